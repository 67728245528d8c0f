"""Tests for explain/fv_heatmaps.py: Otsu, masks, SM+/SM-, selection, heatmaps, overlay."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax.explain import fv_heatmaps as fv


# ---------------------------------------------------------------- Otsu


def brute_force_otsu_split(x, bins=256):
    """Best split index k by looping over every bin threshold (numpy, float64)."""
    counts, edges = np.histogram(x, bins=bins, range=(x.min(), x.max()))
    centres = 0.5 * (edges[:-1] + edges[1:])
    best, best_k = -1.0, None
    total = counts.sum()
    for k in range(bins - 1):
        w0, w1 = counts[:k + 1].sum(), counts[k + 1:].sum()
        if w0 == 0 or w1 == 0:
            continue
        mu0 = (counts[:k + 1] * centres[:k + 1]).sum() / w0
        mu1 = (counts[k + 1:] * centres[k + 1:]).sum() / w1
        var = (w0 / total) * (w1 / total) * (mu0 - mu1) ** 2
        if var > best * (1 + 1e-9):  # first maximum, robust to float ties
            best, best_k = var, k
    return best_k, edges


def _off_edges(x, bins=256, gap=1e-4):
    """Drop values within ``gap`` bin widths of a histogram edge (float32 vs float64 binning)."""
    lo, hi = x.min(), x.max()
    pos = (x - lo) / (hi - lo) * bins
    keep = (np.abs(pos - np.round(pos)) > gap) | (x == lo) | (x == hi)
    return x[keep]


@pytest.mark.parametrize("seed,kind", [(0, "uniform"), (1, "beta"), (2, "mixture"),
                                       (3, "skewed")])
def test_otsu_matches_brute_force(seed, kind):
    rng = np.random.default_rng(seed)
    n = 3000
    x = {"uniform": rng.uniform(size=n),
         "beta": rng.beta(0.5, 2.0, size=n),
         "mixture": np.concatenate([rng.normal(0.3, 0.1, n // 3), rng.normal(1.2, 0.3, n)]),
         "skewed": rng.exponential(size=n) ** 2}[kind]
    x = _off_edges(x.astype(np.float32))
    k, edges = brute_force_otsu_split(x.astype(np.float64))
    threshold = float(fv.otsu_threshold(jnp.asarray(x)))
    expected_mask = x >= edges[k + 1]
    np.testing.assert_array_equal(x > threshold, expected_mask)
    # the threshold is the largest value of the lower class
    assert threshold == x[~expected_mask].max()


def test_otsu_bimodal_separates_modes():
    rng = np.random.default_rng(5)
    low, high = rng.normal(0.2, 0.05, 4000), rng.normal(0.8, 0.05, 2000)
    x = jnp.asarray(np.concatenate([low, high]).reshape(60, 100), jnp.float32)
    t = float(fv.otsu_threshold(x))
    assert 0.35 < t < 0.65
    mask = np.asarray(x > t).ravel()
    assert mask[:4000].mean() < 0.001 and mask[4000:].mean() > 0.999


def test_otsu_jit_and_two_values():
    x = jnp.asarray([[0.0, 0.0], [1.0, 1.0]])
    assert float(jax.jit(fv.otsu_threshold)(x)) == 0.0
    masks, constant = jax.jit(fv.otsu_binarize)(x[None])
    np.testing.assert_array_equal(np.asarray(masks[0]), [[False, False], [True, True]])
    assert not bool(constant[0])


def test_constant_map_gives_empty_mask_and_warning():
    maps = jnp.stack([jnp.full((8, 8), 0.4), jnp.eye(8)])
    assert float(fv.otsu_threshold(maps[0])) == pytest.approx(0.4)
    with pytest.warns(RuntimeWarning, match="constant"):
        masks = fv.binarize_maps(maps)
    assert not np.asarray(masks[0]).any()
    np.testing.assert_array_equal(np.asarray(masks[1]), np.eye(8, dtype=bool))


def test_otsu_bad_input():
    with pytest.raises(ValueError, match="bins"):
        fv.otsu_threshold(jnp.ones(4), bins=1)
    with pytest.raises(ValueError, match="non-empty"):
        fv.otsu_threshold(jnp.ones((0,)))


# ---------------------------------------------------------------- masks and RA


def _pixels(mask):
    return {tuple(p) for p in np.argwhere(np.asarray(mask))}


def test_masks_match_set_algebra():
    p = np.zeros((5, 6), bool)
    g = np.zeros((5, 6), bool)
    p[1:4, 1:3] = True
    p[0, 5] = True
    g[2:5, 2:5] = True
    g[0, 0] = True
    sp, sg = _pixels(p), _pixels(g)
    assert _pixels(fv.oim(p, g)) == sp & sg
    assert _pixels(fv.um(p, g)) == sp | sg
    assert _pixels(fv.n_ium(p, g)) == (sp | sg) - (sp & sg)
    stacked = fv.technique_masks(jnp.asarray(p), jnp.asarray(g))
    assert [_pixels(m) for m in stacked] == [sp & sg, sp | sg, (sp | sg) - (sp & sg)]
    np.testing.assert_allclose(np.asarray(fv.removed_area(stacked)),
                               [len(sp & sg) / 30, len(sp | sg) / 30,
                                len((sp | sg) - (sp & sg)) / 30])


# ---------------------------------------------------------------- SM+ and SM-


def test_sm_formulas_hand_computed():
    # SM+ = ((0.8 - 0.5)/0.5)/(2*0.25) + ((0.6 - 0.5)/0.5)/(2*0.25) = 1.2 + 0.4
    assert float(fv.sm_plus(jnp.float32(0.5), 0.8, 0.6, 0.25)) == pytest.approx(1.6)
    # SM- = ((1.2 - 0.9)/1.2)/0.2 = 1.25
    assert float(fv.sm_minus(jnp.float32(1.2), 0.9, 0.2)) == pytest.approx(1.25)
    # RA = 0 or d = 0: NaN, no division error
    assert np.isnan(float(fv.sm_plus(jnp.float32(0.5), 0.8, 0.6, 0.0)))
    assert np.isnan(float(fv.sm_minus(jnp.float32(1.2), 0.9, 0.0)))
    assert np.isnan(float(fv.sm_minus(jnp.float32(0.0), 0.9, 0.5)))


def region_embed(images):
    """Embedding = (1, mean of channel 0 on the left half, mean of channel 1 on the right
    half): masking moves it in a way computable by hand."""
    half = images.shape[2] // 2
    left = jnp.mean(images[:, :, :half, 0], axis=(1, 2))
    right = jnp.mean(images[:, :, half:, 1], axis=(1, 2))
    return jnp.stack([jnp.ones_like(left), left, right], axis=-1)


def _np_embed(img):
    half = img.shape[1] // 2
    return np.array([1.0, img[:, :half, 0].mean(), img[:, half:, 1].mean()])


def _np_dist(a, b):
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    return float(((a - b) ** 2).sum())


def test_evaluate_masks_against_hand_computation():
    rng = np.random.default_rng(0)
    probes = rng.uniform(size=(2, 4, 4, 3)).astype(np.float32)
    galleries = rng.uniform(size=(2, 4, 4, 3)).astype(np.float32)
    masks = np.zeros((2, 2, 4, 4), bool)
    masks[0, :, :, :2] = True  # left half: changes the "left" coordinate only
    masks[1, 0, 0, 3] = True  # one pixel on the right for pair 0
    masks[1, 1, :2, :] = True  # top half for pair 1
    out = fv.evaluate_masks(region_embed, jnp.asarray(probes), jnp.asarray(galleries),
                            jnp.asarray(masks))
    for b in range(2):
        e_p, e_g = _np_embed(probes[b]), _np_embed(galleries[b])
        d = _np_dist(e_p, e_g)
        assert float(out["d"][b]) == pytest.approx(d, rel=1e-5)
        for k in range(2):
            mp, mg = probes[b].copy(), galleries[b].copy()
            mp[masks[k, b]] = 0.0
            mg[masks[k, b]] = 0.0
            d_pp = _np_dist(e_p, _np_embed(mg))  # probe vs masked gallery
            d_pg = _np_dist(e_g, _np_embed(mp))  # gallery vs masked probe
            d_npg = _np_dist(_np_embed(mp), _np_embed(mg))
            ra = masks[k, b].mean()
            np.testing.assert_allclose(
                [out["d_pp"][k, b], out["d_pg"][k, b], out["d_npg"][k, b], out["ra"][k, b]],
                [d_pp, d_pg, d_npg, ra], rtol=1e-4, atol=1e-7)
            sm_p = ((d_pg - d) / d) / (2 * ra) + ((d_pp - d) / d) / (2 * ra)
            sm_m = ((d - d_npg) / d) / ra
            assert float(out["sm_plus"][k, b]) == pytest.approx(sm_p, rel=1e-3, abs=1e-5)
            assert float(out["sm_minus"][k, b]) == pytest.approx(sm_m, rel=1e-3, abs=1e-5)


def test_mean_fill():
    images = jnp.asarray(np.random.default_rng(1).uniform(size=(1, 4, 4, 3)), jnp.float32)
    mask = jnp.zeros((1, 4, 4), bool).at[0, 0, 0].set(True)
    out = np.asarray(fv.apply_mask(images, mask, "mean"))
    np.testing.assert_allclose(out[0, 0, 0], np.asarray(images[0]).mean(axis=(0, 1)),
                               rtol=1e-6)
    np.testing.assert_array_equal(out[0, 1:], np.asarray(images[0, 1:]))


def test_empty_mask_gives_nan_not_error():
    probes = jnp.full((1, 4, 4, 3), 0.3)
    galleries = jnp.full((1, 4, 4, 3), 0.7)
    out = fv.evaluate_masks(region_embed, probes, galleries, jnp.zeros((1, 4, 4), bool))
    assert np.isnan(float(out["sm_plus"][0, 0])) and np.isnan(float(out["sm_minus"][0, 0]))
    with pytest.warns(RuntimeWarning, match="RA = 0"):
        fv.warn_undefined(out)


def test_select_technique():
    nan = np.nan
    scores = jnp.asarray([[1.0, nan, 2.0, nan, 0.5],    # oim
                          [3.0, 1.0, 2.0, nan, 0.1],    # um
                          [9.0, 5.0, nan, nan, 0.9]])   # n_ium
    np.testing.assert_array_equal(np.asarray(fv.select_technique(scores)), [2, 2, 0, -1, 2])
    np.testing.assert_array_equal(
        np.asarray(fv.select_technique(scores, fv.POSITIVE_TECHNIQUES)), [1, 1, 0, -1, 0])
    with pytest.raises(ValueError, match="candidates"):
        fv.select_technique(scores, ("oim", "xor"))
    with pytest.raises(ValueError, match="scores"):
        fv.select_technique(scores[:2])


# ---------------------------------------------------------------- heatmaps


def test_combine_maps_rules():
    map_p = jnp.asarray([[0.2, 0.4, 0.6, 0.8]])[None]
    map_g = jnp.asarray([[0.6, 0.1, 0.9, 0.3]])[None]
    bin_p = jnp.asarray([[True, True, False, False]])[None]
    bin_g = jnp.asarray([[True, False, True, False]])[None]
    masks = fv.technique_masks(bin_p, bin_g)
    out = [np.asarray(fv.combine_maps(map_p, map_g, bin_p, bin_g, m))[0, 0] for m in masks]
    np.testing.assert_allclose(out[0], [0.4, 0, 0, 0])  # OIM: mean on the shared pixel
    np.testing.assert_allclose(out[1], [0.4, 0.4, 0.9, 0])  # UM: mean / single value
    np.testing.assert_allclose(out[2], [0, 0.4, 0.9, 0])  # N-IUM: single values


def np_smooth(heat, dil, size, variance):
    """Reference: explicit offset loops, window offsets -(n-1)//2 .. n//2, zero outside."""
    b, h, w = heat.shape
    lo = (dil - 1) // 2
    padded = np.full((b, h + dil - 1, w + dil - 1), -np.inf)
    padded[:, lo:lo + h, lo:lo + w] = heat
    dilated = np.full_like(heat, -np.inf)
    for di in range(dil):
        for dj in range(dil):
            dilated = np.maximum(dilated, padded[:, di:di + h, dj:dj + w])
    offsets = np.arange(size) - (size - 1) / 2
    taps = np.exp(-offsets ** 2 / (2 * variance))
    taps /= taps.sum()
    lo = (size - 1) // 2
    padded = np.zeros((b, h + size - 1, w + size - 1))
    padded[:, lo:lo + h, lo:lo + w] = dilated
    out = np.zeros_like(heat)
    for di in range(size):
        for dj in range(size):
            out += taps[di] * taps[dj] * padded[:, di:di + h, dj:dj + w]
    return out


@pytest.mark.parametrize("dil,size,variance", [(8, 56, 6.6), (3, 5, 1.5), (1, 6, 2.0)])
def test_smooth_heatmap_matches_numpy(dil, size, variance):
    rng = np.random.default_rng(dil)
    heat = rng.uniform(size=(2, 20, 24)) * (rng.uniform(size=(2, 20, 24)) > 0.8)
    got = fv.smooth_heatmap(jnp.asarray(heat, jnp.float32), dil, size, variance)
    np.testing.assert_allclose(np.asarray(got), np_smooth(heat, dil, size, variance),
                               atol=1e-5)


def test_gaussian_kernel_variance():
    taps = fv.gaussian_kernel_1d(56, 6.6)
    offsets = np.arange(56) - 27.5
    assert taps.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(taps, taps[::-1])
    assert (taps * offsets ** 2).sum() == pytest.approx(6.6, rel=1e-3)


def test_overlay_on_luminance():
    import matplotlib

    image = jnp.asarray(np.random.default_rng(2).uniform(size=(6, 6, 3)), jnp.float32)
    heat = jnp.zeros((6, 6)).at[2, 3].set(5.0).at[0, 0].set(2.5)
    out = np.asarray(fv.overlay_on_luminance(image, heat, alpha=0.5))
    grey = np.asarray(image) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(out[1, 1], [grey[1, 1]] * 3, rtol=1e-6)  # no heat: grey
    jet_top = np.asarray(matplotlib.colormaps["jet"](1.0)[:3])
    np.testing.assert_allclose(out[2, 3], 0.5 * grey[2, 3] + 0.5 * jet_top, rtol=1e-5)
    batched = fv.overlay_on_luminance(jnp.stack([image, image]), jnp.stack([heat, heat]))
    assert batched.shape == (2, 6, 6, 3)
    with pytest.raises(ValueError, match="must match"):
        fv.overlay_on_luminance(image, jnp.zeros((5, 6)))


# ---------------------------------------------------------------- pipeline


@dataclasses.dataclass(frozen=True)
class CountingEmbed:
    counter: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def __call__(self, images):
        self.counter.append(1)
        return region_embed(images)


def _pair_batch(seed):
    rng = np.random.default_rng(seed)
    probes = jnp.asarray(rng.uniform(size=(3, 16, 16, 3)), jnp.float32)
    galleries = jnp.asarray(rng.uniform(size=(3, 16, 16, 3)), jnp.float32)
    yy, xx = np.mgrid[:16, :16]
    maps_p = np.stack([np.exp(-((xx - 4 - i) ** 2 + (yy - 8) ** 2) / 8.0) for i in range(3)])
    maps_g = np.stack([np.exp(-((xx - 6) ** 2 + (yy - 7 - i) ** 2) / 8.0) for i in range(3)])
    return probes, galleries, jnp.asarray(maps_p), jnp.asarray(maps_g)


def test_explain_pairs_consistent_and_compiles_once():
    embed = CountingEmbed()
    probes, galleries, maps_p, maps_g = _pair_batch(0)
    positive = jnp.asarray([True, False, True])
    kwargs = dict(gaussian_size=9, gaussian_variance=2.0)
    out = fv.explain_pairs(embed, probes, galleries, maps_p, maps_g, positive, **kwargs)
    assert len(embed.counter) == 1
    # the same as the parts called one by one
    bin_p = fv.binarize_maps(maps_p)
    bin_g = fv.binarize_maps(maps_g)
    np.testing.assert_array_equal(np.asarray(out["binary_p"]), np.asarray(bin_p))
    masks = fv.technique_masks(bin_p, bin_g)
    ref = fv.evaluate_masks(region_embed, probes, galleries, masks)
    for key in ("d", "d_pp", "d_pg", "d_npg", "ra", "sm_plus", "sm_minus"):
        np.testing.assert_allclose(np.asarray(out[key]), np.asarray(ref[key]), rtol=1e-5)
    sm_p, sm_m = np.asarray(ref["sm_plus"]), np.asarray(ref["sm_minus"])
    expected_sel = [np.nanargmax(sm_p[:2, 0]), np.nanargmax(sm_m[:, 1]),
                    np.nanargmax(sm_p[:2, 2])]
    np.testing.assert_array_equal(np.asarray(out["selected"]), expected_sel)
    for b, k in enumerate(expected_sel):
        raw = fv.combine_maps(maps_p[b:b + 1], maps_g[b:b + 1], bin_p[b:b + 1],
                              bin_g[b:b + 1], masks[k, b:b + 1])
        np.testing.assert_allclose(np.asarray(out["heatmap_raw"][b]), np.asarray(raw[0]))
    np.testing.assert_allclose(np.asarray(out["heatmap"]),
                               np.asarray(fv.smooth_heatmap(out["heatmap_raw"], 8, 9, 2.0)),
                               atol=1e-6)
    # new data, same shapes: no retrace
    probes2, galleries2, maps_p2, maps_g2 = _pair_batch(1)
    fv.explain_pairs(embed, probes2, galleries2, maps_p2, maps_g2, positive, **kwargs)
    assert len(embed.counter) == 1


def test_explain_pairs_constant_map_fallback():
    probes, galleries, maps_p, maps_g = _pair_batch(2)
    maps_g = maps_g.at[1].set(0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fv.explain_pairs(region_embed, probes, galleries, maps_p, maps_g,
                               jnp.asarray([True, True, False]), gaussian_size=9)
    messages = " ".join(str(w.message) for w in caught)
    assert "constant" in messages and "RA = 0" in messages
    assert bool(out["constant_g"][1]) and not np.asarray(out["binary_g"][1]).any()
    # OIM is empty for pair 1 -> NaN; UM still defined (the probe's own mask) and chosen
    assert np.isnan(float(out["sm_plus"][0, 1]))
    assert int(out["selected"][1]) == 1


def test_explain_pairs_bad_sizes():
    probes, galleries, maps_p, maps_g = _pair_batch(0)
    with pytest.raises(ValueError, match="same size"):
        fv.explain_pairs(region_embed, probes, galleries[:, :8], maps_p, maps_g,
                         jnp.ones(3, bool))
    with pytest.raises(ValueError, match="maps_g"):
        fv.explain_pairs(region_embed, probes, galleries, maps_p, maps_g[:, :8],
                         jnp.ones(3, bool))
    with pytest.raises(ValueError, match="same size"):
        fv.evaluate_masks(region_embed, probes, galleries[:2], jnp.zeros((1, 3, 16, 16), bool))
    with pytest.raises(ValueError, match="masks"):
        fv.evaluate_masks(region_embed, probes, galleries, jnp.zeros((1, 3, 8, 8), bool))
    with pytest.raises(ValueError, match="fill"):
        fv.evaluate_masks(region_embed, probes, galleries, jnp.zeros((1, 3, 16, 16), bool),
                          fill="white")
    with pytest.raises(ValueError, match="positive"):
        fv.explain_pairs(region_embed, probes, galleries, maps_p, maps_g, jnp.ones(2, bool))


def test_pair_figure():
    import matplotlib.pyplot as plt

    probes, galleries, maps_p, maps_g = _pair_batch(0)
    fig = fv.pair_figure(probes[0], galleries[0], maps_p[0], maps=(maps_p[0], maps_g[0]),
                         binary=(maps_p[0] > 0.5, maps_g[0] > 0.5), title="pair 0")
    assert len(fig.axes) == 7
    plt.close(fig)
