"""Similarity fit (Umeyama) and bilinear warp of data.align."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from faceaudit_jax.data import align


def umeyama_reference(src, dst):
    """Umeyama (1991) with the SVD and the reflection correction, in numpy float64."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.T @ sc / len(src)
    u, d, vt = np.linalg.svd(cov)
    s = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        s[1, 1] = -1
    rotation = u @ s @ vt
    scale = np.trace(np.diag(d) @ s) / (sc ** 2).sum(1).mean()
    t = mu_d - scale * rotation @ mu_s
    return np.concatenate([scale * rotation, t[:, None]], 1)


def _similarity(scale, angle, tx, ty):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def test_recovers_a_known_similarity_exactly():
    rng = np.random.default_rng(0)
    truth = np.stack([_similarity(rng.uniform(0.3, 3), rng.uniform(-np.pi, np.pi), *rng.uniform(-50, 50, 2))
                      for _ in range(6)])
    src = rng.uniform(0, 200, size=(6, 5, 2))
    dst = np.einsum("bij,bnj->bni", truth[:, :, :2], src) + truth[:, None, :, 2]
    fitted = np.asarray(align.similarity_transform(src, dst))
    np.testing.assert_allclose(fitted, truth, rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(np.asarray(align.apply_transform(fitted, src)), dst, atol=2e-3)


def test_matches_umeyama_svd_on_noisy_and_mirrored_points():
    rng = np.random.default_rng(1)
    for trial in range(5):
        src = rng.uniform(0, 100, size=(5, 2))
        dst = src @ rng.normal(size=(2, 2)) + rng.normal(size=2) * 10 + rng.normal(size=(5, 2))
        if trial == 0:
            dst = src * np.array([-1.0, 1.0])  # a mirror image: the fit must stay a rotation
        fitted = np.asarray(align.similarity_transform(src, dst))
        np.testing.assert_allclose(fitted, umeyama_reference(src, dst), rtol=1e-4, atol=1e-3)
        assert np.linalg.det(fitted[:, :2]) > 0
        assert np.isclose(fitted[0, 0], fitted[1, 1], atol=1e-5) and np.isclose(fitted[0, 1], -fitted[1, 0], atol=1e-5)


def test_broadcasts_landmarks_against_one_template_and_inverts():
    rng = np.random.default_rng(2)
    landmarks = rng.uniform(20, 90, size=(3, 5, 2))
    batched = align.similarity_transform(landmarks, align.ARCFACE_TEMPLATE_112)
    assert batched.shape == (3, 2, 3)
    for b in range(3):
        np.testing.assert_allclose(np.asarray(batched[b]),
                                   umeyama_reference(landmarks[b], align.ARCFACE_TEMPLATE_112), atol=1e-3)
    round_trip = align.apply_transform(align.invert_transform(batched), align.apply_transform(batched, landmarks))
    np.testing.assert_allclose(np.asarray(round_trip), landmarks, atol=1e-3)
    with pytest.raises(ValueError, match="src has 4 points but dst has 5"):
        align.similarity_transform(landmarks[:, :4], align.ARCFACE_TEMPLATE_112)
    with pytest.raises(ValueError, match=r"expected \[..., N, 2\]"):
        align.similarity_transform(np.zeros((5, 3)), np.zeros((5, 3)))


def test_warp_matches_scipy_bilinear_with_constant_border():
    rng = np.random.default_rng(3)
    images = rng.random((2, 13, 11, 3)).astype(np.float32)
    matrices = np.stack([_similarity(1.3, 0.4, -2.0, 1.5), _similarity(0.7, -1.1, 6.0, 9.0)]).astype(np.float32)
    out = np.asarray(align.warp_affine(images, matrices, (9, 10), fill=0.25))
    for b in range(2):
        inverse = np.asarray(align.invert_transform(matrices[b]))
        ys, xs = np.mgrid[0:9, 0:10].astype(np.float64)
        sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
        sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
        for c in range(3):
            ref = ndimage.map_coordinates(images[b, :, :, c].astype(np.float64), [sy, sx], order=1,
                                          mode="grid-constant", cval=0.25)
            np.testing.assert_allclose(out[b, :, :, c], ref, atol=1e-5)


def test_aligned_blobs_land_on_the_template():
    # Place Gaussian blobs where a known similarity sends the template into the photo.
    height, width = 90, 70
    photo_from_template = _similarity(0.55, 0.3, 20.0, 12.0)
    landmarks = np.asarray(align.apply_transform(photo_from_template, align.ARCFACE_TEMPLATE_112))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.zeros((height, width, 3), np.float32)
    for x, y in landmarks:
        image[..., 0] += np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 1.2 ** 2))
    aligned, matrices = align.align_faces(image[None], landmarks[None])
    aligned = np.asarray(aligned)[0, ..., 0]
    np.testing.assert_allclose(np.asarray(matrices[0]), np.asarray(align.invert_transform(photo_from_template)),
                               atol=1e-3)
    gy, gx = np.mgrid[0:112, 0:112].astype(np.float64)
    for tx, ty in align.ARCFACE_TEMPLATE_112:
        window = (np.abs(gx - tx) < 7) & (np.abs(gy - ty) < 7)
        weight = aligned * window
        centre = np.array([(weight * gx).sum(), (weight * gy).sum()]) / weight.sum()
        np.testing.assert_allclose(centre, [tx, ty], atol=0.25)


def test_align_photo_and_template_scaling():
    rng = np.random.default_rng(4)
    photo = (rng.random((50, 40, 3)) * 255).astype(np.uint8)
    landmarks = align.apply_transform(_similarity(0.3, 0.0, 3.0, 2.0), align.ARCFACE_TEMPLATE_112)
    aligned, matrix = align.align_photo(photo, np.asarray(landmarks), output_size=56)
    assert aligned.shape == (56, 56, 3) and aligned.dtype == np.float32
    assert 0.0 <= aligned.min() and aligned.max() <= 1.0
    np.testing.assert_allclose(np.asarray(align.apply_transform(matrix, landmarks)), align.arcface_template(56),
                               atol=1e-3)
    np.testing.assert_allclose(align.arcface_template(224), (align.ARCFACE_TEMPLATE_112 + 0.5) * 2 - 0.5)
    with pytest.raises(ValueError, match="coincide"):
        align.align_photo(photo, np.ones((5, 2)))
    with pytest.raises(ValueError, match="not all finite"):
        align.align_photo(photo, np.full((5, 2), np.nan))
    with pytest.raises(ValueError, match="output_size"):
        align.arcface_template(0)


def test_align_faces_compiles_once_per_shape():
    rng = np.random.default_rng(5)
    images = jnp.asarray(rng.random((2, 40, 40, 3)), jnp.float32)
    landmarks = jnp.asarray(align.arcface_template(40) + rng.normal(size=(2, 5, 2)), jnp.float32)
    before = align.align_faces._cache_size()
    for _ in range(3):
        out, _ = align.align_faces(images, landmarks * (1 + 0.01 * _), output_size=32)
    jax.block_until_ready(out)
    assert align.align_faces._cache_size() == before + 1
    assert out.shape == (2, 32, 32, 3)
