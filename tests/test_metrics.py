"""Confusion-matrix metrics (method.md §8) against hand-computed values."""

from __future__ import annotations

import json
import math

import pytest
import torch
from support import BCSS

from construct.metrics import ConfusionMatrix

# GT   0 0 1 1 4 4
# pred 0 1 1 1 4 0
TARGET = torch.tensor([0, 0, 1, 1, 4, 4])
PRED = torch.tensor([0, 1, 1, 1, 4, 0])


def test_hand_computed_example() -> None:
    cm = ConfusionMatrix(BCSS.all_names)
    cm.update(PRED, TARGET)
    m = cm.compute()
    # TP = (1, 2, -, -, 1), GT = (2, 2, 0, 0, 2), Pred = (2, 3, 0, 0, 1)
    assert m.confusion[0] == (1, 1, 0, 0, 0) and m.confusion[4] == (1, 0, 0, 0, 1)
    assert m.iou[0] == pytest.approx(100 / 3)
    assert m.iou[1] == pytest.approx(200 / 3)
    assert m.iou[4] == pytest.approx(50.0)
    assert m.dice[0] == pytest.approx(50.0)
    assert m.dice[1] == pytest.approx(80.0)
    assert m.dice[4] == pytest.approx(200 / 3)
    assert math.isnan(m.iou[2]) and math.isnan(m.dice[3])  # absent from GT and prediction
    assert m.miou == pytest.approx(50.0)  # mean of TUM and STR only: background excluded
    assert m.mdice == pytest.approx(65.0)
    assert m.fwiou == pytest.approx((100 / 3 + 200 / 3 + 50) / 3)
    assert m.pixel_accuracy == pytest.approx(400 / 6)


def test_missed_and_spurious_classes_score_zero_not_nan() -> None:
    cm = ConfusionMatrix(BCSS.all_names)
    cm.update(torch.tensor([[0, 0], [0, 0]]), torch.tensor([[0, 2], [0, 0]]))  # LYM missed
    cm.update(torch.tensor([3]), torch.tensor([0]))  # NEC predicted, absent from GT
    m = cm.compute()
    assert m.iou[2] == 0.0 and m.dice[2] == 0.0
    assert m.iou[3] == 0.0 and m.dice[3] == 0.0
    assert math.isnan(m.iou[1]) and math.isnan(m.iou[4])
    assert m.iou[0] == pytest.approx(60.0)  # TP 3, GT 4, Pred 4
    assert m.miou == pytest.approx(20.0)  # STR (NaN) left out of the mean


def test_perfect_prediction() -> None:
    target = torch.randint(0, 5, (2, 16, 16))
    cm = ConfusionMatrix(BCSS.all_names)
    cm.update(target.clone(), target)
    m = cm.compute()
    assert m.miou == pytest.approx(100.0) and m.mdice == pytest.approx(100.0)
    assert m.fwiou == pytest.approx(100.0) and m.pixel_accuracy == pytest.approx(100.0)


def test_batched_updates_equal_one_update_and_merge() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (6, 3, 20, 20), generator=gen)
    target = torch.randint(0, 5, (6, 3, 20, 20), generator=gen, dtype=torch.uint8)
    whole, parts, a, b = ConfusionMatrix(BCSS.all_names), ConfusionMatrix(BCSS.all_names), ConfusionMatrix(BCSS.all_names), ConfusionMatrix(BCSS.all_names)
    whole.update(pred, target)
    for i in range(6):
        parts.update(pred[i], target[i])
        (a if i % 2 else b).update(pred[i], target[i])
    a.merge(b)
    assert torch.equal(whole.matrix, parts.matrix) and torch.equal(whole.matrix, a.matrix)
    assert whole.matrix.sum() == pred.numel()
    assert whole.compute() == parts.compute()
    whole.reset()
    assert whole.matrix.sum() == 0


def test_empty_matrix_is_all_nan() -> None:
    m = ConfusionMatrix(BCSS.all_names).compute()
    assert all(math.isnan(v) for v in (m.miou, m.mdice, m.fwiou, m.pixel_accuracy, *m.iou))


def test_json_and_table() -> None:
    cm = ConfusionMatrix(BCSS.all_names)
    cm.update(PRED, TARGET)
    m = cm.compute()
    d = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    assert d["per_class"]["LYM"] == {"iou": None, "dice": None}
    assert d["miou"] == pytest.approx(50.0)
    assert d["confusion_matrix"][0] == [1, 1, 0, 0, 0]
    table = m.format_table()
    for name in ("TUM", "STR", "LYM", "NEC", "BACK", "mIoU", "mDice", "FwIoU", "n/a", "50.00", "65.00"):
        assert name in table


def test_invalid_inputs() -> None:
    cm = ConfusionMatrix(BCSS.all_names)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        cm.update(torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="0..4"):
        cm.update(torch.tensor([5]), torch.tensor([0]))
    with pytest.raises(ValueError, match="0..4"):
        cm.update(torch.tensor([0]), torch.tensor([-1]))
    with pytest.raises(ValueError, match="merge"):
        cm.merge(ConfusionMatrix(("A", "B", "BACK")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    pred, target = torch.randint(0, 5, (4, 64, 64)), torch.randint(0, 5, (4, 64, 64))
    cpu, gpu = ConfusionMatrix(BCSS.all_names), ConfusionMatrix(BCSS.all_names)
    cpu.update(pred, target)
    gpu.update(pred.cuda(), target.cuda())
    assert gpu.matrix.device.type == "cuda"
    assert gpu.compute() == cpu.compute()
