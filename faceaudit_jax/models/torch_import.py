"""Import torchvision ResNet weights into the Flax ResNets of ``models.resnet``.

A user who trained a classifier with torchvision (``resnet18/34/50`` with its
own ``fc``) saves ``model.state_dict()``; ``load_torchvision_resnet`` turns it
into a ``ResNetClassifier`` and its variables so the classifier can be
audited here (CAMs, FaceX, ...). The state dict may hold torch tensors or
numpy arrays; torch itself is needed only to read a ``.pt`` file
(``load_state_dict_file``, extra ``faceaudit_jax[torch]``).

Layout conversion (the naming table is in ``models.resnet``'s docstring):
conv kernels OIHW -> HWIO, BatchNorm weight / bias / running_mean /
running_var -> scale / bias / mean / var (``batch_stats`` for the last two),
``fc.weight`` [K, C] -> Dense kernel [C, K]. ``num_batches_tracked`` counters
carry nothing and are dropped. A "module." prefix (DataParallel) is removed.

Input normalisation: a torchvision model expects inputs already normalised
(ImageNet mean / std by default); the Flax model takes [0, 1] images and
normalises inside with its ``mean`` / ``std`` fields. Pass the mean / std the
torch model was trained with so both compute the same function.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax.models import resnet

_BN_FIELDS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_STAGE_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(.+)$")

# (blocks per stage, block kind) -> models.resnet architecture name
_KNOWN_LAYOUTS = {
    ((2, 2, 2, 2), "basic"): "resnet18",
    ((3, 4, 6, 3), "basic"): "resnet34",
    ((3, 4, 6, 3), "bottleneck"): "resnet50",
}


def to_numpy(value) -> np.ndarray:
    """A torch tensor (any device, with or without grad) or array-like -> numpy array."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict without DataParallel's "module." key prefix (unchanged if absent)."""
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _flax_path(key: str) -> tuple[str, ...]:
    """torchvision key -> (collection, *module path, leaf) in a ``ResNetClassifier``."""
    if key in ("fc.weight", "fc.bias"):
        return ("params", "fc", "kernel" if key.endswith("weight") else "bias")
    if key == "conv1.weight":
        return ("params", "backbone", "conv1", "kernel")
    if key.startswith("bn1."):
        field = key[len("bn1."):]
        if field in _BN_FIELDS:
            collection, leaf = _BN_FIELDS[field]
            return (collection, "backbone", "norm1", leaf)
    match = _STAGE_BLOCK.match(key)
    if match:
        stage, block, rest = match.groups()
        module = f"layer{stage}_{block}"
        conv = re.fullmatch(r"conv(\d)\.weight", rest)
        if conv:
            return ("params", "backbone", module, f"conv{conv.group(1)}", "kernel")
        if rest == "downsample.0.weight":
            return ("params", "backbone", module, "downsample_conv", "kernel")
        norm = re.fullmatch(r"(bn(\d)|downsample\.1)\.(\w+)", rest)
        if norm and norm.group(3) in _BN_FIELDS:
            name = f"norm{norm.group(2)}" if norm.group(2) else "downsample_norm"
            collection, leaf = _BN_FIELDS[norm.group(3)]
            return (collection, "backbone", module, name, leaf)
    raise ValueError(f"state dict key {key!r} is not part of a torchvision ResNet")


def _convert_value(key: str, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if key == "fc.weight":
        if value.ndim != 2:
            raise ValueError(f"{key} has shape {value.shape}; expected [num_outputs, channels]")
        return value.T
    if key.endswith("weight") and value.ndim == 4:  # conv OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    return value


def convert_torchvision_resnet(state_dict: Mapping[str, Any]) -> dict:
    """torchvision ResNet state dict -> Flax variables {"params", "batch_stats"} (numpy leaves).

    Pure renaming and transposing; ``load_torchvision_resnet`` also checks
    the result against the Flax model's own variable shapes.
    """
    variables: dict = {}
    for key, value in strip_prefix(state_dict).items():
        if key.endswith("num_batches_tracked"):
            continue
        path = _flax_path(key)
        node = variables
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _convert_value(key, to_numpy(value))
    return variables


def infer_architecture(state_dict: Mapping[str, Any]) -> str:
    """The ``models.resnet`` name (resnet18 / resnet34 / resnet50) of a torchvision state dict."""
    blocks: dict[int, int] = {}
    bottleneck = False
    for key in strip_prefix(state_dict):
        match = _STAGE_BLOCK.match(key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
            bottleneck |= match.group(3).startswith("conv3.")
    layout = (tuple(blocks.get(s, 0) for s in range(1, 5)), "bottleneck" if bottleneck else "basic")
    if layout not in _KNOWN_LAYOUTS:
        raise ValueError(
            f"state dict has {layout[0]} {layout[1]} blocks per stage; supported torchvision layouts: "
            + ", ".join(f"{name} {stages} {kind}" for (stages, kind), name in _KNOWN_LAYOUTS.items()))
    return _KNOWN_LAYOUTS[layout]


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def check_variables(expected: Mapping, got: Mapping) -> None:
    """Raise ValueError listing missing, unexpected and wrongly shaped variables."""
    want, have = _flatten(expected), _flatten(got)
    missing = sorted("/".join(k) for k in set(want) - set(have))
    unexpected = sorted("/".join(k) for k in set(have) - set(want))
    wrong = sorted(f"{'/'.join(k)}: got {tuple(np.shape(have[k]))}, expected {tuple(want[k].shape)}"
                   for k in set(want) & set(have) if tuple(np.shape(have[k])) != tuple(want[k].shape))
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    if wrong:
        problems.append(f"wrong shapes {wrong}")
    if problems:
        raise ValueError("imported weights do not fit the Flax ResNet: " + "; ".join(problems))


def load_torchvision_resnet(
    state_dict: Mapping[str, Any],
    *,
    name: str | None = None,
    mean: Sequence[float] = resnet.IMAGENET_MEAN,
    std: Sequence[float] = resnet.IMAGENET_STD,
    dtype: Any = jnp.float32,
):
    """A torchvision ResNet state dict -> (``ResNetClassifier``, variables).

    ``name`` (resnet18 / resnet34 / resnet50) is inferred from the keys when
    not given; the number of outputs comes from ``fc.weight``. ``mean`` /
    ``std`` are the input normalisation the torch model was trained with.
    The variables are checked name by name and shape by shape against the
    Flax model (found with ``jax.eval_shape``, so nothing is computed).
    """
    state_dict = strip_prefix(state_dict)
    if "fc.weight" not in state_dict:
        raise ValueError("state dict has no fc.weight; expected a torchvision ResNet classifier")
    name = name or infer_architecture(state_dict)
    num_outputs = int(to_numpy(state_dict["fc.weight"]).shape[0])
    model = resnet.build_model(name, num_outputs, norm="batch", mean=mean, std=std, dtype=dtype)
    dummy = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    expected = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), dummy)
    variables = convert_torchvision_resnet(state_dict)
    check_variables(expected, variables)
    return model, jax.tree_util.tree_map(jnp.asarray, variables)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``torch.save``d state dict (or a checkpoint dict holding "state_dict") as numpy arrays.

    Needs torch (the extra ``faceaudit_jax[torch]``); loads on the CPU with
    ``weights_only=True`` so no code in the file runs.
    """
    try:
        import torch  # noqa: PLC0415 (optional dependency)
    except ImportError as err:
        raise ImportError("reading a PyTorch checkpoint needs torch; install it with: "
                          "pip install 'faceaudit_jax[torch]'") from err
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing checkpoint file: {path}")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}; expected a state dict (a mapping)")
    return {k: to_numpy(v) for k, v in loaded.items()}
