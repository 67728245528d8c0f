"""Attribute masks B for proportional energy (binary-attribute CAM paper, eq. 7).

Two sources, same output (bool [B, A, H, W], one mask per image and attribute):

* ``source="parse"`` (default): the union of the attribute's parsed regions,
  ``regions.ATTRIBUTE_MASK_REGIONS`` (``regions.region_membership(attrs,
  for_energy=True)``, a bool [A, 19] table). The masks of all attributes come
  from one gather ``table[:, parse]``, so they follow each face's pose.
* ``source="rectangles"``: the paper's alternative, fixed rectangles on the
  aligned face, the same for every image. The default layout
  (``PAPER_RECTANGLES``) is the one of the authors' released protocol for
  AFFACT's 224 x 224 alignment: a 7 x 7 grid of 32 px cells, given here in
  normalised coordinates (cell / 7). Pass another dict for another alignment.

Rectangles are (x0, y0, x1, y1) in [0, 1] with x to the right and y down; a
pixel belongs to a rectangle when its centre ((col + 0.5) / W, (row + 0.5) / H)
lies in [x0, x1) x [y0, y1). An attribute's mask is the union of its
``include`` rectangles minus the union of its ``exclude`` rectangles.

Per-attribute table of the rectangle layout (grid rows / columns of the 7 x 7
grid, end exclusive; the parse regions are those of
``regions.ATTRIBUTE_MASK_REGIONS``):

| attribute | rectangle mask | parse regions |
|---|---|---|
| 5_o_Clock_Shadow | nose-cheeks: rows 3-5, cols 2-5 | skin |
| Arched_Eyebrows | eyes band: rows 2-4, cols 2-5 | l_brow, r_brow |
| Attractive | global: rows 1-7, cols 1-6 | (none) |
| Bags_Under_Eyes | eyes band | l_eye, r_eye |
| Bald | upper head: rows 0-3, cols 2-5 | hair, skin |
| Bangs | eyes band | hair |
| Big_Lips | mouth box: rows 4-5, cols 2-5 | u_lip, l_lip |
| Big_Nose | nose-cheeks | nose |
| Black_Hair | hair: global minus face column (rows 2-7, cols 2-5) | hair |
| Blond_Hair | hair | hair |
| Blurry | global | (none) |
| Brown_Hair | hair | hair |
| Bushy_Eyebrows | eyes band | l_brow, r_brow |
| Chubby | global | skin |
| Double_Chin | chin band: rows 5-6, cols 2-5 | skin, neck |
| Eyeglasses | eyes band | eye_g, l_eye, r_eye |
| Goatee | chin column: rows 4-6, cols 3-4 | skin, l_lip |
| Gray_Hair | hair | hair |
| Heavy_Makeup | nose-cheeks | skin, l_eye, r_eye, u_lip, l_lip |
| High_Cheekbones | nose-cheeks | skin |
| Male | global | (none) |
| Mouth_Slightly_Open | mouth box | mouth, u_lip, l_lip |
| Mustache | mouth box | skin, u_lip |
| Narrow_Eyes | eyes band | l_eye, r_eye |
| No_Beard | nose-cheeks | skin |
| Oval_Face | face: rows 1-6, cols 2-5 | skin |
| Pale_Skin | face | skin |
| Pointy_Nose | nose-cheeks | nose |
| Receding_Hairline | upper head | hair |
| Rosy_Cheeks | nose-cheeks | skin |
| Sideburns | ear boxes: rows 3-6, cols 1-3 and 4-6 | hair, skin |
| Smiling | mouth box | mouth, u_lip, l_lip |
| Straight_Hair | hair | hair |
| Wavy_Hair | hair | hair |
| Wearing_Earrings | ear boxes | ear_r, l_ear, r_ear |
| Wearing_Hat | hat band: rows 0-3, cols 1-6 | hat, hair |
| Wearing_Lipstick | mouth box | u_lip, l_lip |
| Wearing_Necklace | neck box: rows 5-7, cols 2-5 | neck_l, neck |
| Wearing_Necktie | neck box | cloth, neck |
| Young | global | (none) |

Attributes with no parse region (Attractive, Blurry, Male, Young) get an
all-False parse mask: their energy is 0 by construction and means nothing, so
leave them out of energy tables (``mask_defined`` tells which).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax import regions

Rectangle = tuple[float, float, float, float]  # (x0, y0, x1, y1), normalised


class RectangleMask(NamedTuple):
    """Union of ``include`` rectangles minus the union of ``exclude`` rectangles."""

    include: tuple[Rectangle, ...]
    exclude: tuple[Rectangle, ...] = ()


def _grid(row0: int, row1: int, col0: int, col1: int, cells: int = 7) -> Rectangle:
    """Rectangle of grid cells rows [row0, row1) x cols [col0, col1) of a cells x cells grid."""
    return (col0 / cells, row0 / cells, col1 / cells, row1 / cells)


_UPPER_HEAD = RectangleMask((_grid(0, 3, 2, 5),))
_HAT = RectangleMask((_grid(0, 3, 1, 6),))
_EYES = RectangleMask((_grid(2, 4, 2, 5),))
_NOSE_CHEEKS = RectangleMask((_grid(3, 5, 2, 5),))
_EARS = RectangleMask((_grid(3, 6, 1, 3), _grid(3, 6, 4, 6)))
_MOUTH = RectangleMask((_grid(4, 5, 2, 5),))
_GOATEE = RectangleMask((_grid(4, 6, 3, 4),))
_CHIN = RectangleMask((_grid(5, 6, 2, 5),))
_NECK = RectangleMask((_grid(5, 7, 2, 5),))
_FACE = RectangleMask((_grid(1, 6, 2, 5),))
_GLOBAL = RectangleMask((_grid(1, 7, 1, 6),))
_HAIR = RectangleMask((_grid(1, 7, 1, 6),), exclude=(_grid(2, 7, 2, 5),))

# The released protocol's layout for 224 x 224 AFFACT-aligned faces (see the
# module docstring's table).
PAPER_RECTANGLES: dict[str, RectangleMask] = {
    "5_o_Clock_Shadow": _NOSE_CHEEKS, "Arched_Eyebrows": _EYES, "Attractive": _GLOBAL,
    "Bags_Under_Eyes": _EYES, "Bald": _UPPER_HEAD, "Bangs": _EYES, "Big_Lips": _MOUTH,
    "Big_Nose": _NOSE_CHEEKS, "Black_Hair": _HAIR, "Blond_Hair": _HAIR, "Blurry": _GLOBAL,
    "Brown_Hair": _HAIR, "Bushy_Eyebrows": _EYES, "Chubby": _GLOBAL, "Double_Chin": _CHIN,
    "Eyeglasses": _EYES, "Goatee": _GOATEE, "Gray_Hair": _HAIR, "Heavy_Makeup": _NOSE_CHEEKS,
    "High_Cheekbones": _NOSE_CHEEKS, "Male": _GLOBAL, "Mouth_Slightly_Open": _MOUTH,
    "Mustache": _MOUTH, "Narrow_Eyes": _EYES, "No_Beard": _NOSE_CHEEKS, "Oval_Face": _FACE,
    "Pale_Skin": _FACE, "Pointy_Nose": _NOSE_CHEEKS, "Receding_Hairline": _UPPER_HEAD,
    "Rosy_Cheeks": _NOSE_CHEEKS, "Sideburns": _EARS, "Smiling": _MOUTH, "Straight_Hair": _HAIR,
    "Wavy_Hair": _HAIR, "Wearing_Earrings": _EARS, "Wearing_Hat": _HAT,
    "Wearing_Lipstick": _MOUTH, "Wearing_Necklace": _NECK, "Wearing_Necktie": _NECK,
    "Young": _GLOBAL,
}

MASK_SOURCES = ("parse", "rectangles")


def _attribute_names(attributes: Sequence[str] | None) -> tuple[str, ...]:
    if attributes is None:
        return regions.ATTRIBUTES
    if isinstance(attributes, str):
        raise ValueError(
            f"attributes must be a sequence of attribute names; got the string {attributes!r} "
            f"(wrap one name in a list: [{attributes!r}])")
    names = tuple(attributes)
    regions.attribute_ids(names)  # validates every name
    return names


def region_table(attributes: Sequence[str] | None = None, for_energy: bool = True) -> np.ndarray:
    """bool [A, 19]: region r is part of attribute a's mask."""
    return regions.region_membership(_attribute_names(attributes), for_energy=for_energy)


def mask_defined(attributes: Sequence[str] | None = None, source: str = "parse",
                 rectangles: Mapping[str, RectangleMask] | None = None) -> np.ndarray:
    """bool [A]: the attribute has a non-trivial mask under ``source``.

    False for the global attributes under "parse" (Male, Young, ...), and for
    attributes missing from the rectangle dict under "rectangles".
    """
    names = _attribute_names(attributes)
    if source == "parse":
        return region_table(names).any(axis=1)
    if source == "rectangles":
        table = PAPER_RECTANGLES if rectangles is None else rectangles
        return np.array([name in table and len(table[name].include) > 0 for name in names])
    raise ValueError(f"unknown mask source {source!r}; expected one of {MASK_SOURCES}")


def parse_attribute_masks(parse, attributes: Sequence[str] | None = None,
                          for_energy: bool = True):
    """Masks of all attributes from parse maps in one gather.

    Args:
      parse: int [B, H, W] region ids 0..18 (``regions.REGIONS`` order).
      attributes: attribute names (default: all 40, CelebA order).
      for_energy: use the wider energy masks (``ATTRIBUTE_MASK_REGIONS``);
        False gives ``ATTRIBUTE_REGIONS``.

    Returns:
      bool [B, A, H, W]. Ids outside 0..18 raise ValueError for concrete
      input; under jit they belong to no mask.
    """
    names = _attribute_names(attributes)
    if not isinstance(parse, jax.core.Tracer):
        parse_np = np.asarray(parse)
        if not np.issubdtype(parse_np.dtype, np.integer):
            raise ValueError(f"parse must hold integer region ids; got dtype {parse_np.dtype}")
        regions.validate_parse_ids(parse_np)
    parse = jnp.asarray(parse)
    if parse.ndim != 3:
        raise ValueError(f"parse must be [B, H, W]; got shape {parse.shape}")
    table = jnp.asarray(region_table(names, for_energy))  # [A, R]
    in_range = (parse >= 0) & (parse < regions.NUM_REGIONS)
    ids = jnp.where(in_range, parse, 0)
    masks = table[:, ids] & in_range[None]  # [A, B, H, W], one gather
    return jnp.swapaxes(masks, 0, 1)


def _pixel_in_rectangles(rects: Sequence[Rectangle], height: int, width: int) -> np.ndarray:
    """bool [H, W]: pixel centre inside any of the rectangles."""
    ys = (np.arange(height) + 0.5) / height
    xs = (np.arange(width) + 0.5) / width
    inside = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in rects:  # a handful of rectangles, each vectorised
        rows = (ys >= y0) & (ys < y1)
        cols = (xs >= x0) & (xs < x1)
        inside |= rows[:, None] & cols[None, :]
    return inside


def _check_rectangle(name: str, rect) -> None:
    try:
        x0, y0, x1, y1 = (float(v) for v in rect)
    except (TypeError, ValueError):
        raise ValueError(
            f"rectangle of {name!r} must be (x0, y0, x1, y1); got {rect!r}") from None
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(
            f"rectangle {rect!r} of {name!r} must satisfy 0 <= x0 < x1 <= 1 and "
            "0 <= y0 < y1 <= 1 (normalised coordinates)")


def rectangle_attribute_masks(height: int, width: int,
                              attributes: Sequence[str] | None = None,
                              rectangles: Mapping[str, RectangleMask] | None = None
                              ) -> np.ndarray:
    """Fixed-rectangle masks on the aligned face: bool [A, H, W] (same for every image).

    ``rectangles`` maps attribute names to ``RectangleMask`` (default
    ``PAPER_RECTANGLES``); an attribute missing from it gets an all-False mask
    (see ``mask_defined``).
    """
    if not (isinstance(height, (int, np.integer)) and isinstance(width, (int, np.integer))
            and height > 0 and width > 0):
        raise ValueError(f"height and width must be positive ints; got {height!r}, {width!r}")
    names = _attribute_names(attributes)
    table = PAPER_RECTANGLES if rectangles is None else rectangles
    masks = np.zeros((len(names), height, width), bool)
    for a, name in enumerate(names):
        if name not in table:
            continue
        spec = table[name]
        if not isinstance(spec, RectangleMask):
            spec = RectangleMask(tuple(spec))
        for rect in (*spec.include, *spec.exclude):
            _check_rectangle(name, rect)
        masks[a] = (_pixel_in_rectangles(spec.include, height, width)
                    & ~_pixel_in_rectangles(spec.exclude, height, width))
    return masks


def attribute_masks(parse, attributes: Sequence[str] | None = None, source: str = "parse",
                    *, for_energy: bool = True,
                    rectangles: Mapping[str, RectangleMask] | None = None):
    """Attribute masks B for a batch: bool [B, A, H, W].

    Args:
      parse: int [B, H, W] parse maps; with ``source="rectangles"`` only its
        shape is used (the masks are fixed on the aligned face).
      attributes: attribute names (default: all 40).
      source: "parse" (regions of the parse map) or "rectangles" (the paper's
        fixed rectangles, or ``rectangles``).
    """
    if source == "parse":
        return parse_attribute_masks(parse, attributes, for_energy)
    if source == "rectangles":
        shape = tuple(np.shape(parse))
        if len(shape) != 3:
            raise ValueError(f"parse must be [B, H, W]; got shape {shape}")
        batch, height, width = shape
        fixed = rectangle_attribute_masks(height, width, attributes, rectangles)
        return jnp.broadcast_to(jnp.asarray(fixed)[None], (batch, *fixed.shape))
    raise ValueError(f"unknown mask source {source!r}; expected one of {MASK_SOURCES}")
