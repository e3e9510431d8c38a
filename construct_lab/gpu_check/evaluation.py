"""GPU-check child: evaluation throughput on generated test tiles, and where its time goes."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch.utils.data import DataLoader

from construct.config import config_to_dict
from construct_lab.bench import synchronize
from construct_lab.gpu_check.plan import Plan, check_config


def run_evaluation(plan: Plan) -> bool:
    """Images/s with TTA, without and with the CRF pool (and a plain pass for reference), on the
    eager path and then with ``inference.fast_path`` (a copy of the model whose CONCH replays CUDA
    graphs; on the CPU those rows run the eager path).

    Batches come from the test split through a DataLoader with pinned memory and are moved to the
    device before the predictor sees them, so the CRF pool is fed from device tensors as in
    evaluate_performance.py on a GPU. Each setting's time is split into the network (TTA passes,
    synchronised), post-processing (gating, upsampling, the copy to the host, the CRF) and waiting
    for the loader.
    """
    from construct.classes import ClassSet
    from construct.data.datasets import EvalDataset
    from construct.inference.predictor import Predictor
    from construct.models.build import build_model

    device = torch.device(plan.device)
    config = check_config(plan.dry_run)
    fast_config = check_config(plan.dry_run, "inference.fast_path=true")
    started = time.perf_counter()
    model = build_model(config, device).eval()
    fast_model = copy.deepcopy(model)
    dataset = EvalDataset(plan.data_root, "test", ClassSet.from_config(config))
    inference = config_to_dict(config)["inference"]
    result: dict[str, Any] = {
        "model_build_s": time.perf_counter() - started, "tiles": len(dataset), "batch": config.inference.batch_size,
        "loader_workers": plan.loader_workers, "crf_workers": plan.crf_workers, "protocol": config.inference.presence,
        "tta": {key: value for key, value in inference.items() if key.startswith("tta")},
        "crf_iterations": config.inference.crf.iterations, "settings": {},
    }
    loader = DataLoader(dataset, batch_size=config.inference.batch_size, num_workers=plan.loader_workers,
                        pin_memory=device.type == "cuda", persistent_workers=plan.loader_workers > 0)
    options_by_name = {
        "no TTA, no CRF": {"tta": False, "crf": False},
        "TTA, no CRF": {"tta": True, "crf": False},
        f"TTA + CRF pool ({plan.crf_workers} workers)": {"tta": True, "crf": True},
    }
    settings = {name: (model, config, options) for name, options in options_by_name.items()}
    settings.update({f"{name}, fast path": (fast_model, fast_config, options) for name, options in options_by_name.items()})
    for index, (name, (setting_model, setting_config, options)) in enumerate(settings.items()):
        share = plan.time_left() / (len(settings) - index)  # what is left, split over the settings to come
        with Predictor(setting_model, setting_config, device, workers=plan.crf_workers, **options) as predictor:
            result["settings"][name] = _time_setting(predictor, loader, device, config.inference.presence, plan,
                                                     time.time() + share)
        entry = result["settings"][name]
        if setting_model.student.graphs is not None:
            entry["cuda_graphs"] = len(setting_model.student.graphs)
        print(f"  {name}: {entry['images_per_s']:.1f} images/s ({entry['images']} images)", flush=True)
        plan.save_result(result)
    return True


def _time_setting(predictor: Any, loader: DataLoader, device: torch.device, protocol: str, plan: Plan,
                  stop_at: float) -> dict[str, Any]:
    def run(batch: dict[str, Any]) -> tuple[float, float]:
        started = time.perf_counter()
        images = batch["image"].to(device, non_blocking=True)
        cams, logits = predictor.network(images, batch["name"])
        synchronize(device)
        network_done = time.perf_counter()
        predictor.postprocess(images, cams, logits, protocol, batch["presence"])
        return network_done - started, time.perf_counter() - network_done

    warmup_started = time.perf_counter()
    run(next(iter(loader)))  # kernels and, with the CRF, the worker pool's start-up
    totals = {"network_s": 0.0, "postprocess_s": 0.0, "loading_s": 0.0}
    images = 0
    started = time.perf_counter()
    warmup = started - warmup_started
    while images < plan.eval_images and time.time() < stop_at:
        waited = time.perf_counter()
        for batch in loader:
            totals["loading_s"] += time.perf_counter() - waited
            network, postprocess = run(batch)
            totals["network_s"] += network
            totals["postprocess_s"] += postprocess
            images += len(batch["name"])
            if images >= plan.eval_images or time.time() >= stop_at:
                break
            waited = time.perf_counter()
    seconds = time.perf_counter() - started
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "warmup_s": warmup, **totals}
