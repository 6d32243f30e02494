"""Rewrite: ABRi, resets, re-learning, BN recalibration."""
