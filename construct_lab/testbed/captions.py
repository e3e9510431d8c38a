"""Captions for synthetic tissue: varied templates and paraphrases of each class, as in the
captioned pathology images CONCH was trained on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from construct_lab.synthetic.tiles import GLASS

# Paraphrases of each generator texture (tumour, stroma, lymphocytes, necrosis, glass), in the
# vocabulary of the BCSS-WSSS prompts that the demo gives those textures.
CLASS_PHRASES: tuple[tuple[str, ...], ...] = (
    ("tumor", "tumour", "tumor cells", "malignant epithelial cells", "carcinoma", "invasive carcinoma",
     "pleomorphic hyperchromatic nuclei", "cancerous epithelium"),
    ("stroma", "connective tissue", "collagen fibers", "fibrous stroma", "fibroblasts and collagen",
     "pink fibrous tissue", "desmoplastic stroma"),
    ("lymphocytes", "immune cells", "a lymphocytic infiltrate", "dense small round dark nuclei",
     "inflammatory cells", "tumor-infiltrating lymphocytes"),
    ("necrosis", "necrotic tissue", "dead tissue", "nuclear debris", "pale eosinophilic necrotic areas",
     "ghost cells and debris"),
    ("background", "empty glass", "no tissue", "blank slide background"),
)
TEMPLATES: tuple[str, ...] = (
    "{}.", "an H&E image of {}.", "a histopathology image showing {}.", "H&E stained section with {}.",
    "this patch contains {}.", "microscopy of breast tissue: {}.", "photomicrograph of {}.",
    "a region of {}.", "{} in a breast cancer section.", "high power view of {}.",
)


def join_phrases(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(rng: np.random.Generator, classes: Sequence[int], prompts: Sequence[str], prompt_rate: float = 0.2) -> str:
    """A caption naming ``classes`` (generator texture indices, glass allowed); for one tissue class it is
    sometimes that class's prototype prompt itself, so the prompts are among what CONCH learned."""
    classes = list(classes)
    if len(classes) == 1 and classes[0] != GLASS and rng.random() < prompt_rate:
        return prompts[classes[0]]
    order = rng.permutation(len(classes))
    phrases = [CLASS_PHRASES[classes[i]][rng.integers(len(CLASS_PHRASES[classes[i]]))] for i in order]
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(join_phrases(phrases))
