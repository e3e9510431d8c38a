"""GPU-check children that train: step throughput and peak memory of every bench variant on the
eager and the fast path, the two paths' losses over the same batches, and DDP.

All reuse construct_lab.bench's objective, random batch and step, so they time exactly what
``python -m construct_lab.bench`` times. The fast path (``train.fast_path``) needs CUDA; in a
CPU dry run its rows run the eager step with the deferred non-finite check, as main.py would.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from construct.config import config_to_dict
from construct.engine.guard import FiniteLossGuard
from construct_lab.bench import VARIANTS, peak_memory_mib, synchronize, training_batch, training_objective, training_step
from construct_lab.gpu_check.plan import Plan, check_config, nccl_version, reserved_memory_mib, reset_peak_memory


def largest_batch(peak_mib: Callable[[int], float | None], limit_mib: float, known: dict[int, float],
                  max_batch: int, max_probes: int = 4) -> tuple[int | None, dict[int, float]]:
    """The largest batch (≤ ``max_batch``) whose peak memory stays within ``limit_mib``.

    ``peak_mib(batch)`` measures one batch size (None: out of memory); ``known`` holds batch sizes
    measured already. Peak memory grows about linearly with the batch, so each probe goes where a
    line fitted through the measurements so far crosses the limit, kept between the largest batch
    known to fit and the smallest known not to. Returns the batch (None if none fits) and every
    measurement, infinity marking out of memory.
    """
    probes = dict(known)
    for _ in range(max_probes):
        fits = [b for b, m in probes.items() if m <= limit_mib]
        best = max(fits, default=0)
        ceiling = min((b for b, m in probes.items() if m > limit_mib), default=max_batch + 1)
        if best + 1 >= ceiling:
            break
        finite = sorted((b, m) for b, m in probes.items() if math.isfinite(m))
        if len(finite) >= 2:
            (b1, m1), (b2, m2) = finite[-2], finite[-1]
            slope = (m2 - m1) / (b2 - b1)
            guess = math.floor(b2 + (limit_mib - m2) / slope) if slope > 0 else ceiling - 1
        elif best:
            guess = 2 * best
        else:
            guess = max(1, (ceiling - 1) // 2)
        candidate = min(max(guess, best + 1 if fits else 1), ceiling - 1)
        if candidate <= best or candidate in probes:
            break
        measured = peak_mib(candidate)
        probes[candidate] = math.inf if measured is None else measured
    fits = [b for b, m in probes.items() if m <= limit_mib]
    return (max(fits) if fits else None), probes


FAST_SYNC_EVERY = 5
"""Fast-path steps between host syncs while timing (the fast trainer syncs only at log lines)."""


def measure_steps(step: Callable[[], dict[str, torch.Tensor]], device: torch.device, batch: int, plan: Plan,
                  sync_every: int = 1) -> dict[str, Any]:
    """Time ``step`` after a warm-up: at least 3 steps and 1.5 s, at most 15 steps (one step, no warm-up, in a dry run).

    The clock is read after a device sync every ``sync_every`` steps (an eager step syncs itself).
    """
    warmup, min_steps, max_steps, min_seconds = (0, 1, 1, 0.0) if plan.dry_run else (2, 3, 15, 1.5)
    reset_peak_memory(device)
    for _ in range(warmup):  # allocator, kernels, cuDNN choices, optimizer state, memory bank, CUDA graphs
        step()
    synchronize(device)
    started = time.perf_counter()
    steps = 0
    while True:
        losses = step()
        steps += 1
        if steps % sync_every and steps < max_steps:
            continue
        synchronize(device)
        elapsed = time.perf_counter() - started
        if steps >= max_steps or (steps >= min_steps and elapsed >= min_seconds) or plan.time_left() < 0:
            break
    seconds = elapsed / steps
    values = {name: float(value.detach()) for name, value in losses.items()}
    if not all(math.isfinite(v) for v in values.values()):
        raise FloatingPointError(f"non-finite loss at batch {batch}: {values}")
    return {"batch": batch, "steps": steps, "seconds_per_step": seconds, "steps_per_s": 1 / seconds,
            "images_per_s": batch / seconds, "peak_memory_mib": peak_memory_mib(device),
            "peak_reserved_mib": reserved_memory_mib(device), "losses": values}


class _VariantRunner:
    """Builds each variant's objective (and a fresh optimizer) around one student and one teacher
    per model config and path (eager, fast): real-size random towers take seconds to build, the
    fast ones are copies of the eager ones. Only the student of the path measured is on the
    device, and the teacher waits on the CPU while a variant without L_struct runs, so neither
    counts in another measurement's peak memory. (A tower that moved captures its graphs again.)"""

    def __init__(self, plan: Plan, device: torch.device, result: dict[str, Any]) -> None:
        from construct.models.build import build_model, build_teacher

        self.build_model, self.build_teacher = build_model, build_teacher
        self.plan, self.device, self.result = plan, device, result
        self.models: dict[str, torch.nn.Module] = {}
        self.teachers: dict[str, torch.nn.Module] = {}

    def objective(self, variant: str, fast: bool = False):
        config = check_config(self.plan.dry_run, *VARIANTS[variant])
        eager_key = json.dumps(config_to_dict(config)["model"], sort_keys=True)
        if eager_key not in self.models:
            started = time.perf_counter()
            self.models[eager_key] = self.build_model(config, self.device)
            self.result.setdefault("model_build_s", time.perf_counter() - started)
        key = eager_key + (" fast" if fast else "")
        if key not in self.models:
            self.models[key] = copy.deepcopy(self.models[eager_key])
        for name, model in self.models.items():
            model.to(self.device if name == key else "cpu")
        teacher = None
        if config.loss.struct_weight > 0:
            if eager_key not in self.teachers:
                self.teachers[eager_key] = self.build_teacher(config, "cpu")
            if key not in self.teachers:
                self.teachers[key] = copy.deepcopy(self.teachers[eager_key])
            teacher = self.teachers[key].to(self.device)
        cuda_fast = fast and self.device.type == "cuda"
        return config, *training_objective(config, self.models[key], teacher, self.device, fast=cuda_fast)

    def release(self) -> None:
        for model in self.models.values():
            model.zero_grad(set_to_none=True)
        for teacher in self.teachers.values():
            teacher.to("cpu")
        gc.collect()
        reset_peak_memory(self.device)


def run_training_bench(plan: Plan) -> bool:
    """Every bench variant at ``plan.batch``, then the largest batch within the memory limit.

    Returns False when a measurement failed (the others still run) or when time ran out before
    one the check needs: any at batch 10, or a search of the default objective, the paper's
    setting or cls + struct. Searches of the other variants left out for time are only recorded.
    """
    device = torch.device(plan.device)
    use_bf16 = device.type == "cuda"
    result: dict[str, Any] = {"batch": plan.batch, "memory_limit_mib": plan.memory_limit_mib, "bf16": use_bf16,
                              "variants": {name: {"overrides": list(overrides)} for name, overrides in VARIANTS.items()}}
    runner = _VariantRunner(plan, device, result)
    ok = True

    def attempt(variant: str, what: str, action: Callable[[str, dict[str, Any]], None], required: bool = True) -> None:
        nonlocal ok
        entry = result["variants"][variant]
        if plan.time_left() < (0 if plan.dry_run else 8):
            entry.setdefault("skipped", []).append(f"{what}: out of time")
            ok = ok and not required
        else:
            try:
                action(variant, entry)
            except Exception as exc:  # recorded; the next variant still runs
                entry.setdefault("errors", []).append(f"{what}: {type(exc).__name__}: {exc}")
                ok = False
            finally:
                runner.release()
        plan.save_result(result)

    def at_batch(variant: str, entry: dict[str, Any]) -> None:
        config, objective, optimizer = runner.objective(variant)
        torch.manual_seed(0)
        images, labels = training_batch(plan.batch, device, config)
        entry["present_classes"] = int(labels.sum())

        def step() -> dict[str, torch.Tensor]:
            losses = training_step(objective, optimizer, images, labels, use_bf16)
            synchronize(device)  # the eager trainer syncs every step too (the finite-loss check)
            return losses

        entry["at_batch"] = measure_steps(step, device, plan.batch, plan)
        print(f"  {variant} at batch {plan.batch}: {entry['at_batch']['seconds_per_step']:.3f} s/step, "
              f"peak {entry['at_batch']['peak_memory_mib']:.0f} MiB", flush=True)

    def at_batch_fast(variant: str, entry: dict[str, Any]) -> None:
        config, objective, optimizer = runner.objective(variant, fast=True)
        torch.manual_seed(0)
        images, labels = training_batch(plan.batch, device, config)
        guard = FiniteLossGuard(Path(plan.result_path).parent, deferred=True)
        steps = [0]

        def step() -> dict[str, torch.Tensor]:
            losses = training_step(objective, optimizer, images, labels, use_bf16)
            steps[0] += 1
            guard.check(losses, steps[0])  # on the device, as the fast trainer does
            return losses

        entry["at_batch_fast"] = measure_steps(step, device, plan.batch, plan, sync_every=FAST_SYNC_EVERY)
        guard.raise_if_seen()
        entry["at_batch_fast"]["cuda_graphs"] = cuda_graph_count(objective)
        print(f"  {variant} at batch {plan.batch}, fast path: {entry['at_batch_fast']['seconds_per_step']:.3f} s/step, "
              f"peak {entry['at_batch_fast']['peak_memory_mib']:.0f} MiB", flush=True)

    def largest(variant: str, entry: dict[str, Any]) -> None:
        config, objective, optimizer = runner.objective(variant)

        def peak_at(batch: int) -> float | None:
            torch.manual_seed(0)
            reset_peak_memory(device)
            try:
                images, labels = training_batch(batch, device, config)
                training_step(objective, optimizer, images, labels, use_bf16)  # peaks in the backward pass
                synchronize(device)
            except torch.cuda.OutOfMemoryError:
                return None
            finally:
                images = labels = None
                objective.zero_grad(set_to_none=True)
            peak = peak_memory_mib(device)
            print(f"  {variant}: batch {batch} peaks at {peak:.0f} MiB", flush=True)
            return peak

        known = {plan.batch: entry["at_batch"]["peak_memory_mib"]} if "at_batch" in entry else {}
        best, probes = largest_batch(peak_at, plan.memory_limit_mib, known, plan.max_batch)
        entry["batch_probes_mib"] = {str(b): (m if math.isfinite(m) else "out of memory") for b, m in sorted(probes.items())}
        if best is None:
            raise RuntimeError(f"no batch size fits in {plan.memory_limit_mib:.0f} MiB")
        torch.manual_seed(0)
        images, labels = training_batch(best, device, config)

        def step() -> dict[str, torch.Tensor]:
            losses = training_step(objective, optimizer, images, labels, use_bf16)
            synchronize(device)
            return losses

        entry["largest_batch"] = measure_steps(step, device, best, plan)
        entry["largest_batch"]["limited_by"] = "memory" if best < plan.max_batch else f"the search's upper end ({plan.max_batch})"

    for name in VARIANTS:
        attempt(name, f"batch {plan.batch}", at_batch)
    for name in VARIANTS:  # after every eager row: the fast towers are copies that stay bf16
        attempt(name, f"batch {plan.batch}, fast path", at_batch_fast)
    searched = sorted(VARIANTS, key=lambda name: search_priority(name, plan.dry_run))
    for name in searched[:1] if plan.dry_run else searched:  # one search shows a dry run works
        attempt(name, "largest batch", largest, required=search_priority(name, plan.dry_run) <= 2)
    return ok


def cuda_graph_count(objective: torch.nn.Module) -> int:
    """CUDA graphs the frozen towers of ``objective`` captured (0: the fast path did not engage)."""
    towers = (objective.model.student, objective.teacher)
    return sum(len(tower.graphs) for tower in towers if tower is not None and tower.graphs is not None)


MATCH_STEPS = {False: 50, True: 3}
"""Batches of the eager/fast comparison (the issue's 50; 3 in a dry run)."""
MATCH_TOLERANCE = 0.02
"""Largest relative difference of the total loss at any step that still counts as a match. The eager
step already runs in bf16 autocast, and the fast path stores the frozen weights as autocast casts
them, so the paths differ by kernel choices and fused AdamW's rounding; a stale or misplaced graph
buffer gives differences of order one."""


def run_match(plan: Plan) -> bool:
    """The default objective on the eager and the fast path from the same weights, over the same
    seeded random batches: the losses of every step, side by side, and their largest differences.
    Returns False when they differ by more than MATCH_TOLERANCE."""
    from construct.models.build import build_model, build_teacher

    device = torch.device(plan.device)
    config = check_config(plan.dry_run)
    steps = MATCH_STEPS[plan.dry_run]
    model = build_model(config, "cpu")
    teacher = build_teacher(config, "cpu") if config.loss.struct_weight > 0 else None
    towers = {"eager": (model, teacher), "fast": (copy.deepcopy(model), copy.deepcopy(teacher))}
    result: dict[str, Any] = {"batch": plan.batch, "steps": steps, "tolerance": MATCH_TOLERANCE, "losses": {}}
    for path, (student, frozen_teacher) in towers.items():
        student.to(device)
        if frozen_teacher is not None:
            frozen_teacher.to(device)
        objective, optimizer = training_objective(config, student, frozen_teacher, device,
                                                  fast=path == "fast" and device.type == "cuda")
        trajectory: list[dict[str, float]] = []
        for index in range(steps):
            torch.manual_seed(10_000 + index)
            images, labels = training_batch(plan.batch, device, config)
            losses = training_step(objective, optimizer, images, labels, use_bf16=device.type == "cuda")
            trajectory.append({name: float(value.detach()) for name, value in losses.items()})
        if path == "fast":
            result["cuda_graphs"] = cuda_graph_count(objective)
        result["losses"][path] = trajectory
        student.to("cpu")
        if frozen_teacher is not None:
            frozen_teacher.to("cpu")
        plan.save_result(result)
    result.update(compare_trajectories(result["losses"]["eager"], result["losses"]["fast"]))
    result["match"] = result["max_relative_difference"]["total"] <= MATCH_TOLERANCE
    plan.save_result(result)
    print(f"  eager vs fast over {steps} batches: largest relative difference of the total loss "
          f"{result['max_relative_difference']['total']:.2e} (tolerance {MATCH_TOLERANCE})", flush=True)
    return result["match"]


def compare_trajectories(eager: list[dict[str, float]], fast: list[dict[str, float]]) -> dict[str, Any]:
    """Per loss term: the largest and the median relative difference |fast − eager| / |eager| over the steps."""
    largest: dict[str, float] = {}
    median: dict[str, float] = {}
    for name in eager[0]:
        differences = sorted(abs(f[name] - e[name]) / max(abs(e[name]), 1e-12) for e, f in zip(eager, fast))
        largest[name] = differences[-1] if all(math.isfinite(d) for d in differences) else math.inf
        median[name] = differences[len(differences) // 2]
    return {"max_relative_difference": largest, "median_relative_difference": median}


def run_loader(plan: Plan) -> bool:
    """Images/s of main.py's training loader alone (PNG decoding, augmentation, pinned batches) with
    the fast path's settings, to set beside the step rate: a loader slower than the step stalls it."""
    from torch.utils.data import DataLoader

    from construct.data.datasets import train_dataset
    from construct.engine.data import ResumableSampler, SeededAugmentation

    config = check_config(plan.dry_run, f"data.root={plan.data_root}")
    dataset = train_dataset(config, augment=False)
    batch = config.train.batch_size
    sampler = ResumableSampler(len(dataset), batch, config.train.seed)
    workers = plan.loader_workers
    loader = DataLoader(SeededAugmentation(dataset, config.train.seed), batch_size=batch, sampler=sampler,
                        num_workers=workers, pin_memory=plan.device.startswith("cuda"), persistent_workers=workers > 0,
                        prefetch_factor=4 if workers else None)
    result: dict[str, Any] = {"workers": workers, "batch": batch, "tiles": len(dataset)}
    iterator = iter(loader)
    next(iterator)  # worker start-up
    images = 0
    started = time.perf_counter()
    epoch = 0
    while plan.time_left() > 0 and images < (4 * batch if plan.dry_run else 20_000):
        try:
            images += len(next(iterator)["image"])
        except StopIteration:
            epoch += 1
            sampler.set_epoch(epoch)
            iterator = iter(loader)
    seconds = time.perf_counter() - started
    result.update(images=images, seconds=seconds, images_per_s=images / seconds if seconds else 0.0)
    plan.save_result(result)
    print(f"  loader: {result['images_per_s']:.0f} images/s with {workers} workers", flush=True)
    return images > 0


def search_priority(variant: str, dry_run: bool) -> int:
    """Order of the largest-batch searches, should time run out: the configs' default objective,
    the paper's setting, cls + struct, other variants with L_sim, then cls alone."""
    loss = check_config(dry_run, *VARIANTS[variant]).loss
    if not VARIANTS[variant]:
        return 0
    if "paper" in variant:
        return 1
    if loss.struct_weight > 0 and loss.sim_weight == 0:
        return 2
    return 3 if loss.sim_weight > 0 else 4


def run_ddp(plan: Plan) -> bool:
    """The default objective wrapped in DistributedDataParallel as the trainer wraps it, under
    torchrun (NCCL on CUDA, gloo on the CPU): a few timed steps with an all-reduce of the loss."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from construct.models.build import build_model, build_teacher

    on_cuda = plan.device.startswith("cuda")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_cuda else torch.device("cpu")
    if on_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if on_cuda else "gloo"
    started = time.perf_counter()
    dist.init_process_group(backend=backend)
    result: dict[str, Any] = {"backend": backend, "world_size": dist.get_world_size(), "init_s": time.perf_counter() - started}
    if on_cuda:
        result["nccl"] = nccl_version()
    try:
        config = check_config(plan.dry_run)
        model = build_model(config, device)
        teacher = build_teacher(config, device) if config.loss.struct_weight > 0 else None
        objective, optimizer = training_objective(config, model, teacher, device)
        # Buffers stay per rank (each rank keeps its own memory bank), as in the trainer.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            wrapped = DistributedDataParallel(objective, device_ids=[device.index] if on_cuda else None,
                                              broadcast_buffers=False)
        torch.manual_seed(0)
        images, labels = training_batch(plan.batch, device, config)
        reduced: list[float] = []

        def step() -> dict[str, torch.Tensor]:
            losses = training_step(wrapped, optimizer, images, labels, on_cuda)
            total = losses["total"].detach().clone()
            dist.all_reduce(total)
            reduced.append(float(total) / dist.get_world_size())
            return losses

        result.update(measure_steps(step, device, plan.batch, plan))
        result["all_reduced_loss"] = reduced[-1]
        dist.barrier()
        print(f"  DDP ({backend}, world size {result['world_size']}): {result['seconds_per_step']:.3f} s/step", flush=True)
    finally:
        plan.save_result(result)
        dist.destroy_process_group()
    return True
