"""Workflows: one module per command (inspect, diff, reinit, conflict, check, report), each composing the
pipeline stages load -> locate -> measure -> rewrite -> report over a :class:`Subject` (the checkpoint,
opened once) and a :class:`DataSource` (the data, decoded once)."""
