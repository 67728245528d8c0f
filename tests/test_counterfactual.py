"""Counterfactual faces: only the switched attribute's pixels change."""

import numpy as np
import pytest
from scipy import ndimage

from faceaudit_jax import regions
from faceaudit_jax.data import synthetic

# Regions beyond ATTRIBUTE_REGIONS that a switch legitimately touches: the
# renderer ties brow colour to hair colour.
_ALSO = {"Blond_Hair": ("l_brow", "r_brow")}
# Share of the absolute pixel change within 2 px of the attribute's pixels;
# earrings show through the anti-aliased edges of hair locks.
_MIN_SHARE = {"Smiling": 0.9, "Wearing_Earrings": 0.98}


def _attribute_pixels(attribute, parse_a, parse_b):
    ids = [regions.region_id(r) for r in regions.regions_of(attribute) + _ALSO.get(attribute, ())]
    pixels = np.isin(parse_a, ids) | np.isin(parse_b, ids)
    if attribute == "Eyeglasses":  # tinted lenses inside the rims
        rims = (parse_a == regions.region_id("eye_g")) | (parse_b == regions.region_id("eye_g"))
        pixels |= np.stack([ndimage.binary_fill_holes(r) for r in rims])
    return pixels


@pytest.mark.parametrize("attribute", synthetic.COUNTERFACTUAL_ATTRIBUTES)
def test_only_the_switched_attribute_changes(attribute):
    indices = np.arange(12)
    factual, counter, applicable = synthetic.render_counterfactual(0, indices, attribute, 64)
    assert applicable.any()
    fi, ci = np.asarray(factual["image"]), np.asarray(counter["image"])
    fp, cp = np.asarray(factual["parse"]), np.asarray(counter["parse"])
    # the factual batch is the ordinary rendering
    np.testing.assert_array_equal(fi, np.asarray(synthetic.render(0, indices, 64)["image"]))
    # images the switch does not apply to are untouched, bit for bit
    np.testing.assert_array_equal(fi[~applicable], ci[~applicable])
    # attributes: the switched one flips on applicable images, no other changes
    # (hair colour is one categorical attribute over four columns)
    fa, ca = np.asarray(factual["attrs"]), np.asarray(counter["attrs"])
    col = regions.attribute_id(attribute)
    np.testing.assert_array_equal(ca[applicable, col], 1 - fa[applicable, col])
    hair = [regions.attribute_id(n) for n in ("Black_Hair", "Brown_Hair", "Blond_Hair",
                                              "Gray_Hair")]
    others = [j for j in range(regions.NUM_ATTRIBUTES)
              if j != col and not (attribute == "Blond_Hair" and j in hair)]
    np.testing.assert_array_equal(ca[:, others], fa[:, others])
    # every applicable image changes, and only where the attribute is drawn
    change = np.abs(fi - ci).sum(-1)
    assert (change[applicable].reshape(applicable.sum(), -1).max(1) > 0.05).all()
    pixels = _attribute_pixels(attribute, fp, cp)
    assert not ((fp != cp) & ~pixels).any(), "parse changed outside the attribute's regions"
    near = np.stack([ndimage.binary_dilation(p, iterations=2) for p in pixels])
    share = change[near].sum() / change.sum()
    assert share >= _MIN_SHARE.get(attribute, 0.999), share
    if attribute == "Smiling":
        # A smile widens the mouth, which moves what the renderer hangs on its
        # width: nasolabial folds, moustache, goatee. Those marks are colour on
        # skin, close to the mouth.
        skin = regions.region_id("skin")
        outside = (change > 1e-6) & ~near
        assert ((fp == skin) & (cp == skin))[outside].all()
        close = np.stack([ndimage.binary_dilation(p, iterations=10) for p in pixels])
        assert not (outside & ~close).any()


def test_switch_attribute_sets_values_and_rejects_bad_input():
    params = synthetic.sample_parameters(0, np.arange(40))
    attrs = synthetic.sample_attributes(0, np.arange(40))["attrs"]
    _, on, applicable = synthetic.switch_attribute(params, attrs, "Wearing_Hat", 1)
    col = regions.attribute_id("Wearing_Hat")
    assert (on[:, col] == 1).all()
    np.testing.assert_array_equal(applicable, attrs[:, col] == 0)
    bald = attrs[:, regions.attribute_id("Bald")] == 1
    _, _, blond_ok = synthetic.switch_attribute(params, attrs, "Blond_Hair")
    assert not blond_ok[bald].any() and blond_ok[~bald].all()
    with pytest.raises(ValueError, match="cannot switch 'Male'"):
        synthetic.switch_attribute(params, attrs, "Male")
    with pytest.raises(ValueError, match="value must be"):
        synthetic.switch_attribute(params, attrs, "Wearing_Hat", 2)
