"""What the inference scripts share: model/inference options, loading, split data, atomic writes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from construct.cli import add_device_arguments, resolve_device
from construct.config import Config, load_config
from construct.data.datasets import eval_dataset, train_dataset
from construct.inference.predictor import Predictor
from construct.inference.segmenter import SegmenterPredictor, predictor_for
from construct.models.build import load_either_stage
from construct.models.construct import ConStructModel
from construct.models.segmenter import Segmenter

TrainedModel = ConStructModel | Segmenter
"""Either stage's network: the CAM model (stage 1) or the segmenter trained on its pseudo-masks (stage 2)."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --checkpoint, --opts and the device flags (--gpu / --device / --debug)."""
    parser.add_argument("--config", required=True, help="YAML config the checkpoint was trained with (e.g. configs/bcss.yaml)")
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="trained checkpoint (best.pth or latest.pth) of stage 1 (main.py) or stage 2 (construct-train-seg)")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. data.root=/data/BCSS-WSSS inference.presence_gate=0.4")
    add_device_arguments(parser)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """--no-crf, --no-tta, --workers, --max-images."""
    parser.add_argument("--no-crf", action="store_true",
                        help="skip the dense CRF (argmax of the probabilities instead); a stage-2 checkpoint runs "
                        "the CRF only with stage2.crf: true")
    parser.add_argument("--no-tta", action="store_true",
                        help="one plain forward pass instead of test-time augmentation (stage 1: inference.tta over "
                        "inference.tta_factors x inference.tta_flip; stage 2: the flip of stage2.tta_flip, off by default)")
    parser.add_argument("--workers", type=positive_int, default=None, metavar="N",
                        help=f"CRF worker processes (default: all {os.cpu_count()} cores; 1 = serial)")
    parser.add_argument("--max-images", type=positive_int, default=None, metavar="N", help="process only the first N images")


def load_settings(args: argparse.Namespace) -> tuple[Config, torch.device]:
    """Config with --opts, and the device (checked first, so a bad --gpu fails fast)."""
    device = resolve_device(args)
    return load_config(args.config, args.opts), device


def load(args: argparse.Namespace) -> tuple[Config, TrainedModel, torch.device]:
    """:func:`load_settings` plus the trained model of --checkpoint, in eval mode on the device."""
    config, device = load_settings(args)
    return config, load_either_stage(config, args.checkpoint, device), device


def make_predictor(args: argparse.Namespace, config: Config, model: TrainedModel,
                   device: torch.device) -> Predictor | SegmenterPredictor:
    """The predictor of either stage, with --no-tta, --no-crf and --workers applied."""
    return predictor_for(model, config, device, tta=not args.no_tta, crf=not args.no_crf, workers=args.workers)


def split_dataset(config: Config, split: str) -> tuple[Dataset, str]:
    """Dataset of a split and the presence protocol its CAMs are gated with.

    Train tiles are gated with their image-level labels (the pseudo-mask setting of a second-stage
    segmenter) and keep their own size; val/test follow ``inference.presence``.
    """
    if split == "train":
        return train_dataset(config, resize=False), "ground_truth"
    return eval_dataset(config, split), config.inference.presence


def first(dataset: Dataset, count: int | None) -> Dataset:
    """The first ``count`` items (all when None)."""
    return dataset if count is None else Subset(dataset, range(min(count, len(dataset))))


def presence_of(batch: dict) -> torch.Tensor | None:
    """Ground-truth class presence of a batch: the mask's classes (val/test) or the file-name label (train)."""
    return batch.get("presence", batch.get("label"))
