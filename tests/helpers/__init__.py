"""Shared test set-up, imported by tests/conftest.py and by the test modules that cannot use a fixture
(hypothesis tests): the in-process CLI runner (:mod:`helpers.cli`) and the audio-visual checkpoint
builder (:mod:`helpers.checkpoints`)."""
