"""The GPU check's projection to BCSS-WSSS and its markdown section for docs/benchmarks.md."""

from __future__ import annotations

from typing import Any

BCSS_TRAIN_TILES = 23_422
BCSS_TEST_TILES = 4_986
PAPER_EPOCHS = 2
PAPER_BATCH = 10


def projection(parts: dict[str, Any]) -> dict[str, Any]:
    """Minutes for the paper's training run and for the test split, from what the parts measured.

    Training: 2 epochs at batch 10 on one GPU (the last, incomplete batch of an epoch is dropped),
    at main.py's steady rate (data loading included) and at each bench variant's step rate (no
    loading), each on the eager and the fast path where measured. Validation passes are not
    included. Test: TTA + CRF at the measured rate (eager and fast path); with
    ``--protocol both`` (evaluate_performance.py's default) the post-processing and CRF run twice
    per image, the network once.
    """
    iterations = PAPER_EPOCHS * (BCSS_TRAIN_TILES // PAPER_BATCH)
    train: dict[str, float] = {}
    for part, suffix in (("train_run", ""), ("train_run_fast", ", fast path")):
        run = parts.get(part, {})
        if run.get("steady_seconds_per_iteration"):
            train[f"main.py, default config (data loading included){suffix}"] = (
                iterations * run["steady_seconds_per_iteration"] / 60)
    for key, suffix in (("at_batch", ""), ("at_batch_fast", ", fast path")):
        for name, entry in parts.get("train_bench", {}).get("variants", {}).items():
            at_batch = entry.get(key)
            if at_batch and at_batch["batch"] == PAPER_BATCH:
                train[f"bench step, {name}{suffix}"] = iterations * at_batch["seconds_per_step"] / 60
    test: dict[str, float] = {}
    for name, entry in parts.get("eval", {}).get("settings", {}).items():
        if "CRF" in name and "no CRF" not in name and entry.get("images"):
            per_image_post = entry["postprocess_s"] / entry["images"]
            test[f"{name}, one protocol"] = BCSS_TEST_TILES / entry["images_per_s"] / 60
            test[f"{name}, both protocols (network once, CRF twice)"] = (
                BCSS_TEST_TILES * (entry["seconds"] / entry["images"] + per_image_post) / 60)
    if not train and not test:
        raise RuntimeError("nothing to project from: the training and evaluation parts measured nothing")
    return {"train_iterations": iterations, "train_tiles": BCSS_TRAIN_TILES, "epochs": PAPER_EPOCHS,
            "batch": PAPER_BATCH, "test_tiles": BCSS_TEST_TILES, "train_minutes": train, "test_minutes": test}


def _gib(mib: float | None) -> str:
    return "–" if mib is None else f"{mib / 1024:.2f} GiB"


def _status_line(name: str, part: dict[str, Any]) -> str:
    status = part.get("status", "not run")
    detail = f": {part['error']}" if part.get("error") else ""
    return f"| {name} | {status}{detail} | {part.get('seconds', 0):.0f} |"


def render_markdown(report: dict[str, Any]) -> str:
    """A section for docs/benchmarks.md: what ran, the numbers, and every failure in words."""
    parts = report.get("parts", {})
    env = parts.get("environment", {})
    kind = "dry run on the CPU, tiny towers: not a measurement" if report.get("dry_run") else "bf16 autocast"
    intro = (f"Measured {report.get('date', '?')} with `{report.get('command')}` ({report.get('total_s', 0):.0f} s "
             f"in all). Machine: {env.get('machine', '?')}; Python {env.get('python')}.")
    if not report.get("dry_run"):
        intro += (f" GPU memory {env.get('gpu_memory_gib', 0):.1f} GiB, driver {env.get('driver')}, CUDA {env.get('cuda')}, "
                  f"cuDNN {env.get('cudnn')}, NCCL {env.get('nccl')}; {env.get('usable_cpus')} usable CPU cores "
                  f"(os.cpu_count() {env.get('cpu_count')}). Real-size random towers (CONCH ViT-B/16 + MiT-B1), 224 px.")
    if report.get("dry_run"):
        intro += (" Fast-path rows run the eager path here (CUDA graphs, bf16 towers and fused AdamW need CUDA;"
                  " main.py keeps the deferred non-finite check).")
    if env.get("pin_mismatches"):
        mismatches = ", ".join(f"{name} {found}" for name, found in env["pin_mismatches"].items())
        intro += f" Versions other than requirements.txt's: {mismatches}."
    lines = [
        f"## GPU check: {env.get('gpu', 'no GPU')} ({kind})",
        "",
        intro,
        "",
        "| part | status | seconds |",
        "|---|---|---|",
        *[_status_line(name, part) for name, part in parts.items()],
        "",
    ]
    bench = parts.get("train_bench", {})
    if bench.get("variants"):
        limit = bench.get("memory_limit_mib", 0) / 1024
        lines += [
            f"Training steps (random batches, no data loading; `construct_lab.bench` step code). Peak memory is "
            f"{'CUDA max allocated (max reserved beside it)' if bench.get('bf16') else 'the process peak RSS'}; "
            f"the largest batch is the largest whose peak allocated stays within {limit:.0f} GiB.",
            "",
            "| losses | batch | steps / s | images / s | peak memory | peak reserved |",
            "|---|---|---|---|---|---|",
        ]
        for name, entry in bench["variants"].items():
            for key, label in (("at_batch", ""), ("at_batch_fast", " (fast path)"), ("largest_batch", " (largest)")):
                m = entry.get(key)
                if m:
                    lines.append(f"| {name} | {m['batch']}{label} | {m['steps_per_s']:.2f} | {m['images_per_s']:.1f} | "
                                 f"{_gib(m['peak_memory_mib'])} | {_gib(m.get('peak_reserved_mib'))} |")
            for problem in entry.get("errors", []) + entry.get("skipped", []):
                lines.append(f"| {name} | {problem} | | | | |")
        lines.append("")
    match = parts.get("train_match", {})
    if match.get("max_relative_difference"):
        largest = match["max_relative_difference"]
        lines += [
            f"Eager vs fast path, default objective, the same {match.get('steps')} seeded random batches of "
            f"{match.get('batch')} from the same weights ({match.get('cuda_graphs', 0)} CUDA graphs captured on the fast "
            f"path): largest relative difference of the total loss at any step {largest['total']:.2e} (median "
            f"{match['median_relative_difference']['total']:.2e}; per term: "
            + ", ".join(f"{name} {value:.2e}" for name, value in largest.items() if name != "total")
            + f"); tolerance {match.get('tolerance')}: **{'match' if match.get('match') else 'no match'}**.",
            "",
        ]
    for part, label in (("train_run", "eager path"), ("train_run_fast", "fast path (`train.fast_path=true`)")):
        run = parts.get(part, {})
        if not run.get("iterations"):
            continue
        lines += [
            f"`main.py`, {label}, on {run.get('train_tiles')} synthetic tiles: {run['iterations']} iterations at batch "
            f"{run.get('batch')}, {run.get('num_workers')} loader workers, pinned memory "
            f"{'on' if run.get('pin_memory') else 'off'}: "
            + (f"{1 / run['steady_seconds_per_iteration']:.2f} it/s steady "
               f"({run.get('batch', 0) / run['steady_seconds_per_iteration']:.1f} images/s); "
               if run.get("steady_seconds_per_iteration") else "")
            + f"validation mIoU {run.get('val_miou', float('nan')):.1f} on {run.get('val_tiles')} tiles; "
            f"checkpoints {', '.join(run.get('checkpoints', [])) or 'none'}; {run.get('seconds', 0):.0f} s in all.",
            "",
        ]
    loader = parts.get("loader", {})
    if loader.get("images_per_s"):
        lines += [
            f"Training loader alone (PNG decoding, flips/rotations, {'pinned ' if not report.get('dry_run') else ''}"
            f"batches of {loader.get('batch')}; {loader.get('workers')} workers, persistent, 4 batches prefetched each): "
            f"{loader['images_per_s']:.0f} images/s over {loader.get('images')} images.",
            "",
        ]
    ddp = parts.get("torchrun", {})
    if ddp.get("seconds_per_step"):
        lines += [
            f"DDP under torchrun: world size {ddp.get('world_size')}, backend {ddp.get('backend')}, "
            f"{ddp['steps_per_s']:.2f} steps/s at batch {ddp.get('batch')} (default losses), "
            f"process group set up in {ddp.get('init_s', 0):.1f} s.",
            "",
        ]
    evaluation = parts.get("eval", {})
    if evaluation.get("settings"):
        lines += [
            f"Evaluation on {evaluation.get('tiles')} synthetic test tiles (batch {evaluation.get('batch')}, "
            f"{evaluation.get('loader_workers')} loader workers, TTA "
            f"{', '.join(f'{k}={v}' for k, v in evaluation.get('tta', {}).items())}, "
            f"CRF {evaluation.get('crf_iterations')} iterations); seconds summed over the measured images:",
            "",
            "| setting | images / s | network | post-processing + CRF | loader wait | warm-up |",
            "|---|---|---|---|---|---|",
            *[f"| {name} | {e['images_per_s']:.1f} | {e['network_s']:.1f} s | {e['postprocess_s']:.1f} s | "
              f"{e['loading_s']:.1f} s | {e['warmup_s']:.1f} s |" for name, e in evaluation["settings"].items()],
            *(["", "The fast-path rows copy the model and set `inference.fast_path`; the warm-up includes "
               "capturing the CUDA graphs of the TTA passes."] if any("fast path" in n for n in evaluation["settings"]) else []),
            "",
        ]
    proj = parts.get("projection", {})
    if proj.get("train_minutes") or proj.get("test_minutes"):
        lines += [
            f"Projection on this machine: {proj['epochs']} epochs of BCSS-WSSS ({proj['train_tiles']:,} tiles, "
            f"batch {proj['batch']}, {proj['train_iterations']:,} iterations, validation not included) and the "
            f"{proj['test_tiles']:,}-tile test split.",
            "",
            "| job | minutes |",
            "|---|---|",
            *[f"| train: {name} | {minutes:.1f} |" for name, minutes in proj["train_minutes"].items()],
            *[f"| test: {name} | {minutes:.1f} |" for name, minutes in proj["test_minutes"].items()],
            "",
        ]
    return "\n".join(lines)
