"""The ablation runner on 2 variants x 1 seed x a few iterations: table, figure, periodic validation."""

from __future__ import annotations

import json

import pytest
from support import BCSS, DEMO_RANDOM

from construct_lab.ablate import build_parser, main
from construct_lab.synthetic.tiles import generate_dataset


def test_ablation_runner_writes_table_and_curves(tmp_path):
    root = tmp_path / "data"
    generate_dataset(root, n_train=16, n_val=3, n_test=3, seed=5, classes=BCSS, size=64)
    out = tmp_path / "ablation"
    args = build_parser().parse_args([
        "--config", str(DEMO_RANDOM), "--variants", "cls,full", "--seeds", "0",
        "--out", str(out), "--device", "cpu", "--workers", "1", "--jobs", "2", "--opts", f"data.root={root}", "testbed.dataset=null",
        "data.num_workers=0", "model.image_size=64", "train.batch_size=4", "train.max_iters=4", "train.eval_interval=2",
        "inference.batch_size=4", "inference.tta_factors=[1.0]",
    ])
    main(args)

    table = (out / "ablation.md").read_text()
    assert "| cls | 0 |" in table and "| full | 0 |" in table
    assert "Mean ± std over seeds" in table and "Command: `python -m construct_lab.ablate" in table
    assert "Test metrics with TTA intensity ×[1.0] + flip (2 passes) and dense CRF" in table
    assert (out / "curves.png").stat().st_size > 10_000
    runs = json.loads((out / "ablation.json").read_text())
    assert [run["variant"] for run in runs] == ["cls", "full"]
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["cls-seed0.log", "full-seed0.log"]  # one process each

    # a rerun reuses the finished runs instead of training again
    before = (out / "cls" / "seed0" / "result.json").stat().st_mtime_ns
    main(args)
    assert (out / "cls" / "seed0" / "result.json").stat().st_mtime_ns == before
    for run in runs:
        assert [record["iteration"] for record in run["curve"]] == [2, 4]  # periodic validation in the log
        assert {"miou", "cls_accuracy"} <= set(run["curve"][0])
        assert set(run["test"]) == {"predicted", "ground_truth"}
        per_class = run["test"]["predicted"]["iou"]
        assert list(per_class) == [*BCSS.names, BCSS.background_name]
        present = [v for v in list(per_class.values())[:-1] if v is not None]
        assert present and run["test"]["predicted"]["miou"] == pytest.approx(sum(present) / len(present))
    assert "Test IoU per class, predicted presence" in table and "| " + " | ".join(BCSS.names) in table
    logged = [json.loads(line) for line in (out / "cls" / "seed0" / "log.jsonl").read_text().splitlines()]
    train_terms = {key for record in logged if record["kind"] == "train" for key in record}
    assert "struct" not in train_terms and "sim" not in train_terms  # only the loss weights differ between variants
