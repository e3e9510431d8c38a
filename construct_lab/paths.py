"""Where the lab finds the checkout it runs in.

The lab (demo, testbed, benchmarks, GPU check) is not part of the installed wheel: it runs from a
clone, whose configs/ and docs/ it reads and writes. The library itself never locates the clone.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The root of the checkout holding this package."""
