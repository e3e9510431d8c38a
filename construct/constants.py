"""Dataset and model constants from the method specification (docs: method.md §1)."""

CLASS_NAMES: tuple[str, ...] = ("TUM", "STR", "LYM", "NEC")
"""The four tissue classes, in label-bit order."""

ALL_CLASS_NAMES: tuple[str, ...] = CLASS_NAMES + ("BACK",)
NUM_CLASSES = len(CLASS_NAMES)
BACKGROUND_INDEX = 4
"""Mask value of background / excluded pixels."""

PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),  # TUM
    (0, 255, 0),  # STR
    (0, 0, 255),  # LYM
    (153, 0, 255),  # NEC
    (255, 255, 255),  # BACK
)

# Each network normalises with the statistics it was trained with (CONCH: OpenAI CLIP's; the
# SegFormer teacher: ImageNet's), never with dataset statistics (the authors' code feeds CONCH
# BCSS-normalised pixels, method.md §9.3).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
