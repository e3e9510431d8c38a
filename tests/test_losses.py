"""The three losses on hand-made tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from construct.losses import (
    FgBgContrastiveLoss,
    MemoryBank,
    adaptive_fg_masks,
    affinity,
    classification_loss,
    info_nce,
    relational_affinity_loss,
)


def test_classification_loss_is_bce_on_logits():
    logits = torch.tensor([[10.0, -10.0], [0.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    expected = (2 * torch.log1p(torch.exp(torch.tensor(-10.0))) + 2 * torch.log(torch.tensor(2.0))) / 4
    assert torch.allclose(classification_loss(logits, labels), expected)


def test_affinity_is_cosine_between_positions():
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).T.reshape(1, 2, 1, 2)  # two positions: (1,0) and (0,2)
    assert torch.allclose(affinity(features), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))


def test_identical_maps_give_zero_structural_loss_and_different_maps_do_not():
    student = torch.randn(2, 8, 7, 7)
    assert relational_affinity_loss(student, student.clone()).item() < 1e-10
    # Same structure at another resolution and channel count: the teacher is resized first.
    assert relational_affinity_loss(torch.ones(1, 4, 7, 7), torch.ones(1, 16, 14, 14)).item() < 1e-10
    assert relational_affinity_loss(student, torch.randn(2, 16, 14, 14)).item() > 1e-3


def test_structural_loss_gradient_reaches_student_only():
    student = torch.randn(1, 8, 5, 5, requires_grad=True)
    teacher = torch.randn(1, 4, 10, 10, requires_grad=True)
    relational_affinity_loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_fg_embedding_equal_to_its_prototype_scores_lower_infonce_than_random():
    torch.manual_seed(0)
    prototypes = F.normalize(torch.randn(4, 512), dim=-1)
    negatives = torch.cat([prototypes[1:], F.normalize(torch.randn(32, 512), dim=-1)])
    aligned = info_nce(prototypes[:1], prototypes[None, :1], negatives[None], 0.07)
    random = info_nce(F.normalize(torch.randn(1, 512), dim=-1), prototypes[None, :1], negatives[None], 0.07)
    assert aligned < random
    assert aligned < 0.01  # the positive dominates at τ = 0.07


def test_memory_bank_fifo_wraps_around():
    bank = MemoryBank(size=4, dim=2)
    assert bank.features.shape == (0, 2)
    vectors = F.normalize(torch.arange(1, 13, dtype=torch.float32).reshape(6, 2), dim=-1)
    bank.push(vectors[:3])
    assert torch.allclose(bank.features, vectors[:3])
    bank.push(vectors[3:6])  # 6 pushed into 4 slots: the two oldest are overwritten
    assert bank.features.shape == (4, 2)
    assert torch.allclose(bank.queue, torch.stack([vectors[4], vectors[5], vectors[2], vectors[3]]))
    assert int(bank.pointer) == 2
    bank.push(torch.randn(9, 2))  # more than the bank holds: only the newest 4 are kept
    assert int(bank.count) == 4


def test_adaptive_masks_per_image_and_per_class():
    cams = torch.zeros(1, 2, 1, 4)
    cams[0, 0, 0] = torch.tensor([10.0, 6.0, 1.0, 0.0])
    cams[0, 1, 0] = torch.tensor([0.0, 2.0, 4.0, -3.0])
    per_image = adaptive_fg_masks(cams, 0.5, "per_image")  # threshold 5 for both classes
    per_class = adaptive_fg_masks(cams, 0.5, "per_class")  # thresholds 5 and 2
    assert per_image[0, 0, 0].tolist() == [True, True, False, False]
    assert per_image[0, 1, 0].tolist() == [False, False, False, False]
    assert per_class[0, 1, 0].tolist() == [False, True, True, False]


def test_contrastive_loss_backpropagates_into_cams_and_prototypes():
    torch.manual_seed(0)
    loss = FgBgContrastiveLoss(alpha=0.5, threshold_max="per_class", temperature=0.07, bank_size=16, dim=8).train()
    images = torch.rand(2, 3, 16, 16)
    cams = torch.randn(2, 3, 4, 4, requires_grad=True)
    prototypes = torch.randn(3, 8, requires_grad=True)
    projection = torch.randn(3, 8)

    class Encoder:  # a differentiable stand-in for CONCH's image encoder
        def encode_image(self, views: torch.Tensor) -> torch.Tensor:
            return F.normalize(views.mean(dim=(2, 3)) @ projection, dim=-1)

    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    value = loss(images, cams, labels, F.normalize(prototypes, dim=-1), 1, Encoder())
    value.backward()
    assert cams.grad.abs().sum() > 0
    assert prototypes.grad.abs().sum() > 0
    assert int(loss.bank.count) == 3  # one BG embedding per present (image, class) pair


def test_contrastive_loss_without_present_classes_is_zero():
    loss = FgBgContrastiveLoss(0.5, "per_image", 0.07, 8, 4)
    cams = torch.randn(1, 2, 4, 4, requires_grad=True)
    value = loss(torch.rand(1, 3, 8, 8), cams, torch.zeros(1, 2), torch.randn(2, 4), 1, encoder=None)
    assert value.item() == 0.0


def test_shared_negatives_equal_the_same_negatives_given_per_query():
    torch.manual_seed(0)
    query, positives = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 2, 8), dim=-1)
    own, bank = F.normalize(torch.randn(3, 4, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    expanded = torch.cat([own, bank.expand(3, -1, -1)], dim=1)
    assert torch.allclose(info_nce(query, positives, own, 0.1, shared_negatives=bank),
                          info_nce(query, positives, expanded, 0.1), atol=1e-6)
