"""Rewrite: the math of ABRi (:mod:`.abri`), re-learning (:mod:`.relearn`) and BN recalibration
(:mod:`.recalibrate`), and the rewrite methods registered by name (:mod:`.methods`)."""
