"""Shared test set-up, imported by tests/conftest.py and by the test modules that cannot use a fixture
(module-scoped fixtures, hypothesis tests): the in-process CLI runner (:mod:`helpers.cli`), the
audio-visual checkpoint builder (:mod:`helpers.checkpoints`) and a reader of rich's terminal tables
(:mod:`helpers.terminal`)."""
