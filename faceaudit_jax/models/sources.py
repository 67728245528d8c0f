"""Where an explained model comes from: ``model.source`` in every explain-side config.

- ``train``: the experiment trains its own model (the default of every config).
- ``checkpoint``: ``model.path`` is a run directory written by this project's
  ``train.py`` (e.g. ``W/biased``): Orbax checkpoints under ``checkpoints/``
  and ``model.json``, the record of the architecture, number of outputs and
  the attribute each output predicts (``record_classifier`` writes it).
- ``torchvision``: ``model.path`` is a ``torch.save``d ``state_dict`` of a
  torchvision ResNet-18/34/50 with its own ``fc``; ``model.mean`` /
  ``model.std`` are the normalisation it was trained with, applied inside the
  Flax model, which takes images in [0, 1].
- For face verification: ``model.embedder = "module:function"``, any
  numpy-callable embedder ``f(images [B, H, W, 3] in [0, 1]) -> [B, D]``
  (``load_embedder``).

``model.output_index`` picks the logit that is explained when the model has
several outputs (e.g. a 40-attribute CelebA classifier). Every loader checks
the file against the config (architecture, number of outputs, output index)
and raises a ValueError naming the file and the field before any explaining
starts.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax.models import resnet, torch_import

MODEL_SOURCES = ("train", "checkpoint", "torchvision")
RECORD_FILE = "model.json"
_RECORD_FORMAT = "faceaudit_jax classifier v1"


@dataclasses.dataclass
class Classifier:
    """A ResNet classifier with its variables; ``output_index`` is the logit that is explained.

    ``fns(stage=None)`` gives the (features_fn, head_fn) pair of
    ``resnet.classifier_fns`` (split after ResNet stage ``stage``, None: the
    last) with the head narrowed to that one logit ([B, 1]), which is what
    the binary CAM targets and FaceX consume.
    """

    model: Any
    variables: dict
    name: str
    workdir: str
    output_index: int = 0
    arch: str = ""

    def fns(self, stage: Optional[int] = None):
        """(features_fn, head_fn) split after ``stage``; head_fn gives the explained logit [B, 1]."""
        return resnet.classifier_fns(self.model, self.variables, stage,
                                     output_index=int(self.output_index))


# ----------------------------------------------------------------------------- run-dir record


def record_classifier(run_dir, *, arch: str, outputs, resolution: int, data_source: str) -> dict:
    """Write ``run_dir/model.json``: what ``load_classifier`` needs to rebuild the model.

    ``outputs`` names the attribute of each logit, in order. Returns the record.
    """
    outputs = [str(o) for o in ([outputs] if isinstance(outputs, str) else outputs)]
    record = {"format": _RECORD_FORMAT, "arch": str(arch), "num_outputs": len(outputs),
              "outputs": outputs, "resolution": int(resolution), "data_source": str(data_source)}
    path = Path(run_dir) / RECORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def read_record(run_dir) -> dict:
    """The ``model.json`` of a run directory, or a ValueError saying what the folder lacks."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"model.path={str(run_dir)!r}: no such directory; expected a run directory "
                         "written by train.py (e.g. WORKDIR/biased)")
    path = run_dir / RECORD_FILE
    if not path.is_file():
        raise ValueError(f"model.path={str(run_dir)!r} has no {RECORD_FILE}; expected a run directory "
                         "written by train.py (e.g. WORKDIR/biased, holding model.json and checkpoints/)")
    record = json.loads(path.read_text())
    if record.get("format") != _RECORD_FORMAT:
        raise ValueError(f"{path}: format {record.get('format')!r}; expected {_RECORD_FORMAT!r}")
    return record


# ----------------------------------------------------------------------------- config checks


def model_source(model_cfg) -> str:
    source = str(model_cfg.get("source", "train") or "train")
    if source not in MODEL_SOURCES:
        raise ValueError(f"model.source={source!r}; expected one of {list(MODEL_SOURCES)}")
    return source


def _arch_field(model_cfg) -> str:
    """The config field naming the architecture: ``model.arch`` (audit) or ``model.name`` (training configs)."""
    return "arch" if "arch" in model_cfg else "name"


def _check_arch(model_cfg, found: str, where: str) -> None:
    field = _arch_field(model_cfg)
    wanted = str(model_cfg.get(field, "") or "")
    if wanted and wanted != found:
        raise ValueError(f"{where} holds a {found} model; model.{field}={wanted!r}. Set "
                         f"--config.model.{field}={found} or point model.path at a {wanted} model")


def _check_outputs(model_cfg, num_outputs: int, where: str) -> int:
    wanted = int(model_cfg.get("num_outputs", 0) or 0)
    if wanted and wanted != num_outputs:
        raise ValueError(f"{where} has {num_outputs} output(s) (fc); model.num_outputs={wanted}")
    index = int(model_cfg.get("output_index", 0) or 0)
    if not 0 <= index < num_outputs:
        raise ValueError(f"model.output_index={index}, but {where} has {num_outputs} output(s); "
                         f"expected an index in [0, {num_outputs})")
    return index


def _model_path(model_cfg) -> str:
    path = str(model_cfg.get("path", "") or "")
    if not path:
        raise ValueError(f"model.source={model_source(model_cfg)!r} needs --config.model.path "
                         "(a train.py run directory or a state_dict file)")
    if not os.path.exists(path):
        raise ValueError(f"model.path={path!r} does not exist")
    return path


# ----------------------------------------------------------------------------- loaders


def restore_variables(run_dir) -> dict:
    """{"params", ["batch_stats"]} of the latest Orbax checkpoint under ``run_dir/checkpoints``."""
    import orbax.checkpoint as ocp

    ckpt_dir = Path(run_dir).resolve() / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ValueError(f"model.path={str(run_dir)!r} has no checkpoints/ folder; expected a run "
                         "directory written by train.py (training finished or at least checkpointed)")
    with ocp.CheckpointManager(str(ckpt_dir),
                               item_handlers=ocp.StandardCheckpointHandler()) as manager:
        step = manager.latest_step()
        if step is None:
            raise ValueError(f"{ckpt_dir} holds no checkpoint; expected one written by train.py")
        # The optimiser state is restored too and dropped. Every array goes to this
        # process's first device: a multi-process job cannot restore "as saved"
        # (Orbax refuses another process's devices as a topology mismatch).
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              manager.item_metadata(step))
        tree = manager.restore(step, args=ocp.args.StandardRestore(target))
    variables = {"params": tree["params"]}
    if tree.get("batch_stats"):
        variables["batch_stats"] = tree["batch_stats"]
    return variables


def _expected_variables(model) -> dict:
    dummy = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), dummy)


def trained_resolution(clf: Classifier) -> int:
    """The image size a train.py run dir records for its model (0 when unknown, e.g. torchvision)."""
    path = Path(clf.workdir) / RECORD_FILE
    return int(json.loads(path.read_text()).get("resolution", 0)) if path.is_file() else 0


def load_checkpoint_classifier(model_cfg, name: str = "audited") -> Classifier:
    """The classifier of a train.py run directory (``model.path``), checked against the config."""
    path = _model_path(model_cfg)
    record = read_record(path)
    _check_arch(model_cfg, record["arch"], f"{path} ({RECORD_FILE})")
    index = _check_outputs(model_cfg, int(record["num_outputs"]), f"{path} ({RECORD_FILE})")
    model = resnet.build_model(record["arch"], int(record["num_outputs"]))
    variables = restore_variables(path)
    try:
        torch_import.check_variables(_expected_variables(model), variables)
    except ValueError as err:
        raise ValueError(f"{path}: checkpoint does not match {RECORD_FILE} "
                         f"({record['arch']}, {record['num_outputs']} outputs): {err}") from None
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    return Classifier(model, variables, name, str(path), index, record["arch"])


def load_torchvision_classifier(model_cfg, name: str = "audited") -> Classifier:
    """A torchvision ResNet ``state_dict`` file (``model.path``), checked against the config."""
    path = _model_path(model_cfg)
    if os.path.isdir(path):
        raise ValueError(f"model.path={path!r} is a directory; model.source='torchvision' expects a "
                         "state_dict file saved with torch.save(model.state_dict(), path)")
    state_dict = torch_import.strip_prefix(torch_import.load_state_dict_file(path))
    if "fc.weight" not in state_dict:
        raise ValueError(f"{path} has no fc.weight; expected a torchvision ResNet classifier state_dict")
    try:
        arch = torch_import.infer_architecture(state_dict)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    _check_arch(model_cfg, arch, path)
    num_outputs = int(np.shape(state_dict["fc.weight"])[0])
    index = _check_outputs(model_cfg, num_outputs, path)
    mean = tuple(float(v) for v in model_cfg.get("mean", resnet.IMAGENET_MEAN))
    std = tuple(float(v) for v in model_cfg.get("std", resnet.IMAGENET_STD))
    try:
        model, variables = torch_import.load_torchvision_resnet(state_dict, name=arch, mean=mean, std=std)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return Classifier(model, variables, name, str(path), index, arch)


def load_classifier(model_cfg, name: str = "audited") -> Classifier:
    """The classifier ``model_cfg`` names (source checkpoint or torchvision); errors before any work."""
    source = model_source(model_cfg)
    if source == "checkpoint":
        return load_checkpoint_classifier(model_cfg, name)
    if source == "torchvision":
        return load_torchvision_classifier(model_cfg, name)
    raise ValueError("model.source='train' builds its model by training; load_classifier "
                     "loads an existing one (model.source='checkpoint' or 'torchvision')")


def load_embedder(spec: str) -> Callable[[np.ndarray], np.ndarray]:
    """The numpy-callable embedder named by ``"module:function"`` (e.g. ``mypkg.faces:embed``).

    The function takes images [B, H, W, 3] float in [0, 1] and returns
    embeddings [B, D]; the attribute may also be a zero-argument factory
    returning such a callable when ``function`` ends with ``()``.
    """
    spec = str(spec or "")
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model.embedder={spec!r}; expected 'module:function' "
                         "(e.g. 'faceaudit_jax.models.dlib_face:embed')")
    factory = attr.endswith("()")
    attr = attr[:-2] if factory else attr
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model.embedder={spec!r}: cannot import {module_name!r} ({err})") from None
    if not hasattr(module, attr):
        raise ValueError(f"model.embedder={spec!r}: module {module_name!r} has no {attr!r}")
    fn = getattr(module, attr)
    fn = fn() if factory else fn
    if not callable(fn):
        raise ValueError(f"model.embedder={spec!r} is a {type(fn).__name__}; expected a callable")
    return fn


def describe(clf: Classifier, model_cfg) -> dict:
    """What a report says about the audited model."""
    return {"source": model_source(model_cfg), "path": clf.workdir, "arch": clf.arch,
            "num_outputs": int(clf.model.num_outputs), "output_index": int(clf.output_index)}


def multi_attribute_outputs(model_cfg, clf: Classifier) -> tuple[str, ...]:
    """The attribute each logit of a loaded multi-attribute classifier predicts, in order.

    ``checkpoint``: from the run directory's model.json (``model.outputs``, if
    set, must agree); ``torchvision``: ``model.outputs``, which must name one
    attribute per ``fc`` output. A ValueError names the file and the field.
    """
    given = tuple(str(o) for o in (model_cfg.get("outputs", ()) or ()))
    num_outputs = int(clf.model.num_outputs)
    if model_source(model_cfg) == "checkpoint":
        recorded = tuple(read_record(clf.workdir)["outputs"])
        if given and given != recorded:
            raise ValueError(f"{clf.workdir} ({RECORD_FILE}) predicts {list(recorded)}; "
                             f"model.outputs={list(given)}. Leave model.outputs empty or match it")
        return recorded
    if not given:
        raise ValueError(f"model.outputs is empty; {clf.workdir} has {num_outputs} fc output(s): "
                         "name the attribute of each, in order (e.g. "
                         "--config.model.outputs='(\"Bald\",\"Eyeglasses\")')")
    if len(given) != num_outputs:
        raise ValueError(f"{clf.workdir} has {num_outputs} fc output(s); model.outputs names "
                         f"{len(given)}: {list(given)}")
    return given


# ---------------------------------------------------------------------------
# Face-verification embedders (model.source = checkpoint | callable)
# ---------------------------------------------------------------------------

EMBEDDER_SOURCES = ("train", "checkpoint", "callable")


def embedder_source(model_cfg) -> str:
    """``model.source`` of a face-verification config, checked against EMBEDDER_SOURCES."""
    return _one_of("model.source", str(model_cfg.get("source", "train") or "train"), EMBEDDER_SOURCES)


def _one_of(field: str, value: str, allowed: tuple) -> str:
    if value in allowed:
        return value
    raise ValueError(f"{field}={value!r}; expected one of {allowed}")


def embedder_run_dir(path) -> Path:
    """The embedder run directory behind ``model.path``: the run dir itself (it holds
    checkpoints/ and fingerprint.json) or an experiment workdir holding models/embedder."""
    path = Path(str(path or ""))
    if not str(path) or not path.is_dir():
        raise FileNotFoundError(f"model.path={str(path)!r} does not exist or is not a folder; expected "
                                "an embedder run directory (a CorrRISE workdir or its models/embedder)")
    run_dir = path / "models" / "embedder" if (path / "models" / "embedder").is_dir() else path
    if not (run_dir / "fingerprint.json").is_file() or not (run_dir / "checkpoints").is_dir():
        raise FileNotFoundError(f"model.path={str(path)!r} holds no fingerprint.json and checkpoints/; "
                                "expected a run directory of this project's embedder training")
    return run_dir


def check_embedder_config(model_cfg) -> None:
    """Clear errors before any data is read: ``model.source`` and its ``path`` (checkpoint)
    or ``function`` (callable, imported here; errors name ``model.function``)."""
    source = embedder_source(model_cfg)
    if source == "checkpoint":
        embedder_run_dir(model_cfg.get("path", ""))
    elif source == "callable":
        try:
            load_embedder(str(model_cfg.get("function", "")))
        except ValueError as err:
            raise ValueError(f"model.function: {err}") from None

def load_embedder_checkpoint(path):
    """(FaceEmbedder, variables, fingerprint) of a trained ``models.embedder`` run directory."""
    from faceaudit_jax.models import embedder as embedder_lib

    run_dir = embedder_run_dir(path)
    record = json.loads((run_dir / "fingerprint.json").read_text())
    missing = [k for k in ("model", "embedding_dim", "num_classes") if k not in record]
    if missing:
        raise ValueError(f"{run_dir / 'fingerprint.json'} lacks {missing}; expected an embedder run directory")
    model = embedder_lib.build_embedder_with_margin(int(record["num_classes"]), name=str(record["model"]),
                                                    embedding_dim=int(record["embedding_dim"]))
    variables = embedder_lib.embedder_variables(restore_variables(run_dir))
    return model.embedder, variables, record


def check_embedder_output(fn: Callable, images: np.ndarray, spec: str) -> int:
    """Calls a numpy embedder on ``images`` [B, H, W, 3] in [0, 1]; returns its dimension D,
    or raises a ValueError naming ``spec`` when the output is not finite [B, D]."""
    out = np.asarray(fn(np.asarray(images, np.float32)))
    if out.ndim != 2 or out.shape[0] != images.shape[0] or out.shape[1] < 1:
        raise ValueError(f"model.function={spec!r} returned shape {out.shape} for {images.shape[0]} images "
                         f"of shape {images.shape[1:]}; expected ({images.shape[0]}, D)")
    if not np.all(np.isfinite(out)):
        raise ValueError(f"model.function={spec!r} returned non-finite embeddings")
    return int(out.shape[1])


def vit_embedder_run_dir(path) -> Path:
    """The ViT embedder run directory behind ``model.path``: the run dir itself or a
    vit_fv workdir holding models/vit_embedder (checked like ``embedder_run_dir``)."""
    path = Path(str(path or ""))
    if str(path) and (path / "models" / "vit_embedder").is_dir():
        path = path / "models" / "vit_embedder"
    return embedder_run_dir(path)


def load_vit_checkpoint(path):
    """(ViTFaceEmbedder, {"params": embedder params}, class centres [D, C], fingerprint) of a
    trained vit_fv embedder run directory."""
    from faceaudit_jax.models import vit

    run_dir = vit_embedder_run_dir(path)
    record = json.loads((run_dir / "fingerprint.json").read_text())
    missing = [k for k in ("model", "num_identities") if k not in record]
    if missing:
        raise ValueError(f"{run_dir / 'fingerprint.json'} lacks {missing}; expected a ViT embedder run directory")
    embedder = vit.build_vit(str(record["model"]), **dict(record.get("overrides") or {}))
    params = restore_variables(run_dir)["params"]
    return embedder, {"params": params["embedder"]}, np.asarray(params["class_centres"]), record
