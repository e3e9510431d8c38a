"""One-stage ConStruct training: AdamW + poly schedule, validation, checkpoints, resume, DDP."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from construct.checkpoint import (
    backbone_identity,
    check_backbones,
    check_classes,
    check_student,
    load_checkpoint,
    require_stage,
    save_checkpoint,
)
from construct.classes import ClassSet
from construct.config import Config, TrainConfig, config_to_dict, save_config
from construct.data.check import check_config_data
from construct.data.datasets import collate_same_size, eval_dataset, train_dataset
from construct.engine.data import ResumableSampler, SeededAugmentation
from construct.engine.distributed import DistInfo, barrier
from construct.engine.guard import FiniteLossGuard, TrainingError
from construct.engine.objective import ConStructObjective
from construct.engine.validate import validate
from construct.errors import CheckpointError, os_error_reason
from construct.models.build import build_model, build_teacher, student_checkpoint
from construct.models.construct import ConStructModel
from construct.models.graphs import enable_fast_path


@dataclass
class TrainResult:
    iterations: int
    best_miou: float
    best_iteration: int
    work_dir: Path


def parameter_report(groups: dict[str, list[torch.nn.Parameter]]) -> str:
    """Total and trainable parameters per group, and the trainable share of everything."""
    rows = []
    grand_total = grand_trainable = 0
    for name, params in groups.items():
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        grand_total += total
        grand_trainable += trainable
        rows.append(f"  {name:<16} {total:>13,} total {trainable:>12,} trainable")
    share = 100.0 * grand_trainable / max(grand_total, 1)
    rows.append(f"  {'all':<16} {grand_total:>13,} total {grand_trainable:>12,} trainable ({share:.2f}%)")
    return "parameters:\n" + "\n".join(rows)


def poly_lambda(total_iterations: int, power: float, warmup_iters: int = 0,
                warmup_ratio: float = 1e-6) -> Callable[[int], float]:
    """Poly decay lr_t = lr_0 · (1 − t/T)^power, after an optional linear warm-up of W iterations.

    The warm-up has the released code's form: the multiplier rises linearly from ``warmup_ratio`` at
    t = 0 towards 1, and the decay then runs as (1 − (t − W)/T)^power (T, not T − W, in the
    denominator). W = 0 is the plain poly decay.
    """
    total = max(total_iterations, 1)

    def multiplier(step: int) -> float:
        if step < warmup_iters:
            return 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
        return max(0.0, 1.0 - (step - warmup_iters) / total) ** power

    return multiplier


def mixed_precision(train_cfg: TrainConfig, device: torch.device) -> tuple[bool, torch.dtype, bool]:
    """(autocast on, its dtype, loss scaling on) for training on ``device``: autocast only on CUDA;
    fp16 needs loss scaling (the released code's GradScaler), bf16 has fp32's range and does not."""
    enabled = train_cfg.mixed_precision and device.type == "cuda"
    dtype = getattr(torch, train_cfg.autocast_dtype)
    return enabled, dtype, enabled and dtype == torch.float16


def refuse_existing_run(config: Config, resume: bool, overwrite: bool) -> None:
    """An existing run is reused only with --resume or --overwrite (checked before any other work)."""
    work_dir = Path(config.work_dir)
    if (work_dir / "latest.pth").exists() and not (resume or overwrite):
        raise TrainingError(
            f"{work_dir} already holds a run (latest.pth); pass --resume to continue it or --overwrite to start again"
        )


def prepare_work_dir(config: Config) -> None:
    """Create the run folder and check that it is writable."""
    work_dir = Path(config.work_dir)
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        probe = work_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise TrainingError(f"{work_dir}: work dir is not writable ({os_error_reason(exc, work_dir)})") from None


class JsonlLogger:
    """Appends one JSON object per line; mirrors scalars to TensorBoard when it is installed."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                self.tensorboard = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("iteration", "epoch"):
                    self.tensorboard.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["iteration"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def train(
    config: Config,
    dist_info: DistInfo,
    resume: str | Path | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train ConStruct as configured; returns where the run ended and its best validation mIoU.

    The data check (construct.data.check) reads every label, tile header and val/test mask first:
    a dataset problem stops the run before anything is written or built.
    """
    checkpoint = load_checkpoint(resume) if resume is not None else None
    if checkpoint is not None:  # a checkpoint of the other stage is one line, before the data check
        require_stage(checkpoint, 1, resume, "main.py --resume")
    refuse_existing_run(config, resume is not None, overwrite)
    report = check_config_data(config, ("train", config.data.val_split, "test"), progress=dist_info.is_main)
    if dist_info.is_main:
        print(report.summary())
    report.raise_if_problems()
    device = dist_info.device
    work_dir = Path(config.work_dir)
    if checkpoint is not None:
        check_student(checkpoint, config.model.student.name, resume)
    if dist_info.is_main:
        prepare_work_dir(config)
        save_config(config, work_dir / "config.yaml")
        if checkpoint is None:
            (work_dir / "log.jsonl").unlink(missing_ok=True)

    train_set = train_dataset(config, augment=False)
    val_set = eval_dataset(config, config.data.val_split)
    train_cfg = config.train
    sampler = ResumableSampler(len(train_set), train_cfg.batch_size, train_cfg.seed, dist_info.rank, dist_info.world_size)
    if sampler.batches_per_epoch == 0:
        raise TrainingError(
            f"{config.data.root}: {len(train_set)} training images give no full batch of "
            f"train.batch_size={train_cfg.batch_size} per process"
        )
    workers = config.data.num_workers
    cuda_fast = train_cfg.fast_path and device.type == "cuda"
    if train_cfg.fast_path and not cuda_fast and dist_info.is_main:
        print(f"note: train.fast_path on {device}: CUDA graphs, bf16 towers and fused AdamW need CUDA; "
              "only the deferred non-finite-loss check applies")
    # The fast path keeps its workers between epochs and a deeper queue, so decoding never stalls a step.
    fast_loader = cuda_fast and workers > 0
    train_loader = DataLoader(SeededAugmentation(train_set, train_cfg.seed), batch_size=train_cfg.batch_size,
                              sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                              persistent_workers=fast_loader, prefetch_factor=4 if fast_loader else None)
    val_loader = DataLoader(val_set, batch_size=config.inference.batch_size, num_workers=workers,
                            collate_fn=collate_same_size)

    model = build_model(config, device)
    teacher = build_teacher(config, device) if config.loss.struct_weight > 0 else None
    objective = ConStructObjective(model, teacher, config).to(device)
    if dist_info.is_main:
        groups = {f"{model.student.name} (frozen)": list(model.student.parameters())}
        if teacher is not None:
            groups["teacher (frozen)"] = list(teacher.parameters())
        groups.update({"adapters": list(model.adapters.parameters()), "prototypes": list(model.prototypes.parameters()),
                       "adaptive_layer": list(model.adaptive_layer.parameters()), "cam_scale": [model.cam_scale]})
        print(parameter_report(groups))

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                                  betas=tuple(train_cfg.betas), **({"fused": True} if cuda_fast else {}))
    iterations_per_epoch = sampler.batches_per_epoch
    total_iterations = iterations_per_epoch * train_cfg.epochs
    if train_cfg.max_iters is not None:
        total_iterations = min(total_iterations, train_cfg.max_iters)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(total_iterations, train_cfg.poly_power,
                                                                          train_cfg.warmup_iters, train_cfg.warmup_ratio))

    identity = backbone_identity(model.student, teacher, student_checkpoint(config), config.model.teacher.checkpoint)
    iteration = 0
    best = {"miou": -1.0, "iteration": 0}
    if checkpoint is not None:
        check_classes(checkpoint, ClassSet.from_config(config).names, resume)
        iteration, best = _restore(checkpoint, resume, model, objective, optimizer, scheduler, identity)
    if cuda_fast:  # after the identity: its fingerprint reads the fp32 weights
        for tower in (model.student, teacher):
            if tower is not None:
                enable_fast_path(tower)

    step_module: torch.nn.Module = objective
    if dist_info.enabled:
        # Buffers stay per rank: each rank keeps its own memory bank of negatives.
        with warnings.catch_warnings():
            # broadcast_buffers=False is still the only way to keep buffers rank-local at init.
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            step_module = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                                  broadcast_buffers=False)

    def state(it: int) -> dict[str, Any]:
        return {
            "stage": 1,
            "model": model.trainable_state_dict(),
            "objective": objective.extra_state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "iteration": it,
            "best": dict(best),
            "config": config_to_dict(config),
            "backbones": identity,
            "classes": list(ClassSet.from_config(config).names),
        }

    logger = JsonlLogger(work_dir / "log.jsonl", dist_info.is_main)
    use_amp, amp_dtype, scale_loss = mixed_precision(train_cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=scale_loss)
    if checkpoint is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    eval_every = train_cfg.eval_interval or iterations_per_epoch
    guard = FiniteLossGuard(work_dir, deferred=train_cfg.fast_path)
    model.train()
    progress = tqdm(total=total_iterations, initial=iteration, desc="train", dynamic_ncols=True,
                    disable=not dist_info.is_main)
    started = time.time()
    try:
        while iteration < total_iterations:
            epoch, start_batch = divmod(iteration, iterations_per_epoch)
            sampler.set_epoch(epoch, start_batch)
            for batch in train_loader:
                images = batch["image"].to(device, non_blocking=True)
                labels = batch["label"].to(device, non_blocking=True)
                objective.set_progress(iteration, total_iterations)
                with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                    losses = step_module(images, labels)
                guard.check(losses, iteration + 1)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(losses["total"]).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                iteration += 1
                log_now = iteration % train_cfg.log_interval == 0
                evaluate_now = iteration % eval_every == 0 or iteration == total_iterations
                checkpoint_now = bool(train_cfg.checkpoint_interval and iteration % train_cfg.checkpoint_interval == 0)
                if not guard.deferred or log_now or evaluate_now or checkpoint_now:  # the host syncs here
                    guard.raise_if_seen()
                    scalars = {k: float(v.detach()) for k, v in losses.items()}
                    progress.set_postfix({k: f"{v:.3f}" for k, v in scalars.items()}, refresh=False)
                progress.update()
                if log_now:
                    logger.log({"kind": "train", "iteration": iteration, "epoch": epoch,
                                "lr": scheduler.get_last_lr()[0], **scalars, "elapsed_s": time.time() - started})
                if evaluate_now:
                    metrics = validate(model, val_loader, config, device) if dist_info.is_main else {}
                    if dist_info.is_main:
                        logger.log({"kind": "val", "iteration": iteration, "epoch": epoch, **metrics})
                        progress.write(f"iteration {iteration}: val mIoU {metrics['miou']:.2f} "
                                       f"mDice {metrics['mdice']:.2f} cls acc {metrics['cls_accuracy']:.1f}")
                        if metrics["miou"] > best["miou"]:
                            best = {"miou": metrics["miou"], "iteration": iteration}
                            save_checkpoint(state(iteration), work_dir / "best.pth")
                if dist_info.is_main and (evaluate_now or checkpoint_now):
                    save_checkpoint(state(iteration), work_dir / "latest.pth")
                if evaluate_now:
                    barrier(dist_info)
                if iteration >= total_iterations:
                    break
    finally:
        progress.close()
        logger.close()
    return TrainResult(iterations=iteration, best_miou=best["miou"], best_iteration=best["iteration"], work_dir=work_dir)


def _restore(checkpoint: dict[str, Any], path: str | Path, model: ConStructModel, objective: ConStructObjective,
             optimizer: torch.optim.Optimizer, scheduler: Any, identity: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Load every piece of a training checkpoint; a mismatch names what differs."""
    check_backbones(checkpoint, identity, path)
    try:
        model.load_trainable_state_dict(checkpoint["model"])
        objective.load_extra_state_dict(checkpoint["objective"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: does not fit this model/config: {exc}") from None
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if torch.cuda.is_available() and checkpoint["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return int(checkpoint["iteration"]), dict(checkpoint["best"])
