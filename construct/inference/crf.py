"""Dense CRF refinement of 5-channel class probabilities (method.md §7), serial or over a process pool."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

from construct.config import CrfConfig


def dense_crf(image: np.ndarray, probs: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """Refine ``probs`` (C×H×W, values in [0, 1]) on ``image`` (H×W×3 uint8); returns H×W uint8 labels.

    Unary = −log(prob) (clipped at 1e-5); a Gaussian smoothness kernel and a bilateral
    appearance kernel; ``cfg.iterations`` mean-field steps; argmax of the marginals.
    """
    num_labels, height, width = probs.shape
    if image.shape != (height, width, 3):
        raise ValueError(f"image {image.shape} does not match probabilities {probs.shape}")
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32, copy=False))))
    crf.addPairwiseGaussian(sxy=cfg.gaussian_sxy, compat=cfg.gaussian_compat)
    crf.addPairwiseBilateral(sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=cfg.bilateral_compat)
    marginals = np.asarray(crf.inference(cfg.iterations), dtype=np.float32)
    return marginals.reshape(num_labels, height, width).argmax(axis=0).astype(np.uint8)


def _dense_crf_pair(pair: tuple[np.ndarray, np.ndarray], cfg: CrfConfig) -> np.ndarray:
    return dense_crf(pair[0], pair[1], cfg)


class CrfPool:
    """Runs :func:`dense_crf` over many images, in a reusable pool of spawned worker processes.

    ``workers`` = None uses every core; 1 runs serially in this process. Spawned (not forked)
    workers are safe next to CUDA and torch's thread pools. The pool starts on first use and is
    kept until :meth:`close`, so a long evaluation pays the start-up once.
    """

    def __init__(self, cfg: CrfConfig, workers: int | None = None) -> None:
        self.cfg = cfg
        self.workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        self._executor: ProcessPoolExecutor | None = None

    def __call__(self, images: Sequence[np.ndarray], probs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(images) != len(probs):
            raise ValueError(f"{len(images)} images but {len(probs)} probability maps")
        job = partial(_dense_crf_pair, cfg=self.cfg)
        if self.workers == 1 or len(images) <= 1:
            return [job(pair) for pair in zip(images, probs)]
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return list(self._executor.map(job, zip(images, probs)))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def __enter__(self) -> CrfPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def crf_batch(images: Sequence[np.ndarray], probs: Sequence[np.ndarray], cfg: CrfConfig,
              workers: int | None = None) -> list[np.ndarray]:
    """:func:`dense_crf` on every (image, probs) pair; same labels whatever ``workers`` is."""
    with CrfPool(cfg, workers) as pool:
        return pool(images, probs)
