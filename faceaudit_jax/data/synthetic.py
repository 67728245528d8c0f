"""Procedurally rendered cartoon faces: the embedded default data set.

Every image is a pure function of ``(seed, index)``: nothing is stored, any
image can be re-rendered from its index, and a data set of a million faces is a
range of integers. Each image comes with the batch format of docs/design.md,
including an exact parse map in the CelebAMask-HQ region order of
:mod:`faceaudit_jax.regions`.

Public functions: :func:`render` (pixels and labels of images by index),
:func:`sample_attributes` (attributes only, no pixels: cheap enough to filter
pools of millions of indices), :func:`sample_parameters` and
:func:`render_parameters` (the drawing parameters, e.g. to render a
counterfactual with one accessory switched), :func:`attribute_rates`.

How a face is made
------------------
* Randomness. Image ``index`` belongs to identity ``index //
  images_per_identity``. Every random number is a counter-based hash (numpy,
  splitmix64) of ``(seed, stream, counter, slot)``: identity-level draws
  (sex, age, skin tone, face and jaw shape, eye spacing, nose, lips, brows,
  usual hair colour, baldness) use the identity as counter, image-level
  draws (pose, lighting, expression, hair style, accessories, background) the
  image index. This plays the role of ``fold_in(key(seed), index)`` without
  a compile and at about a million images per second on one core. Binary
  attributes are comparisons of those uniforms with constant probabilities,
  so :func:`sample_attributes` returns exactly the attributes :func:`render`
  draws.
* Geometry. Shapes are signed-distance (or first-order signed-distance)
  functions in continuous coordinates: the image spans [-1, 1] on both axes
  (x to the right, y down), so the same face rendered at 64 and at 512 pixels
  is the same face. The image is anti-aliased (coverage = clip(0.5 - d /
  pixel)); the parse map is the hard assignment d < 0, painted in occlusion
  order: background, long (back) hair, cloth, neck, necktie (part of cloth),
  necklace, ears, earrings, face skin (beard, moustache, stubble, wrinkles
  and make-up are colour on skin, as in CelebAMask-HQ), front hair (cap,
  bangs, side locks over the top of the ears, sideburns), eyeglasses arms,
  brows, eyes, glasses rims, nose, lips and mouth opening, hat.
* Pose. Scale, translation and roll (about a point between nose and mouth)
  move the head; yaw is drawn by shifting the inner features (eyes, nose,
  mouth; the nose more, because it sticks out) towards the turned side and
  squashing that half of the face outline, while the far ear slides behind
  the cheek. ``yaw`` is returned in radians, positive when the face turns
  towards the image's right (features shifted to larger x); it is drawn
  within +-30 degrees (normal, sd ~11 degrees), so CelebA's frontal filter
  (nose off the eye-mouth line by < 0.1 of its length) keeps about 9 faces
  in 10 and rejects those turned by more than ~25 degrees.
* Male and Young are carried by subtle cues on purpose (the papers' shortcut
  experiments need a target that is harder than the accessory shortcut):
  Male by a slightly wider, squarer jaw, slightly thicker brows and neck,
  shorter hair on average (per image, overlapping strongly with women's) and
  optional facial hair; Young by the absence of faint wrinkles, skin
  texture, under-eye bags and grey strands. Accessories are salient on
  purpose: lipstick is saturated red, earrings bright discs or hoops,
  glasses dark frames, hats large coloured shapes.
* Speed. The pixels come from one jitted function of the parameter arrays,
  compiled once per (batch size, resolution). Per-pixel work avoids
  transcendental functions (they dominated the cost), the many small
  inner-face layers are drawn only inside static windows that contain them
  for every pose, and batches are rendered in chunks of ~2**17 pixels so
  the intermediates stay in cache (see benchmarks/bench_render.py).

Left and right follow the image, as CelebA's landmarks do: ``l_eye``,
``l_brow``, ``l_ear`` and the first landmark are on the image's left.

Thin features (glasses rims, necklace, hoops, the mouth opening, lips, eyes,
brows) have a minimum stroke of about one pixel, so a drawn accessory always
owns parse pixels at every resolution from 64 up; that is the only place
resolution changes geometry, and only at low resolutions (at 64 px a
glasses rim can hide a brow).

Attributes the renderer does not draw (Attractive, Blurry, High_Cheekbones,
Oval_Face, Pointy_Nose) are -1. Hair colour is one of black, brown, blond,
grey, an unlabelled auburn (as CelebA leaves many hair colours unlabelled,
which keeps the marginal rates CelebA-like), or bald: the colour attributes
and Bald are mutually exclusive in both sampling modes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax import regions

MIN_RESOLUTION = 64
MAX_RESOLUTION = 512
DEFAULT_RESOLUTION = 128
NUM_GROUPS = 4  # skin-tone groups, 0 (lightest) .. 3 (darkest)
MAX_YAW = math.radians(30.0)

# Ranges of the pose and face-size parameters. The sampler clips to them and
# the static drawing windows are computed from them (see _window).
_FACE_R_RANGE = (0.36, 0.50)
_ROLL_RANGE = (-0.10, 0.10)
_SCALE_RANGE = (1.00, 1.22)
_TX_RANGE = (-0.05, 0.05)
_TY_RANGE = (-0.15, -0.05)

IDENTITY_STREAM = 0x1D
IMAGE_STREAM = 0x1A

# Attributes with no drawn counterpart; always -1 (unknown), never 0.
UNDRAWN_ATTRIBUTES: tuple[str, ...] = (
    "Attractive", "Blurry", "High_Cheekbones", "Oval_Face", "Pointy_Nose")
DRAWN_ATTRIBUTES: tuple[str, ...] = tuple(
    a for a in regions.ATTRIBUTES if a not in UNDRAWN_ATTRIBUTES)

_R = regions.REGION_ID

# ---------------------------------------------------------------------------
# Random slots: the named draws of an identity and of an image. A draw's
# value depends on its position here (the hash's slot), so adding a name at
# the end of a tuple keeps every earlier draw, and so every data set,
# unchanged.
# ---------------------------------------------------------------------------
_ID_UNIFORMS = (
    "male", "young", "group", "pale", "big_nose", "big_lips", "chubby",
    "double_chin", "bushy", "arched", "receding", "bags", "age", "iris",
    "hair_cat", "bald",
)
_ID_NORMALS = (
    "face_width", "jaw_square", "chin", "top", "eye_dx", "eye_y", "eye_w",
    "eye_h", "brow_thick", "brow_gap", "brow_tilt", "nose_len", "nose_w",
    "mouth_y", "mouth_w", "lip_u", "lip_l", "neck_w", "tone_r", "tone_g",
    "tone_b", "hair_len",
)
_IM_UNIFORMS = (
    "smiling", "open", "lipstick", "makeup", "earrings", "necklace",
    "necktie", "hat", "glasses", "hair_cat", "bangs", "hair_texture",
    "sideburns", "stubble", "goatee", "mustache", "beard", "rosy", "narrow",
    "bg_r", "bg_g", "bg_b", "bg2_r", "bg2_g", "bg2_b", "light_angle",
    "cloth_r", "cloth_g", "cloth_b", "neckline", "tie_colour", "hat_colour",
    "hat_type", "glasses_colour", "glasses_shape", "earring_colour",
    "earring_type", "necklace_colour", "lipstick_colour", "makeup_colour",
    "hair_part", "bangs_phase", "wave_phase", "noise_phase", "light_amp",
    "hair_redraw",
)
_IM_NORMALS = (
    "yaw", "roll", "scale", "tx", "ty", "brightness", "hair_len",
    "hair_volume", "hair_jitter", "smile_amount", "open_amount", "gaze_x",
    "gaze_y", "brow_raise",
)



# ---------------------------------------------------------------------------
# Colours (linear-ish RGB in [0, 1]).
# ---------------------------------------------------------------------------
SKIN_TONES = np.array([
    [0.96, 0.80, 0.69],
    [0.86, 0.65, 0.50],
    [0.64, 0.45, 0.32],
    [0.40, 0.27, 0.19],
], np.float32)
PALE_TONE = np.array([1.0, 0.93, 0.89], np.float32)

# Hair categories (index into HAIR_COLOURS; BALD draws no hair).
BLACK, BROWN, BLOND, GRAY, AUBURN, BALD = range(6)
HAIR_COLOURS = np.array([
    [0.07, 0.06, 0.06],
    [0.34, 0.21, 0.11],
    [0.93, 0.80, 0.47],
    [0.76, 0.76, 0.75],
    [0.56, 0.24, 0.11],
    [0.25, 0.17, 0.11],   # bald: only used for a beard's colour
], np.float32)
GREY_STRAND = np.array([0.80, 0.80, 0.80], np.float32)
LIPSTICK_COLOURS = np.array([
    [0.82, 0.04, 0.10], [0.70, 0.02, 0.22], [0.90, 0.10, 0.18],
    [0.58, 0.02, 0.08]], np.float32)
HAT_COLOURS = np.array([
    [0.85, 0.10, 0.10], [0.10, 0.25, 0.80], [0.10, 0.60, 0.20],
    [0.95, 0.75, 0.05], [0.55, 0.15, 0.65], [0.95, 0.45, 0.05]], np.float32)
EARRING_COLOURS = np.array([
    [1.00, 0.85, 0.15], [0.92, 0.93, 0.98], [1.00, 0.15, 0.25],
    [0.10, 0.85, 0.85]], np.float32)
NECKLACE_COLOURS = np.array([
    [1.00, 0.82, 0.20], [0.90, 0.91, 0.95], [0.98, 0.96, 0.90],
    [0.85, 0.10, 0.30]], np.float32)
GLASSES_COLOURS = np.array([
    [0.04, 0.04, 0.05], [0.20, 0.10, 0.05], [0.05, 0.07, 0.20]], np.float32)
TIE_COLOURS = np.array([
    [0.75, 0.05, 0.08], [0.08, 0.12, 0.45], [0.10, 0.40, 0.15],
    [0.45, 0.05, 0.15], [0.80, 0.60, 0.10]], np.float32)
EYESHADOW_COLOURS = np.array([
    [0.50, 0.25, 0.60], [0.30, 0.45, 0.70], [0.45, 0.28, 0.20],
    [0.85, 0.45, 0.60]], np.float32)
IRIS_COLOURS = np.array([
    [0.30, 0.18, 0.08], [0.16, 0.10, 0.06], [0.25, 0.45, 0.70],
    [0.30, 0.50, 0.30], [0.45, 0.35, 0.15]], np.float32)

# ---------------------------------------------------------------------------
# Attribute probabilities. Default: CelebA-like conditionals (by Male and
# Young); independent=True: each attribute at its marginal rate.
# ---------------------------------------------------------------------------
# Hair categories (BLACK, BROWN, BLOND, GRAY, AUBURN) given not bald, rows
# indexed by 2 * male + young.
_HAIR_GIVEN_NOT_BALD = np.array([
    [0.20, 0.20, 0.15, 0.15, 0.30],     # woman, old
    [0.22, 0.25, 0.26, 0.00, 0.27],     # woman, young
    [0.25, 0.12, 0.03, 0.25, 0.35],     # man, old
    [0.30, 0.20, 0.05, 0.005, 0.445],   # man, young
], np.float64)
_HAIR_MARGINAL = np.array([0.245, 0.205, 0.153, 0.041, 0.356], np.float64)
_HAIR_CUM = np.cumsum(_HAIR_GIVEN_NOT_BALD, axis=1)[:, :-1].astype(np.float32)
_HAIR_MARGINAL_CUM = np.cumsum(_HAIR_MARGINAL / _HAIR_MARGINAL.sum())[:-1].astype(np.float32)

MARGINAL_RATES: dict[str, float] = {
    "Male": 0.42, "Young": 0.77, "Pale_Skin": 0.043, "Big_Nose": 0.23,
    "Big_Lips": 0.24, "Chubby": 0.058, "Double_Chin": 0.047,
    "Bushy_Eyebrows": 0.14, "Arched_Eyebrows": 0.27,
    "Receding_Hairline": 0.08, "Bags_Under_Eyes": 0.20, "Smiling": 0.48,
    "Mouth_Slightly_Open": 0.48, "Wearing_Lipstick": 0.47,
    "Heavy_Makeup": 0.38, "Wearing_Earrings": 0.19, "Wearing_Necklace": 0.12,
    "Wearing_Necktie": 0.07, "Wearing_Hat": 0.05, "Eyeglasses": 0.065,
    "Bald": 0.02, "Bangs": 0.15, "Wavy_Hair": 0.32, "Straight_Hair": 0.21,
    "Sideburns": 0.056, "5_o_Clock_Shadow": 0.11, "Goatee": 0.063,
    "Mustache": 0.042, "Rosy_Cheeks": 0.066, "Narrow_Eyes": 0.115,
    "full_beard": 0.05,
}


# ---------------------------------------------------------------------------
# Counter-based random numbers (numpy). Every draw is a hash of (seed,
# stream, counter, slot): no state, any image's draws can be recomputed alone,
# and the same numbers come out for a batch of 1 or of 1e6. splitmix64's
# finaliser is the mixing function (a bijection with full avalanche).
# ---------------------------------------------------------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SLOT_MULT = 0xD1B54A32D192ED03
_U64_MASK = (1 << 64) - 1
_NORMAL_SLOT_BASE = 1 << 16


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class _Stream:
    """Named uniform and normal draws for a vector of counters (identities or
    image indices) of one stream; each draw is computed when first asked for."""

    def __init__(self, seed: int, stream: int, counters: np.ndarray,
                 uniform_names: tuple[str, ...], normal_names: tuple[str, ...]):
        key = _mix64(np.array([(seed << 8) | stream], np.uint64))
        self._base = _mix64(key + counters.astype(np.uint64) * _GOLDEN)
        self._u = {n: i for i, n in enumerate(uniform_names)}
        self._z = {n: i for i, n in enumerate(normal_names)}
        self._cache: dict[str, np.ndarray] = {}

    def _unit(self, slot: int) -> np.ndarray:
        bits = _mix64(self._base + np.uint64(((slot + 1) * _SLOT_MULT) & _U64_MASK))
        return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))   # [0, 1)

    def u(self, name: str) -> np.ndarray:
        """Uniform in [0, 1), float64."""
        if name not in self._cache:
            self._cache[name] = self._unit(self._u[name])
        return self._cache[name]

    def z(self, name: str) -> np.ndarray:
        """Standard normal (Box-Muller on two dedicated slots), float64."""
        key = "z:" + name
        if key not in self._cache:
            slot = _NORMAL_SLOT_BASE + 2 * self._z[name]
            radius = np.sqrt(-2.0 * np.log1p(-self._unit(slot)))
            self._cache[key] = radius * np.cos(2.0 * np.pi * self._unit(slot + 1))
        return self._cache[key]


def _pick(palette: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Rows of a constant palette chosen by uniforms in [0, 1)."""
    return palette[np.minimum((u * len(palette)).astype(np.int64), len(palette) - 1)]


def _brow_colour(hair_cat: np.ndarray) -> np.ndarray:
    """Brows: darker than blond hair, greyish under grey hair, brown when bald."""
    colour = 0.8 * HAIR_COLOURS[np.where(hair_cat == BALD, BROWN, hair_cat)]
    colour = np.where((hair_cat == BLOND)[:, None], 0.6 * HAIR_COLOURS[BLOND], colour)
    return np.where((hair_cat == GRAY)[:, None], np.array([0.55, 0.53, 0.52]), colour)


# ---------------------------------------------------------------------------
# Attributes and drawing parameters (vectorised numpy, no pixels).
# ---------------------------------------------------------------------------
def _probability(independent: bool):
    """p(name, conditional): an attribute's probability, its marginal rate
    (independent sampling) or the CelebA-like conditional (array [N])."""
    def p(name, conditional):
        return MARGINAL_RATES[name] if independent else conditional
    return p


def _identity_attributes(ids: _Stream, p) -> dict[str, np.ndarray]:
    """Identity-level binary attributes (bool [N]) and the skin-tone group
    (int [N]); ``receding_draw`` is the receding hairline before baldness."""
    M = MARGINAL_RATES
    male = ids.u("male") < M["Male"]
    female = ~male
    young = ids.u("young") < p("Young", np.where(male, 0.66, 0.85))
    group = np.searchsorted(np.array([0.55, 0.78, 0.91]), ids.u("group"), side="right")
    pale = ids.u("pale") < p("Pale_Skin", np.where(
        group == 0, np.where(male, 0.02, 0.09), np.where((group == 1) & female, 0.03, 0.0)))
    big_nose = ids.u("big_nose") < p("Big_Nose", np.where(male, 0.38, 0.12))
    big_lips = ids.u("big_lips") < p("Big_Lips", np.where(male, 0.17, 0.29))
    chubby = ids.u("chubby") < p("Chubby", np.where(
        male, np.where(young, 0.05, 0.20), np.where(young, 0.01, 0.06)))
    double_chin = ids.u("double_chin") < p("Double_Chin", np.where(
        chubby, 0.5, np.where(young, 0.01, 0.10)))
    bushy = ids.u("bushy") < p("Bushy_Eyebrows", np.where(male, 0.22, 0.08))
    arched = ids.u("arched") < p("Arched_Eyebrows", np.where(male, 0.10, 0.38))
    bags = ids.u("bags") < p("Bags_Under_Eyes", np.where(young, 0.13, 0.45))
    receding_draw = ids.u("receding") < p("Receding_Hairline", np.where(
        male, np.where(young, 0.06, 0.30), 0.02))
    return dict(male=male, young=young, group=group, pale=pale, big_nose=big_nose,
                big_lips=big_lips, chubby=chubby, double_chin=double_chin, bushy=bushy,
                arched=arched, bags=bags, receding_draw=receding_draw)


def _image_attributes(img: _Stream, male, young, p) -> dict[str, np.ndarray]:
    """Image-level expression and accessory attributes, bool [N]."""
    M = MARGINAL_RATES
    smiling = img.u("smiling") < M["Smiling"]
    mouth_open = img.u("open") < p("Mouth_Slightly_Open", np.where(smiling, 0.70, 0.27))
    lipstick = img.u("lipstick") < p("Wearing_Lipstick", np.where(male, 0.01, 0.80))
    makeup = img.u("makeup") < p("Heavy_Makeup", np.where(
        male, 0.005, np.where(lipstick, 0.78, 0.05)))
    earrings = img.u("earrings") < p("Wearing_Earrings", np.where(male, 0.02, 0.31))
    necklace = img.u("necklace") < p("Wearing_Necklace", np.where(male, 0.02, 0.19))
    necktie = img.u("necktie") < p("Wearing_Necktie", np.where(male, 0.16, 0.005))
    hat = img.u("hat") < p("Wearing_Hat", np.where(male, 0.06, 0.04))
    glasses = img.u("glasses") < p("Eyeglasses", np.where(
        male, np.where(young, 0.05, 0.17), np.where(young, 0.035, 0.12)))
    narrow = img.u("narrow") < M["Narrow_Eyes"]
    rosy = img.u("rosy") < p("Rosy_Cheeks", np.where(male, 0.02, 0.10))
    return dict(smiling=smiling, mouth_open=mouth_open, lipstick=lipstick, makeup=makeup,
                earrings=earrings, necklace=necklace, necktie=necktie, hat=hat,
                glasses=glasses, narrow=narrow, rosy=rosy)


def _hair_attributes(ids: _Stream, img: _Stream, male, young, receding_draw,
                     independent: bool, p) -> dict[str, np.ndarray]:
    """Baldness, hair category (int [N], BLACK..BALD) and hair attributes.

    Baldness and the usual hair colour belong to the identity; one image in
    seven shows another colour (dyed, lit differently), drawn from the same
    table so the rates do not change.
    """
    bald = ids.u("bald") < p("Bald", np.where(male, np.where(young, 0.005, 0.12), 0.0))
    if independent:
        cum = np.broadcast_to(_HAIR_MARGINAL_CUM, (len(male), len(_HAIR_MARGINAL_CUM)))
    else:
        cum = _HAIR_CUM[2 * male.astype(np.int64) + young.astype(np.int64)]
    colour_u = np.where(img.u("hair_redraw") < 0.15, img.u("hair_cat"), ids.u("hair_cat"))
    hair_cat = np.where(bald, BALD, np.sum(colour_u[:, None] > cum, axis=1))
    has_hair = ~bald
    bangs = has_hair & (img.u("bangs") < p("Bangs", np.where(male, 0.09, 0.20)))
    wavy_p = p("Wavy_Hair", np.where(male, 0.18, 0.42))
    straight_p = p("Straight_Hair", np.where(male, 0.23, 0.20))
    texture_u = img.u("hair_texture")
    wavy = has_hair & (texture_u < wavy_p)
    straight = has_hair & (texture_u >= wavy_p) & (texture_u < np.add(wavy_p, straight_p))
    sideburns = has_hair & (img.u("sideburns") < p("Sideburns", np.where(male, 0.13, 0.0)))
    receding = has_hair & receding_draw
    return dict(bald=bald, hair_cat=hair_cat, has_hair=has_hair, bangs=bangs, wavy=wavy,
                straight=straight, sideburns=sideburns, receding=receding)


def _facial_hair_attributes(img: _Stream, male, p) -> dict[str, np.ndarray]:
    """Stubble, goatee, moustache, full beard (colour on skin), bool [N]."""
    stubble = img.u("stubble") < p("5_o_Clock_Shadow", np.where(male, 0.26, 0.0))
    goatee = img.u("goatee") < p("Goatee", np.where(male, 0.15, 0.0))
    mustache = img.u("mustache") < p("Mustache", np.where(male, 0.10, 0.0))
    full_beard = img.u("beard") < p("full_beard", np.where(male, 0.12, 0.0))
    return dict(stubble=stubble, goatee=goatee, mustache=mustache, full_beard=full_beard)


def _attribute_table(a: dict[str, np.ndarray]) -> np.ndarray:
    """int8 [N, 40] in regions.ATTRIBUTES order from the drawn flags ``a``
    (1 / 0; -1 for the attributes the renderer does not draw)."""
    hair_cat = a["hair_cat"]
    named = {
        "5_o_Clock_Shadow": a["stubble"], "Arched_Eyebrows": a["arched"],
        "Bags_Under_Eyes": a["bags"], "Bald": a["bald"], "Bangs": a["bangs"],
        "Big_Lips": a["big_lips"], "Big_Nose": a["big_nose"],
        "Black_Hair": hair_cat == BLACK, "Blond_Hair": hair_cat == BLOND,
        "Brown_Hair": hair_cat == BROWN, "Bushy_Eyebrows": a["bushy"],
        "Chubby": a["chubby"], "Double_Chin": a["double_chin"], "Eyeglasses": a["glasses"],
        "Goatee": a["goatee"], "Gray_Hair": hair_cat == GRAY,
        "Heavy_Makeup": a["makeup"], "Male": a["male"],
        "Mouth_Slightly_Open": a["mouth_open"], "Mustache": a["mustache"],
        "Narrow_Eyes": a["narrow"], "No_Beard": ~(a["goatee"] | a["mustache"] | a["full_beard"]),
        "Pale_Skin": a["pale"], "Receding_Hairline": a["receding"],
        "Rosy_Cheeks": a["rosy"], "Sideburns": a["sideburns"], "Smiling": a["smiling"],
        "Straight_Hair": a["straight"], "Wavy_Hair": a["wavy"],
        "Wearing_Earrings": a["earrings"], "Wearing_Hat": a["hat"],
        "Wearing_Lipstick": a["lipstick"], "Wearing_Necklace": a["necklace"],
        "Wearing_Necktie": a["necktie"], "Young": a["young"],
    }
    assert set(named) == set(DRAWN_ATTRIBUTES)
    attrs = np.full((len(hair_cat), regions.NUM_ATTRIBUTES), -1, np.int8)
    for name, value in named.items():
        attrs[:, regions.ATTRIBUTE_ID[name]] = value
    return attrs


def _clipped(z, mean, sd, lo, hi):
    """A normal draw z scaled to (mean, sd) and clipped to [lo, hi]."""
    return np.clip(mean + sd * z, lo, hi)


def _rgb(stream: _Stream, prefix: str) -> np.ndarray:
    """Uniform colour [N, 3] from the draws prefix_r, prefix_g, prefix_b."""
    return np.stack([stream.u(prefix + c) for c in ("_r", "_g", "_b")], axis=-1)


def _face_parameters(ids: _Stream, img: _Stream, a) -> dict[str, np.ndarray]:
    """Age, skin tone and face geometry (mostly identity-level). Male: a
    little wider, squarer jaw, thicker brows and neck; the distributions
    overlap."""
    fm, fchub = a["male"].astype(np.float64), a["chubby"].astype(np.float64)
    IZ, MZ = ids.z, img.z
    age = np.where(a["young"], 18.0 + 22.0 * ids.u("age"), 40.0 + 35.0 * ids.u("age"))
    tone = SKIN_TONES[a["group"]] * (1.0 + 0.035 * np.stack(
        [IZ("tone_r"), IZ("tone_g"), IZ("tone_b")], axis=-1))
    tone = np.where(a["pale"][:, None], 0.45 * tone + 0.55 * PALE_TONE, tone)
    big_nose, big_lips = a["big_nose"], a["big_lips"]
    return dict(
        age=age, tone=tone,
        face_r=_clipped(IZ("face_width"), 0.410 + 0.010 * fm + 0.030 * fchub, 0.016, *_FACE_R_RANGE),
        jaw_sq=_clipped(IZ("jaw_square"), -0.05 + 0.35 * fm + 0.30 * fchub, 0.18, -0.4, 1.0),
        chin=_clipped(IZ("chin"), 0.50 + 0.015 * fm, 0.022, 0.44, 0.58),
        top=_clipped(IZ("top"), 0.60, 0.015, 0.55, 0.65),
        eye_dx=_clipped(IZ("eye_dx"), 0.17, 0.010, 0.145, 0.195),
        eye_y=_clipped(IZ("eye_y"), -0.035, 0.010, -0.065, -0.005),
        eye_w=_clipped(IZ("eye_w"), 0.071, 0.005, 0.058, 0.084),
        eye_h=_clipped(IZ("eye_h"), 0.031, 0.003, 0.023, 0.039) * np.where(a["narrow"], 0.55, 1.0),
        brow_thick=_clipped(IZ("brow_thick"), 0.019 + 0.003 * fm, 0.002, 0.014, 0.026)
        * np.where(a["bushy"], 1.6, 1.0),
        brow_gap=_clipped(IZ("brow_gap"), 0.078, 0.007, 0.062, 0.095)
        + 0.012 * np.clip(MZ("brow_raise"), -1.0, 1.0),
        brow_tilt=_clipped(IZ("brow_tilt"), 0.0, 0.008, -0.015, 0.015),
        brow_arch=np.where(a["arched"], 0.024, 0.007),
        nose_len=_clipped(IZ("nose_len"), 0.115, 0.010, 0.09, 0.14) + np.where(big_nose, 0.022, 0.0),
        nose_w=_clipped(IZ("nose_w"), 0.032, 0.004, 0.024, 0.042) + np.where(big_nose, 0.016, 0.0),
        mouth_y=_clipped(IZ("mouth_y"), 0.27, 0.010, 0.245, 0.30),
        mouth_w=_clipped(IZ("mouth_w"), 0.130, 0.010, 0.105, 0.155)
        + np.where(a["smiling"], 0.012, 0.0),
        lip_u=_clipped(IZ("lip_u"), 0.030, 0.003, 0.022, 0.038) + np.where(big_lips, 0.010, 0.0),
        lip_l=_clipped(IZ("lip_l"), 0.038, 0.003, 0.030, 0.046) + np.where(big_lips, 0.012, 0.0),
        neck_w=_clipped(IZ("neck_w"), 0.155 + 0.015 * fm + 0.02 * fchub, 0.010, 0.13, 0.21),
        iris=_pick(IRIS_COLOURS, ids.u("iris")),
    )


def _pose_light_parameters(img: _Stream) -> dict[str, np.ndarray]:
    """Head pose, lighting and background (image-level)."""
    MZ, MU = img.z, img.u
    return dict(
        yaw=np.clip(0.20 * MZ("yaw"), -MAX_YAW, MAX_YAW),
        roll=_clipped(MZ("roll"), 0.0, 0.045, *_ROLL_RANGE),
        scale=_clipped(MZ("scale"), 1.11, 0.045, *_SCALE_RANGE),
        tx=_clipped(MZ("tx"), 0.0, 0.02, *_TX_RANGE),
        ty=_clipped(MZ("ty"), -0.10, 0.02, *_TY_RANGE),
        brightness=_clipped(MZ("brightness"), 0.97, 0.06, 0.82, 1.10),
        light_angle=2.0 * np.pi * MU("light_angle"),
        light_amp=0.06 + 0.12 * MU("light_amp"),
        bg=0.15 + 0.75 * _rgb(img, "bg"),
        bg2=0.15 + 0.75 * _rgb(img, "bg2"),
    )


def _hair_parameters(ids: _Stream, img: _Stream, a) -> dict[str, np.ndarray]:
    """Hair colour, length, volume, style and its phases; brow colour (tied to
    the hair category)."""
    MZ, MU = img.z, img.u
    hair_cat = a["hair_cat"]
    # Hair length: a per-identity habit plus per-image variation; men's hair is
    # shorter on average, but the two distributions overlap strongly.
    fm = a["male"].astype(np.float64)
    hair_len = np.clip(0.60 - 0.28 * fm + 0.19 * ids.z("hair_len") + 0.16 * MZ("hair_len"), 0.0, 1.0)
    return dict(
        has_hair=a["has_hair"], hair_cat=hair_cat,
        hair_colour=HAIR_COLOURS[hair_cat] * (1.0 + 0.08 * np.clip(MZ("hair_jitter"), -2.0, 2.0))[:, None],
        hair_len=hair_len,
        hair_volume=_clipped(MZ("hair_volume"), 0.035 + 0.02 * hair_len, 0.01, 0.018, 0.075),
        bangs=a["bangs"], wavy=a["wavy"], sideburns=a["sideburns"], receding=a["receding"],
        hair_part=2.0 * MU("hair_part") - 1.0,
        bangs_phase=2.0 * np.pi * MU("bangs_phase"),
        wave_phase=2.0 * np.pi * MU("wave_phase"),
        salt=np.floor(MU("noise_phase") * (1 << 24)),
        brow_colour=_brow_colour(hair_cat),
    )


def _appearance_parameters(img: _Stream, a) -> dict[str, np.ndarray]:
    """Expression, skin details, accessories (flags, colours, shapes), cloth."""
    MZ, MU = img.z, img.u
    return dict(
        smiling=a["smiling"], mouth_open=a["mouth_open"],
        smile_amount=_clipped(MZ("smile_amount"), 1.0, 0.2, 0.6, 1.4),
        open_amount=_clipped(MZ("open_amount"), 1.0, 0.2, 0.6, 1.4),
        gaze=np.stack([np.clip(0.25 * MZ("gaze_x"), -0.5, 0.5),
                       np.clip(0.15 * MZ("gaze_y"), -0.3, 0.3)], axis=-1),
        **{k: a[k] for k in ("lipstick", "makeup", "earrings", "necklace", "necktie", "hat",
                             "glasses", "rosy", "bags", "double_chin", "stubble", "goatee",
                             "mustache", "full_beard")},
        lipstick_colour=_pick(LIPSTICK_COLOURS, MU("lipstick_colour")),
        makeup_colour=_pick(EYESHADOW_COLOURS, MU("makeup_colour")),
        earring_colour=_pick(EARRING_COLOURS, MU("earring_colour")),
        earring_hoop=MU("earring_type") < 0.35,
        necklace_colour=_pick(NECKLACE_COLOURS, MU("necklace_colour")),
        glasses_colour=_pick(GLASSES_COLOURS, MU("glasses_colour")),
        glasses_round=MU("glasses_shape") < 0.5,
        hat_colour=_pick(HAT_COLOURS, MU("hat_colour")),
        hat_brim=MU("hat_type") < 0.6,
        tie_colour=_pick(TIE_COLOURS, MU("tie_colour")),
        cloth=0.10 + 0.70 * _rgb(img, "cloth"),
        v_neck=MU("neckline") < 0.4,
    )


def _draw(seed: int, indices: np.ndarray, images_per_identity: int, independent: bool,
          with_params: bool = True):
    """Attributes (and, with_params, drawing parameters) of images.

    Binary attributes are comparisons of uniforms with constant
    probabilities, so they are exactly reproducible and cost one hash each.
    Every draw is keyed by its name (see _Stream), so the helpers may ask for
    them in any order.

    Returns (attrs int8 [N, 40], identity int32 [N], group int32 [N], params:
    dict of float32 [N] / [N, k] arrays, or None without with_params).
    """
    indices = indices.astype(np.int64)
    identity = indices // images_per_identity
    ids = _Stream(seed, IDENTITY_STREAM, identity, _ID_UNIFORMS, _ID_NORMALS)
    img = _Stream(seed, IMAGE_STREAM, indices, _IM_UNIFORMS, _IM_NORMALS)
    p = _probability(independent)
    a = _identity_attributes(ids, p)
    a.update(_image_attributes(img, a["male"], a["young"], p))
    a.update(_hair_attributes(ids, img, a["male"], a["young"], a["receding_draw"], independent, p))
    a.update(_facial_hair_attributes(img, a["male"], p))
    attrs = _attribute_table(a)
    identity = identity.astype(np.int32)
    group = a["group"].astype(np.int32)
    if not with_params:
        return attrs, identity, group, None
    params = {**_face_parameters(ids, img, a), **_pose_light_parameters(img),
              **_hair_parameters(ids, img, a), **_appearance_parameters(img, a)}
    # Everything goes to the renderer as float32 (hair_cat as int32).
    params = {k: np.asarray(v, np.int32 if k == "hair_cat" else np.float32)
              for k, v in params.items()}
    return attrs, identity, group, params


# ---------------------------------------------------------------------------
# Shape primitives: signed distances (or first-order approximations of them),
# negative inside. Per-pixel work avoids divisions and transcendentals where
# it can: rendering speed is a requirement (see benchmarks/bench_render.py).
# ---------------------------------------------------------------------------
def _ellipse(x, y, cx, cy, ax, ay):
    """Signed distance to an axis-aligned ellipse, to first order at its edge.

    g / |grad g| for g = ((x - cx) / ax)^2 + ((y - cy) / ay)^2 - 1: the sign is
    exact, the value is the distance near the edge (which is all the
    anti-aliasing needs), and it costs one rsqrt per pixel.
    """
    iax, iay = 1.0 / ax, 1.0 / ay
    px = (x - cx) * iax
    py = (y - cy) * iay
    g = px * px + py * py - 1.0
    gx, gy = px * iax, py * iay
    return 0.5 * g * jax.lax.rsqrt(gx * gx + gy * gy + 1e-12)


def _circle(x, y, cx, cy, r):
    return jnp.sqrt((x - cx) ** 2 + (y - cy) ** 2) - r


def _rounded_box(x, y, cx, cy, hx, hy, r):
    """Signed distance to a box with half-sizes (hx, hy) and corner radius r."""
    qx = jnp.abs(x - cx) - hx + r
    qy = jnp.abs(y - cy) - hy + r
    outside = jnp.sqrt(jnp.maximum(qx, 0.0) ** 2 + jnp.maximum(qy, 0.0) ** 2)
    return outside + jnp.minimum(jnp.maximum(qx, qy), 0.0) - r


def _intersect(*ds):
    return functools.reduce(jnp.maximum, ds)


def _union(*ds):
    return functools.reduce(jnp.minimum, ds)


def _stroke(d, width):
    """A stroke of the given width centred on the zero set of d."""
    return jnp.abs(d) - 0.5 * width


def _coverage(d, pixel):
    """Anti-aliased coverage of the inside of d for a pixel of size `pixel`."""
    return jnp.clip(0.5 - d / pixel, 0.0, 1.0)


class _Canvas(NamedTuple):
    image: jax.Array   # [H, W, 3]
    parse: jax.Array   # [H, W] int32


def _paint(canvas: _Canvas, d, colour, pixel, region=None, on=True):
    """Paint the inside of d over the canvas.

    The image gets soft coverage (anti-aliasing); the parse map, when
    `region` is given (an id, or a per-pixel id array), gets the hard inside
    d < 0. `on` (a traced bool or float) switches the layer off.
    """
    on = jnp.asarray(on, jnp.float32)
    alpha = _coverage(d, pixel) * on
    colour = jnp.asarray(colour, jnp.float32)
    image = canvas.image + alpha[..., None] * (colour - canvas.image)
    parse = canvas.parse
    if region is not None:
        parse = jnp.where((d < 0.0) & (on > 0.0), jnp.asarray(region, jnp.int32), parse)
    return _Canvas(image, parse)


def _tint(canvas: _Canvas, alpha, colour):
    """Colour-only overlay (make-up, beard, wrinkles): the parse map is untouched."""
    colour = jnp.asarray(colour, jnp.float32)
    return canvas._replace(image=canvas.image + alpha[..., None] * (colour - canvas.image))


def _darken(canvas: _Canvas, amount):
    """Multiply the image by (1 - amount): faint lines and shadows."""
    return canvas._replace(image=canvas.image * (1.0 - amount)[..., None])


def _wave(x):
    """A cheap sine look-alike (piecewise parabola, period 2 pi, error < 6 %)
    for textures: transcendental functions dominate per-pixel cost on CPU."""
    u = x * (1.0 / (2.0 * np.pi))
    u = u - jnp.round(u)                      # [-0.5, 0.5]
    return 8.0 * u * (1.0 - 2.0 * jnp.abs(u))


def _hash_noise(ix, iy, salt):
    """Per-pixel value noise in [0, 1) from an integer hash of the pixel index."""
    h = (ix.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)) ^ (
        iy.astype(jnp.uint32) * jnp.uint32(0x85EBCA77)) ^ salt.astype(jnp.uint32)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x2C1B3C6D)
    h = h ^ (h >> 12)
    return (h >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


# ---------------------------------------------------------------------------
# Pose: image coordinates -> body (scale, translation) -> head (roll) ->
# canonical frontal face (yaw undone by a horizontal warp).
# ---------------------------------------------------------------------------
_ROLL_PIVOT_Y = 0.10   # the head rolls about a point between nose and mouth
_WARP_SOFTNESS = 0.08  # width of the smoothed kink of the yaw warp


def _yaw_warp(face_r, yaw, xp=jnp):
    """(shift, slope_left, slope_right) of the yaw warp.

    Turning the face by yaw > 0 (to the image's right) shifts the features
    by `shift` towards +x and squashes the right half of the face outline
    (it turns away) while the left half widens a little.
    """
    s = xp.sin(yaw)
    right, left = xp.maximum(s, 0.0), xp.maximum(-s, 0.0)
    w_left = face_r * (1.0 + 0.08 * right - 0.22 * left)
    w_right = face_r * (1.0 + 0.08 * left - 0.22 * right)
    shift = 0.30 * face_r * s
    return shift, face_r / (w_left + shift), face_r / (w_right - shift)


def _head_to_face_x(hx, warp, xp=jnp):
    """Canonical (frontal) x of a head-frame x: a monotone two-slope map with
    a smoothed kink, sending -w_left -> -R, shift -> ~0 and w_right -> R."""
    shift, slope_left, slope_right = warp
    z = hx - shift
    # Smooth max(z, 0) = (z + sqrt(z^2 + eps^2)) / 2: one sqrt, no exp / log.
    return slope_left * z + (slope_right - slope_left) * 0.5 * (
        z + xp.sqrt(z * z + _WARP_SOFTNESS ** 2))


def _face_to_head_x(fx, warp, xp=jnp):
    """Inverse of _head_to_face_x (Newton; used for landmarks and bounds)."""
    shift, slope_left, slope_right = warp
    z = xp.where(fx < 0, fx / slope_left, fx / slope_right)
    for _ in range(8):
        g = _head_to_face_x(z + shift, warp, xp) - fx
        dg = slope_left + (slope_right - slope_left) * 0.5 * (
            1.0 + z / xp.sqrt(z * z + _WARP_SOFTNESS ** 2))
        z = z - g / dg
    return z + shift


def _face_to_image(fx, fy, p, xp=jnp):
    """Canonical face coordinates -> normalised image coordinates."""
    hx = _face_to_head_x(fx, _yaw_warp(p["face_r"], p["yaw"], xp), xp)
    cr, sr = xp.cos(p["roll"]), xp.sin(p["roll"])
    ry = fy - _ROLL_PIVOT_Y
    bx = cr * hx - sr * ry
    by = sr * hx + cr * ry + _ROLL_PIVOT_Y
    return p["tx"] + p["scale"] * bx, p["ty"] + p["scale"] * by


class _Frame(NamedTuple):
    """Per-pixel coordinates of a rectangle of pixels in the different frames."""
    fx: jax.Array      # canonical face x (roll and yaw undone)
    fy: jax.Array      # head-frame y (roll undone)
    bx: jax.Array      # body frame (scale and translation undone, no roll)
    by: jax.Array
    img_x: jax.Array   # normalised image coordinates in [-1, 1]
    img_y: jax.Array
    ix: jax.Array      # integer pixel column / row
    iy: jax.Array
    pixel: jax.Array   # one pixel in head / body units


def _frame(p, resolution: int, rows: tuple[int, int], cols: tuple[int, int]) -> _Frame:
    step = 2.0 / resolution
    iy = jnp.arange(rows[0], rows[1], dtype=jnp.int32)[:, None]
    ix = jnp.arange(cols[0], cols[1], dtype=jnp.int32)[None, :]
    shape = (rows[1] - rows[0], cols[1] - cols[0])
    iy, ix = jnp.broadcast_to(iy, shape), jnp.broadcast_to(ix, shape)
    img_x = (ix.astype(jnp.float32) + 0.5) * step - 1.0
    img_y = (iy.astype(jnp.float32) + 0.5) * step - 1.0
    inv_s = 1.0 / p["scale"]
    bx = (img_x - p["tx"]) * inv_s
    by = (img_y - p["ty"]) * inv_s
    cr, sr = jnp.cos(p["roll"]), jnp.sin(p["roll"])
    ry = by - _ROLL_PIVOT_Y
    hx = cr * bx + sr * ry
    fy = -sr * bx + cr * ry + _ROLL_PIVOT_Y
    fx = _head_to_face_x(hx, _yaw_warp(p["face_r"], p["yaw"]))
    return _Frame(fx, fy, bx, by, img_x, img_y, ix, iy, step * inv_s)


# Boxes (canonical face coordinates: x0, x1, y0, y1) that contain everything
# drawn by the two windowed passes for every parameter value the sampler can
# produce; tests/test_synthetic.py checks windowed == full-frame rendering.
# Face boxes are in canonical face coordinates, body boxes in body
# coordinates (no roll, no yaw). Only the many small inner-face layers get
# windows: every window boundary materialises the canvas, and for the larger
# layers that memory traffic costs more than the arithmetic a window saves
# (measured; so is two windows beating one window around both).
_EYES_BOX = ("face", (-0.35, 0.35, -0.245, 0.10))
_MOUTH_BOX = ("face", (-0.22, 0.22, -0.05, 0.52))
_WINDOW_MARGIN_PX = 3


@functools.lru_cache(maxsize=None)
def _window(resolution: int, box: tuple[str, tuple[float, float, float, float]]):
    """Static pixel rows and columns that hold `box` under every pose."""
    kind, (x0, x1, y0, y1) = box
    grid = np.meshgrid(
        np.linspace(-MAX_YAW, MAX_YAW, 41), np.linspace(*_FACE_R_RANGE, 5),
        np.linspace(*_ROLL_RANGE, 21), np.array(_SCALE_RANGE), np.array(_TX_RANGE),
        np.array(_TY_RANGE), np.array([x0, x1]), np.array([y0, y1]), indexing="ij")
    yaw, face_r, roll, scale, tx, ty, fx, fy = (g.ravel() for g in grid)
    p = dict(yaw=yaw, face_r=face_r, roll=roll, scale=scale, tx=tx, ty=ty)
    if kind == "face":
        x, y = _face_to_image(fx, fy, p, np)
    else:
        x, y = tx + scale * fx, ty + scale * fy
    step = 2.0 / resolution
    to_px = lambda v: (v + 1.0) / step  # noqa: E731  (pixel edges)
    c0 = max(0, int(np.floor(to_px(x.min()))) - _WINDOW_MARGIN_PX)
    c1 = min(resolution, int(np.ceil(to_px(x.max()))) + _WINDOW_MARGIN_PX)
    r0 = max(0, int(np.floor(to_px(y.min()))) - _WINDOW_MARGIN_PX)
    r1 = min(resolution, int(np.ceil(to_px(y.max()))) + _WINDOW_MARGIN_PX)
    return (r0, r1), (c0, c1)


# ---------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------
def _head_sdf(fx, fy, p):
    """Head outline: an ellipse above y = 0 (cranium, forehead), below it a
    jaw blended between an ellipse (jaw_sq = 0), a squarer superellipse
    (jaw_sq = 1) and a pointier chin (jaw_sq < 0)."""
    r, top, chin, w = p["face_r"], p["top"], p["chin"], p["jaw_sq"]
    d_up = _ellipse(fx, fy, 0.0, 0.0, r, top)
    ax = jnp.abs(fx) * (1.0 / r)
    ay = jnp.maximum(fy, 0.0) * (1.0 / chin)
    ax2, ay2 = ax * ax, ay * ay
    g = (1.0 - w) * (ax2 + ay2) + w * jnp.sqrt(ax2 * ax2 + ay2 * ay2) - 1.0
    # g ~ 2 (k - 1) near the edge; one unit of k is r sideways, chin downwards.
    unit = (r * ax + chin * ay) / (ax + ay + 1e-6)
    return jnp.where(fy < 0.0, d_up, 0.5 * g * unit)


def _hair_colour_field(f: _Frame, p):
    """Per-pixel hair colour: strands (wavy or straight), grey strands with age."""
    wave = p["wavy"] * 0.035 * _wave(f.fy * 38.0 + p["wave_phase"])
    strands = _wave((f.fx + wave) * 110.0 + 1.5 * _wave(f.fy * 8.0))
    grey_fraction = jnp.clip((p["age"] - 42.0) / 45.0, 0.0, 0.4) * (p["hair_cat"] != GRAY)
    grey = jnp.clip(5.0 * _wave((f.fx + wave) * 190.0 + 3.0 * _wave(f.fx * 31.0 + p["wave_phase"]))
                    - 4.0, 0.0, 1.0)
    highlight = 0.12 * jnp.clip(1.0 - ((f.fy + 0.42) * 10.0) ** 2, 0.0, 1.0)
    colour = p["hair_colour"] * (1.0 + 0.06 * strands + highlight)[..., None]
    colour = colour + (grey_fraction * grey)[..., None] * (jnp.asarray(GREY_STRAND) - colour)
    return jnp.clip(colour, 0.0, 1.0)


def _draw_base(f: _Frame, p):
    """Background, long hair behind the head, cloth and neck (full frame)."""
    t = ((f.img_y + 1.0) * 0.5)[..., None]
    canvas = _Canvas(p["bg"] + t * (p["bg2"] - p["bg"]), jnp.zeros(f.fx.shape, jnp.int32))
    hair_colour = _hair_colour_field(f, p)

    r, length = p["face_r"], p["hair_len"]
    half_w = r + p["hair_volume"] + 0.05 * length
    wave = p["wavy"] * 0.018 * _wave(f.fy * 22.0 + p["wave_phase"])
    bottom = 0.05 + 0.55 * length
    d_back = _rounded_box(f.fx + wave, f.fy, 0.0, 0.5 * (bottom - 0.30), half_w,
                          0.5 * (bottom + 0.30), 0.12)
    canvas = _paint(canvas, d_back, hair_colour, f.pixel, _R["hair"],
                    on=p["has_hair"] * (length > 0.25))

    # Shoulders start a fixed neck length below the chin (body frame).
    chin = p["chin"]
    shoulder_y = p["chin"] + 0.22
    d_cloth = _intersect(shoulder_y + 0.25 * f.bx * f.bx - f.by, jnp.abs(f.bx) - 1.3)
    cloth_shade = 1.0 - 0.2 * jnp.clip(jnp.abs(f.bx) - 0.3, 0.0, 1.0)
    canvas = _paint(canvas, d_cloth, p["cloth"] * cloth_shade[..., None], f.pixel, _R["cloth"])

    # Neck down to the neckline (round or V; a tie closes the collar).
    tie = p["necktie"]
    ax = jnp.abs(f.bx)
    nw = p["neck_w"]
    v_depth = 0.16 * p["v_neck"] * (1.0 - tie)
    neckline = shoulder_y + 0.03 - 0.03 * tie + v_depth * jnp.maximum(0.0, 1.0 - ax * (1.0 / 0.16))
    flare = 0.5 * jnp.maximum(f.by - (shoulder_y - 0.04), 0.0)
    d_neck = _intersect(ax - nw - flare, 0.15 - f.by, f.by - neckline)
    under_chin = jnp.clip((f.by - chin + 0.02) * (1.0 / 0.16), 0.0, 1.0)
    canvas = _paint(canvas, d_neck, p["tone"] * (0.72 + 0.16 * under_chin)[..., None],
                    f.pixel, _R["neck"])
    return canvas, hair_colour


def _draw_neck_details(canvas, f: _Frame, p):
    """Necktie (part of cloth: white collar, knot, blade) and necklace."""
    tie = p["necktie"]
    ax = jnp.abs(f.bx)
    collar_y = p["chin"] + 0.24
    d_collar = _intersect(ax - 0.20, collar_y - 0.02 - f.by, f.by - (collar_y + 0.06 + 0.25 * ax))
    canvas = _paint(canvas, d_collar, jnp.array([0.95, 0.95, 0.95]), f.pixel, _R["cloth"], on=tie)
    dy = f.by - collar_y
    d_knot = _intersect(ax - (0.034 - 0.2 * dy), -dy, dy - 0.055)
    d_blade = _intersect(ax - (0.024 + 0.30 * (dy - 0.055)), 0.05 - dy)
    canvas = _paint(canvas, _union(d_knot, d_blade), p["tie_colour"], f.pixel, _R["cloth"], on=tie)

    # Necklace: a U-shaped chain on the neck and a pendant.
    nw = p["neck_w"]
    lace_y = p["chin"] + 0.12
    thick = jnp.maximum(0.014, 1.1 * f.pixel)
    d_chain = _intersect(_stroke(f.by - (lace_y - 0.05 * (f.bx / nw) ** 2), thick), ax - 0.97 * nw)
    d_pendant = _circle(f.bx, f.by, 0.0, lace_y + 0.02, jnp.maximum(0.018, f.pixel))
    return _paint(canvas, _union(d_chain, d_pendant), p["necklace_colour"], f.pixel,
                  _R["neck_l"], on=p["necklace"])


def _draw_ears(canvas, f: _Frame, p):
    """Ears (mirrored: one evaluation for both) and earrings under the lobes."""
    left = f.fx < 0
    u = jnp.abs(f.fx)
    # The ear on the side the face turns to slides behind the cheek.
    far = jnp.maximum(jnp.where(left, -1.0, 1.0) * jnp.sin(p["yaw"]), 0.0)
    ear_u = p["face_r"] + 0.004 - 0.40 * p["face_r"] * far
    d_ear = _ellipse(u, f.fy, ear_u, 0.01, 0.048, 0.095)
    shade = 0.93 - 0.2 * jnp.clip(1.0 - jnp.abs(u - ear_u - 0.006) * (1.0 / 0.02), 0.0, 1.0) \
        * (jnp.abs(f.fy) < 0.05)
    canvas = _paint(canvas, d_ear, p["tone"] * shade[..., None], f.pixel,
                    jnp.where(left, _R["l_ear"], _R["r_ear"]))
    hoop = p["earring_hoop"] > 0
    radius = jnp.where(hoop, 0.032, 0.024)
    d_disc = _circle(u, f.fy, ear_u + 0.014, 0.102 + radius, radius)
    ring = jnp.maximum(0.010, 1.1 * f.pixel)
    d_earring = jnp.where(hoop, _stroke(d_disc + 0.5 * ring, ring), d_disc)
    glint = 0.35 * (d_disc < -0.45 * radius) * (1.0 - hoop)
    colour = p["earring_colour"] + glint[..., None] * (1.0 - p["earring_colour"])
    return _paint(canvas, d_earring, colour, f.pixel, _R["ear_r"], on=p["earrings"])


def _draw_face(canvas, f: _Frame, p):
    """Face skin with shading and texture; wrinkles, cheeks and facial hair
    are colour on skin (CelebAMask-HQ labels beards as skin)."""
    r = p["face_r"]
    d_face = _head_sdf(f.fx, f.fy, p)
    age = jnp.clip((p["age"] - 22.0) / 40.0, 0.0, 1.0)   # 0 young .. 1 old
    u = jnp.abs(f.fx)
    roundness = 1.0 - 0.16 * (u * (1.0 / r)) ** 2 - 0.10 * jnp.clip((f.fy - 0.35) * 5.0, 0.0, 1.0)
    noise = _hash_noise(f.ix, f.iy, p["salt"]) - 0.5
    texture = 1.0 + (0.02 + 0.06 * age) * noise   # old skin is less smooth
    canvas = _paint(canvas, d_face, p["tone"] * (roundness * texture)[..., None], f.pixel, _R["skin"])
    inside = _coverage(d_face, f.pixel)
    px = f.pixel

    # Forehead lines (age): three arcs evaluated at once as the nearest of them.
    level = (f.fy + 0.25 - 0.10 * f.fx * f.fx) * (-1.0 / 0.036)
    k = jnp.clip(jnp.round(level), 0.0, 2.0)
    d_lines = _intersect(jnp.abs(level - k) * 0.036 - 0.003, u - (0.17 - 0.025 * k))
    canvas = _darken(canvas, inside * 0.16 * age * _coverage(d_lines, jnp.maximum(px, 0.006)))

    # Cheeks: rosy (stronger, larger) and make-up blush.
    d_cheek = _ellipse(u, f.fy, p["eye_dx"] + 0.035, 0.12, 0.08, 0.06)
    soft = jnp.clip(-d_cheek * 20.0, 0.0, 1.0)
    canvas = _tint(canvas, (0.38 * p["rosy"] + 0.25 * p["makeup"]) * soft * inside,
                   jnp.array([0.92, 0.22, 0.28]))

    # Facial hair area: the lower face below a line through the cheeks.
    un = u * (1.0 / r)
    jaw_line = 0.10 + 0.02 * un - 0.12 * un ** 4
    area = _coverage(_intersect(jaw_line - f.fy, d_face), 2.0 * px)
    grain = 0.75 + 0.5 * _hash_noise(f.ix + 7, f.iy, p["salt"])
    beard_colour = jnp.asarray(HAIR_COLOURS)[p["hair_cat"]] * 0.8
    canvas = _tint(canvas, 0.32 * p["stubble"] * area * grain, jnp.array([0.22, 0.2, 0.2]))
    canvas = _tint(canvas, jnp.minimum(0.9 * p["full_beard"] * area * grain, 1.0), beard_colour)

    # Double chin: a soft crease above the chin.
    d_crease = _intersect(_stroke(f.fy - (p["chin"] - 0.055 + 1.2 * f.fx * f.fx), 0.008), u - 0.15)
    canvas = _darken(canvas, inside * p["double_chin"] * 0.35 * _coverage(d_crease, 2.0 * px))
    return canvas, d_face, beard_colour


def _draw_front_hair(canvas, f: _Frame, p, d_face, hair_colour):
    """Hair over the cranium, bangs, side locks over the top of the ears,
    sideburns. Returns the canvas and the visible-skin coverage."""
    r, vol = p["face_r"], p["hair_volume"]
    u = jnp.abs(f.fx)
    wave = p["wavy"] * 0.012 * _wave(f.fy * 30.0 + u * 20.0 + p["wave_phase"])
    d_cap = _ellipse(f.fx, f.fy, 0.0, -0.02, r + vol, p["top"] + vol - 0.02) + wave
    # Hairline: a side part tilts it, receding temples lift it at |x| ~ 0.2,
    # bangs bring it down to just above the brows.
    un = u * (1.0 / r)
    part = 0.04 * p["hair_part"] * f.fx * (1.0 / r)
    temple = p["receding"] * 0.14 * jnp.clip(1.0 - ((u - 0.20) * (1.0 / 0.10)) ** 2, 0.0, 1.0)
    hairline = -0.36 + 0.30 * un ** 4 + part - temple - 0.06 * p["receding"]
    fringe = p["eye_y"] - p["brow_gap"] - 0.035 + 0.012 * _wave(f.fx * 55.0 + p["bangs_phase"])
    hairline = jnp.where((p["bangs"] > 0) & (u < 0.9 * r), jnp.maximum(hairline, fringe), hairline)
    d_forehead = _intersect(d_face, hairline - f.fy)
    # The front hair stops near the middle of the ears; longer hair is behind.
    d_hair = _intersect(d_cap, -d_forehead, f.fy - (-0.01 + 0.02 * p["hair_len"]))
    d_side = _rounded_box(u, f.fy, r - 0.024, 0.02, 0.022, 0.075, 0.015)
    d_hair = jnp.where(p["sideburns"] > 0, _union(d_hair, d_side), d_hair)
    canvas = _paint(canvas, d_hair, hair_colour, f.pixel, _R["hair"], on=p["has_hair"])
    skin_visible = _coverage(d_face, f.pixel) * (1.0 - p["has_hair"] * _coverage(d_hair, f.pixel))
    return canvas, skin_visible


def _eye_sdf(u, fy, cx, cy, w, h):
    """Almond eye: the intersection of two discs through the corners."""
    rad = (w * w + h * h) / (2.0 * h)
    off = rad - h
    return jnp.maximum(_circle(u, fy, cx, cy + off, rad), _circle(u, fy, cx, cy - off, rad))


def _glasses_frame_width(pixel):
    return jnp.maximum(0.017, 1.1 * pixel)


def _draw_eyes_window(canvas, f: _Frame, p, skin_visible, beard_colour=None):
    """Eye shadow, under-eye bags, crow's feet, brows, eyes, glasses lenses
    and bridge. Both sides in one evaluation: u = |x| mirrors the face."""
    left = f.fx < 0
    u = jnp.abs(f.fx)
    px = f.pixel
    ex, ey, ew = p["eye_dx"], p["eye_y"], p["eye_w"]
    eh = jnp.maximum(p["eye_h"], 0.6 * px)   # >= 1.2 px tall: never vanishes
    age = jnp.clip((p["age"] - 22.0) / 40.0, 0.0, 1.0)

    d_shadow = _ellipse(u, f.fy, ex, ey - 0.022, 1.2 * ew, 0.04)
    canvas = _tint(canvas, 0.7 * p["makeup"] * skin_visible * _coverage(d_shadow, 2.0 * px),
                   p["makeup_colour"])
    d_bags = _ellipse(u, f.fy, ex, ey + 0.034, 0.8 * ew, 0.015)
    canvas = _darken(canvas, 0.2 * p["bags"] * skin_visible * _coverage(d_bags, 3.0 * px))
    # Crow's feet: three short lines fanning out of the outer eye corner.
    x0 = ex + ew + 0.012
    slope = (f.fy - ey) / (u - x0 + 0.012)
    k = jnp.clip(jnp.round(slope * 2.0), -1.0, 1.0)
    d_crow = _intersect(jnp.abs((f.fy - ey) - 0.5 * k * (u - x0 + 0.012)) - 0.0025,
                        jnp.abs(u - x0 - 0.016) - 0.016)
    canvas = _darken(canvas, 0.16 * age * skin_visible * _coverage(d_crow, jnp.maximum(px, 0.006)))

    # Brows: a curved band over each eye, thicker at the inner end.
    half = 0.072
    t = (u - ex - 0.006) * (1.0 / half)          # -1 inner end, +1 outer end
    curve = ey - p["brow_gap"] - p["brow_arch"] * (1.0 - ((t - 0.25) * 0.8) ** 2) + p["brow_tilt"] * t
    thick = jnp.maximum(p["brow_thick"], 1.2 * px) * (1.0 - 0.45 * jnp.clip(t, 0.0, 1.0) ** 2)
    d_brow = _intersect(jnp.abs(f.fy - curve) - 0.5 * thick, (jnp.abs(t) - 1.0) * half)
    canvas = _paint(canvas, d_brow, p["brow_colour"], px, jnp.where(left, _R["l_brow"], _R["r_brow"]))

    # Eyes: white, iris, pupil, upper lash line (colour only inside the region).
    d_eye = _eye_sdf(u, f.fy, ex, ey, ew, eh)
    canvas = _paint(canvas, d_eye, jnp.array([0.96, 0.95, 0.93]), px,
                    jnp.where(left, _R["l_eye"], _R["r_eye"]))
    iris_u = ex + jnp.where(left, -1.0, 1.0) * p["gaze"][0] * ew
    iris_y = ey + p["gaze"][1] * eh
    d_ring = _circle(u, f.fy, iris_u, iris_y, 0.0)
    canvas = _paint(canvas, jnp.maximum(d_ring - 0.022, d_eye), p["iris"], px)
    canvas = _paint(canvas, jnp.maximum(d_ring - 0.009, d_eye), jnp.array([0.02, 0.02, 0.02]), px)
    liner = 0.005 + 0.004 * p["makeup"]
    d_lash = _intersect(_stroke(d_eye, 2.0 * liner), f.fy - ey - 0.2 * eh)
    canvas = _tint(canvas, 0.85 * _coverage(d_lash, px), jnp.array([0.06, 0.04, 0.04]))

    # Glasses: lens rims (round or rectangular), a faint lens tint, the bridge.
    frame = _glasses_frame_width(px)
    # The rim is drawn inside the lens outline, clear of the eye at any resolution.
    lens_w, lens_h = ew + 0.028 + frame, eh + 0.026 + frame
    d_round = _ellipse(u, f.fy, ex, ey, lens_w, lens_h)
    d_rect = _rounded_box(u, f.fy, ex, ey, lens_w, 0.9 * lens_h, 0.025)
    d_lens = jnp.where(p["glasses_round"] > 0, d_round, d_rect)
    canvas = _tint(canvas, 0.12 * p["glasses"] * _coverage(d_lens, px), jnp.array([0.75, 0.85, 0.95]))
    d_bridge = _intersect(_stroke(f.fy - (ey - 0.012), frame), u - (ex - lens_w + 0.004))
    d_glasses = _union(_stroke(d_lens + 0.5 * frame, frame), d_bridge)
    return _paint(canvas, d_glasses, p["glasses_colour"], px, _R["eye_g"], on=p["glasses"])


def _draw_glasses_arms(canvas, f: _Frame, p):
    """Temple arms from the lens rims to the ears (full frame, cheap)."""
    u = jnp.abs(f.fx)
    frame = _glasses_frame_width(f.pixel)
    x_out = p["eye_dx"] + p["eye_w"] + 0.028 + frame
    d_arm = _intersect(_stroke(f.fy - (p["eye_y"] - 0.02), frame), x_out - 0.004 - u,
                       u - (p["face_r"] + 0.01))
    return _paint(canvas, d_arm, p["glasses_colour"], f.pixel, _R["eye_g"], on=p["glasses"])


def _nose_shift(p):
    """The nose tip sticks out, so yaw moves it further than the eyes."""
    return 0.075 * jnp.sin(p["yaw"])


def _mouth_geometry(p, pixel):
    """(centre x, centre y, half-width, corner lift, half-opening) of the mouth."""
    lift = 0.026 * p["smiling"] * p["smile_amount"]
    gap = jnp.where(p["mouth_open"] > 0, 0.020 * p["open_amount"], 0.0) + 0.010 * p["smiling"]
    # At least ~one pixel of opening, so a drawn opening always owns pixels.
    gap = jnp.where(gap > 0, jnp.maximum(gap, 0.65 * pixel), 0.0)
    return 0.4 * _nose_shift(p), p["mouth_y"], p["mouth_w"], lift, gap


def _draw_mouth_skin(canvas, f: _Frame, p, skin_visible, beard_colour, mouth):
    """Nasolabial folds (age), moustache over the upper lip and goatee on the
    chin (colour on skin). ``mouth`` is :func:`_mouth_geometry`'s tuple."""
    px = f.pixel
    u = jnp.abs(f.fx)
    age = jnp.clip((p["age"] - 22.0) / 40.0, 0.0, 1.0)
    mx, my, hw, _, gap = mouth

    # Nasolabial folds: from the nose wing down past the mouth corner.
    t = jnp.clip((f.fy - p["nose_len"] - 0.01) / (my + 0.03 - p["nose_len"]), 0.0, 1.0)
    x_fold = p["nose_w"] + 0.03 + (hw - p["nose_w"]) * t
    d_fold = _intersect(jnp.abs(u - x_fold) - 0.003, jnp.abs(f.fy - 0.5 * (p["nose_len"] + my + 0.04))
                        - 0.5 * (my + 0.02 - p["nose_len"]))
    canvas = _darken(canvas, 0.18 * age * skin_visible * _coverage(d_fold, jnp.maximum(px, 0.006)))

    grain = 0.75 + 0.5 * _hash_noise(f.ix + 7, f.iy, p["salt"])
    lip_top = my - gap - p["lip_u"]
    d_moustache = _intersect(_stroke(f.fy - (lip_top - 0.017 + 0.35 * (f.fx - mx) ** 2), 0.032),
                             u - (hw + 0.022))
    canvas = _tint(canvas, jnp.minimum(0.95 * p["mustache"] * skin_visible * grain, 1.0)
                   * _coverage(d_moustache, px), beard_colour)
    d_goatee = _ellipse(f.fx, f.fy, mx, my + gap + p["lip_l"] + 0.055, 0.045, 0.05)
    return _tint(canvas, jnp.minimum(0.85 * p["goatee"] * skin_visible * grain, 1.0)
                 * _coverage(d_goatee, 1.5 * px), beard_colour)


def _draw_nose(canvas, f: _Frame, p):
    """Nose: bridge widening into a rounded tip, shaded on the far side, nostrils."""
    px = f.pixel
    nx = _nose_shift(p)
    top = p["eye_y"] + 0.03
    tip_y, nw = p["nose_len"], p["nose_w"]
    nh = 0.6 * nw + 0.008
    d_tip = _ellipse(f.fx, f.fy, nx, tip_y - 0.5 * nh, nw, nh)
    frac = jnp.clip((f.fy - top) / (tip_y - top), 0.0, 1.0)
    half = 0.014 + (0.75 * nw - 0.014) * frac * frac
    d_bridge = _intersect(jnp.abs(f.fx - nx * (0.4 + 0.6 * frac)) - half, top - f.fy, f.fy - tip_y)
    d_nose = _union(d_tip, d_bridge)
    side = jnp.clip((f.fx - nx) * (2.0 / nw), -1.0, 1.0) * jnp.where(p["yaw"] >= 0, 1.0, -1.0)
    canvas = _paint(canvas, d_nose, p["tone"] * (0.90 - 0.07 * side)[..., None], px, _R["nose"])
    d_nostril = _ellipse(jnp.abs(f.fx - nx), f.fy, 0.55 * nw, tip_y - 0.004, 0.3 * nw, 0.009)
    return _tint(canvas, 0.75 * _coverage(jnp.maximum(d_nostril, d_nose), px), p["tone"] * 0.35)


def _draw_lips(canvas, f: _Frame, p, mouth):
    """Lips, the opening between them and teeth in a smile; a smile lifts the
    corners. ``mouth`` is :func:`_mouth_geometry`'s tuple."""
    px = f.pixel
    mx, my, hw, lift, gap = mouth
    t = (f.fx - mx) * (1.0 / hw)
    env = jnp.clip(1.0 - t * t, 0.0, 1.0)
    centre = my - lift * t * t
    half_gap = gap * env
    beyond = (jnp.abs(t) - 1.0) * hw
    lip_u = jnp.maximum(p["lip_u"], 1.2 * px)   # never thinner than ~a pixel
    lip_l = jnp.maximum(p["lip_l"], 1.2 * px)
    bow = 1.0 - 0.35 * jnp.clip(1.0 - (t * 4.0) ** 2, 0.0, 1.0)   # cupid's bow dip
    upper_top = centre - half_gap - lip_u * jnp.sqrt(env) * bow
    lower_bottom = centre + half_gap + lip_l * jnp.sqrt(env)
    natural = p["tone"] * jnp.array([0.80, 0.56, 0.56]) + jnp.array([0.10, 0.0, 0.0])
    lip_colour = jnp.where(p["lipstick"] > 0, p["lipstick_colour"], natural)
    d_upper = _intersect(upper_top - f.fy, f.fy - (centre - half_gap), beyond)
    d_lower = _intersect(f.fy - lower_bottom, centre + half_gap - f.fy, beyond)
    d_open = _intersect(jnp.abs(f.fy - centre) - half_gap, beyond)
    canvas = _paint(canvas, d_upper, lip_colour * 0.85, px, _R["u_lip"])
    canvas = _paint(canvas, d_lower, lip_colour, px, _R["l_lip"])
    canvas = _paint(canvas, d_open, jnp.array([0.25, 0.05, 0.07]), px, _R["mouth"], on=gap > 0)
    # Teeth in the upper part of a smile's opening (colour; the region stays mouth).
    d_teeth = _intersect(d_open, f.fy - centre + 0.2 * half_gap)
    return _tint(canvas, p["smiling"] * _coverage(d_teeth, px), jnp.array([0.96, 0.95, 0.90]))


def _draw_mouth_window(canvas, f: _Frame, p, skin_visible, beard_colour):
    """Nasolabial folds, moustache, goatee, nose, lips and mouth opening."""
    mouth = _mouth_geometry(p, f.pixel)
    canvas = _draw_mouth_skin(canvas, f, p, skin_visible, beard_colour, mouth)
    canvas = _draw_nose(canvas, f, p)
    return _draw_lips(canvas, f, p, mouth)


def _draw_hat(canvas, f: _Frame, p):
    r = p["face_r"]
    brim = p["hat_brim"]
    brim_y = -0.30 - 0.02 * brim
    d_dome = _intersect(_ellipse(f.fx, f.fy, 0.0, brim_y + 0.02, r + 0.06, 0.42),
                        f.fy - (brim_y + 0.02))
    d_brim = _ellipse(f.fx, f.fy, 0.0, brim_y, r + 0.17, 0.045)
    d_hat = jnp.where(brim > 0, _union(d_dome, d_brim), d_dome)
    band = jnp.clip((f.fy - (brim_y - 0.08)) * 50.0, 0.0, 1.0) * (1.0 - brim)
    return _paint(canvas, d_hat, p["hat_colour"] * (1.0 - 0.25 * band)[..., None], f.pixel,
                  _R["hat"], on=p["hat"])


def _crop(canvas: _Canvas, rows, cols) -> _Canvas:
    return _Canvas(canvas.image[rows[0]:rows[1], cols[0]:cols[1]],
                   canvas.parse[rows[0]:rows[1], cols[0]:cols[1]])


def _paste(canvas: _Canvas, window: _Canvas, rows, cols) -> _Canvas:
    return _Canvas(canvas.image.at[rows[0]:rows[1], cols[0]:cols[1]].set(window.image),
                   canvas.parse.at[rows[0]:rows[1], cols[0]:cols[1]].set(window.parse))


def _render_one(p, resolution: int, windows: bool = True):
    """image [H, W, 3] in [0, 1] and parse [H, W] int32 of one parameter set.

    Layers are painted in occlusion order. The many small inner-face layers
    (eyes, brows, glasses rims, nose, lips) are drawn only inside two static
    pixel windows that contain them for every pose the sampler can produce;
    `windows=False` draws them over the full frame (same result, slower; the
    tests compare the two).
    """
    full = ((0, resolution), (0, resolution))
    f = _frame(p, resolution, *full)

    canvas, hair_colour = _draw_base(f, p)
    canvas = _draw_neck_details(canvas, f, p)
    canvas = _draw_ears(canvas, f, p)
    canvas, d_face, beard_colour = _draw_face(canvas, f, p)
    canvas, skin_visible = _draw_front_hair(canvas, f, p, d_face, hair_colour)
    canvas = _draw_glasses_arms(canvas, f, p)
    # Eyes, brows and glasses rims; then nose and mouth: each in its window.
    for box, draw in ((_EYES_BOX, _draw_eyes_window), (_MOUTH_BOX, _draw_mouth_window)):
        rows, cols = _window(resolution, box) if windows else full
        window = draw(_crop(canvas, rows, cols), _frame(p, resolution, rows, cols), p,
                      skin_visible[rows[0]:rows[1], cols[0]:cols[1]], beard_colour)
        canvas = _paste(canvas, window, rows, cols)
    canvas = _draw_hat(canvas, f, p)
    # Directional light and overall brightness.
    direction = jnp.stack([jnp.cos(p["light_angle"]), jnp.sin(p["light_angle"])])
    light = p["brightness"] * (1.0 + p["light_amp"] * (direction[0] * f.img_x + direction[1] * f.img_y))
    return jnp.clip(canvas.image * light[..., None], 0.0, 1.0), canvas.parse


def _landmarks(p, resolution: int):
    """CelebA's 5 points (image-left eye, image-right eye, nose tip, image-left
    and image-right mouth corners), pixel coordinates with centres at integers."""
    mx, my, hw, lift, _ = _mouth_geometry(p, 2.0 / resolution / p["scale"])
    nh = 0.6 * p["nose_w"] + 0.008
    fx = jnp.stack([-p["eye_dx"], p["eye_dx"], _nose_shift(p), mx - hw, mx + hw])
    fy = jnp.stack([p["eye_y"], p["eye_y"], p["nose_len"] - 0.5 * nh, my - lift, my - lift])
    x, y = _face_to_image(fx, fy, p)
    return (jnp.stack([x, y], axis=-1) + 1.0) * (0.5 * resolution) - 0.5


# ---------------------------------------------------------------------------
# Jitted entry points.
# ---------------------------------------------------------------------------
# The renderer is one large elementwise graph; LLVM's expensive passes cost
# about a third of its compile time and buy no measurable speed.
_COMPILER_OPTIONS = {"xla_llvm_disable_expensive_passes": True}



# Images rendered together (vmap) per step of a loop over the batch: about
# 2**17 pixels keeps the many per-layer intermediates in cache (measured
# 1.3x at 128 px and 1.6x at 256 px over one vmap of the whole batch).
_PIXELS_PER_CHUNK = 1 << 17


@functools.partial(jax.jit, static_argnames=("resolution",), compiler_options=_COMPILER_OPTIONS)
def _render_jit(params, *, resolution: int):
    """Pixels of a batch of parameter sets: (image, parse, landmarks)."""
    batch = params["yaw"].shape[0]
    target = max(1, _PIXELS_PER_CHUNK // (resolution * resolution))
    render_one = functools.partial(_render_one, resolution=resolution)
    if batch <= target:
        image, parse = jax.vmap(render_one)(params)
    else:
        # Equal chunks (padding the batch by fewer than `steps` copies of its
        # last image): a remainder chunk would compile the renderer twice.
        steps = -(-batch // target)
        chunk = -(-batch // steps)
        pad = steps * chunk - batch
        padded = jax.tree.map(lambda v: jnp.concatenate([v, jnp.repeat(v[-1:], pad, axis=0)]), params)
        image, parse = jax.lax.map(render_one, padded, batch_size=chunk)
        image, parse = image[:batch], parse[:batch]
    landmarks = jax.vmap(_landmarks, in_axes=(0, None))(params, resolution)
    return image, parse, landmarks


# ---------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------
_INT32_MAX = np.iinfo(np.int32).max
_PARAMETER_NAMES = tuple(_draw(0, np.zeros(1, np.int64), 1, False)[3])


def _check_seed(seed) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not 0 <= int(seed) <= _INT32_MAX:
        raise ValueError(f"seed must be in 0..{_INT32_MAX}, got {seed}")
    return int(seed)


def _check_indices(indices) -> np.ndarray:
    arr = np.asarray(indices)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"indices must be a 1-D sequence of integers, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"indices must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > _INT32_MAX):
        bad = arr.min() if arr.min() < 0 else arr.max()
        raise ValueError(f"image index {bad} out of range; expected 0..{_INT32_MAX}")
    return arr.astype(np.int32)


def _check_images_per_identity(n) -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"images_per_identity must be a positive integer, got {n!r}")
    return int(n)


def _check_resolution(resolution) -> int:
    if (isinstance(resolution, (bool, np.bool_)) or not isinstance(resolution, (int, np.integer))
            or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION):
        raise ValueError(
            f"resolution must be an integer in {MIN_RESOLUTION}..{MAX_RESOLUTION}, got {resolution!r}")
    return int(resolution)


_ATTR_CHUNK = 1 << 18   # bounds the memory of sample_attributes on huge pools


def sample_attributes(seed: int, indices, *, independent: bool = False,
                      images_per_identity: int = 10) -> dict[str, np.ndarray]:
    """Attributes of images without rendering them (vectorised numpy; about a
    million indices per second).

    Args:
      seed: data-set seed, 0..2**31-1.
      indices: 1-D integer image indices, 0..2**31-1.
      independent: sample every drawn attribute independently at its marginal
        rate (Male included) instead of CelebA-like co-occurrences. Hair
        colours and Bald stay mutually exclusive; hair attributes are 0 when
        bald.
      images_per_identity: identity = index // images_per_identity.

    Returns:
      numpy dict: ``attrs`` int8 [N, 40] (1 / 0, -1 for undrawn attributes),
      ``identity`` int32 [N], ``group`` int32 [N] (skin tone, 0 light .. 3
      dark): exactly the values :func:`render` returns for the same images.
    """
    seed = _check_seed(seed)
    idx = _check_indices(indices)
    ipi = _check_images_per_identity(images_per_identity)
    parts = [_draw(seed, idx[i:i + _ATTR_CHUNK], ipi, bool(independent), with_params=False)
             for i in range(0, max(idx.size, 1), _ATTR_CHUNK)]
    return {"attrs": np.concatenate([q[0] for q in parts]),
            "identity": np.concatenate([q[1] for q in parts]),
            "group": np.concatenate([q[2] for q in parts])}


def sample_parameters(seed: int, indices, *, independent: bool = False,
                      images_per_identity: int = 10) -> dict[str, np.ndarray]:
    """The drawing parameters of images (numpy dict of float32 [B] / [B, k]).

    Together with :func:`render_parameters` this allows counterfactual
    images: copy the dict, change one entry (e.g. ``lipstick`` to 0) and
    render both. Attributes are not recomputed from edited parameters.
    """
    seed = _check_seed(seed)
    idx = _check_indices(indices)
    ipi = _check_images_per_identity(images_per_identity)
    return _draw(seed, idx, ipi, bool(independent))[3]


def render_parameters(params: dict, resolution: int = DEFAULT_RESOLUTION) -> dict[str, jax.Array]:
    """Render parameter sets from :func:`sample_parameters` (possibly edited).

    Returns ``image`` [B, H, W, 3], ``parse`` [B, H, W] and ``landmarks``
    [B, 5, 2] as in :func:`render`. Compiles once per (B, resolution).
    """
    res = _check_resolution(resolution)
    missing = set(_PARAMETER_NAMES) - set(params)
    if missing:
        raise ValueError(f"params lacks {sorted(missing)}; expected the dict of sample_parameters")
    arrays = {k: jnp.asarray(params[k]) for k in _PARAMETER_NAMES}
    image, parse, landmarks = _render_jit(arrays, resolution=res)
    return {"image": image, "parse": parse, "landmarks": landmarks}


def render(seed: int, indices, resolution: int = DEFAULT_RESOLUTION, *,
           independent: bool = False, images_per_identity: int = 10) -> dict[str, jax.Array]:
    """Render images by index: the batch format of docs/design.md, as jax arrays.

    Args:
      seed: data-set seed, 0..2**31-1.
      indices: 1-D integer image indices (B of them, B >= 1).
      resolution: image side in pixels, 64..512. The face is defined in
        continuous coordinates, so resolutions differ only in sampling.
      independent: as in :func:`sample_attributes`.
      images_per_identity: identity = index // images_per_identity.

    Returns:
      ``image`` float32 [B, H, W, 3] in [0, 1]; ``parse`` int32 [B, H, W]
      (region ids 0..18, regions.REGIONS order); ``attrs`` int8 [B, 40];
      ``identity`` int32 [B]; ``landmarks`` float32 [B, 5, 2] (x, y) pixel
      coordinates with pixel centres at integers, CelebA order (image-left
      eye, image-right eye, nose tip, image-left and image-right mouth
      corners); ``group`` int32 [B] (skin tone 0 light .. 3 dark); ``yaw``
      float32 [B] in radians, positive when the face turns to the image's
      right (its features shift to larger x).

    The per-image parameters are drawn on the host (numpy, cheap); the pixels
    come from one jitted function compiled once per (B, resolution).
    """
    seed = _check_seed(seed)
    idx = _check_indices(indices)
    if idx.size == 0:
        raise ValueError("indices is empty; expected at least one image index")
    res = _check_resolution(resolution)
    ipi = _check_images_per_identity(images_per_identity)
    attrs, identity, group, params = _draw(seed, idx, ipi, bool(independent))
    image, parse, landmarks = _render_jit({k: jnp.asarray(v) for k, v in params.items()},
                                          resolution=res)
    return {
        "image": image, "parse": parse, "attrs": jnp.asarray(attrs),
        "identity": jnp.asarray(identity), "landmarks": landmarks,
        "group": jnp.asarray(group), "yaw": jnp.asarray(params["yaw"]),
    }


# ---------------------------------------------------------------------------
# Counterfactual faces: the same image with one attribute switched
# ---------------------------------------------------------------------------

# Hair colour a blond face gets when Blond_Hair is switched off.
COUNTERFACTUAL_NON_BLOND = BROWN
# Attributes the renderer can switch on one face while everything else
# (identity, pose, lighting, background, other accessories) stays the same.
COUNTERFACTUAL_ATTRIBUTES: tuple[str, ...] = (
    "Blond_Hair", "Eyeglasses", "Smiling", "Wearing_Earrings", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Hat", "Wearing_Necktie", "Heavy_Makeup", "Rosy_Cheeks",
)
_FLAG_PARAMETER = {
    "Eyeglasses": "glasses", "Wearing_Earrings": "earrings", "Wearing_Lipstick": "lipstick",
    "Wearing_Necklace": "necklace", "Wearing_Hat": "hat", "Wearing_Necktie": "necktie",
    "Heavy_Makeup": "makeup", "Rosy_Cheeks": "rosy", "Smiling": "smiling",
}
# renderer: a smile widens the mouth by this much (see _draw: mouth_w)
_SMILE_WIDENING = 0.012


def switch_attribute(params: dict, attrs, attribute: str, value=None):
    """Drawing parameters and attributes with one attribute switched.

    ``params`` from :func:`sample_parameters`, ``attrs`` int8 [B, 40];
    ``value`` None flips the attribute on every image, 0 or 1 sets it. Only
    the parameters that draw ``attribute`` change: a flag (glasses, hat,
    lipstick, ...), plus for Smiling the mouth width it adds and for
    Blond_Hair the hair category, its colour (keeping the image's colour
    jitter) and the brow colour the renderer ties to it (blond <->
    ``COUNTERFACTUAL_NON_BLOND``). Returns (params, attrs, applicable bool
    [B]); an image is not applicable where the switch cannot be drawn (hair
    colour on a bald face) or changes nothing (``value`` already held).
    """
    if attribute not in COUNTERFACTUAL_ATTRIBUTES:
        raise ValueError(f"cannot switch {attribute!r}; expected one of "
                         f"{', '.join(COUNTERFACTUAL_ATTRIBUTES)}")
    if value not in (None, 0, 1, True, False):
        raise ValueError(f"value must be None (flip), 0 or 1; got {value!r}")
    attrs = np.array(attrs, np.int8, copy=True)
    col = regions.attribute_id(attribute)
    current = attrs[:, col] == 1
    new = ~current if value is None else np.full_like(current, bool(value))
    out = {k: np.array(v, copy=True) for k, v in params.items()}
    if attribute == "Blond_Hair":
        cat = np.asarray(params["hair_cat"])
        applicable = (cat != BALD) & (new != current)
        new_cat = np.where(applicable, np.where(new, BLOND, COUNTERFACTUAL_NON_BLOND), cat)
        jitter = (np.asarray(params["hair_colour"]).sum(-1)
                  / np.maximum(HAIR_COLOURS[cat].sum(-1), 1e-6))
        out["hair_cat"] = new_cat.astype(np.int32)
        out["hair_colour"] = np.where(applicable[:, None], HAIR_COLOURS[new_cat] * jitter[:, None],
                                      params["hair_colour"]).astype(np.float32)
        out["brow_colour"] = np.where(applicable[:, None], _brow_colour(new_cat),
                                      params["brow_colour"]).astype(np.float32)
        for name, c in (("Black_Hair", BLACK), ("Brown_Hair", BROWN), ("Blond_Hair", BLOND),
                        ("Gray_Hair", GRAY)):
            j = regions.attribute_id(name)
            attrs[:, j] = np.where(applicable, new_cat == c, attrs[:, j])
        return out, attrs, applicable
    applicable = new != current
    flag = _FLAG_PARAMETER[attribute]
    out[flag] = np.where(applicable, new, np.asarray(params[flag]) > 0).astype(np.float32)
    if attribute == "Smiling":
        change = (new.astype(np.float32) - current.astype(np.float32)) * applicable
        out["mouth_w"] = (np.asarray(params["mouth_w"]) + _SMILE_WIDENING * change).astype(np.float32)
    attrs[:, col] = np.where(applicable, new, current)
    return out, attrs, applicable


def render_counterfactual(seed: int, indices, attribute: str, resolution: int = DEFAULT_RESOLUTION,
                          *, value=None, independent: bool = False,
                          images_per_identity: int = 10):
    """(factual, counterfactual, applicable): each image rendered as drawn and again
    with ``attribute`` switched (see :func:`switch_attribute`), same identity,
    pose, lighting, background and every other attribute.

    Both batches have the format of :func:`render` (``attrs`` updated in the
    counterfactual); ``applicable`` bool [B] marks the images that changed.
    """
    seed = _check_seed(seed)
    idx = _check_indices(indices)
    if idx.size == 0:
        raise ValueError("indices is empty; expected at least one image index")
    factual = render(seed, idx, resolution, independent=independent,
                     images_per_identity=images_per_identity)
    params = sample_parameters(seed, idx, independent=independent,
                               images_per_identity=images_per_identity)
    edited, attrs, applicable = switch_attribute(params, np.asarray(factual["attrs"]),
                                                 attribute, value)
    counterfactual = dict(factual)
    counterfactual.update(render_parameters(edited, resolution))
    counterfactual["attrs"] = jnp.asarray(attrs)
    return factual, counterfactual, applicable


def attribute_rates(attrs: np.ndarray) -> dict[str, float]:
    """Fraction of images with each drawn attribute (NaN for undrawn ones)."""
    attrs = np.asarray(attrs)
    out = {}
    for j, name in enumerate(regions.ATTRIBUTES):
        col = attrs[:, j]
        known = col >= 0
        out[name] = float(col[known].mean()) if known.any() else float("nan")
    return out
