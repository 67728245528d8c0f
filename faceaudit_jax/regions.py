"""Face regions (CelebAMask-HQ order) and CelebA attributes, with the maps between them.

Everything in the package that names a region or an attribute goes through
this module, so a typo fails here with the list of valid names rather than as
a silent all-zero mask somewhere downstream.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

# CelebAMask-HQ's 19 classes; the id of a region is its index here.
REGIONS: tuple[str, ...] = (
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow",
    "r_brow", "l_ear", "r_ear", "mouth", "u_lip", "l_lip", "hair", "hat",
    "ear_r", "neck_l", "neck", "cloth",
)
NUM_REGIONS = len(REGIONS)
REGION_ID: dict[str, int] = {name: i for i, name in enumerate(REGIONS)}

# Human-readable labels for figures.
REGION_LABELS: dict[str, str] = {
    "background": "background", "skin": "skin", "nose": "nose",
    "eye_g": "eyeglasses", "l_eye": "left eye", "r_eye": "right eye",
    "l_brow": "left brow", "r_brow": "right brow", "l_ear": "left ear",
    "r_ear": "right ear", "mouth": "mouth", "u_lip": "upper lip",
    "l_lip": "lower lip", "hair": "hair", "hat": "hat", "ear_r": "earrings",
    "neck_l": "necklace", "neck": "neck", "cloth": "cloth",
}

# CelebA's 40 binary attributes in the column order of list_attr_celeba.txt.
ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes",
    "Bald", "Bangs", "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair",
    "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young",
)
NUM_ATTRIBUTES = len(ATTRIBUTES)
ATTRIBUTE_ID: dict[str, int] = {name: i for i, name in enumerate(ATTRIBUTES)}

# Attribute -> the parsed regions where it is visible. This is the map FaceX's
# ranking position (RP) uses: the RP of an attribute is the best rank among its
# regions. Attributes that are global (Male, Young, Attractive, Blurry) map to
# no region.
ATTRIBUTE_REGIONS: dict[str, tuple[str, ...]] = {
    "5_o_Clock_Shadow": ("skin",),
    "Arched_Eyebrows": ("l_brow", "r_brow"),
    "Attractive": (),
    "Bags_Under_Eyes": ("l_eye", "r_eye"),
    "Bald": ("hair", "skin"),
    "Bangs": ("hair",),
    "Big_Lips": ("u_lip", "l_lip"),
    "Big_Nose": ("nose",),
    "Black_Hair": ("hair",),
    "Blond_Hair": ("hair",),
    "Blurry": (),
    "Brown_Hair": ("hair",),
    "Bushy_Eyebrows": ("l_brow", "r_brow"),
    "Chubby": ("skin",),
    "Double_Chin": ("skin", "neck"),
    "Eyeglasses": ("eye_g",),
    "Goatee": ("skin",),
    "Gray_Hair": ("hair",),
    "Heavy_Makeup": ("skin", "l_eye", "r_eye", "u_lip", "l_lip"),
    "High_Cheekbones": ("skin",),
    "Male": (),
    "Mouth_Slightly_Open": ("mouth", "u_lip", "l_lip"),
    "Mustache": ("skin",),
    "Narrow_Eyes": ("l_eye", "r_eye"),
    "No_Beard": ("skin",),
    "Oval_Face": ("skin",),
    "Pale_Skin": ("skin",),
    "Pointy_Nose": ("nose",),
    "Receding_Hairline": ("hair",),
    "Rosy_Cheeks": ("skin",),
    "Sideburns": ("hair", "skin"),
    "Smiling": ("mouth", "u_lip", "l_lip"),
    "Straight_Hair": ("hair",),
    "Wavy_Hair": ("hair",),
    "Wearing_Earrings": ("ear_r",),
    "Wearing_Hat": ("hat",),
    "Wearing_Lipstick": ("u_lip", "l_lip"),
    "Wearing_Necklace": ("neck_l",),
    "Wearing_Necktie": ("cloth",),
    "Young": (),
}

# Attribute -> the region mask B used for proportional energy (binary-attribute
# CAM paper, eq. 7). Wider than ATTRIBUTE_REGIONS where the attribute's absence
# is judged from a larger area: "no earrings" is judged by looking at the ears.
ATTRIBUTE_MASK_REGIONS: dict[str, tuple[str, ...]] = {
    **ATTRIBUTE_REGIONS,
    "Wearing_Earrings": ("ear_r", "l_ear", "r_ear"),
    "Eyeglasses": ("eye_g", "l_eye", "r_eye"),
    "Wearing_Hat": ("hat", "hair"),
    "Wearing_Necklace": ("neck_l", "neck"),
    "Wearing_Necktie": ("cloth", "neck"),
    "Bald": ("hair", "skin"),
    "Mustache": ("skin", "u_lip"),
    "Goatee": ("skin", "l_lip"),
}


def _unknown(kind: str, name: object, valid: Sequence[str]) -> ValueError:
    return ValueError(
        f"unknown {kind} {name!r}; expected one of: {', '.join(valid)}")


def region_id(name: str) -> int:
    """Id of a region name; a clear error for names outside the vocabulary."""
    try:
        return REGION_ID[name]
    except (KeyError, TypeError):
        raise _unknown("region", name, REGIONS) from None


def region_ids(names: Iterable[str]) -> list[int]:
    return [region_id(n) for n in names]


def attribute_id(name: str) -> int:
    """Column of an attribute in the CelebA order; clear error otherwise."""
    try:
        return ATTRIBUTE_ID[name]
    except (KeyError, TypeError):
        raise _unknown("attribute", name, ATTRIBUTES) from None


def attribute_ids(names: Iterable[str]) -> list[int]:
    return [attribute_id(n) for n in names]


def regions_of(attribute: str, *, for_energy: bool = False) -> tuple[str, ...]:
    """Regions tied to an attribute (for RP, or the wider energy mask)."""
    attribute_id(attribute)  # validates the name
    table = ATTRIBUTE_MASK_REGIONS if for_energy else ATTRIBUTE_REGIONS
    return table[attribute]


def region_membership(attributes: Sequence[str], *, for_energy: bool = False) -> np.ndarray:
    """bool [len(attributes), NUM_REGIONS]: which regions make each attribute's mask."""
    table = np.zeros((len(attributes), NUM_REGIONS), dtype=bool)
    for a, name in enumerate(attributes):
        for r in regions_of(name, for_energy=for_energy):
            table[a, REGION_ID[r]] = True
    return table


def validate_parse_ids(parse, num_regions: int = NUM_REGIONS) -> None:
    """Raise if a parse map holds ids outside 0..num_regions-1 (host-side check)."""
    arr = np.asarray(parse)
    if arr.size == 0:
        return
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= num_regions:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"parse map holds region id {bad}; expected ids in 0..{num_regions - 1} "
            f"({', '.join(REGIONS[:num_regions])})")
