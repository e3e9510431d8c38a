"""The Python API: load a trained checkpoint, segment tiles and whole slides.

    import construct
    segmenter = construct.load_segmenter("work_dirs/bcss/construct/best.pth", device="cuda")
    result = segmenter.predict_tile("tile.png")       # result.mask: H×W class indices, result.class_names
    report = segmenter.predict_slide("slide.svs", "out/")   # masks, overview, GeoJSON, areas JSON

It runs the same inference as the command-line tools (construct/commands), with the settings of
the config the checkpoint was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from construct.classes import ClassSet
from construct.config import Config, load_config
from construct.data.io import read_image
from construct.errors import ConStructError
from construct.inference.predictor import Prediction
from construct.inference.segmenter import predictor_for
from construct.inference.slide import open_slide, predict_slide
from construct.models.build import load_either_stage


@dataclass
class TileResult:
    """A tile's segmentation, in the dataset's own mask values."""

    mask: np.ndarray
    """H×W uint8: the dataset's mask value of each pixel (as in its ground-truth masks)."""
    class_names: tuple[str, ...]
    """Name of each class, in label order, then the background."""
    mask_values: tuple[int, ...]
    """The mask value of each entry of ``class_names``."""
    scores: np.ndarray
    """(C,) image-level class scores in [0, 1]."""
    prediction: Prediction
    """The full prediction (internal class indices, per-class probabilities, presence)."""


class Segmenter:
    """A trained model with its config's inference settings; close it (or use ``with``) when done."""

    def __init__(self, config: Config, checkpoint: str | Path, device: str | torch.device = "cpu",
                 tta: bool = True, crf: bool = True) -> None:
        self.config = config
        self.device = torch.device(device)
        self.checkpoint = Path(checkpoint)
        self.classes = ClassSet.from_config(config)
        model = load_either_stage(config, checkpoint, self.device)  # stage 1 (CAMs) or stage 2 (segmenter)
        self.predictor = predictor_for(model, config, self.device, tta=tta, crf=crf)

    def predict_tile(self, image: str | Path | np.ndarray) -> TileResult:
        """Segment one RGB image (a file or an H×W×3 uint8 array) of any size; predicted class presence
        (a stage-2 checkpoint is not gated)."""
        pixels = read_image(image) if isinstance(image, str | Path) else np.asarray(image)
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ConStructError(f"expected an H×W×3 uint8 RGB image, got {pixels.dtype} of shape {pixels.shape}")
        batch = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        prediction = self.predictor.predict_batch(batch, protocol="predicted")[0]
        return TileResult(mask=self.classes.to_dataset(prediction.mask), class_names=self.classes.all_names,
                          mask_values=self.classes.mask_values, scores=prediction.scores, prediction=prediction)

    def predict_slide(self, slide: str | Path, out_dir: str | Path, regions: bool = True,
                      mpp: float | None = None) -> dict[str, Any]:
        """Predict a whole slide into ``out_dir`` (as ``construct-predict-slides``); returns its areas report.

        ``mpp`` gives the slide's µm/px where the file does not record it.
        """
        opened = open_slide(Path(slide), self.config, mpp)
        try:
            return predict_slide(opened, self.predictor, Path(out_dir), regions=regions,
                                 provenance={"checkpoint": str(self.checkpoint)})
        finally:
            opened.reader.close()

    def close(self) -> None:
        self.predictor.close()

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def load_segmenter(checkpoint: str | Path, config: str | Path | None = None, device: str | torch.device = "cpu",
                   opts: list[str] | None = None, tta: bool = True, crf: bool = True) -> Segmenter:
    """A :class:`Segmenter` for ``checkpoint``; ``config`` defaults to the config.yaml training wrote beside it.

    ``opts`` are config overrides as on the command line (``["inference.presence_gate=0.4"]``).
    """
    checkpoint = Path(checkpoint)
    config_path = Path(config) if config is not None else checkpoint.parent / "config.yaml"
    if config is None and not config_path.is_file():
        raise ConStructError(f"{checkpoint}: no config.yaml beside it; pass config= (the YAML it was trained with)")
    return Segmenter(load_config(config_path, opts or []), checkpoint, device, tta=tta, crf=crf)
