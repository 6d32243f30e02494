"""Terminal rendering of each command's result: one module per command, rich tables on a Console."""
