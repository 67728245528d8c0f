"""IoR (FaceX eqs. 3-4), streaming accumulation and rankings against numpy loops."""

import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax.regions import NUM_REGIONS, REGIONS
from faceaudit_jax.summary import ior as ior_lib


def ref_region_ior(maps, parse, num_regions):
    """Eq. 3 with explicit loops over images and regions."""
    b = maps.shape[0]
    out = np.zeros((b, num_regions))
    present = np.zeros((b, num_regions), bool)
    for i in range(b):
        for r in range(num_regions):
            mask = parse[i] == r
            if mask.sum() > 0:
                present[i, r] = True
                out[i, r] = (maps[i] * mask).sum() / mask.sum()
    return out, present


def ref_summary(ior, present):
    out = np.full(ior.shape[1], np.nan)
    for r in range(ior.shape[1]):
        if present[:, r].any():
            out[r] = ior[present[:, r], r].mean()
    return out


def _random_batch(rng, b=4, size=(12, 8), num_regions=NUM_REGIONS, missing=(14, 15)):
    maps = rng.random((b, *size)).astype(np.float32)
    ids = [r for r in range(num_regions) if r not in missing]
    parse = rng.choice(ids, size=(b, *size)).astype(np.int32)
    return maps, parse


def test_region_ior_matches_loops():
    rng = np.random.default_rng(0)
    maps, parse = _random_batch(rng)
    parse[2][parse[2] == 3] = 1  # region 3 absent from image 2 only
    ior, present = ior_lib.region_ior(maps, parse)
    want, want_present = ref_region_ior(maps, parse, NUM_REGIONS)
    np.testing.assert_allclose(ior, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(present, want_present)
    assert not present[2, 3] and float(ior[2, 3]) == 0.0
    assert ior.dtype == jnp.float32 and present.dtype == jnp.bool_


def test_summarize_ior_divides_by_images_where_present_and_nan_for_never():
    rng = np.random.default_rng(1)
    maps, parse = _random_batch(rng, b=5)
    parse[1:][parse[1:] == 3] = 1  # eyeglasses present in image 0 only
    ior, present = ior_lib.region_ior(maps, parse)
    summary = np.asarray(ior_lib.summarize_ior(ior, present))
    np.testing.assert_allclose(summary, ref_summary(*ref_region_ior(maps, parse, NUM_REGIONS)),
                               rtol=1e-5)
    assert np.isnan(summary[14]) and np.isnan(summary[15])  # never present
    assert summary[3] == pytest.approx(float(ior[0, 3]))  # N_r = 1, not 5


def test_zero_maps_give_zero_not_nan():
    parse = np.random.default_rng(2).integers(0, NUM_REGIONS, (2, 8, 8)).astype(np.int32)
    ior, present = ior_lib.region_ior(np.zeros((2, 8, 8), np.float32), parse)
    np.testing.assert_array_equal(ior, 0.0)
    summary = np.asarray(ior_lib.summarize_ior(ior, present))
    assert np.all((summary == 0) | np.isnan(summary))


def test_parse_nearest_resize():
    rng = np.random.default_rng(3)
    maps = rng.random((2, 8, 12)).astype(np.float32)
    small = rng.integers(0, NUM_REGIONS, (2, 4, 6)).astype(np.int32)
    upsampled = np.repeat(np.repeat(small, 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(ior_lib.resize_parse_nearest(jnp.asarray(small), (8, 12)),
                                  upsampled)
    np.testing.assert_allclose(ior_lib.region_ior(maps, small)[0],
                               ref_region_ior(maps, upsampled, NUM_REGIONS)[0], rtol=1e-5)
    # Larger parse maps (CelebAMask-HQ style): every second pixel, half-pixel centres.
    large = rng.integers(0, NUM_REGIONS, (2, 16, 24)).astype(np.int32)
    np.testing.assert_array_equal(ior_lib.resize_parse_nearest(jnp.asarray(large), (8, 12)),
                                  large[:, 1::2, 1::2])
    # A non-integer factor with the same aspect ratio (6x9 -> 8x12).
    odd = rng.integers(0, NUM_REGIONS, (2, 6, 9)).astype(np.int32)
    rows = np.floor((np.arange(8) + 0.5) * 6 / 8).astype(int)
    cols = np.floor((np.arange(12) + 0.5) * 9 / 12).astype(int)
    np.testing.assert_array_equal(ior_lib.resize_parse_nearest(jnp.asarray(odd), (8, 12)),
                                  odd[:, rows][:, :, cols])


def test_bad_inputs():
    maps = np.zeros((2, 8, 8), np.float32)
    parse = np.zeros((2, 8, 8), np.int32)
    for bad_id in (19, -1):
        bad = parse.copy()
        bad[1, 3, 3] = bad_id
        with pytest.raises(ValueError, match=f"region id {bad_id}; expected ids in 0..18"):
            ior_lib.region_ior(maps, bad)
        with pytest.raises(ValueError, match=f"region id {bad_id}"):
            ior_lib.region_ior(maps, jnp.asarray(bad))  # device array: on-device min/max
    with pytest.raises(ValueError, match="aspect ratios differ"):
        ior_lib.region_ior(maps, np.zeros((2, 8, 6), np.int32))
    with pytest.raises(ValueError, match="2 maps for a batch of 3"):
        ior_lib.region_ior(np.zeros((3, 8, 8), np.float32), parse)
    with pytest.raises(ValueError, match="unknown ior_mode 'hard'"):
        ior_lib.region_ior(maps, parse, ior_mode="hard")
    with pytest.raises(ValueError, match="integer region ids"):
        ior_lib.region_ior(maps, parse.astype(np.float32))
    with pytest.raises(ValueError, match="empty batch"):
        ior_lib.region_ior(maps[:0], parse[:0])
    with pytest.raises(ValueError, match="empty data set"):
        ior_lib.IoRAccumulator.finalize(ior_lib.IoRAccumulator.init())


def ref_thresholded(maps, parse, num_regions):
    """FaceX's released scoring at 64x64 (no resize needed: inputs already 64x64)."""
    b = maps.shape[0]
    out = np.zeros((b, num_regions))
    present = np.zeros((b, num_regions), bool)
    for i in range(b):
        g = np.floor(np.clip(maps[i], 0, 1) * 255) / 255
        nonzero = g[g > 0]
        t = nonzero.mean() if nonzero.size else np.inf
        for r in range(num_regions):
            m = parse[i] == r
            if m.sum():
                present[i, r] = True
                out[i, r] = np.sum((g > t) & m) / m.sum()
    return out, present


def test_thresholded_mode_matches_reference_at_64():
    rng = np.random.default_rng(4)
    maps = rng.random((2, 64, 64)).astype(np.float32)
    maps[maps < 0.3] = 0.0
    parse = rng.integers(0, 6, (2, 64, 64)).astype(np.int32)
    ior, present = ior_lib.region_ior(maps, parse, num_regions=6, ior_mode="thresholded")
    want, want_present = ref_thresholded(maps, parse, 6)
    np.testing.assert_allclose(ior, want, atol=1e-6)
    np.testing.assert_array_equal(present, want_present)


def test_thresholded_mode_at_other_resolutions():
    # A map lit exactly on a square region at 128 px: that region scores ~1, others 0.
    parse = np.zeros((1, 128, 128), np.int32)
    parse[0, 32:96, 32:96] = 1
    parse[0, :16, :] = 2
    maps = (parse == 1).astype(np.float32) * np.linspace(0.5, 1.0, 128)[None, None, :]
    ior, present = ior_lib.region_ior(maps, parse[:, ::2, ::2], num_regions=3,
                                      ior_mode="thresholded")
    assert present.all()
    assert float(ior[0, 2]) == 0.0
    assert 0.4 < float(ior[0, 1]) <= 1.0  # above-mean half of the lit square
    ior0, _ = ior_lib.region_ior(np.zeros_like(maps), parse, num_regions=3,
                                 ior_mode="thresholded")
    np.testing.assert_array_equal(ior0, 0.0)


def test_streaming_equals_one_shot_with_groups():
    rng = np.random.default_rng(5)
    maps, parse = _random_batch(rng, b=9, size=(8, 8))
    groups = rng.integers(0, 3, 9).astype(np.int32)
    groups[:3] = [0, 1, 0]
    parse[groups == 2] = np.where(parse[groups == 2] == 7, 1, parse[groups == 2])
    state = ior_lib.IoRAccumulator.init(NUM_REGIONS, num_groups=3)
    # Other test files in this worker may have compiled other shapes already.
    compiled_before = ior_lib._ior_update_jit._cache_size()
    for lo, hi in ((0, 3), (3, 6), (6, 9)):
        state = ior_lib.IoRAccumulator.update(state, maps[lo:hi], parse[lo:hi],
                                              groups[lo:hi])
    summary = ior_lib.IoRAccumulator.finalize(state)
    ior, present = ref_region_ior(maps, parse, NUM_REGIONS)
    np.testing.assert_allclose(summary.ior, ref_summary(ior, present), rtol=1e-5)
    np.testing.assert_array_equal(summary.counts, present.sum(0))
    assert summary.num_images == 9
    for g in range(3):
        sel = groups == g
        np.testing.assert_allclose(summary.ior_by_group[g], ref_summary(ior[sel], present[sel]),
                                   rtol=1e-5)
        assert summary.num_images_by_group[g] == sel.sum()
    if (groups == 2).any():
        assert np.isnan(summary.ior_by_group[2, 7])
    # Same batch shape three times: the update compiled once.
    assert ior_lib._ior_update_jit._cache_size() - compiled_before <= 1
    with pytest.raises(ValueError, match="group id 3 out of range"):
        ior_lib.IoRAccumulator.update(state, maps[:2], parse[:2], np.array([0, 3]))


def test_rank_regions_and_ranking_position():
    values = np.full(NUM_REGIONS, np.nan)
    values[0] = 0.9    # background: excluded by default
    values[11] = 0.7   # u_lip
    values[12] = 0.5   # l_lip
    values[13] = 0.8   # hair
    values[1] = 0.2    # skin
    ranking = ior_lib.rank_regions(values)
    assert [(r, n) for r, n, _ in ranking] == [(1, "hair"), (2, "u_lip"), (3, "l_lip"),
                                               (4, "skin")]
    assert ior_lib.ranking_position(values, ["u_lip", "l_lip"]) == 2
    assert ior_lib.ranking_position(values, "skin") == 4
    assert ior_lib.ranking_position(values, ["hat"]) is None  # never present
    with_background = ior_lib.rank_regions(values, exclude=())
    assert with_background[0][:2] == (1, "background")
    assert ior_lib.ranking_position(values, ["u_lip"], exclude=()) == 3
    with pytest.raises(ValueError, match="unknown region 'lips'"):
        ior_lib.ranking_position(values, ["lips"])
    assert len(REGIONS) == NUM_REGIONS
