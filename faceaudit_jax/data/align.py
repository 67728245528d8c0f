"""Align face photos to the 5-point template of face-recognition models.

Face-recognition models (ArcFace and its kin) are trained on 112 x 112 crops
whose eyes, nose tip and mouth corners sit on fixed template points. Given
five detected landmarks per photo (CelebA order: left eye, right eye, nose,
left mouth corner, right mouth corner, "left" meaning image-left), this module
fits the least-squares similarity transform (rotation, uniform scale,
translation; Umeyama 1991) from the landmarks to the template and warps the
photo with bilinear interpolation. Everything is batched and jittable.

Coordinates are (x, y) in pixels with pixel centres at integer positions (the
convention of OpenCV's warpAffine and of ``data.celeba``), so a pixel (row i,
column j) is at (j, i). A transform is a [2, 3] matrix M acting on
homogeneous points: p_out = M[:, :2] @ p_in + M[:, 2].

The 2-D Umeyama solution has a closed form: writing centred points as complex
numbers z (source) and w (destination), the best scale-rotation is
c = sum(conj(z) w) / sum(|z|^2), i.e. a = Re(c), b = Im(c) in [[a, -b], [b, a]].
It equals Umeyama's SVD solution with the reflection correction (a similarity
never mirrors) and needs no SVD.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# ArcFace / InsightFace 112 x 112 template, (x, y) in the CelebA landmark order.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32)
ARCFACE_SIZE = 112


def arcface_template(output_size: int = ARCFACE_SIZE) -> np.ndarray:
    """The ArcFace template scaled to an ``output_size`` x ``output_size`` crop, float32 [5, 2].

    Scaling uses the pixel-centre convention: x -> (x + 0.5) * s / 112 - 0.5.
    """
    if isinstance(output_size, bool) or not isinstance(output_size, (int, np.integer)) or output_size < 1:
        raise ValueError(f"output_size must be a positive int, got {output_size!r}")
    scale = output_size / ARCFACE_SIZE
    return ((ARCFACE_TEMPLATE_112 + 0.5) * scale - 0.5).astype(np.float32)


def _check_points(points, name: str) -> None:
    if points.ndim < 2 or points.shape[-1] != 2:
        raise ValueError(f"{name} has shape {tuple(points.shape)}; expected [..., N, 2] (x, y) points")
    if points.shape[-2] < 2:
        raise ValueError(f"{name} has {points.shape[-2]} point(s); a similarity needs at least 2")


def similarity_transform(src, dst) -> jax.Array:
    """Least-squares similarity mapping ``src`` onto ``dst``: [..., N, 2] x2 -> [..., 2, 3].

    Minimises sum_n |s R src_n + t - dst_n|^2 over scale s > 0, rotation R
    (det +1) and translation t. ``src`` and ``dst`` broadcast against each
    other (e.g. landmarks [B, 5, 2] and one template [5, 2]). Source points
    that all coincide have no defined transform (the result is NaN);
    ``align_photo`` checks for that on the host.
    """
    src = jnp.asarray(src, jnp.float32)
    dst = jnp.asarray(dst, jnp.float32)
    _check_points(src, "src")
    _check_points(dst, "dst")
    if src.shape[-2] != dst.shape[-2]:
        raise ValueError(f"src has {src.shape[-2]} points but dst has {dst.shape[-2]}")
    src, dst = jnp.broadcast_arrays(src, dst)
    src_mean = src.mean(axis=-2, keepdims=True)
    dst_mean = dst.mean(axis=-2, keepdims=True)
    zx, zy = jnp.moveaxis(src - src_mean, -1, 0)
    wx, wy = jnp.moveaxis(dst - dst_mean, -1, 0)
    norm = jnp.sum(zx * zx + zy * zy, axis=-1)
    a = jnp.sum(zx * wx + zy * wy, axis=-1) / norm  # Re(conj(z) w)
    b = jnp.sum(zx * wy - zy * wx, axis=-1) / norm  # Im(conj(z) w)
    linear = jnp.stack([jnp.stack([a, -b], -1), jnp.stack([b, a], -1)], -2)  # [..., 2, 2]
    translation = dst_mean[..., 0, :] - jnp.einsum("...ij,...j->...i", linear, src_mean[..., 0, :])
    return jnp.concatenate([linear, translation[..., None]], axis=-1)


def apply_transform(matrices, points) -> jax.Array:
    """Map points [..., N, 2] through matrices [..., 2, 3]."""
    matrices = jnp.asarray(matrices, jnp.float32)
    points = jnp.asarray(points, jnp.float32)
    return jnp.einsum("...ij,...nj->...ni", matrices[..., :2], points) + matrices[..., None, :, 2]


def invert_transform(matrices) -> jax.Array:
    """Inverse of affine transforms [..., 2, 3] (closed-form 2 x 2 inverse)."""
    matrices = jnp.asarray(matrices, jnp.float32)
    a, b, c, d = matrices[..., 0, 0], matrices[..., 0, 1], matrices[..., 1, 0], matrices[..., 1, 1]
    det = a * d - b * c
    inv = jnp.stack([jnp.stack([d, -b], -1), jnp.stack([-c, a], -1)], -2) / det[..., None, None]
    translation = -jnp.einsum("...ij,...j->...i", inv, matrices[..., :, 2])
    return jnp.concatenate([inv, translation[..., None]], axis=-1)


def _bilinear_sample(image: jax.Array, x: jax.Array, y: jax.Array, fill: float) -> jax.Array:
    """Sample image [H, W, C] at float coords x, y [h, w]; neighbours outside count as ``fill``."""
    height, width = image.shape[:2]
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = (x - x0)[..., None]
    fy = (y - y0)[..., None]
    x0 = x0.astype(jnp.int32)
    y0 = y0.astype(jnp.int32)

    def tap(yy, xx):
        inside = (xx >= 0) & (xx < width) & (yy >= 0) & (yy < height)
        value = image[jnp.clip(yy, 0, height - 1), jnp.clip(xx, 0, width - 1)]
        return jnp.where(inside[..., None], value, jnp.asarray(fill, image.dtype))

    top = tap(y0, x0) * (1 - fx) + tap(y0, x0 + 1) * fx
    bottom = tap(y0 + 1, x0) * (1 - fx) + tap(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


@functools.partial(jax.jit, static_argnames=("output_hw", "fill"))
def warp_affine(images, matrices, output_hw: tuple[int, int], fill: float = 0.0) -> jax.Array:
    """Warp images [B, H, W, C] by matrices [B, 2, 3] (input -> output coords) into [B, h, w, C].

    Each output pixel is sampled bilinearly at its preimage under the
    transform (as OpenCV's warpAffine with INTER_LINEAR and a constant
    border ``fill``).
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images have shape {tuple(images.shape)}; expected [B, H, W, C]")
    if matrices.shape != (images.shape[0], 2, 3):
        raise ValueError(f"matrices have shape {tuple(matrices.shape)}; expected [{images.shape[0]}, 2, 3]")
    out_h, out_w = output_hw
    ys, xs = jnp.meshgrid(jnp.arange(out_h, dtype=jnp.float32), jnp.arange(out_w, dtype=jnp.float32),
                          indexing="ij")
    grid = jnp.stack([xs, ys], -1).reshape(1, out_h * out_w, 2)
    source = apply_transform(invert_transform(matrices), grid).reshape(-1, out_h, out_w, 2)
    sample = jax.vmap(_bilinear_sample, in_axes=(0, 0, 0, None))
    return sample(images.astype(jnp.float32), source[..., 0], source[..., 1], fill)


@functools.partial(jax.jit, static_argnames=("output_size",))
def align_faces(images, landmarks, output_size: int = ARCFACE_SIZE, template=None):
    """Align a batch of same-size photos: images [B, H, W, C], landmarks [B, 5, 2] (x, y).

    Returns (aligned [B, s, s, C], matrices [B, 2, 3]) where s = output_size,
    the matrices map photo coordinates to the crop, and the landmarks land on
    ``template`` (default: the ArcFace template scaled to s) in the least-
    squares sense.
    """
    if landmarks.shape[-2:] != (5, 2) and template is None:
        raise ValueError(f"landmarks have shape {tuple(landmarks.shape)}; expected [B, 5, 2] for the "
                         "5-point template (pass template= for other point sets)")
    target = arcface_template(output_size) if template is None else template
    matrices = similarity_transform(landmarks, target)
    return warp_affine(images, matrices, (output_size, output_size)), matrices


def align_photo(image, landmarks, output_size: int = ARCFACE_SIZE, template=None):
    """Align one photo of any size: image [H, W, C] (float in [0, 1] or uint8), landmarks [5, 2].

    Returns (aligned float32 [s, s, C] numpy, matrix [2, 3] numpy). Raises
    ValueError for landmarks that are not finite or all coincide.
    """
    image = np.asarray(image)
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    landmarks = np.asarray(landmarks, np.float32)
    if image.ndim != 3:
        raise ValueError(f"image has shape {image.shape}; expected [H, W, C]")
    if not np.isfinite(landmarks).all():
        raise ValueError(f"landmarks are not all finite: {landmarks.tolist()}")
    if np.allclose(landmarks, landmarks[:1]):
        raise ValueError(f"landmarks all coincide at {landmarks[0].tolist()}; no transform is defined")
    aligned, matrices = align_faces(image[None], landmarks[None], output_size=output_size, template=template)
    return np.asarray(aligned[0]), np.asarray(matrices[0])
