"""Synthetic H&E-like tiles and slides for the demo, the testbed and the tests (no real data needed)."""
