"""Ablation runner: train loss-term variants over seeds, test each best checkpoint, tabulate and plot.

    python -m construct_lab.ablate --config configs/demo.yaml --variants cls,cls+struct,cls+sim,full --seeds 0,1,2

Variants are config overrides of the loss terms (same data, same seeds): the four loss-term
variants, and settings of L_sim's open choices on top of the full loss. Each run trains
into ``<out>/<variant>/seed<S>/`` with periodic validation (``train.eval_interval``); its
``best.pth`` is evaluated on the test split under both presence protocols with TTA and CRF as the
config says. Writes ``ablation.md`` (table) and ``curves.png`` (validation mIoU and classification
accuracy against iteration, mean over seeds) into ``--out``. A finished run leaves
``result.json`` in its folder, so rerunning an interrupted ablation only trains what is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from construct.atomic import write_text_atomic
from construct.cli import add_device_arguments, resolve_device, run_cli
from construct.config import PAPER_SIM_OVERRIDES, Config, config_to_dict, load_config
from construct.data.datasets import eval_dataset
from construct.engine.distributed import DistInfo
from construct.engine.trainer import train
from construct.errors import ConfigError, ConStructError
from construct.inference.evaluate import evaluate_split
from construct.inference.postprocess import PROTOCOLS
from construct.inference.predictor import Predictor
from construct.metrics import SegmentationMetrics
from construct.models.build import load_trained_model
from construct_lab.prepare import prepare_inputs

VARIANT_OVERRIDES: dict[str, list[str]] = {
    "cls": ["loss.struct_weight=0", "loss.sim_weight=0"],
    "cls+struct": ["loss.sim_weight=0"],
    "cls+sim": ["loss.struct_weight=0"],
    "full": [],
    # L_sim's open choices (docs/ablation.md), each on top of the full loss:
    "full-paper-sim": list(PAPER_SIM_OVERRIDES),
    "full-sim-prototypes-only": ["loss.sim_gradient=prototypes"],
    "full-per-image-max": ["loss.threshold_max=per_image"],
    "full-sim0.05": ["loss.sim_weight=0.05"],
    # L_sim off for the first half of the iterations, then at full weight (loss.sim_warmup):
    "full-sim-warmup": ["loss.sim_warmup=0.5"],
}


def parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def variant_config(args: argparse.Namespace, variant: str, seed: int) -> Config:
    if variant not in VARIANT_OVERRIDES:
        raise ConfigError(f"--variants: unknown variant '{variant}' (choose from {', '.join(VARIANT_OVERRIDES)})")
    work_dir = args.out / variant / f"seed{seed}"
    return load_config(args.config, [*args.opts, *VARIANT_OVERRIDES[variant], f"train.seed={seed}", f"work_dir={work_dir}"])


def validation_curve(work_dir: Path) -> list[dict[str, Any]]:
    lines = (work_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == "val"]


RESULT = "result.json"
"""Each finished run leaves its record here; a rerun of the same command reuses it (resumable)."""


def run_one(args: argparse.Namespace, variant: str, seed: int, device) -> dict[str, Any]:
    config = variant_config(args, variant, seed)
    record_path = Path(config.work_dir) / RESULT
    if finished(args, variant, seed):
        print(f"{variant} seed {seed}: reusing the finished run in {config.work_dir}")
        return json.loads(record_path.read_text(encoding="utf-8"))
    started = time.time()
    result = train(config, DistInfo(device=device), overwrite=True)
    model = load_trained_model(config, Path(config.work_dir) / "best.pth", device)
    with Predictor(model, config, device, tta=True, crf=config.inference.crf.enabled, workers=args.workers) as predictor:
        metrics = evaluate_split(predictor, eval_dataset(config, "test"), config, PROTOCOLS,
                                 description=f"test {variant} seed {seed}")
    record = {
        "variant": variant, "seed": seed, "best_val_miou": result.best_miou, "best_iteration": result.best_iteration,
        "test": {p: {"miou": m.miou, "mdice": m.mdice, "iou": per_class(m)} for p, m in metrics.items()},
        "tta": predictor.tta.describe(),
        "curve": validation_curve(Path(config.work_dir)), "seconds": time.time() - started,
        "config": config_to_dict(config),
    }
    write_text_atomic(record_path, json.dumps(record))  # a run killed while writing leaves no half record
    return record


def per_class(metrics: SegmentationMetrics) -> dict[str, float | None]:
    """Test IoU by class name (None where a class is absent from both masks and predictions)."""
    return {name: None if math.isnan(value) else value for name, value in zip(metrics.class_names, metrics.iou)}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def write_table(runs: list[dict[str, Any]], path: Path, command: str) -> None:
    head = "| variant | seed | best val mIoU (iter) | test mIoU pred. | test mDice pred. | test mIoU GT-gated | test mDice GT-gated |"
    lines = ["# Ablation", "", f"Command: `{command}`", "",
             f"Test metrics with {runs[0]['tta']} and dense CRF; 'pred.' = predicted class presence (honest), "
             "'GT-gated' = presence from the ground-truth mask (oracle, as the paper reports).", "",
             head, "|---|---|---|---|---|---|---|"]
    for run in runs:
        p, g = run["test"]["predicted"], run["test"]["ground_truth"]
        lines.append(f"| {run['variant']} | {run['seed']} | {run['best_val_miou']:.2f} ({run['best_iteration']}) | "
                     f"{p['miou']:.2f} | {p['mdice']:.2f} | {g['miou']:.2f} | {g['mdice']:.2f} |")
    lines += ["", "Mean ± std over seeds:", "", head.replace("| seed ", "| seeds "), "|---|---|---|---|---|---|---|"]
    for variant in dict.fromkeys(run["variant"] for run in runs):
        group = [run for run in runs if run["variant"] == variant]
        cells = [mean_std([r["best_val_miou"] for r in group])]
        cells += [mean_std([r["test"][p][k] for r in group]) for p in PROTOCOLS for k in ("miou", "mdice")]
        lines.append(f"| {variant} | {len(group)} | " + " | ".join(cells) + " |")
    lines += per_class_table(runs)
    total = sum(run["seconds"] for run in runs)
    lines += ["", f"Run time: {total / 60:.1f} min summed over {len(runs)} runs (training + test evaluation; "
              "runs trained side by side with --jobs overlap in wall time).", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def per_class_table(runs: list[dict[str, Any]]) -> list[str]:
    """Mean test IoU per class with predicted presence, for the runs that recorded it."""
    recorded = [run for run in runs if "iou" in run["test"]["predicted"]]
    if not recorded:
        return []
    names = list(recorded[0]["test"]["predicted"]["iou"])
    lines = ["", "Test IoU per class, predicted presence (mean ± std over seeds):", "",
             "| variant | seeds | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for variant in dict.fromkeys(run["variant"] for run in recorded):
        group = [run["test"]["predicted"]["iou"] for run in recorded if run["variant"] == variant]
        cells = []
        for name in names:
            values = [iou[name] for iou in group if iou[name] is not None]
            cells.append(mean_std(values) if values else "–")
        lines.append(f"| {variant} | {len(group)} | " + " | ".join(cells) + " |")
    return lines


def plot_curves(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ax_miou, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in dict.fromkeys(run["variant"] for run in runs):
        curves = [run["curve"] for run in runs if run["variant"] == variant]
        iterations = [record["iteration"] for record in curves[0]]
        for axis, key in ((ax_miou, "miou"), (ax_acc, "cls_accuracy")):
            values = [statistics.mean(curve[i][key] for curve in curves) for i in range(len(iterations))]
            axis.plot(iterations, values, marker="o", markersize=3, label=variant)
    ax_miou.set(xlabel="iteration", ylabel="validation mIoU (%, no CRF)", title="Segmentation")
    ax_acc.set(xlabel="iteration", ylabel="class-presence accuracy (%)", title="Classification")
    for axis in (ax_miou, ax_acc):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="base config (e.g. configs/demo.yaml)")
    parser.add_argument("--variants", type=parse_list, default=list(VARIANT_OVERRIDES)[:4],
                        help=f"comma-separated subset of {','.join(VARIANT_OVERRIDES)} "
                             "(default: the four loss-term variants cls,cls+struct,cls+sim,full)")
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in parse_list(t)], default=[0],
                        help="comma-separated train.seed values (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("work_dirs/ablation"), help="output folder (default work_dirs/ablation)")
    parser.add_argument("--workers", type=int, default=None, help="CRF worker processes (default: all cores)")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE", help="overrides applied to every variant")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at the same time, each in its own process (for many-core or GPU machines; "
                             "each run is the same as when trained alone). Default 1")
    parser.add_argument("--single-run", action="store_true", help=argparse.SUPPRESS)  # a --jobs child: no table
    add_device_arguments(parser)
    return parser


def finished(args: argparse.Namespace, variant: str, seed: int) -> bool:
    config = variant_config(args, variant, seed)
    path = Path(config.work_dir) / RESULT
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("config") == config_to_dict(config)
    except (OSError, ValueError):
        return False


def run_in_parallel(args: argparse.Namespace, device) -> None:
    """Train the missing (variant, seed) runs ``--jobs`` at a time, each in its own process."""
    pending = [(v, s) for v in args.variants for s in args.seeds if not finished(args, v, s)]
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    device_args = ["--device", str(device)]
    running: list[tuple[str, subprocess.Popen]] = []
    failed: list[str] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            variant, seed = pending.pop(0)
            name = f"{variant}-seed{seed}"
            command = [sys.executable, "-m", "construct_lab.ablate", "--config", str(args.config), "--variants", variant,
                       "--seeds", str(seed), "--out", str(args.out), "--single-run", *device_args,
                       *(["--workers", str(args.workers)] if args.workers else []), *(["--opts", *args.opts] if args.opts else [])]
            with open(logs / f"{name}.log", "w", encoding="utf-8") as log:
                running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)))
            print(f"started {name} (log: {logs / name}.log)", flush=True)
        time.sleep(1)
        for name, process in list(running):
            if process.poll() is not None:
                running.remove((name, process))
                print(f"{'finished' if process.returncode == 0 else 'FAILED'} {name}", flush=True)
                if process.returncode != 0:
                    failed.append(name)
    if failed:
        raise ConStructError(f"ablation runs failed: {', '.join(failed)} (see {logs}/<run>.log)")


def main(args: argparse.Namespace) -> None:
    device = resolve_device(args)
    for variant in args.variants:
        variant_config(args, variant, args.seeds[0])  # fail on a bad variant or override before any training
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.single_run:  # once, not per job; with --jobs 1 too (the runs train in this process)
        prepare_inputs(variant_config(args, args.variants[0], args.seeds[0]), DistInfo(device=device))
    if args.jobs > 1:
        run_in_parallel(args, device)
    runs = [run_one(args, variant, seed, device) for variant in args.variants for seed in args.seeds]
    if args.single_run:
        return
    command = "python -m construct_lab.ablate --config {} --variants {} --seeds {}{}".format(
        args.config, ",".join(args.variants), ",".join(map(str, args.seeds)),
        (" --opts " + " ".join(args.opts)) if args.opts else "")
    (args.out / "ablation.json").write_text(json.dumps([{k: v for k, v in run.items() if k != "config"} for run in runs],
                                                       indent=2), encoding="utf-8")
    write_table(runs, args.out / "ablation.md", command)
    plot_curves(runs, args.out / "curves.png")
    print(f"wrote {args.out / 'ablation.md'}, {args.out / 'curves.png'} and {args.out / 'ablation.json'}")


if __name__ == "__main__":
    run_cli(main, build_parser())
