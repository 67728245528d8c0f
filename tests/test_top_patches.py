"""High-impact patches (FaceX eqs. 6-7): V against loops, top-k against a global sort."""

import numpy as np
import pytest

from faceaudit_jax.summary import top_patches as tp


def ref_patch_values(maps, parse, patch, num_regions):
    b, h, w = maps.shape
    out = np.zeros((b, h // patch, w // patch, num_regions))
    for i in range(b):
        for py in range(h // patch):
            for px in range(w // patch):
                g = maps[i, py * patch:(py + 1) * patch, px * patch:(px + 1) * patch]
                p = parse[i, py * patch:(py + 1) * patch, px * patch:(px + 1) * patch]
                for r in range(num_regions):
                    out[i, py, px, r] = (g * (p == r)).sum()
    return out


def ref_top_k(values, image_ids, k, one_per_image=False):
    """Global sort of every (value, image, row, col) with value > 0, per region."""
    b, rows, cols, num_regions = values.shape
    result = []
    for r in range(num_regions):
        entries = []
        for i in range(b):
            cands = [(values[i, y, x, r], image_ids[i], y, x)
                     for y in range(rows) for x in range(cols) if values[i, y, x, r] > 0]
            if one_per_image and cands:
                cands = [max(cands, key=lambda e: e[0])]
            entries += cands
        entries.sort(key=lambda e: -e[0])
        result.append(entries[:k])
    return result


def _assert_matches(top, ref, k):
    for r, entries in enumerate(ref):
        n = len(entries)
        assert top.valid[r, :n].all() and not top.valid[r, n:].any()
        np.testing.assert_allclose(top.values[r, :n], [e[0] for e in entries], rtol=1e-5)
        np.testing.assert_array_equal(top.image_ids[r, :n], [e[1] for e in entries])
        np.testing.assert_array_equal(top.rows[r, :n], [e[2] for e in entries])
        np.testing.assert_array_equal(top.cols[r, :n], [e[3] for e in entries])
        np.testing.assert_array_equal(top.image_ids[r, n:], -1)


def _batch(rng, b=6, size=(16, 24), num_regions=5):
    maps = rng.random((b, *size)).astype(np.float32)  # continuous: no ties
    parse = rng.integers(0, num_regions, (b, *size)).astype(np.int32)
    parse[:, :, :8][parse[:, :, :8] == 4] = 0  # region 4 only in the right-hand patches
    return maps, parse


def test_patch_values_match_loops():
    rng = np.random.default_rng(0)
    maps, parse = _batch(rng)
    values = np.asarray(tp.patch_values(maps, parse, patch_size=4, num_regions=5))
    assert values.shape == (6, 4, 6, 5)
    np.testing.assert_allclose(values, ref_patch_values(maps, parse, 4, 5), rtol=1e-5,
                               atol=1e-6)
    # Summing V over patches gives the IoR numerator sum(G * M_r).
    totals = values.sum(axis=(1, 2))
    for r in range(5):
        np.testing.assert_allclose(totals[:, r], (maps * (parse == r)).sum(axis=(1, 2)),
                                   rtol=1e-5)


def test_parse_at_half_resolution_is_upsampled_by_nearest():
    rng = np.random.default_rng(1)
    maps, parse = _batch(rng, b=2)
    small = parse[:, ::2, ::2]
    values = np.asarray(tp.patch_values(maps, small, patch_size=8, num_regions=5))
    upsampled = np.repeat(np.repeat(small, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(values, ref_patch_values(maps, upsampled, 8, 5), rtol=1e-5)


@pytest.mark.parametrize("one_per_image", [False, True])
def test_streaming_top_k_equals_global_sort(one_per_image):
    rng = np.random.default_rng(2)
    maps, parse = _batch(rng, b=6)
    maps[5] = 0.0  # an image with no activation contributes nothing
    image_ids = np.array([10, 11, 12, 13, 14, 15], np.int32)
    k = 7
    values = ref_patch_values(maps, parse, 8, 5)
    ref = ref_top_k(values, image_ids, k, one_per_image)

    state = tp.TopPatchAccumulator.init(k=k, num_regions=5)
    for lo in range(0, 6, 2):
        state = tp.TopPatchAccumulator.update(state, maps[lo:lo + 2], parse[lo:lo + 2],
                                              image_ids[lo:lo + 2], patch_size=8,
                                              one_per_image=one_per_image)
    streamed = tp.TopPatchAccumulator.finalize(state)
    _assert_matches(streamed, ref, k)
    one_shot = tp.top_patches(maps, parse, image_ids, k=k, patch_size=8, num_regions=5,
                              one_per_image=one_per_image)
    for a, b in zip(streamed, one_shot):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not (streamed.image_ids == 15).any()
    if one_per_image:
        for r in range(5):
            ids = streamed.image_ids[r][streamed.valid[r]]
            assert len(set(ids.tolist())) == len(ids)


def test_fewer_candidates_than_k_and_compile_once():
    rng = np.random.default_rng(3)
    maps, parse = _batch(rng, b=2, size=(8, 8), num_regions=3)
    parse[:] = 0
    parse[0, 0, 0] = 2  # region 2: a single pixel in one patch of image 0
    state = tp.TopPatchAccumulator.init(k=5, num_regions=3)
    before = tp._top_patch_update_jit._cache_size()
    for _ in range(3):
        state = tp.TopPatchAccumulator.update(state, maps, parse, np.array([0, 1]), patch_size=4)
    assert tp._top_patch_update_jit._cache_size() == before + 1
    top = tp.TopPatchAccumulator.finalize(state)
    assert top.valid[2].sum() == 3  # the same patch seen in three updates
    np.testing.assert_allclose(top.values[2, :3], maps[0, 0, 0], rtol=1e-6)
    assert (top.rows[2, :3] == 0).all() and (top.cols[2, :3] == 0).all()
    assert not top.valid[1].any() and (top.image_ids[1] == -1).all()  # region 1 never present


def test_bad_inputs():
    maps = np.zeros((2, 20, 20), np.float32)
    parse = np.zeros((2, 20, 20), np.int32)
    with pytest.raises(ValueError, match="not divisible by patch_size 16"):
        tp.patch_values(maps, parse, patch_size=16)
    bad = parse.copy()
    bad[0, 0, 0] = 25
    with pytest.raises(ValueError, match="region id 25"):
        tp.top_patches(maps, bad, patch_size=4)
    state = tp.TopPatchAccumulator.init(k=3)
    with pytest.raises(ValueError, match="image_ids must be integers of shape"):
        tp.TopPatchAccumulator.update(state, maps, parse, np.array([0.0, 1.0]), patch_size=4)
