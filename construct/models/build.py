"""Builders that turn a :class:`~construct.config.Config` into models."""

from __future__ import annotations

from pathlib import Path

import torch

from construct.checkpoint import (
    backbone_identity,
    check_backbones,
    check_classes,
    check_student,
    checkpoint_stage,
    load_checkpoint,
    require_stage,
)
from construct.classes import ClassSet
from construct.config import Config
from construct.errors import CheckpointError
from construct.models.conch import load_conch
from construct.models.construct import ConStructModel
from construct.models.open_clip_student import load_open_clip_student
from construct.models.segformer import MiTTeacher, load_mit_teacher
from construct.models.segmenter import Segmenter, load_trained_segmenter
from construct.models.student import Student


def student_checkpoint(config: Config) -> str | None:
    """The weight file (or folder) of the configured student: model.conch.checkpoint for CONCH,
    model.student.checkpoint for the OpenCLIP students."""
    model_cfg = config.model
    return model_cfg.conch.checkpoint if model_cfg.student.name == "conch" else model_cfg.student.checkpoint


def load_student(config: Config) -> Student:
    """The frozen student that ``model.student.name`` chooses, from its local weights (random when null)."""
    model_cfg = config.model
    if model_cfg.student.name == "conch":
        return load_conch(model_cfg.conch.checkpoint, image_size=model_cfg.image_size, preset=model_cfg.conch.preset,
                          tokenizer_path=model_cfg.conch.tokenizer)
    return load_open_clip_student(model_cfg.student.checkpoint, name=model_cfg.student.name,
                                  preset=model_cfg.student.preset, image_size=model_cfg.image_size)


def build_model(config: Config, device: torch.device | str = "cpu") -> ConStructModel:
    """Frozen student + adapters + text-initialised prototypes, on ``device``.

    Frozen backbones without a checkpoint get random weights drawn from ``train.seed``, so a run,
    its resume and its evaluation all see the same network.
    """
    model_cfg = config.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        student = load_student(config)
        with torch.no_grad():
            text_embeddings = student.encode_text(student.tokenize(list(ClassSet.from_config(config).prompts)))
        model = ConStructModel(
            student=student,
            text_embeddings=text_embeddings,
            feature_blocks=model_cfg.feature_blocks,
            level_scales=model_cfg.level_scales,
            cam_levels=model_cfg.cam_levels,
            cam_level_weights=model_cfg.cam_level_weights,
            prototypes_per_class=model_cfg.prototypes_per_class,
            projector_ratio=model_cfg.projector_ratio,
            cam_scale_init=model_cfg.cam_scale_init,
            extra_levels=[pair[0] for pair in model_cfg.distill_pairs],
            adapter_padding=model_cfg.adapter_padding,
            projector_input=model_cfg.projector_input,
            projector_init=model_cfg.projector_init,
        )
        if model_cfg.conch.normalization == "dataset":  # CONCH only (config validation)
            student.set_feature_normalization(model_cfg.conch.dataset_mean, model_cfg.conch.dataset_std)
    return model.to(device)


def build_teacher(config: Config, device: torch.device | str = "cpu") -> MiTTeacher:
    """The frozen MiT teacher (only needed when the structural loss is on)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed + 1)
        teacher = load_mit_teacher(config.model.teacher.checkpoint, preset=config.model.teacher.preset,
                                   stochastic_depth=config.model.teacher.mode == "train")
    return teacher.to(device)


def load_trained_model(config: Config, checkpoint_path: str | Path, device: torch.device | str = "cpu") -> ConStructModel:
    """Build the model of ``config`` and load a training checkpoint's trainable state, in eval mode.

    A checkpoint of another class set or student fails naming both; one of another model or config
    fails with the mismatched keys listed.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    require_stage(checkpoint, 1, checkpoint_path, "the ConStruct (CAM) model")
    check_classes(checkpoint, ClassSet.from_config(config).names, checkpoint_path)
    check_student(checkpoint, config.model.student.name, checkpoint_path)
    model = build_model(config, "cpu")
    identity = backbone_identity(model.student, None, student_checkpoint(config), None)
    check_backbones(checkpoint, identity, checkpoint_path)
    try:
        model.load_trainable_state_dict(checkpoint["model"])
    except KeyError as exc:
        raise CheckpointError(f"{checkpoint_path}: does not fit the model of this config: {exc.args[0]}") from None
    return model.to(device).eval()


def load_either_stage(config: Config, checkpoint_path: str | Path,
                      device: torch.device | str = "cpu") -> ConStructModel | Segmenter:
    """The network of a stage-1 (CAM model) or stage-2 (segmenter) checkpoint, as the checkpoint says it is."""
    checkpoint = load_checkpoint(checkpoint_path)
    if checkpoint_stage(checkpoint) == 2:
        return load_trained_segmenter(checkpoint, checkpoint_path, ClassSet.from_config(config).names, device)
    return load_trained_model(config, checkpoint_path, device)
