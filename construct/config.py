"""Typed YAML configuration: nested dataclasses with defaults, strict loading, CLI overrides.

A YAML file is read with ``yaml.safe_load`` and mapped onto :class:`Config`. Unknown keys, wrong
types and missing required values raise :class:`ConfigError` naming the file and the dotted key
(with the closest valid key for a typo). ``--opts a.b=value`` overrides are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from construct.atomic import write_text_atomic
from construct.errors import ConfigError

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

PAPER_SIM_OVERRIDES: tuple[str, ...] = ("loss.sim_views=image", "loss.sim_view_size=null", "loss.sim_max_pairs=0",
                                        "loss.sim_gradient=encoder")
"""The paper's L_sim as --opts: masked image views through CONCH at full size, every pair, gradient
through the encoder (construct_lab.bench and construct_lab.ablate compare it with the default)."""


@dataclass
class SyntheticConfig:
    """A synthetic dataset of the configured classes, generated under ``data.root`` when it is missing."""

    train: int = 600
    """Number of training tiles (image-level labels in the file names)."""
    val: int = 60
    """Number of validation tiles (with masks)."""
    test: int = 60
    """Number of test tiles (with masks)."""
    seed: int = 0
    """Generator seed: the same seed gives the same dataset."""
    style: Literal["default", "variant"] = "default"
    """Colours and structure sizes: 'default' is the painter's own palette, 'variant' another stain
    at 1.3x magnification."""
    painter: Literal["classic", "noise", "glands"] = "classic"
    """How tissue is drawn (construct_lab/synthetic/painters.py): 'classic' (the testbed's first painter), or
    'noise' / 'glands', which draw the same classes with other shapes, layouts and colours; a
    dataset by a painter the towers were not pretrained on measures transfer."""
    textures: list[int] | None = None
    """Generator texture of each class (0 tumour, 1 stroma, 2 lymphocytes, 3 necrosis); null = 0, 1, 2, ...
    in class order."""
    label_format: Literal["bits", "spaced"] = "bits"
    """Train labels in the file names as [1101] or [1 1 0 1]; with data.label_csv set, a CSV is written instead."""
    val_folder: str = "val"
    """Name of the validation folder it writes (one of data.split_folders.val)."""
    alveoli: bool = False
    """White air spaces inside tissue, labelled background (as in lung)."""


@dataclass
class TestbedConfig:
    """The offline testbed (demo, tests, ablation). The method never reads this section: the lab
    (``python main.py`` through construct_lab.prepare) makes what it asks for before training."""

    seed: int | None = None
    """When set, model.conch.checkpoint and model.teacher.checkpoint are the testbed's tiny towers
    (<folder>/pytorch_model.bin and <folder>/mit), pretrained offline with this seed on first use
    (python -m construct_lab.pretrain_tiny); null = weights you provide, or random ones."""
    dataset: SyntheticConfig | None = None
    """When set, a synthetic dataset with these sizes is generated at data.root if missing."""


@dataclass
class ClassConfig:
    """One tissue class of the dataset (configs/datasets/ hold the presets)."""

    name: str
    """Short name used in tables, masks, legends and GeoJSON (e.g. TUM)."""
    prompt: str
    """Pathology description whose CONCH text embedding initialises the class's prototypes."""
    color: list[int]
    """Palette colour [r, g, b] (0-255) in masks, overviews and GeoJSON."""


@dataclass
class BackgroundConfig:
    name: str = "BACK"
    """Name of the background class in tables and legends."""
    color: list[int] = field(default_factory=lambda: [255, 255, 255])
    """Palette colour [r, g, b] of background."""
    index: int | None = None
    """Value of background in the dataset's masks (0..number of classes); null = the number of
    classes, i.e. after the tissue classes (BCSS-WSSS and LUAD-HistoSeg: 4)."""


@dataclass
class BackgroundPriorConfig:
    """Pixels brighter than a grey level are background (lung: white alveoli are not tissue)."""

    grey_threshold: int = 200
    """A pixel whose grey value (mean of R, G, B) exceeds this is forced to background."""
    min_size: int = 50
    """Bright regions smaller than this many pixels are left to the model (small holes removed)."""


@dataclass
class SplitFoldersConfig:
    """Folder names accepted for each split under data.root (the first that exists is used)."""

    train: list[str] = field(default_factory=lambda: ["train"])
    """Train tiles: <root>/<name>/*.png, or <root>/<name>/img/*.png when that folder exists (tiles may
    be .png, .jpg/.jpeg, .tif/.tiff or .bmp, of any size: training resizes them to model.image_size)."""
    val: list[str] = field(default_factory=lambda: ["val", "valid"])
    """Validation: <root>/<name>/img/ and <root>/<name>/mask/ (only one of them may exist); a mask is
    the lossless .png/.tif/.tiff of its image's file stem, of the image's size."""
    test: list[str] = field(default_factory=lambda: ["test"])
    """Test: <root>/<name>/img/ and <root>/<name>/mask/."""


@dataclass
class DataConfig:
    name: str = "dataset"
    """Dataset name shown in tables and reports."""
    classes: list[ClassConfig] = field(default_factory=list)
    """Tissue classes in label order: name, prompt and colour each (at least 2; include a preset
    from configs/datasets/ with _base_, or list your own)."""
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    label_csv: str | None = None
    """Image-level train labels: null = in the file names ([1101] or [1 1 0 1]); a CSV path (relative
    to data.root unless absolute) with a 'filename' column and either one 0/1 column per class or a
    'labels' column of class names separated by spaces, commas or semicolons. Cells are separated by
    commas, semicolons or tabs (read from the header line)."""
    split_folders: SplitFoldersConfig = field(default_factory=SplitFoldersConfig)
    background_prior: BackgroundPriorConfig | None = None
    """When set, bright pixels are forced to background in every predicted mask (LUAD-HistoSeg:
    on; BCSS-WSSS: off)."""
    root: str = "data/BCSS-WSSS"
    """Dataset root holding the train, validation and test split folders."""
    val_split: Literal["val", "valid", "test"] = "val"
    """Split used for model selection during training ('valid' is the same as 'val')."""
    num_workers: int = 4
    """DataLoader worker processes (0 = load in the main process)."""
    mpp: float = 0.25
    """Resolution of the training tiles in µm/px (BCSS-WSSS: 0.25); whole slides are resampled to it."""


@dataclass
class StudentConfig:
    """Which frozen vision-language model is the student (docs/students.md)."""

    name: Literal["conch", "quiltnet", "openai_clip"] = "conch"
    """'conch' (CONCH ViT-B/16, gated, CC BY-NC-ND 4.0; its file and options in model.conch), or an
    OpenCLIP ViT-B/16 read from model.student.checkpoint: 'quiltnet' (QuiltNet-B-16, MIT) or
    'openai_clip' (OpenAI CLIP ViT-B/16, MIT)."""
    checkpoint: str | None = "pretrained_models/quiltnet"
    """OpenCLIP students only: the Hugging Face folder as downloaded (open_clip_config.json and
    open_clip_pytorch_model.bin or open_clip_model.safetensors) or the weight file itself; null =
    random weights. The CONCH student reads model.conch.checkpoint instead."""
    preset: Literal["vit_b16", "tiny"] = "vit_b16"
    """OpenCLIP students only: the real ViT-B/16, or a tiny one of the same classes for tests."""


@dataclass
class ConchConfig:
    checkpoint: str | None = "pretrained_models/conch/pytorch_model.bin"
    """Official CONCH weights (model.student.name: conch); null = random weights (tests and the offline demo)."""
    preset: Literal["vit_b16", "tiny"] = "vit_b16"
    """Architecture: the real ViT-B/16, or a tiny one of the same classes for tests and the demo."""
    tokenizer: str | None = None
    """CONCH tokenizer JSON; null = the file shipped in the conch-fork package."""
    normalization: Literal["clip", "dataset"] = "clip"
    """Statistics the feature pass (what the CAMs see) normalises the pixels with: CONCH's own (CLIP)
    or dataset_mean/dataset_std (the released code feeds CONCH BCSS-normalised pixels). L_sim's image
    views always get CLIP normalisation, as in the released code."""
    dataset_mean: list[float] | None = None
    """Per-channel RGB mean (0-1) of the training tiles, for normalization: dataset and
    inference.crf_image: denormalized (configs/bcss_released.yaml gives BCSS-WSSS's, as released)."""
    dataset_std: list[float] | None = None
    """Per-channel RGB std (0-1) of the training tiles, with dataset_mean."""


@dataclass
class TeacherConfig:
    checkpoint: str | None = "pretrained_models/mit_b1"
    """MiT-B1 weights: a Hugging Face folder (nvidia/mit-b1) or NVlabs/mmseg .pth; null = random."""
    preset: Literal["mit_b1", "tiny"] = "mit_b1"
    """Architecture: the real MiT-B1, or a tiny one for tests and the demo."""
    mode: Literal["eval", "train"] = "eval"
    """'eval': the frozen teacher is deterministic. 'train' (the released code): it stays in train mode
    during training, so stochastic depth (drop-path rate 0.1) randomly drops its residual branches."""


@dataclass
class ModelConfig:
    image_size: int = 224
    """Training tile size in pixels (a multiple of 16)."""
    student: StudentConfig = field(default_factory=StudentConfig)
    conch: ConchConfig = field(default_factory=ConchConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    feature_blocks: list[int] = field(default_factory=lambda: [2, 5, 8, 11])
    """Student trunk blocks (0-indexed) that form the feature pyramid, one level each (ViT-B/16
    students have 12 blocks, the tiny presets 4)."""
    level_scales: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])
    """Resize factor of each pyramid level relative to the patch grid (0.5 = 2x2 average pool)."""
    cam_levels: list[int] = field(default_factory=lambda: [3])
    """Pyramid levels (0-indexed) whose refined features produce CAMs."""
    cam_level_weights: list[float] = field(default_factory=lambda: [1.0])
    """Weight of each CAM level in the fused CAM (same length as cam_levels)."""
    distill_pairs: list[list[int]] = field(default_factory=lambda: [[3, 3]])
    """[student level, teacher stage] pairs matched by the relational structural loss."""
    allow_unused_distill_levels: bool = False
    """Allow distill_pairs on levels outside cam_levels (each gets its own adapter). The released code
    distils level 2 while its CAMs come from level 3: L_struct then trains an adapter whose output
    reaches no CAM, so CAMs, logits and the other parameters train as with loss.struct_weight 0."""
    adapter_padding: Literal["reflect", "zeros"] = "reflect"
    """Padding of the adapters' 3x3 depthwise convolution: reflect, or zeros (the released code; zero
    padding lets the kernels mark the tile border)."""
    projector_input: Literal["normalized", "raw"] = "normalized"
    """What the adaptive layer maps: the L2-normalised prototypes, or the raw prototype parameters
    (the released code; the same at initialisation, different once the prototypes' norms drift)."""
    projector_init: Literal["default", "trunc_normal"] = "default"
    """Initial weights of the adaptive layer: PyTorch's Linear default, or truncated normal std 0.02
    with zero biases (the released code)."""
    prototypes_per_class: int = 1
    """K learnable prototypes per class; a class's CAM is the max over its K prototypes."""
    projector_ratio: float = 0.5
    """Hidden width of the prototype MLP as a fraction of the 512-d text embedding."""
    cam_scale_init: float = 1.0 / 0.07
    """Initial value of the learnable cosine scale of the CAMs."""


@dataclass
class LossConfig:
    cls_weight: float = 1.0
    """lambda_cls: weight of the image-level BCE loss (0 = off)."""
    struct_weight: float = 1.5
    """lambda_struct: weight of the relational structural distillation loss (0 = off, no teacher)."""
    sim_weight: float = 0.2
    """lambda_sim: weight of the FG/BG contrastive loss (0 = off). L_sim pulls each CAM towards what
    CONCH's text prompt says the class looks like, so on a cohort whose classes CONCH may not know,
    compare with 0 on your validation split (docs/ablation.md)."""
    fg_threshold: float = 0.5
    """alpha of the adaptive FG threshold: FG = CAM >= alpha * max."""
    threshold_max: Literal["per_image", "per_class"] = "per_class"
    """Maximum the FG threshold is relative to: one per image (authors' code) or per class."""
    temperature: float = 0.07
    """InfoNCE temperature tau of the FG/BG contrastive loss."""
    memory_bank_size: int = 2048
    """Number of past BG embeddings kept as extra negatives (FIFO)."""
    sim_views: Literal["tokens", "image"] = "tokens"
    """How L_sim embeds the FG/BG views. 'image' (the paper): the masked images through the CONCH
    image encoder. 'tokens': the forward pass's last-block tokens pooled by CONCH's attentional
    pooler with the view as attention weights (no second trunk pass; docs/ablation.md)."""
    sim_view_size: int | None = None
    """Image views only: side in px at which the views are encoded (null = model.image_size)."""
    sim_max_pairs: int = 0
    """Cap on the (image, class) pairs of L_sim per step, drawn uniformly; 0 = all pairs."""
    sim_gradient: Literal["encoder", "prototypes", "none"] = "encoder"
    """'encoder': L_sim's gradient reaches the CAMs (through the encoder or the pooling weights) and
    the prototypes; 'prototypes': views are embedded without a graph, only the prototypes learn;
    'none' (the released code): the term is computed and logged but has no gradient at all, so it
    trains exactly like loss.sim_weight 0 (it adds a constant to the loss)."""
    sim_checkpoint_chunk: int = 0
    """Image views with gradient: encode in chunks of this many views under activation
    checkpointing, holding one chunk's activations at a time (0 = all at once, all kept)."""
    sim_warmup: float = 0.0
    """Share of the training iterations (0 <= x < 1) during which L_sim is off and not computed;
    from then on it counts at full weight lambda_sim (0 = on from the start, as in the paper)."""


@dataclass
class TrainConfig:
    epochs: int = 2
    """Passes over the training split."""
    max_iters: int | None = None
    """Stop after this many iterations (overrides epochs when smaller); null = all epochs."""
    batch_size: int = 10
    """Images per step and per process."""
    lr: float = 2e-5
    """AdamW learning rate at iteration 0."""
    weight_decay: float = 1e-3
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    poly_power: float = 1.0
    """Poly decay lr_t = lr * (1 - t/T) ** poly_power (after the warm-up, if any)."""
    warmup_iters: int = 0
    """Linear warm-up iterations W in the released code's form: lr_t = lr * (1 - (1 - t/W) * (1 -
    warmup_ratio)) for t < W, then lr * (1 - (t - W)/T) ** poly_power. 0 = none (the released
    config sets 0, so its schedule is this project's plain poly decay)."""
    warmup_ratio: float = 1e-6
    """Learning-rate multiplier at iteration 0 of the warm-up."""
    seed: int = 42
    """Seeds data order, augmentation and random (checkpoint-less) backbones."""
    mixed_precision: bool = True
    """Autocast on CUDA in autocast_dtype (CPU always runs fp32)."""
    autocast_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    """Mixed-precision type of training on CUDA. float16 (the released code's torch.cuda.amp) also
    scales the loss with a GradScaler, which skips steps whose gradients overflow."""
    validation: Literal["fast", "full"] = "fast"
    """Validation during training (it picks best.pth): 'fast' = one plain pass, no CRF; 'full' = the
    inference pipeline of this config (TTA, CRF, inference.presence), as the released code validates."""
    eval_interval: int = 0
    """Validate every N iterations; 0 = once per epoch."""
    checkpoint_interval: int = 0
    """Also write latest.pth every N iterations; 0 = only at each validation."""
    log_interval: int = 10
    """Write a JSONL log line every N iterations."""
    fast_path: bool = False
    """CUDA only: frozen CONCH and MiT forwards replayed as CUDA graphs with bf16 weights, fused
    AdamW, and the non-finite-loss check kept on the device and read at log, validation and
    checkpoint iterations (the error still names the first bad iteration). Off until the GPU check
    shows it matches eager (docs/benchmarks.md). On the CPU only the deferred check applies; the
    rest is left out with a note."""


@dataclass
class CrfConfig:
    enabled: bool = True
    """Refine masks with a dense CRF (evaluation and export; training validation never uses it)."""
    iterations: int = 5
    """Mean-field iterations."""
    gaussian_sxy: float = 15.0
    """Spatial std (px) of the smoothness kernel."""
    gaussian_compat: float = 30.0
    """Weight of the smoothness kernel."""
    bilateral_sxy: float = 10.0
    """Spatial std (px) of the appearance kernel."""
    bilateral_srgb: float = 20.0
    """Colour std of the appearance kernel."""
    bilateral_compat: float = 50.0
    """Weight of the appearance kernel."""


@dataclass
class SlideConfig:
    """Whole-slide prediction (visualization_utils/predict_slide.py; generate_cam.py --input-dir)."""

    window: int = 512
    """Side (px at the model's resolution) of the windows the dense CRF refines one at a time; each CRF
    worker holds about 340 bytes per pixel of (window + 2 * margin)^2, whatever the slide's size."""
    margin: int = 48
    """Context (px at the model's resolution) added on every side of a CRF window and cut off after,
    so neighbouring windows meet without seams."""
    tissue_mpp: float = 8.0
    """Resolution (µm/px) of the thumbnail that tissue is detected on (coarser for slides over 4096 px there)."""
    tissue_saturation: float = 0.07
    """Minimum HSV saturation (0-1) of a tissue pixel on that thumbnail; glass is grey-white."""
    regions_simplify_um: float = 1.0
    """Tolerance (µm) the class outlines of <name>_regions.geojson are simplified with (all classes together,
    so that neighbours keep sharing their edges); they are traced on the coarsest level of the mask
    pyramid whose pixel is no wider than half this."""
    regions_min_area_um2: float = 25.0
    """Regions smaller than this (µm²) are left out of <name>_regions.geojson: specks smaller than a nucleus
    (the areas JSON still counts every pixel)."""


@dataclass
class InferenceConfig:
    presence: Literal["predicted", "ground_truth"] = "predicted"
    """Class gating of the CAMs: sigmoid(logit) > presence_gate, or the oracle from the GT mask."""
    presence_gate: float = 0.5
    """Probability above which a class counts as present under the predicted protocol."""
    background_power: float = 10.0
    """Background channel = (1 - max_c CAM_c) ** background_power."""
    cam_normalization: Literal["after_tta", "per_pass"] = "after_tta"
    """When CAMs are ReLU'd and min-max scaled: once, on the TTA average of the raw CAMs; or on every
    TTA pass before averaging, the average left unscaled (the released code)."""
    upsample_align_corners: bool = False
    """Upsample the CAMs to the image with bilinear align_corners=True (the released code) or False."""
    crf_softmax: bool = False
    """Softmax over the 5 channels (4 gated CAMs in [0, 1] + background) before the dense CRF (the
    released code): it squeezes the unary towards uniform, so the CRF's pairwise terms weigh more."""
    tta: Literal["intensity", "resize"] = "intensity"
    """Test-time augmentation. 'intensity' (the authors' code, which made the paper's numbers): CONCH's
    normalised input times each factor at the tile's size; CAMs averaged, logits from the plain pass.
    'resize': the input resized by each factor; CAMs and logits averaged."""
    tta_factors: list[float] = field(default_factory=lambda: [0.9, 1.0, 1.1])
    """Test-time augmentation factors: intensity multipliers or resize scales, as inference.tta says
    ([1.0] = none; resize needs 1.0)."""
    tta_flip: bool = True
    """Test-time augmentation: also run each factor on the horizontally flipped image."""
    crf: CrfConfig = field(default_factory=CrfConfig)
    tile_stride: int | None = None
    """Stride of the sliding window on images larger than model.image_size; null = half the tile."""
    batch_size: int = 16
    """Images per forward pass at inference and validation."""
    mixed_precision: bool = True
    """bf16 autocast for inference on CUDA; false = fp32 (the released code evaluates in fp32)."""
    crf_image: Literal["exact", "denormalized"] = "exact"
    """Pixels the CRF's appearance kernel compares: the tile's own uint8 values, or (the released code)
    values rebuilt from the dataset-normalised tensor (model.conch.dataset_mean/std) and truncated,
    so float error leaves many of them one level lower."""
    fast_path: bool = False
    """CUDA only: CONCH's frozen forward replayed as CUDA graphs with bf16 weights, one graph per
    TTA pass shape (evaluation, export, slides); ignored on the CPU. Training validation follows
    train.fast_path instead."""
    slide: SlideConfig = field(default_factory=SlideConfig)


@dataclass
class EvaluationConfig:
    background: Literal["counted", "ignored"] = "counted"
    """How ground-truth background enters the metrics. 'counted' (TPRO, PBIP, ConStruct): a class of the
    (C+1)x(C+1) matrix, left out of the mean over tissue classes. 'ignored' (WSSS-Tissue): ground-truth
    background pixels are left out. Validation during training uses it too."""


@dataclass
class Stage2Config:
    """Stage 2: a segmentation network trained on stage-1 pseudo-masks (``construct-train-seg``).

    Its pseudo-masks are stage 1's predictions on the train split, gated by each tile's image-level
    labels and made with this config's ``inference`` settings (TTA, CRF), as ``generate_cam.py
    --split train`` writes them. Every inference command accepts its checkpoints.
    """

    checkpoint: str | None = None
    """Stage-1 checkpoint the pseudo-masks come from; null = <work_dir>/best.pth."""
    work_dir: str | None = None
    """Run folder of stage 2 (config.yaml, latest.pth, best.pth, log.jsonl); null = <work_dir>/stage2. The
    pseudo-masks are cached beside the stage-1 checkpoint, in pseudo_masks/."""
    backbone: Literal["segformer"] = "segformer"
    """Segmentation network: transformers' SegformerForSemanticSegmentation with C + 1 outputs (background
    is a class it learns)."""
    preset: Literal["mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5", "tiny"] | None = None
    """SegFormer size; null = model.teacher.preset (the MiT the teacher already uses)."""
    encoder_checkpoint: str | None = None
    """MiT weights the encoder starts from (the same formats as model.teacher.checkpoint); null =
    model.teacher.checkpoint, which needs preset to be the teacher's (or null). Random when both are null."""
    ignore: Literal["none", "crf_changed", "low_confidence"] = "none"
    """Noisy-label guard: pixels left out of the cross-entropy. 'none' = every pixel; 'crf_changed' =
    where the dense CRF changed stage 1's argmax; 'low_confidence' = where stage 1's top class
    probability is below confidence_threshold. Neither guard beat plain cross-entropy on the testbed
    (docs/ablation.md section 5), so the default is 'none'."""
    confidence_threshold: float = 0.5
    """Top probability (0-1) under which ignore: low_confidence leaves a pixel out."""
    iterations: int = 8000
    """Training iterations (batches per process)."""
    batch_size: int = 8
    """Tiles per step and per process."""
    lr: float = 6.0e-5
    """AdamW learning rate at iteration 0 (the decode head learns at 10x), poly decay to 0."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    poly_power: float = 1.0
    """Poly decay lr_t = lr * (1 - t/T) ** poly_power."""
    seed: int = 0
    """Seeds the decode head's initial weights, data order and augmentation."""
    mixed_precision: bool = True
    """bf16 autocast in training on CUDA (the CPU runs fp32)."""
    eval_interval: int = 1000
    """Validate (mIoU on data.val_split; it picks best.pth) and write latest.pth every N iterations."""
    checkpoint_interval: int = 0
    """Also write latest.pth every N iterations; 0 = only at each validation."""
    log_interval: int = 50
    """Write a JSONL log line every N iterations."""
    tta_flip: bool = False
    """Inference with a stage-2 checkpoint: average the horizontally flipped pass's probabilities."""
    crf: bool = False
    """Inference with a stage-2 checkpoint: refine the probabilities with the dense CRF of inference.crf."""


@dataclass
class Config:
    work_dir: str = "work_dirs/bcss/construct"
    """Run folder: resolved config.yaml, latest.pth, best.pth, logs."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    testbed: TestbedConfig = field(default_factory=TestbedConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{source}: '{key}' must not be null")
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key, source)
            except ConfigError:
                if len(args) == 2:
                    raise
        raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, source, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            # PyYAML reads 1e-3 (no dot) as a string; users mean the number.
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{source}: '{key}' must be {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _build(cls: type, values: dict[str, Any], source: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid keys: {', '.join(names)})"
        raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")
    kwargs = {k: _convert(v, hints[k], prefix + k, source) for k, v in values.items()}
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in kwargs:
            raise ConfigError(f"{source}: '{prefix}{name}' is required")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a field without a default was not given
        raise ConfigError(f"{source}: missing required value in '{prefix.rstrip('.') or 'root'}': {exc}") from None


def config_from_dict(values: dict[str, Any], source: str = "<dict>") -> Config:
    """Build a validated :class:`Config` from plain data (missing keys take their defaults)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    config = _build(Config, values, source)
    validate(config, source)
    return config


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--opts: expected key=value, got '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--opts: cannot parse the value of '{key}': {exc}") from None
    return key.strip().split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted ``key=value`` overrides (values parsed as YAML scalars) on raw config data."""
    for text in overrides:
        path, value = _parse_override(text)
        node = values
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return values


BASE_KEY = "_base_"
"""A config may name another file, or a list of files (relative to itself), whose values it overrides."""


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        where = f" (the {BASE_KEY} of {chain[-1]})" if chain else ""
        raise ConfigError(f"{path}: config file not found{where}")
    if path.resolve() in chain:
        raise ConfigError(f"{path}: {BASE_KEY} chain loops back to itself")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = values.pop(BASE_KEY, None)
    if base is None:
        return values
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: '{BASE_KEY}' must be a file path or a list of them (later ones override earlier ones)")
    merged: dict[str, Any] = {}
    for name in bases:
        merged = _merge(merged, _read_yaml(path.parent / name, chain + (path.resolve(),)))
    return _merge(merged, values)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file (and its ``_base_`` chain), apply ``--opts`` overrides, validate."""
    path = Path(path)
    values = _read_yaml(path)
    source = str(path) + (" with --opts" if overrides else "")
    return config_from_dict(apply_overrides(values, overrides or []), source)


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain data (lists, dicts, scalars) for YAML files and checkpoints."""
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with :func:`load_config`)."""
    write_text_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True))


def validate(config: Config, source: str) -> None:
    """Cross-field checks that types alone cannot express."""
    model = config.model
    levels = len(model.feature_blocks)

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: '{key}' {message}")

    if model.image_size <= 0 or model.image_size % 16:
        fail("model.image_size", f"must be a positive multiple of 16, got {model.image_size}")
    if len(model.level_scales) != levels:
        fail("model.level_scales", f"needs one entry per feature block ({levels}), got {len(model.level_scales)}")
    for i, scale in enumerate(model.level_scales):
        if not (scale >= 1.0 or (scale > 0 and abs(1.0 / scale - round(1.0 / scale)) < 1e-6)):
            fail(f"model.level_scales[{i}]", f"must be >= 1 (upsampling) or 1/k (k x k average pooling), got {scale}")
    if not model.cam_levels:
        fail("model.cam_levels", "must name at least one pyramid level")
    if len(model.cam_level_weights) != len(model.cam_levels):
        fail("model.cam_level_weights", f"needs one weight per CAM level ({len(model.cam_levels)})")
    for i, level in enumerate(model.cam_levels):
        if not 0 <= level < levels:
            fail(f"model.cam_levels[{i}]", f"must be a pyramid level in 0..{levels - 1}, got {level}")
    for i, pair in enumerate(model.distill_pairs):
        if len(pair) != 2 or not 0 <= pair[0] < levels or not 0 <= pair[1] < 4:
            fail(f"model.distill_pairs[{i}]", f"must be [student level 0..{levels - 1}, teacher stage 0..3], got {pair}")
        if pair[0] not in model.cam_levels and not model.allow_unused_distill_levels:
            # Distilling a level that feeds no CAM cannot change the output (method.md §9.1).
            fail(f"model.distill_pairs[{i}]", f"student level {pair[0]} must be one of model.cam_levels {model.cam_levels} "
                 "(or set model.allow_unused_distill_levels)")
    if config.testbed.seed is not None:
        conch_file = model.conch.checkpoint
        expected_teacher = None if conch_file is None else str(Path(conch_file).parent / "mit")
        if conch_file is None or Path(conch_file).name != "pytorch_model.bin":
            fail("model.conch.checkpoint", "must be <testbed folder>/pytorch_model.bin when testbed.seed is set")
        if model.teacher.checkpoint is None or Path(model.teacher.checkpoint) != Path(expected_teacher):
            fail("model.teacher.checkpoint", f"must be {expected_teacher} (beside the testbed CONCH) when testbed.seed is set")
        if model.conch.preset != "tiny" or model.teacher.preset != "tiny":
            fail("testbed.seed", "needs the tiny presets (model.conch.preset and model.teacher.preset: tiny)")
        if model.student.name != "conch":
            fail("model.student.name", "must be conch when testbed.seed is set (the testbed's towers are CONCH-shaped)")
    validate_dataset(config.data, fail)
    dataset = config.testbed.dataset
    if dataset is not None and dataset.val_folder not in config.data.split_folders.val:
        fail("testbed.dataset.val_folder", f"'{dataset.val_folder}' is not one of data.split_folders.val "
             f"{config.data.split_folders.val}")
    if model.prototypes_per_class < 1:
        fail("model.prototypes_per_class", "must be at least 1")
    if len(config.train.betas) != 2:
        fail("train.betas", f"must hold two numbers, got {config.train.betas}")
    if config.train.batch_size < 1:
        fail("train.batch_size", "must be at least 1")
    if not 0.0 < config.loss.fg_threshold < 1.0:
        fail("loss.fg_threshold", f"must lie in (0, 1), got {config.loss.fg_threshold}")
    if config.loss.memory_bank_size < 0:
        fail("loss.memory_bank_size", "must be >= 0")
    if config.train.warmup_iters < 0:
        fail("train.warmup_iters", "must be >= 0 (0 = no warm-up)")
    if not 0.0 <= config.train.warmup_ratio <= 1.0:
        fail("train.warmup_ratio", f"must lie in [0, 1], got {config.train.warmup_ratio}")
    conch = model.conch
    needs_stats = conch.normalization == "dataset" or config.inference.crf_image == "denormalized"
    for key, values in (("dataset_mean", conch.dataset_mean), ("dataset_std", conch.dataset_std)):
        if values is None:
            if needs_stats:
                fail(f"model.conch.{key}", "is needed by model.conch.normalization: dataset and inference.crf_image: denormalized")
        elif len(values) != 3:
            fail(f"model.conch.{key}", f"needs 3 values (R, G, B), got {values}")
    if conch.normalization == "dataset" and model.student.name != "conch":
        fail("model.conch.normalization", f"'dataset' applies to the CONCH student only (model.student.name is "
             f"{model.student.name})")
    if conch.dataset_std is not None and any(v <= 0 for v in conch.dataset_std):
        fail("model.conch.dataset_std", f"must all be positive, got {conch.dataset_std}")
    if config.loss.sim_max_pairs < 0:
        fail("loss.sim_max_pairs", "must be >= 0 (0 = all pairs)")
    if not 0.0 <= config.loss.sim_warmup < 1.0:
        fail("loss.sim_warmup", f"must lie in [0, 1) (a share of the iterations), got {config.loss.sim_warmup}")
    if config.loss.sim_checkpoint_chunk < 0:
        fail("loss.sim_checkpoint_chunk", "must be >= 0 (0 = no activation checkpointing)")
    if config.loss.sim_views == "tokens":
        if config.loss.sim_view_size is not None or config.loss.sim_checkpoint_chunk:
            key = "sim_view_size" if config.loss.sim_view_size is not None else "sim_checkpoint_chunk"
            fail(f"loss.{key}", "only applies to loss.sim_views: image (token views run no encoder pass)")
    elif config.loss.sim_checkpoint_chunk and config.loss.sim_gradient != "encoder":
        fail("loss.sim_checkpoint_chunk", "needs loss.sim_gradient: encoder (prototype-only views keep no activations)")
    if config.loss.sim_view_size is not None and (config.loss.sim_view_size <= 0 or config.loss.sim_view_size % 16):
        fail("loss.sim_view_size", f"must be a positive multiple of 16, got {config.loss.sim_view_size}")
    if not config.inference.tta_factors:
        fail("inference.tta_factors", "must hold at least one factor (use [1.0] for none)")
    if any(factor <= 0 for factor in config.inference.tta_factors):
        fail("inference.tta_factors", f"must all be positive, got {config.inference.tta_factors}")
    if config.inference.tile_stride is not None and not 0 < config.inference.tile_stride <= model.image_size:
        fail("inference.tile_stride", f"must lie in 1..model.image_size ({model.image_size}) or tiles leave gaps")
    if config.inference.tta == "resize" and 1.0 not in config.inference.tta_factors:
        fail("inference.tta_factors", "must include 1.0 when inference.tta is 'resize' (CAMs are averaged on its grid)")
    if not config.data.mpp > 0:
        fail("data.mpp", f"must be a positive resolution in µm/px, got {config.data.mpp}")
    validate_stage2(config, fail)
    slide = config.inference.slide
    if slide.window < 1:
        fail("inference.slide.window", f"must be at least 1, got {slide.window}")
    if slide.margin < 0:
        fail("inference.slide.margin", f"must be >= 0, got {slide.margin}")
    if not slide.tissue_mpp > 0:
        fail("inference.slide.tissue_mpp", f"must be a positive resolution in µm/px, got {slide.tissue_mpp}")
    if not 0.0 < slide.tissue_saturation < 1.0:
        fail("inference.slide.tissue_saturation", f"must lie in (0, 1), got {slide.tissue_saturation}")
    if not slide.regions_simplify_um > 0:
        fail("inference.slide.regions_simplify_um", f"must be a positive length in µm, got {slide.regions_simplify_um}")
    if not slide.regions_min_area_um2 >= 0:
        fail("inference.slide.regions_min_area_um2", f"must be >= 0 µm², got {slide.regions_min_area_um2}")


def validate_stage2(config: Config, fail: typing.Callable[[str, str], None]) -> None:
    """The stage-2 section: positive budgets, a threshold in (0, 1), encoder weights that fit its preset."""
    stage2 = config.stage2
    for key in ("iterations", "batch_size", "eval_interval", "log_interval"):
        if getattr(stage2, key) < 1:
            fail(f"stage2.{key}", f"must be at least 1, got {getattr(stage2, key)}")
    if stage2.checkpoint_interval < 0:
        fail("stage2.checkpoint_interval", "must be >= 0 (0 = only at each validation)")
    if not 0.0 < stage2.confidence_threshold < 1.0:
        fail("stage2.confidence_threshold", f"must lie in (0, 1), got {stage2.confidence_threshold}")
    teacher = config.model.teacher
    if (stage2.encoder_checkpoint is None and teacher.checkpoint is not None and stage2.preset is not None
            and stage2.preset != teacher.preset):
        fail("stage2.preset", f"'{stage2.preset}' does not fit model.teacher.checkpoint (a {teacher.preset} encoder); "
             "set stage2.encoder_checkpoint to weights of that size")


def validate_dataset(data: DataConfig, fail: typing.Callable[[str, str], None]) -> None:
    """The dataset description: at least two uniquely named classes, RGB colours, a valid background."""
    if len(data.classes) < 2:
        fail("data.classes", f"needs at least 2 tissue classes, got {len(data.classes)} (include a preset from "
             "configs/datasets/ with _base_, or list name, prompt and color for each class)")
    seen: set[str] = set()
    for i, cls in enumerate(data.classes):
        if not cls.name.strip():
            fail(f"data.classes[{i}].name", "must not be empty")
        if cls.name in seen or cls.name == data.background.name:
            fail(f"data.classes[{i}].name", f"'{cls.name}' is used twice (class names and the background's must differ)")
        seen.add(cls.name)
        if not cls.prompt.strip():
            fail(f"data.classes[{i}].prompt", f"must describe class {cls.name} (it initialises its prototypes)")
        _check_colour(cls.color, f"data.classes[{i}].color", fail)
    _check_colour(data.background.color, "data.background.color", fail)
    index = data.background.index
    if index is not None and not 0 <= index <= len(data.classes):
        fail("data.background.index", f"must be a mask value in 0..{len(data.classes)}, got {index}")
    for split in ("train", "val", "test"):
        if not getattr(data.split_folders, split):
            fail(f"data.split_folders.{split}", "must name at least one folder")
    prior = data.background_prior
    if prior is not None:
        if not 0 <= prior.grey_threshold < 255:
            fail("data.background_prior.grey_threshold", f"must lie in 0..254, got {prior.grey_threshold}")
        if prior.min_size < 0:
            fail("data.background_prior.min_size", f"must be >= 0, got {prior.min_size}")


def _check_colour(color: list[int], key: str, fail: typing.Callable[[str, str], None]) -> None:
    if len(color) != 3 or any(not 0 <= c <= 255 for c in color):
        fail(key, f"must be [r, g, b] with values 0-255, got {color}")
