"""Group-balanced reweighting: every (target, confounder...) cell carries the same total loss weight.

FaceX's Figure 5 mitigation: the biased training set is kept, and each image
is weighted inversely to the size of its cell, so the rare bias-conflicting
images count as much as the common bias-aligned ones.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from faceaudit_jax import regions
from faceaudit_jax.data.sampling import attribute_table


def group_balanced_weights(attrs, target: str, confounders: Sequence[str]) -> np.ndarray:
    """Per-sample weights inversely proportional to the size of its (y, a...) cell.

    With G non-empty cells and n_g images in cell g, image i of cell g gets
    w_i = N / (G * n_g): every cell carries the same total weight N / G and
    the weights average exactly 1, so the loss keeps its scale.

    Args:
      attrs: int8 [N, 40] attribute table of the training images.
      target, confounders: attribute names defining the cells.
    Returns:
      float32 [N].
    """
    table = attribute_table(attrs)
    names = [target] + list(confounders)
    values = table[:, regions.attribute_ids(names)]
    unknown = np.flatnonzero(np.any(values < 0, axis=1))
    if unknown.size:
        raise ValueError(f"row {int(unknown[0])} has an unknown (-1) value among {names}; "
                         "expected every training image to be labelled for the cells")
    _, inverse, counts = np.unique(values, axis=0, return_inverse=True, return_counts=True)
    inverse = np.asarray(inverse).reshape(-1)
    weights = table.shape[0] / (counts.size * counts[inverse].astype(np.float64))
    return weights.astype(np.float32)
