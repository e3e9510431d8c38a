"""Stage-2 training: a segmenter on stage 1's pseudo-masks (AdamW + poly decay, validation, resume, DDP).

The conventions are stage 1's (construct/engine/trainer.py): a run folder with config.yaml,
latest.pth, best.pth (highest validation mIoU) and log.jsonl; plain-data checkpoints, here marked
``stage: 2``; exact resume (data order, augmentation and RNG state); torchrun DDP; bf16 autocast
on CUDA; a tqdm bar.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from construct.checkpoint import check_classes, load_checkpoint, require_stage, save_checkpoint
from construct.classes import ClassSet
from construct.config import Config, config_to_dict, save_config
from construct.data.datasets import TrainDataset, eval_dataset, train_dataset
from construct.engine.data import ResumableSampler, SeededAugmentation
from construct.engine.distributed import DistInfo, barrier
from construct.engine.guard import FiniteLossGuard, TrainingError
from construct.engine.pseudo_masks import IGNORE_INDEX, PseudoMasks, make_pseudo_masks
from construct.engine.trainer import (
    JsonlLogger,
    TrainResult,
    parameter_report,
    poly_lambda,
    prepare_work_dir,
    refuse_existing_run,
)
from construct.errors import CheckpointError
from construct.inference.segmenter import SegmenterPredictor
from construct.metrics import ConfusionMatrix
from construct.models.segmenter import Segmenter, SegmenterArchitecture, architecture_for, build_segmenter

HEAD_LR_FACTOR = 10.0
"""The decode head starts random and learns at this multiple of stage2.lr (the encoder is pretrained)."""


def stage2_work_dir(config: Config) -> Path:
    """``stage2.work_dir``, or ``<work_dir>/stage2``."""
    return Path(config.stage2.work_dir or Path(config.work_dir) / "stage2")


def stage1_checkpoint(config: Config) -> Path:
    """``stage2.checkpoint``, or stage 1's ``<work_dir>/best.pth``."""
    return Path(config.stage2.checkpoint or Path(config.work_dir) / "best.pth")


def segmenter_architecture(config: Config) -> SegmenterArchitecture:
    stage2 = config.stage2
    return architecture_for(len(config.data.classes), stage2.backbone, stage2.preset or config.model.teacher.preset)


def encoder_weights(config: Config) -> str | None:
    """The MiT file the encoder starts from: stage2.encoder_checkpoint, else the teacher's (validated to fit)."""
    return config.stage2.encoder_checkpoint or config.model.teacher.checkpoint


class PseudoMaskDataset(Dataset):
    """Train tiles with their pseudo-masks: items ``{"image", "mask", "name"}`` (``mask`` H×W int64,
    :data:`IGNORE_INDEX` where the noisy-label guard leaves pixels out)."""

    def __init__(self, tiles: TrainDataset, pseudo: PseudoMasks, ignore: str, confidence_threshold: float) -> None:
        self.tiles = tiles
        self.pseudo = pseudo
        self.ignore = ignore
        self.confidence_threshold = confidence_threshold

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> dict:
        item = self.tiles[index]
        return {"image": item["image"], "mask": self.pseudo.labels(item["name"], self.ignore, self.confidence_threshold),
                "name": item["name"]}


@torch.no_grad()
def validate_segmenter(model: Segmenter, loader: DataLoader, config: Config, device: torch.device) -> dict[str, float]:
    """mIoU and mDice of the plain segmenter (no TTA, no CRF; the background prior as at test time)."""
    was_training = model.training
    predictor = SegmenterPredictor(model, config, device, tta=False, crf=False)
    confusion = ConfusionMatrix(ClassSet.from_config(config).all_names)
    for batch in loader:
        predictions = predictor.predict_batch(batch["image"], names=batch["name"])
        confusion.update(torch.from_numpy(np.stack([p.mask for p in predictions])).long(), batch["mask"])
    model.train(was_training)
    metrics = confusion.compute(config.evaluation.background)
    return {"miou": metrics.miou, "mdice": metrics.mdice}


def train_segmenter(config: Config, dist_info: DistInfo, resume: str | Path | None = None,
                    overwrite: bool = False) -> TrainResult:
    """Train the stage-2 segmenter as ``config.stage2`` says; returns where it ended and its best val mIoU."""
    device = dist_info.device
    stage2 = config.stage2
    work_dir = stage2_work_dir(config)
    classes = ClassSet.from_config(config)
    source = stage1_checkpoint(config)
    # The inputs' stages and classes are checked before any tile is predicted.
    stage1 = load_checkpoint(source)
    require_stage(stage1, 1, source, "stage2.checkpoint (where the pseudo-masks come from)")
    check_classes(stage1, classes.names, source)
    del stage1
    checkpoint = load_checkpoint(resume) if resume is not None else None
    if checkpoint is not None:
        require_stage(checkpoint, 2, resume, "construct-train-seg --resume")
        check_classes(checkpoint, classes.names, resume)
    run_config = dataclasses.replace(config, work_dir=str(work_dir))
    refuse_existing_run(run_config, resume is not None, overwrite)
    if dist_info.is_main:
        prepare_work_dir(run_config)
        save_config(config, work_dir / "config.yaml")
        if checkpoint is None:
            (work_dir / "log.jsonl").unlink(missing_ok=True)
    barrier(dist_info)

    tiles = train_dataset(config)
    # Beside the stage-1 checkpoint: every stage-2 run of that checkpoint (other seeds, sizes, guards) shares them.
    pseudo = make_pseudo_masks(config, source, tiles, source.parent / "pseudo_masks", dist_info)
    if checkpoint is not None and checkpoint["pseudo_masks"]["key"] != pseudo.key:
        raise CheckpointError(f"{resume}: was trained on pseudo-masks {checkpoint['pseudo_masks']['key']}; "
                              f"{source} and this config give {pseudo.key} (start again with --overwrite)")
    train_set = PseudoMaskDataset(tiles, pseudo, stage2.ignore, stage2.confidence_threshold)
    sampler = ResumableSampler(len(train_set), stage2.batch_size, stage2.seed, dist_info.rank, dist_info.world_size)
    if sampler.batches_per_epoch == 0:
        raise TrainingError(f"{config.data.root}: {len(train_set)} training images give no full batch of "
                            f"stage2.batch_size={stage2.batch_size} per process")
    workers = config.data.num_workers
    # Its own generator: a new epoch's iterator then draws nothing from the global one, which the
    # encoder's stochastic depth uses and a checkpoint restores.
    train_loader = DataLoader(SeededAugmentation(train_set, stage2.seed), batch_size=stage2.batch_size, sampler=sampler,
                              num_workers=workers, pin_memory=device.type == "cuda",
                              generator=torch.Generator().manual_seed(stage2.seed))
    val_loader = DataLoader(eval_dataset(config, config.data.val_split), batch_size=config.inference.batch_size,
                            num_workers=workers)

    architecture = segmenter_architecture(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stage2.seed)
        model = build_segmenter(architecture, encoder_weights(config) if checkpoint is None else None).to(device)
    if dist_info.is_main:
        print(parameter_report({"encoder": model.encoder_parameters(), "decode head": model.head_parameters()}))
    optimizer = torch.optim.AdamW([{"params": model.encoder_parameters(), "lr": stage2.lr},
                                   {"params": model.head_parameters(), "lr": stage2.lr * HEAD_LR_FACTOR}],
                                  lr=stage2.lr, weight_decay=stage2.weight_decay)
    total = stage2.iterations
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(total, stage2.poly_power))
    iteration, best = 0, {"miou": -1.0, "iteration": 0}
    if checkpoint is not None:
        iteration, best = _restore(checkpoint, resume, model, optimizer, scheduler)
    else:  # the encoder's stochastic depth draws from the global generator: a run is repeatable from its seed
        torch.manual_seed(stage2.seed + dist_info.rank)

    step_model: torch.nn.Module = model
    if dist_info.enabled:
        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def state(it: int) -> dict[str, Any]:
        return {
            "stage": 2,
            "architecture": architecture.to_dict(),
            "model": model.segformer.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "iteration": it,
            "best": dict(best),
            "config": config_to_dict(config),
            "classes": list(classes.names),
            "pseudo_masks": {"stage1_checkpoint": str(source), "key": pseudo.key, "ignore": stage2.ignore},
        }

    logger = JsonlLogger(work_dir / "log.jsonl", dist_info.is_main)
    use_amp = stage2.mixed_precision and device.type == "cuda"
    guard = FiniteLossGuard(work_dir, deferred=False)
    per_epoch = sampler.batches_per_epoch
    model.train()
    progress = tqdm(total=total, initial=iteration, desc="train segmenter", dynamic_ncols=True,
                    disable=not dist_info.is_main)
    started = time.time()
    try:
        while iteration < total:
            epoch, start_batch = divmod(iteration, per_epoch)
            sampler.set_epoch(epoch, start_batch)
            for batch in train_loader:
                images = batch["image"].to(device, non_blocking=True)
                targets = batch["mask"].to(device, non_blocking=True)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = step_model(images)
                logits = F.interpolate(logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)
                loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
                losses = {"ce": loss, "total": loss}
                guard.check(losses, iteration + 1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                iteration += 1
                value = float(loss.detach())
                progress.set_postfix({"ce": f"{value:.3f}"}, refresh=False)
                progress.update()
                if iteration % stage2.log_interval == 0:
                    logger.log({"kind": "train", "iteration": iteration, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                                "ce": value, "elapsed_s": time.time() - started})
                evaluate_now = iteration % stage2.eval_interval == 0 or iteration == total
                checkpoint_now = bool(stage2.checkpoint_interval and iteration % stage2.checkpoint_interval == 0)
                if evaluate_now and dist_info.is_main:
                    metrics = validate_segmenter(model, val_loader, config, device)
                    logger.log({"kind": "val", "iteration": iteration, "epoch": epoch, **metrics})
                    progress.write(f"iteration {iteration}: val mIoU {metrics['miou']:.2f} mDice {metrics['mdice']:.2f}")
                    if metrics["miou"] > best["miou"]:
                        best = {"miou": metrics["miou"], "iteration": iteration}
                        save_checkpoint(state(iteration), work_dir / "best.pth")
                if dist_info.is_main and (evaluate_now or checkpoint_now):
                    save_checkpoint(state(iteration), work_dir / "latest.pth")
                if evaluate_now:
                    barrier(dist_info)
                if iteration >= total:
                    break
    finally:
        progress.close()
        logger.close()
    return TrainResult(iterations=iteration, best_miou=best["miou"], best_iteration=best["iteration"], work_dir=work_dir)


def _restore(checkpoint: dict[str, Any], path: str | Path, model: Segmenter, optimizer: torch.optim.Optimizer,
             scheduler: Any) -> tuple[int, dict[str, Any]]:
    """Load a stage-2 training checkpoint; a mismatch names what differs."""
    saved = SegmenterArchitecture.from_dict(checkpoint.get("architecture") or {}, str(path))
    if saved != model.architecture:
        raise CheckpointError(f"{path}: holds a {saved.backbone} {saved.preset} segmenter, this config gives "
                              f"{model.architecture.backbone} {model.architecture.preset}")
    try:
        model.segformer.load_state_dict(checkpoint["model"], strict=True)
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: does not fit this segmenter/config: {exc}") from None
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if torch.cuda.is_available() and checkpoint["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return int(checkpoint["iteration"]), dict(checkpoint["best"])
