"""Generator seeds of the testbed: every use of synthetic images draws from its own tagged stream.

The BCSS-format splits use tags 0 (train), 1 (val) and 2 (test), so pretraining and the premise
measurements never see a tile of the splits a model is trained or evaluated on.
"""

from __future__ import annotations

import numpy as np

PURE_TAG, MIXED_TAG, TEXTURE_TAG, HELD_OUT_PURE_TAG, HELD_OUT_MIXED_TAG = 10, 11, 12, 13, 14


def tagged_rng(seed: int, tag: int, index: int) -> np.random.Generator:
    """The generator of image ``index`` of one use (``tag``)."""
    return np.random.default_rng([seed, tag, index])
