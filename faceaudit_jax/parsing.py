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

Implementations: ``NetworkParser`` (a trained ``models.parser_net.ParserNet``)
and ``GroundTruthParser`` (the batch's own ``parse``).
"""

from __future__ import annotations

import functools
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
