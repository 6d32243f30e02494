"""Measure: static per-channel statistics and verdicts (activation probes come with --data)."""
