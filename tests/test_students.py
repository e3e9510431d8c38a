"""The student interface: CONCH unchanged bit for bit, the OpenCLIP students (QuiltNet-B-16, OpenAI CLIP)
equal to open_clip's own ViT-B-16, strict loading with one-line errors, checkpoints that name their student."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from support import BCSS, FIXTURES, REPO, tiny_config

from construct.checkpoint import backbone_identity, save_checkpoint
from construct.config import load_config
from construct.engine.objective import ConStructObjective
from construct.errors import CheckpointError, ConfigError
from construct.models.build import build_model, build_teacher, load_trained_model
from construct.models.conch import load_conch
from construct.models.open_clip_student import CONFIG_FILE, OpenClipStudent, load_open_clip_student
from construct_lab.synthetic.tiles import generate_dataset

CONCH_REFERENCE = FIXTURES / "conch_reference_digests.json"
TEXTS = ["Tumor (TUM) regions consist of malignant epithelial cells.", "lymphocytes", "", "stroma " * 100]
TINY_QUILTNET = ("model.student.name=quiltnet", "model.student.preset=tiny", "model.student.checkpoint=null")


def open_clip_config(preset: str, quick_gelu: bool = False) -> dict:
    """The open_clip_config.json of a Hugging Face OpenCLIP folder for ``preset``."""
    sizes = {"vit_b16": (768, 12, 512, 8, 12), "tiny": (192, 4, 128, 2, 2)}[preset]
    model_cfg = {"embed_dim": 512,
                 "vision_cfg": {"image_size": 224, "layers": sizes[1], "width": sizes[0], "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": sizes[2], "heads": sizes[3],
                              "layers": sizes[4]}}
    if quick_gelu:
        model_cfg["quick_gelu"] = True
    return {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                       "std": [0.26862954, 0.26130258, 0.27577711]}}


def write_folder(folder: Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


# --- CONCH: the refactor changed nothing ----------------------------------------------------------


def digest(tensor: torch.Tensor) -> str:
    value = tensor.detach().contiguous().cpu()
    return hashlib.sha256(str((value.dtype, tuple(value.shape))).encode() + value.numpy().tobytes()).hexdigest()[:16]


def conch_outputs() -> dict[str, torch.Tensor]:
    """Losses, gradients, prototypes, CAMs and tokens of the tiny CONCH model (both L_sim view modes)."""
    out = {}
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    for views in ("tokens", "image"):
        config = tiny_config(f"loss.sim_views={views}")
        model = build_model(config)
        objective = ConStructObjective(model, build_teacher(config), config).train()
        torch.manual_seed(0)
        losses = objective(images, labels)
        losses["total"].backward()
        out.update({f"{views}.loss.{name}": value for name, value in losses.items()})
        out.update({f"{views}.grad.{name}": p.grad for name, p in model.named_parameters() if p.grad is not None})
    with torch.no_grad():
        plain = model.eval()(images, with_tokens=True)
        out.update(prototypes=model.prototypes.prototypes, cams=plain.cams, logits=plain.logits, tokens=plain.tokens,
                   cams_intensity=model(images, intensity=1.1).cams)
    return out


def test_conch_outputs_are_bit_identical_to_before_the_student_interface() -> None:
    reference = json.loads(CONCH_REFERENCE.read_text())
    platform = {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}
    if reference["platform"] != platform:
        pytest.skip(f"digests were written on {reference['platform']}, this is {platform}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions split across threads round differently
    try:
        outputs = {name: digest(value) for name, value in conch_outputs().items()}
    finally:
        torch.set_num_threads(threads)
    assert outputs == reference["digests"]


# --- OpenCLIP students: parity with open_clip ------------------------------------------------------


@pytest.fixture(scope="module")
def real_size(tmp_path_factory) -> Iterator[tuple[torch.nn.Module, Path]]:
    """open_clip's own random ViT-B-16 (fp16-rounded weights) and a QuiltNet folder of those weights."""
    import open_clip

    reference = open_clip.create_model("ViT-B-16", pretrained=None).half().float().eval()
    folder = tmp_path_factory.mktemp("quiltnet")
    write_folder(folder, {k: v.half() for k, v in reference.state_dict().items()}, open_clip_config("vit_b16"))
    yield reference, folder
    shutil.rmtree(folder)  # 300 MB that pytest would otherwise keep for three sessions


def test_quiltnet_equals_open_clip_vit_b16(real_size) -> None:
    import open_clip

    reference, folder = real_size
    student = load_open_clip_student(str(folder), "quiltnet", "vit_b16", image_size=224)
    images = torch.rand(2, 3, 224, 224)
    normalised = (images - student.pixel_mean) / student.pixel_std
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    with torch.no_grad():
        ids = student.tokenize(TEXTS)
        assert torch.equal(ids, tokenizer(TEXTS))
        assert torch.allclose(student.encode_text(ids), reference.encode_text(ids, normalize=True), atol=1e-5)
        grids, tokens = student.block_features_and_tokens(images, blocks=(11, 2, 5, 8))
        expected = reference.visual.forward_intermediates(normalised, indices=[2, 5, 8, 10, 11], output_fmt="NLC",
                                                          output_extra_tokens=True)
        patches, prefixes = expected["image_intermediates"], expected["image_intermediates_prefix"]
        for grid, index in zip(grids, (4, 0, 1, 2)):
            assert torch.allclose(grid.flatten(2).transpose(1, 2), patches[index], atol=1e-5)
        assert torch.allclose(tokens, torch.cat([prefixes[3], patches[3]], dim=1), atol=1e-5)
        assert torch.allclose(student.encode_image(images), reference.encode_image(normalised, normalize=True), atol=1e-5)
        # token views: with uniform weights, the class token's attention over the patch tokens
        block = reference.visual.transformer.resblocks[-1]
        normed = block.ln_1(tokens)
        attended = block.attn(normed[:, :1], normed[:, 1:], normed[:, 1:], need_weights=False)[0][:, 0]
        pooled = torch.nn.functional.normalize(reference.visual.ln_post(attended) @ reference.visual.proj, dim=-1)
        uniform = student.encode_weighted_tokens(tokens, torch.ones(2, tokens.shape[1] - 1))
        assert torch.allclose(uniform, pooled, atol=1e-5)


def test_quiltnet_trains_evaluates_and_exports_at_real_size(real_size, tmp_path) -> None:
    """python main.py --config configs/bcss_quiltnet.yaml on synthetic tiles with the random QuiltNet folder
    (one iteration, tiny teacher); then evaluation and CAM export of its checkpoint."""
    from construct.commands import evaluate, export

    _, folder = real_size
    run = tmp_path / "run"
    opts = [f"model.student.checkpoint={folder}", "model.teacher.checkpoint=null", "model.teacher.preset=tiny",
            f"data.root={tmp_path / 'data'}", f"work_dir={run}", "testbed.dataset={train: 2, val: 1, test: 1, seed: 0}",
            "data.num_workers=0", "train.max_iters=1", "train.batch_size=2"]
    result = subprocess.run([sys.executable, "main.py", "--config", str(REPO / "configs" / "bcss_quiltnet.yaml"),
                             "--device", "cpu", "--opts", *opts], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(run / "best.pth", weights_only=True)
    assert checkpoint["backbones"]["student"] == "quiltnet" and checkpoint["backbones"]["quiltnet"] == str(folder)
    model_args = ["--config", str(run / "config.yaml"), "--checkpoint", str(run / "best.pth"), "--device", "cpu",
                  "--no-tta", "--no-crf"]
    evaluate.main(evaluate.build_parser().parse_args([*model_args, "--protocol", "predicted", "--out", str(tmp_path)]))
    assert json.loads((tmp_path / "metrics_test_predicted.json").read_text())["images"] == 1
    export.main(export.build_parser().parse_args([*model_args, "--split", "test", "--out-dir", str(tmp_path / "masks")]))
    assert len(list((tmp_path / "masks").glob("*.png"))) == 1


# --- OpenCLIP students: the tiny preset, loading, token views --------------------------------------


@pytest.mark.parametrize("name", ["quiltnet", "openai_clip"])
def test_tiny_student_passes_equal_open_clip_forward(name: str) -> None:
    student = OpenClipStudent(name, "tiny", image_size=64)
    assert student.clip.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == (
        "QuickGELU" if name == "openai_clip" else "GELU")
    images = torch.rand(2, 3, 64, 64)
    normalised = (images - student.pixel_mean) / student.pixel_std
    with torch.no_grad():
        grids = student.block_features(images, blocks=(3, 0))
        expected = student.clip.visual.forward_intermediates(normalised, indices=[0, 3], intermediates_only=True)
        assert torch.allclose(grids[0], expected["image_intermediates"][1], atol=1e-6)
        assert torch.allclose(grids[1], expected["image_intermediates"][0], atol=1e-6)
        assert torch.allclose(student.encode_image(images), student.clip.encode_image(normalised, normalize=True),
                              atol=1e-6)
        # another grid: the position embedding is resampled, as CONCH's trunk does
        assert student.block_features(torch.rand(1, 3, 96, 96), blocks=(1,))[0].shape == (1, 192, 6, 6)


def test_token_views_ignore_zero_weights_and_pass_the_gradient() -> None:
    student = OpenClipStudent("quiltnet", "tiny", image_size=64)
    _, tokens = student.block_features_and_tokens(torch.rand(2, 3, 64, 64), blocks=(1,))
    kept = torch.tensor([0, 3, 5, 9])
    weights = torch.zeros(2, 16)
    weights[:, kept] = 1.0
    subset = torch.cat([tokens[:, :1], tokens[:, 1:][:, kept]], dim=1)
    expected = student.encode_weighted_tokens(subset, torch.ones(2, kept.numel()))
    assert torch.allclose(student.encode_weighted_tokens(tokens, weights), expected, atol=1e-5)
    soft = torch.rand(2, 16, requires_grad=True)
    student.encode_weighted_tokens(tokens, soft).sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.parameters())


def test_folder_and_file_load_strictly(tmp_path) -> None:
    source = OpenClipStudent("quiltnet", "tiny", image_size=224)
    folder = write_folder(tmp_path / "quiltnet", source.clip.state_dict(), open_clip_config("tiny"))
    loaded = load_open_clip_student(str(folder), "quiltnet", "tiny", image_size=224)
    from_file = load_open_clip_student(str(folder / "open_clip_pytorch_model.bin"), "quiltnet", "tiny", image_size=224)
    images = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), source.encode_image(images))
        assert torch.equal(from_file.block_features(images, (2,))[0], source.block_features(images, (2,))[0])
    smaller = load_open_clip_student(str(folder), "quiltnet", "tiny", image_size=64)  # 14x14 → 4x4 positions
    assert smaller.clip.visual.positional_embedding.shape == (17, 192)


def test_loading_errors_are_one_line(tmp_path) -> None:
    state = OpenClipStudent("quiltnet", "tiny", image_size=64).clip.state_dict()
    folder = write_folder(tmp_path / "quiltnet", state, open_clip_config("tiny"))

    def error(*args, **kwargs) -> str:
        with pytest.raises(CheckpointError) as info:
            load_open_clip_student(*args, **kwargs)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "wisdomik/QuiltNet-B-16" in error(str(tmp_path / "absent"), "quiltnet", "tiny", 64)
    assert "model_cfg.vision_cfg.layers is 4" in error(str(folder), "quiltnet", "vit_b16", 64)
    (folder / CONFIG_FILE).write_text(json.dumps(open_clip_config("tiny", quick_gelu=True)))
    assert "a QuickGELU model (OpenAI CLIP ViT-B/16), not QuiltNet-B-16: set model.student.name: openai_clip" in error(
        str(folder), "quiltnet", "tiny", 64)
    assert load_open_clip_student(str(folder), "openai_clip", "tiny", 64).name == "openai_clip"
    (folder / CONFIG_FILE).unlink()
    torch.save({k: v for k, v in state.items() if k != "text_projection"}, folder / "open_clip_pytorch_model.bin")
    assert "missing: text_projection" in error(str(folder), "quiltnet", "tiny", 64)
    # a CONCH file given for QuiltNet, and the reverse
    conch_file = tmp_path / "conch.bin"
    torch.save(load_conch(None, image_size=64, preset="tiny").state_dict(), conch_file)
    message = error(str(conch_file), "quiltnet", "tiny", 64)
    assert "QuiltNet-B-16" in message and "CONCH file" in message and "model.student.name: conch" in message
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    for given in (folder, folder / "open_clip_pytorch_model.bin"):
        with pytest.raises(CheckpointError, match="is an OpenCLIP ViT .* not CONCH: set model.student.name: quiltnet"):
            load_conch(str(given), image_size=64, preset="tiny")


def test_config_choices(tmp_path) -> None:
    config = load_config(REPO / "configs" / "bcss_quiltnet.yaml")
    assert (config.model.student.name, config.model.student.checkpoint) == ("quiltnet", "pretrained_models/quiltnet")
    assert load_config(REPO / "configs" / "luad_quiltnet.yaml").model.student.name == "quiltnet"
    with pytest.raises(ConfigError, match="model.conch.normalization"):
        tiny_config(*TINY_QUILTNET, "model.conch.normalization=dataset", "model.conch.dataset_mean=[0.5,0.5,0.5]",
                    "model.conch.dataset_std=[0.2,0.2,0.2]")
    with pytest.raises(ConfigError, match="model.student.name"):
        load_config(REPO / "configs" / "demo.yaml", ["model.student.name=quiltnet"])


def test_checkpoints_name_their_student(tmp_path) -> None:
    quiltnet = tiny_config(*TINY_QUILTNET)
    model = build_model(quiltnet)
    assert model.student.name == "quiltnet" and model.adapters["2"].body[0].weight.shape[0] == 192
    with torch.no_grad():
        text = model.student.encode_text(model.student.tokenize(list(BCSS.prompts)))
    assert torch.allclose(model.prototypes(), text, atol=1e-6)
    path = tmp_path / "best.pth"
    identity = backbone_identity(model.student, None, None, None)
    save_checkpoint({"model": model.trainable_state_dict(), "classes": list(BCSS.names), "backbones": identity}, path)
    assert load_trained_model(quiltnet, path).student.name == "quiltnet"
    with pytest.raises(CheckpointError, match=r"trained with the quiltnet student, this config gives conch \(model.student.name: quiltnet"):
        load_trained_model(tiny_config(), path)
    # checkpoints from before the student could be chosen were trained on CONCH
    save_checkpoint({"model": model.trainable_state_dict(), "classes": list(BCSS.names), "backbones": {}}, path)
    with pytest.raises(CheckpointError, match="trained with the conch student, this config gives quiltnet"):
        load_trained_model(quiltnet, path)


def test_tiny_quiltnet_trains_draws_prototypes_and_predicts_a_slide(tmp_path) -> None:
    """The tiny preset through training, then the prototype figures and a whole slide from its checkpoint."""
    from construct.commands import predict_slides, prototypes
    from construct.engine.distributed import DistInfo
    from construct.engine.trainer import train

    generate_dataset(tmp_path / "data", n_train=4, n_val=1, n_test=1, seed=0, classes=BCSS)
    config = tiny_config(*TINY_QUILTNET, f"data.root={tmp_path / 'data'}", f"work_dir={tmp_path / 'run'}",
                         "testbed.dataset=null", "train.max_iters=2", "train.batch_size=2")
    assert train(config, DistInfo(device=torch.device("cpu"))).iterations == 2
    run = tmp_path / "run"
    name = next((tmp_path / "data" / "val" / "img").glob("*.png")).name
    prototypes.main(prototypes.build_parser().parse_args([
        "--config", str(run / "config.yaml"), "--checkpoint", str(run / "best.pth"), "--device", "cpu",
        "--split", "val", "--images", name, "--out-dir", str(tmp_path / "figures")]))
    assert (tmp_path / "figures" / f"{Path(name).stem}_prototypes.png").stat().st_size > 10_000
    predict_slides.main(predict_slides.build_parser().parse_args([
        str(FIXTURES / "cmu_small_region.svs"), "--config", str(run / "config.yaml"), "--checkpoint", str(run / "best.pth"),
        "--device", "cpu", "--no-tta", "--no-crf", "--no-regions", "--out-dir", str(tmp_path / "slides"),
        "--opts", "data.mpp=4.0"]))
    assert (tmp_path / "slides" / "cmu_small_region_mask.tif").is_file()
