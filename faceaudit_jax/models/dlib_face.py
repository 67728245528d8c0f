"""dlib's ResNet face-recognition model as a host (numpy) embedder, with its landmarks.

A real, pretrained face-recognition model that ships inside packages, so it
runs offline: ``dlib_face_recognition_resnet_model_v1.dat`` (128-d
descriptors from 150 x 150 aligned chips; 99.38% on LFW per its author) and
the 68-point shape predictor, both from the ``face_recognition_models``
package, run by ``dlib`` (``dlib-bin`` wheels). Install the extra:
``pip install -e ".[dlib]"``. Licences: dlib is Boost-licensed; the model
files are CC0 (the face_recognition_models LICENSE); the 68-point
predictor's training data (iBUG 300-W) excludes commercial use.

- ``DlibFaceModel.five_points(photo)``: face detection (dlib's HOG detector)
  and the 68 landmarks, reduced to the five points of ``data.align`` (eye
  centres, nose tip, mouth corners; image-left first).
- ``DlibFaceModel.align(photo)``: the 150 x 150 chip through
  ``data.align.align_photo`` with ``DLIB_CHIP_TEMPLATE_150``, so real photos
  take the project's own alignment path.
- ``DlibFaceModel.embed(chips)``: numpy [B, 150, 150, 3] in [0, 1] -> [B, 128];
  wrap with ``explain.corrrise.numpy_embed_fn`` to explain the model with
  CorrRISE, RISE or occlusion.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from faceaudit_jax.data import align

CHIP_SIZE = 150
# dlib aligns all 68 landmarks to its mean face (get_face_chip, padding 0.25).
# Its five-point equivalent: the eye centres, nose tip and mouth corners of the
# two sample photos (scikit-image's astronaut, matplotlib's grace_hopper)
# mapped through get_face_chip_details' transform, averaged. Aligning with it
# moved dlib's descriptors by 0.085 and 0.105 (Euclidean) from those of
# dlib's own chips, against a same-person threshold of 0.6 and 0.68 between
# the two people.
DLIB_CHIP_TEMPLATE_150 = np.array(
    [[45.67, 46.51], [100.86, 46.94], [74.34, 78.02], [47.33, 100.17], [98.86, 99.68]], np.float32)

_MODEL_FILES = {
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "landmarks_68": "shape_predictor_68_face_landmarks.dat",
}
_EXTRA_HINT = 'pip install -e ".[dlib]"  (dlib-bin and face-recognition-models)'


def _import_dlib():
    try:
        import dlib
    except ImportError as err:
        raise ImportError(f"DlibFaceModel needs dlib; install the extra: {_EXTRA_HINT}") from err
    return dlib


def model_dir() -> str:
    """The folder of face_recognition_models' .dat files (found without importing the package:
    its __init__ needs pkg_resources, which recent setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"DlibFaceModel needs the face_recognition_models package; install the extra: "
                          f"{_EXTRA_HINT}")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "models")
    missing = [f for f in _MODEL_FILES.values() if not os.path.exists(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}; reinstall face-recognition-models")
    return folder


def to_uint8(images) -> np.ndarray:
    """float images in [0, 1] -> uint8 (what dlib takes), rounding to nearest."""
    images = np.asarray(images, np.float32)
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or inf; expected values in [0, 1]")
    return np.clip(images * 255.0 + 0.5, 0, 255).astype(np.uint8)


def five_from_68(points68) -> np.ndarray:
    """[68, 2] iBUG landmarks -> [5, 2]: image-left eye centre, image-right eye centre,
    nose tip, image-left and image-right mouth corners (the order of ``data.align``)."""
    p = np.asarray(points68, np.float32)
    if p.shape != (68, 2):
        raise ValueError(f"expected [68, 2] landmarks, got shape {p.shape}")
    return np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])


class DlibFaceModel:
    """dlib's face detector, 68-point predictor and ResNet descriptor (see the module doc)."""

    def __init__(self, upsample: int = 1):
        dlib = _import_dlib()
        folder = model_dir()
        self._dlib = dlib
        self.upsample = int(upsample)
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(os.path.join(folder, _MODEL_FILES["landmarks_68"]))
        self.recognizer = dlib.face_recognition_model_v1(os.path.join(folder, _MODEL_FILES["recognition"]))

    def landmarks(self, photo) -> np.ndarray:
        """[68, 2] (x, y) landmarks of the largest detected face of one photo [H, W, 3] in [0, 1]."""
        image = to_uint8(photo)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected one photo [H, W, 3], got shape {image.shape}")
        # Seen here (dlib-bin 20.0.1, numpy 2.4, JAX in the same process): the
        # HOG detector intermittently returns nothing for a photo it otherwise
        # finds at score > 1 (tests/test_dlib_face.py); trying again, once with
        # one more upsampling step, usually finds it.
        for upsample in (self.upsample, self.upsample + 1, self.upsample):
            faces, scores, _ = self.detector.run(image, upsample, 0.0)
            if len(faces):
                break
        else:
            raise ValueError(f"no face found in the {image.shape[1]}x{image.shape[0]} photo "
                             f"(dlib HOG detector, upsample={self.upsample} and "
                             f"{self.upsample + 1}); expected a frontal face")
        # The most confident detection, not the largest: a badge or a patch can
        # be detected at a similar size with a low score.
        face = faces[int(np.argmax(scores))]
        shape = self.predictor(image, face)
        return np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], np.float32)

    def five_points(self, photo) -> np.ndarray:
        return five_from_68(self.landmarks(photo))

    def align(self, photo) -> np.ndarray:
        """The 150 x 150 chip of the photo's face, float32 [150, 150, 3] in [0, 1]."""
        chip, _ = align.align_photo(np.asarray(photo, np.float32), self.five_points(photo),
                                    output_size=CHIP_SIZE, template=DLIB_CHIP_TEMPLATE_150)
        return np.asarray(chip, np.float32)

    def embed(self, chips) -> np.ndarray:
        """Descriptors float32 [B, 128] of aligned chips [B, 150, 150, 3] in [0, 1]."""
        chips = to_uint8(chips)
        if chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
            raise ValueError(f"expected aligned chips [B, {CHIP_SIZE}, {CHIP_SIZE}, 3], got shape {chips.shape}")
        if chips.shape[0] == 0:
            return np.zeros((0, 128), np.float32)
        out = self.recognizer.compute_face_descriptor(list(chips))
        return np.asarray([np.asarray(v) for v in out], np.float32)
