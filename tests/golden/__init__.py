"""Golden equivalence with the official method code: shared cases, maintenance script, fixtures."""
