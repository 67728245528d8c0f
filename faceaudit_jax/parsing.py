"""Face parsing behind one interface: ``parser.parse(images, batch=None)`` -> parse maps.

FaceX needs a parse map (19 CelebAMask-HQ regions, ids of ``regions.REGIONS``)
for every test image. Where the data set has masks (CelebAMask-HQ, the
synthetic faces) they are the ground truth; elsewhere (RFW, your own photos)
a parser predicts them. Every parser here follows the ``Parser`` protocol:

- ``parse(images [B, H, W, 3] in [0, 1], batch=None)`` -> int32 [B, H, W];
  ``batch`` is the batch dict the images came from (only
  ``GroundTruthParser`` needs it).
- ``visible_regions``: bool [19], the regions the parser can ever output.
  A parser that cannot see a region (a landmark parser and hair) never
  guesses it: the region is absent from its maps, and summaries should treat
  it as unknown rather than as "no attribution" (``region_validity`` gives
  the [B, R] mask for that).

Implementations: ``NetworkParser`` (a trained ``models.parser_net.ParserNet``),
``GroundTruthParser`` (the batch's own ``parse``) and ``LandmarkParser``
(regions drawn from a 468-point face mesh; ``MediaPipeFaceMesh`` runs
MediaPipe's detector and mesh models, extra ``faceaudit_jax[landmarks]``).
The mesh-to-regions step (``mesh_to_parse``, ``rasterize_polygons``) is pure
JAX and needs no extra.
"""

from __future__ import annotations

import functools
import os
import warnings
import zipfile
from typing import Any, Mapping, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax import regions


@runtime_checkable
class Parser(Protocol):
    """Anything that turns images into parse maps; see the module docstring."""

    visible_regions: np.ndarray

    def parse(self, images, batch: Mapping[str, Any] | None = None) -> jax.Array:
        ...


def _check_images(images) -> None:
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"expected images of shape [B, H, W, 3], got {shape}")


def parse_batch(parser: Parser, batch: Mapping[str, Any]) -> jax.Array:
    """``parser.parse(batch["image"], batch)``: the call a pipeline makes per batch."""
    if "image" not in batch:
        raise ValueError(f"batch has no 'image' key; keys: {sorted(batch)}")
    return parser.parse(batch["image"], batch)


def region_validity(parser: Parser, batch_size: int) -> np.ndarray:
    """bool [B, R]: True where the parser can see region r (broadcast of ``visible_regions``)."""
    return np.broadcast_to(np.asarray(parser.visible_regions, bool), (batch_size, regions.NUM_REGIONS)).copy()


class GroundTruthParser:
    """The data set's own parse maps (CelebAMask-HQ masks, synthetic faces): ``batch["parse"]``."""

    def __init__(self, num_regions: int = regions.NUM_REGIONS):
        self.num_regions = int(num_regions)
        self.visible_regions = np.arange(regions.NUM_REGIONS) < self.num_regions

    def parse(self, images, batch: Mapping[str, Any] | None = None) -> jax.Array:
        _check_images(images)
        if batch is None or "parse" not in batch:
            raise ValueError("GroundTruthParser reads the masks of the data set: pass the batch the images "
                             "came from, with a 'parse' key (readers of CelebAMask-HQ and the synthetic "
                             "faces provide it); for images without masks use NetworkParser")
        parse = batch["parse"]
        expected = tuple(np.shape(images))[:3]
        if tuple(np.shape(parse)) != expected:
            raise ValueError(f"batch['parse'] has shape {tuple(np.shape(parse))}; expected {expected} "
                             "to match the images")
        if not isinstance(parse, jax.core.Tracer):
            regions.validate_parse_ids(parse, self.num_regions)
        return jnp.asarray(parse, jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "input_hw"))
def _network_parse(model, variables, images, input_hw):
    batch, height, width, _ = images.shape
    x = images.astype(jnp.float32)
    if (height, width) != input_hw:
        x = jax.image.resize(x, (batch,) + input_hw + (3,), method="linear", antialias=True)
    logits = model.apply(variables, x, train=False)
    if (height, width) != input_hw:
        # Resize logits, not labels: bilinear logits give smoother region borders.
        logits = jax.image.resize(logits, (batch, height, width, logits.shape[-1]), method="linear")
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


class NetworkParser:
    """A trained segmentation network (e.g. ``models.parser_net.ParserNet``) as a parser.

    ``model.apply(variables, images, train=False)`` must return logits
    [B, H, W, R]. Images are resized to ``input_size`` (int or (H, W)) when
    given, else to the nearest size the network accepts (a multiple of
    ``model.total_stride`` when it has one), and the logits are resized back,
    so any image size works. ``chunk_size`` bounds how many images go
    through the network at once (memory).
    """

    def __init__(self, model, variables, *, input_size=None, chunk_size: int = 64):
        self.model = model
        self.variables = variables
        num_regions = int(getattr(model, "num_regions", regions.NUM_REGIONS))
        self.visible_regions = np.arange(regions.NUM_REGIONS) < num_regions
        if input_size is not None:
            hw = (input_size, input_size) if isinstance(input_size, int) else tuple(int(v) for v in input_size)
            if len(hw) != 2 or min(hw) < 1:
                raise ValueError(f"input_size must be a positive int or (H, W), got {input_size!r}")
            input_size = hw
        self.input_size = input_size
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def _input_hw(self, height: int, width: int) -> tuple[int, int]:
        if self.input_size is not None:
            return self.input_size
        stride = int(getattr(self.model, "total_stride", 1))
        round_up = lambda v: max(stride, -(-v // stride) * stride)  # noqa: E731
        return round_up(height), round_up(width)

    def parse(self, images, batch: Mapping[str, Any] | None = None) -> jax.Array:
        del batch  # the network sees only the pixels
        _check_images(images)
        images = jnp.asarray(images)
        input_hw = self._input_hw(images.shape[1], images.shape[2])
        chunks = [_network_parse(self.model, self.variables, images[i:i + self.chunk_size], input_hw)
                  for i in range(0, images.shape[0], self.chunk_size)]
        return chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks)


# ---------------------------------------------------------------------------
# Landmark parser: regions drawn from a dense face mesh
# ---------------------------------------------------------------------------

# Closed polygons over the 468-point face mesh of MediaPipe's face_landmark
# model, built from the contours its face_mesh_connections lists (face oval,
# eyes, brows, lips) and, for the nose, the loop around the nostrils closed at
# the top of the bridge (point 168). "subject_right" is the person's right
# side; which one becomes l_ / r_ (image-left / image-right, the project's
# convention) is decided per image from the points' x coordinates.
MESH_POLYGONS: dict[str, tuple[int, ...]] = {
    "face_oval": (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
                  152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109),
    "nose": (168, 275, 440, 344, 278, 294, 327, 326, 2, 97, 98, 64, 48, 115, 220, 45),
    "eye_subject_left": (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466),
    "eye_subject_right": (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246),
    "brow_subject_left": (276, 283, 282, 295, 285, 336, 296, 334, 293, 300),
    "brow_subject_right": (46, 53, 52, 65, 55, 107, 66, 105, 63, 70),
    "mouth": (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95),
    "u_lip": (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191, 78),
    "l_lip": (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95, 78),
}
MESH_SIZE = 468
# The regions a landmark parser can see; everything else (hair, hat, ears,
# neck, cloth, accessories, and true background) is outside its reach.
LANDMARK_VISIBLE_REGIONS: tuple[str, ...] = (
    "skin", "nose", "l_eye", "r_eye", "l_brow", "r_brow", "mouth", "u_lip", "l_lip")


def _padded_polygon_table() -> tuple[tuple[str, ...], np.ndarray]:
    """Polygon names and an index table [P, Vmax], short polygons padded by repeating
    their last vertex (a zero-length edge crosses nothing, so the padding is inert)."""
    names = tuple(MESH_POLYGONS)
    longest = max(len(v) for v in MESH_POLYGONS.values())
    table = np.array([list(v) + [v[-1]] * (longest - len(v)) for v in MESH_POLYGONS.values()], np.int32)
    return names, table


_POLYGON_NAMES, _POLYGON_TABLE = _padded_polygon_table()


def rasterize_polygons(vertices, height: int, width: int) -> jax.Array:
    """Even-odd fill of closed polygons at pixel centres: vertices [..., V, 2] (x, y) -> bool [..., H, W].

    A pixel centre is inside when a ray to +x crosses an odd number of edges
    (edges v_k -> v_{k+1}, the last one closing back to v_0). Vectorised over
    pixels and edges; jittable with static height and width.
    """
    vertices = jnp.asarray(vertices, jnp.float32)
    x0, y0 = vertices[..., 0], vertices[..., 1]
    nxt = jnp.roll(vertices, -1, axis=-2)
    x1, y1 = nxt[..., 0], nxt[..., 1]
    py = jnp.arange(height, dtype=jnp.float32)[:, None, None]  # [H, 1, 1]
    px = jnp.arange(width, dtype=jnp.float32)[None, :, None]   # [1, W, 1]
    expand = lambda a: a[..., None, None, :]  # noqa: E731  [..., V] -> [..., 1, 1, V]
    x0, y0, x1, y1 = map(expand, (x0, y0, x1, y1))
    straddles = (y0 > py) != (y1 > py)
    dy = jnp.where(straddles, y1 - y0, 1.0)
    x_cross = x0 + (py - y0) * (x1 - x0) / dy
    crossings = jnp.sum(straddles & (px < x_cross), axis=-1)
    return (crossings % 2) == 1


@functools.partial(jax.jit, static_argnames=("height", "width", "outside_id"))
def mesh_to_parse(mesh, height: int, width: int, outside_id: int = 0) -> jax.Array:
    """Parse maps int32 [B, H, W] from face meshes [B, 468, 2] (x, y pixel coordinates).

    Regions are painted in increasing id order, a later one on top (the
    CelebAMask-HQ merge order): skin (face oval), nose, eyes, brows, mouth,
    lips. Pixels in no polygon get ``outside_id``. The eye or brow with the
    smaller mean x becomes l_eye / l_brow (image-left).
    """
    mesh = jnp.asarray(mesh, jnp.float32)
    if mesh.ndim != 3 or mesh.shape[1:] != (MESH_SIZE, 2):
        raise ValueError(f"mesh has shape {tuple(mesh.shape)}; expected [B, {MESH_SIZE}, 2]")
    polygons = mesh[:, _POLYGON_TABLE]                       # [B, P, V, 2]
    masks = rasterize_polygons(polygons, height, width)      # [B, P, H, W]
    by_name = {name: masks[:, i] for i, name in enumerate(_POLYGON_NAMES)}

    def mean_x(name):
        return jnp.mean(mesh[:, np.array(MESH_POLYGONS[name]), 0], axis=1)[:, None, None]

    def image_left_right(kind):
        subject_right, subject_left = by_name[f"{kind}_subject_right"], by_name[f"{kind}_subject_left"]
        right_is_left = mean_x(f"{kind}_subject_right") <= mean_x(f"{kind}_subject_left")
        return (jnp.where(right_is_left, subject_right, subject_left),
                jnp.where(right_is_left, subject_left, subject_right))

    l_eye, r_eye = image_left_right("eye")
    l_brow, r_brow = image_left_right("brow")
    painted = [("skin", by_name["face_oval"]), ("nose", by_name["nose"]), ("l_eye", l_eye), ("r_eye", r_eye),
               ("l_brow", l_brow), ("r_brow", r_brow), ("mouth", by_name["mouth"]),
               ("u_lip", by_name["u_lip"]), ("l_lip", by_name["l_lip"])]
    parse = jnp.full(mesh.shape[:1] + (height, width), outside_id, jnp.int32)
    for name, mask in sorted(painted, key=lambda item: regions.REGION_ID[item[0]]):
        parse = jnp.where(mask, regions.REGION_ID[name], parse)
    return parse


def mesh_five_points(mesh) -> jax.Array:
    """CelebA-order 5 points [B, 5, 2] from face meshes [B, 468, 2], for ``data.align``.

    Eye centres are the means of the eye contours; nose tip is mesh point 1;
    mouth corners are 61 and 291. Image-left comes first, as in CelebA.
    """
    mesh = jnp.asarray(mesh, jnp.float32)
    eye_a = mesh[:, np.array(MESH_POLYGONS["eye_subject_right"])].mean(1)
    eye_b = mesh[:, np.array(MESH_POLYGONS["eye_subject_left"])].mean(1)
    mouth_a, mouth_b = mesh[:, 61], mesh[:, 291]
    swap = (eye_a[:, 0] > eye_b[:, 0])[:, None]
    left_eye, right_eye = jnp.where(swap, eye_b, eye_a), jnp.where(swap, eye_a, eye_b)
    swap = (mouth_a[:, 0] > mouth_b[:, 0])[:, None]
    left_mouth, right_mouth = jnp.where(swap, mouth_b, mouth_a), jnp.where(swap, mouth_a, mouth_b)
    return jnp.stack([left_eye, right_eye, mesh[:, 1], left_mouth, right_mouth], axis=1)


# Where the two models lie inside a mediapipe 0.10.x wheel or installed package.
MEDIAPIPE_DETECTOR_PATH = "mediapipe/modules/face_detection/face_detection_short_range.tflite"
MEDIAPIPE_MESH_PATH = "mediapipe/modules/face_landmark/face_landmark.tflite"


def _import_litert_interpreter():
    try:
        from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415 (optional dependency)
    except ImportError as err:
        raise ImportError("the landmark parser runs TFLite models with the optional package ai-edge-litert; "
                          "install it with: pip install 'faceaudit_jax[landmarks]'") from err
    return Interpreter


def _read_mediapipe_model(source: str, inner_path: str) -> bytes:
    """A model file's bytes from a mediapipe wheel (.whl) or an installed package root."""
    if os.path.isfile(source) and source.endswith(".whl"):
        with zipfile.ZipFile(source) as wheel:
            try:
                return wheel.read(inner_path)
            except KeyError:
                raise FileNotFoundError(f"{source} has no {inner_path}; the face models ship in mediapipe "
                                        "wheels up to 0.10.21 (pip download mediapipe==0.10.21 --no-deps)") from None
    for candidate in (os.path.join(source, inner_path), os.path.join(source, inner_path.split("/", 1)[1])):
        if os.path.isfile(candidate):
            with open(candidate, "rb") as f:
                return f.read()
    raise FileNotFoundError(f"missing model file: {os.path.join(source, inner_path)}")


def _blazeface_anchors() -> np.ndarray:
    """Anchor centres [896, 2] of the short-range BlazeFace detector (128 x 128 input):
    2 anchors per cell on the 16 x 16 grid (stride 8), 6 per cell on the 8 x 8 grid (stride 16)."""
    anchors = []
    for grid, per_cell in ((16, 2), (8, 6)):
        ys, xs = np.mgrid[0:grid, 0:grid]
        centres = np.stack([(xs + 0.5) / grid, (ys + 0.5) / grid], -1).reshape(-1, 1, 2)
        anchors.append(np.repeat(centres, per_cell, axis=1).reshape(-1, 2))
    return np.concatenate(anchors).astype(np.float32)


def _crop_matrix(centre, size: float, angle: float, out: int) -> np.ndarray:
    """[2, 3] matrix (pixel-centre coords) taking a square of side ``size`` centred at ``centre``
    and rotated by ``angle`` onto an ``out`` x ``out`` crop, the rotation undone."""
    c, s = np.cos(-angle), np.sin(-angle)
    scale = out / size
    linear = scale * np.array([[c, -s], [s, c]])
    # continuous coords: p_crop = L (p - centre) + out / 2; pixel centres are continuous - 0.5
    translation = out / 2 - linear @ (np.asarray(centre) + 0.5) + linear @ np.array([0.5, 0.5]) - 0.5
    return np.concatenate([linear, translation[:, None]], axis=1).astype(np.float32)


class MediaPipeFaceMesh:
    """MediaPipe's face detector (BlazeFace, short range) and 468-point face mesh, run with LiteRT.

    The two TFLite models ship inside mediapipe wheels up to 0.10.21 (Apache
    2.0). Installing that mediapipe would pin numpy < 2, so the models are
    read straight from the wheel file: ``pip download mediapipe==0.10.21
    --no-deps -d DIR`` once, then ``MediaPipeFaceMesh("DIR/mediapipe-0.10.21-...whl")``
    (an installed mediapipe package root works too). Needs the extra
    ``faceaudit_jax[landmarks]`` (ai-edge-litert). Nothing downloads at run time.

    ``__call__(images [B, H, W, 3] in [0, 1])`` -> (mesh float32 [B, 468, 2]
    in image pixel coordinates, found bool [B], score float32 [B]). The mesh
    is fitted on a crop around the detected face and refined once on a crop
    around its own first estimate, as MediaPipe's tracking graph does.
    """

    def __init__(self, source: str, *, min_detection_score: float = 0.5, min_presence_score: float = 0.5):
        interpreter = _import_litert_interpreter()
        self.detector = interpreter(model_content=_read_mediapipe_model(source, MEDIAPIPE_DETECTOR_PATH))
        self.mesh_model = interpreter(model_content=_read_mediapipe_model(source, MEDIAPIPE_MESH_PATH))
        self.detector.allocate_tensors()
        self.mesh_model.allocate_tensors()
        self.anchors = _blazeface_anchors()
        self.min_detection_score = float(min_detection_score)
        self.min_presence_score = float(min_presence_score)

    @staticmethod
    def _run(interpreter, x: np.ndarray) -> list[np.ndarray]:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x[None].astype(np.float32))
        interpreter.invoke()
        return [interpreter.get_tensor(d["index"])[0] for d in interpreter.get_output_details()]

    def detect(self, image: np.ndarray):
        """(box centre (x, y), box side, eye keypoints [2, 2], score) in pixels, or None."""
        from faceaudit_jax.data import align  # data imports nothing from here

        height, width = image.shape[:2]
        side = max(height, width)
        # Letterbox: the detector sees the whole image, padded to a square, at 128 x 128.
        scale = 128.0 / side
        matrix = np.array([[scale, 0, ((side - width) / 2 + 0.5) * scale - 0.5],
                           [0, scale, ((side - height) / 2 + 0.5) * scale - 0.5]], np.float32)
        small = np.asarray(align.warp_affine(image[None], matrix[None], (128, 128)))[0]
        outputs = {o.shape[-1]: o for o in self._run(self.detector, small * 2.0 - 1.0)}
        regressors, logits = outputs[16], outputs[1][:, 0]
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -100.0, 100.0).astype(np.float64)))
        best = int(np.argmax(scores))
        if scores[best] < self.min_detection_score:
            return None
        raw = regressors[best] / 128.0
        centre = raw[:2] + self.anchors[best]
        keypoints = raw[4:16].reshape(6, 2) + self.anchors[best]
        to_image = lambda p: p * side - np.array([(side - width) / 2, (side - height) / 2])  # noqa: E731
        return to_image(centre), float(max(raw[2], raw[3]) * side), to_image(keypoints[:2]), float(scores[best])

    def _mesh_on_crop(self, image: np.ndarray, centre, size: float, angle: float):
        from faceaudit_jax.data import align

        matrix = _crop_matrix(centre, size, angle, 192)
        crop = np.asarray(align.warp_affine(image[None], matrix[None], (192, 192)))[0]
        outputs = self._run(self.mesh_model, crop)
        coords = next(o for o in outputs if o.size == MESH_SIZE * 3).reshape(MESH_SIZE, 3)[:, :2] - 0.5
        presence_logit = float(next(o for o in outputs if o.size == 1).reshape(()))
        inverse = np.asarray(align.invert_transform(matrix))
        mesh = coords @ inverse[:, :2].T + inverse[:, 2]
        return mesh.astype(np.float32), 1.0 / (1.0 + np.exp(-presence_logit))

    def __call__(self, images):
        images = np.asarray(images, np.float32)
        _check_images(images)
        meshes = np.zeros((images.shape[0], MESH_SIZE, 2), np.float32)
        found = np.zeros(images.shape[0], bool)
        scores = np.zeros(images.shape[0], np.float32)
        for b, image in enumerate(images):
            detection = self.detect(image)
            if detection is None:
                continue
            centre, side, eyes, _ = detection
            angle = np.arctan2(eyes[1, 1] - eyes[0, 1], eyes[1, 0] - eyes[0, 0])
            mesh, presence = self._mesh_on_crop(image, centre, 1.5 * side, angle)
            # Refine on a crop around the first estimate (eye corners 33 / 263 set the roll).
            lo, hi = mesh.min(0), mesh.max(0)
            angle = np.arctan2(mesh[263, 1] - mesh[33, 1], mesh[263, 0] - mesh[33, 0])
            mesh, presence = self._mesh_on_crop(image, (lo + hi) / 2, 1.5 * float(np.max(hi - lo)), angle)
            scores[b] = presence
            if presence >= self.min_presence_score:
                meshes[b], found[b] = mesh, True
        return meshes, found, scores


class LandmarkParser:
    """Parse maps from a face-mesh landmark model: skin (face oval), nose, eyes, brows, mouth, lips.

    ``landmarker(images)`` -> (mesh [B, 468, 2], found [B], ...) in MediaPipe's
    mesh topology (``MediaPipeFaceMesh``). Regions the landmarks cannot see
    (hair, hat, ears, neck, cloth, eyeglasses, jewellery) are never guessed:
    they are absent from the maps and False in ``visible_regions``; pixels
    outside every drawn region get ``outside_id`` (background by default),
    which is why background is not counted as visible either. Images where no
    face is found get all-``outside_id`` maps and a warning naming them.
    """

    def __init__(self, landmarker, *, outside_id: int = 0):
        self.landmarker = landmarker
        self.outside_id = int(outside_id)
        self.visible_regions = np.isin(np.arange(regions.NUM_REGIONS), regions.region_ids(LANDMARK_VISIBLE_REGIONS))
        self.last_found: np.ndarray | None = None

    def parse(self, images, batch: Mapping[str, Any] | None = None) -> jax.Array:
        del batch
        _check_images(images)
        mesh, found = self.landmarker(np.asarray(images))[:2]
        found = np.asarray(found, bool)
        self.last_found = found
        if not found.all():
            warnings.warn(f"no face found in image(s) {np.flatnonzero(~found).tolist()} of the batch; their "
                          f"parse maps are all region {self.outside_id}", stacklevel=2)
        height, width = np.shape(images)[1:3]
        maps = mesh_to_parse(mesh, height, width, self.outside_id)
        return jnp.where(jnp.asarray(found)[:, None, None], maps, self.outside_id)


# ----------------------------------------------------------------------------- trained parsers

# Where a configs/face_parser.py run keeps its parser, relative to its workdir.
PARSER_RUN_DIR = "models/parser"


def load_trained_parser(workdir, **parser_kwargs) -> NetworkParser:
    """The parser a ``configs/face_parser.py`` run trained in ``workdir`` (its last checkpoint)."""
    import json
    from pathlib import Path

    from faceaudit_jax import train_lib
    from faceaudit_jax.models import parser_net

    run_dir = Path(workdir).expanduser() / PARSER_RUN_DIR
    cfg_path = run_dir / "parser_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"no trained parser in {workdir}: {cfg_path} is missing; train one with "
                                "python explain.py --config configs/face_parser.py --workdir <dir>")
    cfg = json.loads(cfg_path.read_text())
    model = parser_net.ParserNet(widths=tuple(cfg["widths"]), norm_groups=int(cfg["norm_groups"]))
    tx = train_lib.make_optimizer(cfg["train"], int(cfg["num_steps"]))
    state = train_lib.create_train_state(model, jax.random.PRNGKey(0), int(cfg["resolution"]), tx)
    restored = train_lib.restore_latest(state, str(run_dir))
    if int(restored.step) == 0:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet; finish training first")
    parser_kwargs.setdefault("input_size", int(cfg["resolution"]))
    return NetworkParser(model, train_lib.state_variables(restored), **parser_kwargs)


def parser_from_config(explain_cfg):
    """The parser named by ``explain.parser``: None (the data set's own masks) or a trained one.

    "" or "ground_truth": ``batch["parse"]``; any other value is the workdir of
    a ``configs/face_parser.py`` run, whose network parses every test image.
    """
    name = str(explain_cfg.get("parser", "") or "")
    if name in ("", "ground_truth"):
        return None
    return load_trained_parser(name)
