"""Inference: CAM post-processing, test-time augmentation, tiling, dense CRF and the predictor.

Kept import-light on purpose: CRF pool workers (spawned processes) import ``crf`` from here.
"""
