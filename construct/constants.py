"""Model constants from the method specification: each network's input normalisation.

The class set is not a constant: it comes from the dataset description in the config
(configs/datasets/, construct.classes.ClassSet).
"""

# Each network normalises with the statistics it was trained with (CONCH: OpenAI CLIP's; the
# SegFormer teacher: ImageNet's), never with dataset statistics (the authors' code feeds CONCH
# BCSS-normalised pixels, method.md §9.3).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
