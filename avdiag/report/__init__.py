"""Report: render results for people (terminal) and machines (JSON)."""
