"""The training objective: L = λ_cls·L_cls + λ_struct·L_struct + λ_sim·L_sim (method.md §4–6)."""

from __future__ import annotations

import torch
from torch import nn

from construct.config import Config
from construct.losses import FgBgContrastiveLoss, classification_loss, relational_affinity_loss
from construct.models.construct import ConStructModel
from construct.models.segformer import MiTTeacher


class ConStructObjective(nn.Module):
    """Model + frozen teacher + losses in one module, so DDP sees one forward per step.

    A loss term with weight 0 is not computed at all (no teacher forward, no extra encoder
    passes), which is what the ablation variants rely on. Nor is L_sim during its warm-up
    (``loss.sim_warmup``), for which the trainer reports its progress through :meth:`set_progress`.
    """

    def __init__(self, model: ConStructModel, teacher: MiTTeacher | None, config: Config) -> None:
        super().__init__()
        loss_cfg = config.loss
        self.model = model
        self.teacher = teacher
        self.weights = {"cls": loss_cfg.cls_weight, "struct": loss_cfg.struct_weight, "sim": loss_cfg.sim_weight}
        self.cam_level_weights = list(config.model.cam_level_weights)
        self.distill_pairs = [tuple(pair) for pair in config.model.distill_pairs]
        if self.weights["struct"] > 0 and (teacher is None or not self.distill_pairs):
            raise ValueError("the structural loss needs a teacher and at least one model.distill_pairs entry")
        self.sim_warmup = loss_cfg.sim_warmup
        self.sim_on = self.sim_warmup == 0
        self.contrastive = None
        if self.weights["sim"] > 0:
            self.contrastive = FgBgContrastiveLoss(
                alpha=loss_cfg.fg_threshold,
                threshold_max=loss_cfg.threshold_max,
                temperature=loss_cfg.temperature,
                bank_size=loss_cfg.memory_bank_size,
                dim=model.prototypes.dim,
                views=loss_cfg.sim_views,
                view_size=loss_cfg.sim_view_size,
                max_pairs=loss_cfg.sim_max_pairs,
                gradient=loss_cfg.sim_gradient,
                checkpoint_chunk=loss_cfg.sim_checkpoint_chunk,
            )

    def set_progress(self, iteration: int, total_iterations: int) -> None:
        """Tell the objective which iteration (0-based) of how many comes next: L_sim joins once
        ``loss.sim_warmup`` of them have passed."""
        self.sim_on = iteration >= self.sim_warmup * total_iterations

    def extra_state_dict(self) -> dict[str, torch.Tensor]:
        """Training state outside the model (the memory bank) that a resume must restore."""
        return {} if self.contrastive is None else self.contrastive.state_dict()

    def load_extra_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.contrastive is not None:
            self.contrastive.load_state_dict(state)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted loss terms and their sum under ``total``."""
        sim = self.contrastive if self.sim_on else None
        token_views = sim is not None and sim.views == "tokens"
        out = self.model(images, with_tokens=token_views)
        total_weight = sum(self.cam_level_weights)
        terms: dict[str, torch.Tensor] = {}
        if self.weights["cls"] > 0:
            terms["cls"] = sum(
                w * classification_loss(logits, labels) for w, logits in zip(self.cam_level_weights, out.level_logits)
            ) / total_weight
        if self.weights["struct"] > 0:
            stages = self.teacher(images)
            terms["struct"] = torch.stack(
                [relational_affinity_loss(out.refined[level], stages[stage]) for level, stage in self.distill_pairs]
            ).mean()
        if sim is not None:
            terms["sim"] = sim(
                images, out.cams, labels, self.model.prototypes(), self.model.prototypes.per_class, self.model.student,
                out.tokens,
            )
        losses = {name: self.weights[name] * value for name, value in terms.items()}
        losses["total"] = sum(losses.values())
        return losses
