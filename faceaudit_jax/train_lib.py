"""Generic, model-agnostic training: optimiser recipes, a jitted update, resumable ``fit``.

The pieces, in the order an experiment uses them::

    config = default_optimizer_config()            # FaceX recipe (Adam, lr 1e-3, steps x0.1 at 1/3, 2/3)
    tx = make_optimizer(config, total_steps)
    state = create_train_state(model, key, image_size, tx)
    state = fit(model, state, batch_fn, total_steps, workdir,
                loss_fn=lambda logits, batch: losses.sigmoid_bce(logits, batch["label"]))
    logits = predict(model, state_variables(state), batches)
    report = group_accuracy(logits[:, 0] > 0, labels, confounder)

Models: any Flax module whose ``__call__(x, train=...)`` returns logits or
``(logits, aux)``; BatchNorm models carry ``batch_stats`` (updated in training),
dropout draws from the rng stream "dropout".

Weight decay: with ``optimizer="adam"`` it is an L2 penalty added to the
gradient before Adam's scaling, as ``torch.optim.Adam(weight_decay=...)`` does
(the FaceX recipe's setting); ``optimizer="adamw"`` decouples it (optax.adamw,
decay multiplied by the scheduled learning rate); for ``"sgd"`` it is L2 too.
Decay applies to all parameters, as in torch's default.

Determinism and resume: ``batch_fn(step)`` must be a pure function of the step
and the dropout key of update ``step`` is ``fold_in(state.rng, step)``, so a run
restored from a checkpoint at step k replays exactly the updates k, k+1, ... of
an uninterrupted run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from faceaudit_jax import workdir as workdir_lib

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("step", "cosine", "exponential", "constant")


# ----------------------------------------------------------------------------- optimiser


def default_optimizer_config() -> ml_collections.ConfigDict:
    """The FaceX training recipe: Adam, lr 1e-3 x 0.1 at 1/3 and 2/3 of training, wd 1e-4, batch 128, 20 epochs.

    Fields read by ``make_optimizer``: optimizer, lr, weight_decay, schedule,
    decay_boundaries (fractions of total steps), decay_factor, exp_decay_rate,
    exp_decay_steps, cosine_alpha, warmup_steps, momentum (sgd), b1, b2, eps,
    grad_clip_norm (0 = off). batch_size and num_epochs are for the caller
    (total_steps = num_epochs * ceil(num_images / batch_size)).
    """
    return ml_collections.ConfigDict(
        dict(
            optimizer="adam",
            lr=1e-3,
            weight_decay=1e-4,
            schedule="step",
            decay_boundaries=(1 / 3, 2 / 3),
            decay_factor=0.1,
            exp_decay_rate=0.96,
            exp_decay_steps=1000,
            cosine_alpha=0.0,
            warmup_steps=0,
            momentum=0.9,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            grad_clip_norm=0.0,
            batch_size=128,
            num_epochs=20,
        )
    )


def _cfg(config: Any, key: str) -> Any:
    """Field of ``config`` with the recipe's default where the config leaves it out."""
    defaults = default_optimizer_config()
    if isinstance(config, Mapping) or isinstance(config, ml_collections.ConfigDict):
        if key in config:
            return config[key]
    elif hasattr(config, key):
        return getattr(config, key)
    return defaults[key]


def make_schedule(config: Any, total_steps: int) -> optax.Schedule:
    """Learning-rate schedule: step -> lr, for update index step = 0, 1, ..., total_steps - 1.

    "step": lr * decay_factor ** (number of boundaries b * total_steps <= step);
    "cosine": cosine decay from lr to cosine_alpha * lr over total_steps;
    "exponential": lr * exp_decay_rate ** (step / exp_decay_steps) (smooth);
    "constant": lr. ``warmup_steps`` > 0 prepends a linear warm-up from 0.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    total_steps = int(total_steps)
    lr = float(_cfg(config, "lr"))
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    kind = _cfg(config, "schedule")
    warmup = int(_cfg(config, "warmup_steps"))
    if not 0 <= warmup < total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup}")

    if kind == "step":
        fractions = tuple(float(b) for b in _cfg(config, "decay_boundaries"))
        if any(not 0.0 < b < 1.0 for b in fractions) or list(fractions) != sorted(fractions):
            raise ValueError(f"decay_boundaries must be increasing fractions in (0, 1), got {fractions}")
        boundaries = jnp.asarray([int(round(b * total_steps)) for b in fractions], jnp.int32)
        factor = float(_cfg(config, "decay_factor"))
        if not factor > 0:
            raise ValueError(f"decay_factor must be positive, got {factor!r}")

        def base(step):
            num_decays = jnp.sum(jnp.asarray(step) >= boundaries)
            return lr * factor ** num_decays.astype(jnp.float32)

    elif kind == "cosine":
        base = optax.cosine_decay_schedule(lr, decay_steps=total_steps, alpha=float(_cfg(config, "cosine_alpha")))
    elif kind == "exponential":
        rate, every = float(_cfg(config, "exp_decay_rate")), int(_cfg(config, "exp_decay_steps"))
        if not 0 < rate <= 1 or every < 1:
            raise ValueError(
                f"exponential schedule needs exp_decay_rate in (0, 1] and exp_decay_steps >= 1, got {rate}, {every}"
            )
        base = optax.exponential_decay(lr, transition_steps=every, decay_rate=rate)
    elif kind == "constant":
        base = optax.constant_schedule(lr)
    else:
        raise ValueError(f"unknown schedule {kind!r}; expected one of {list(SCHEDULES)}")

    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), base], [warmup])
    return base


def make_optimizer(config: Any, total_steps: int) -> optax.GradientTransformation:
    """optax transformation for ``config`` (see ``default_optimizer_config``) over ``total_steps`` updates.

    The learning rate is injected as a hyperparameter, so the optimiser state
    records the rate of the latest update (``current_lr``), which ``fit`` logs.
    """
    schedule = make_schedule(config, total_steps)
    name = _cfg(config, "optimizer")
    weight_decay = float(_cfg(config, "weight_decay"))
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    clip = float(_cfg(config, "grad_clip_norm") or 0.0)
    b1, b2, eps = float(_cfg(config, "b1")), float(_cfg(config, "b2")), float(_cfg(config, "eps"))

    if name == "adam":
        def factory(learning_rate):
            return optax.chain(
                optax.add_decayed_weights(weight_decay),  # coupled L2, as torch's Adam
                optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                optax.scale_by_learning_rate(learning_rate),
            )
    elif name == "adamw":
        def factory(learning_rate):
            return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    elif name == "sgd":
        momentum = float(_cfg(config, "momentum"))

        def factory(learning_rate):
            return optax.chain(
                optax.add_decayed_weights(weight_decay),
                optax.sgd(learning_rate, momentum=momentum or None),
            )
    else:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {list(OPTIMIZERS)}")

    tx = optax.inject_hyperparams(factory)(learning_rate=schedule)
    if clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return tx


_INJECT_STATES = tuple(
    getattr(optax, name) for name in ("InjectHyperparamsState", "InjectStatefulHyperparamsState") if hasattr(optax, name)
)


def current_lr(opt_state: Any) -> jax.Array:
    """The learning rate of the latest update, read from the injected hyperparameters (NaN if none)."""
    found = [
        s.hyperparams["learning_rate"]
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, _INJECT_STATES))
        if isinstance(s, _INJECT_STATES) and "learning_rate" in s.hyperparams
    ]
    return jnp.asarray(found[0], jnp.float32) if found else jnp.float32(jnp.nan)


# ----------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries between updates.

    step: int32 scalar, number of updates done; params / batch_stats (an empty
    dict for models without BatchNorm) / opt_state: pytrees; rng: a raw uint32
    PRNG key [2] (dropout keys are fold_in(rng, step)); tx: the optimiser
    (static, not checkpointed).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    def checkpoint_tree(self) -> dict:
        """The arrays to save (everything but tx)."""
        return dict(step=self.step, params=self.params, batch_stats=self.batch_stats,
                    opt_state=self.opt_state, rng=self.rng)

    def replace_from_tree(self, tree: Mapping) -> "TrainState":
        return self.replace(**{k: tree[k] for k in ("step", "params", "batch_stats", "opt_state", "rng")})


def _raw_key(key: jax.Array) -> jax.Array:
    """Raw uint32 key data whether ``key`` is a typed key or a legacy PRNGKey."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return jnp.asarray(key, jnp.uint32)


def state_variables(state: TrainState) -> dict:
    """{"params", ["batch_stats"]} for ``model.apply``."""
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return variables


def create_train_state(model: Any, key: jax.Array, image_size, tx: optax.GradientTransformation) -> TrainState:
    """Initialise ``model`` for [1, H, W, 3] inputs and the optimiser; step 0.

    ``key`` is split into an init key and the run's rng (dropout); ``image_size``
    is an int or (H, W).
    """
    from faceaudit_jax.models.resnet import init_variables  # models import nothing from here

    init_key, run_key = jax.random.split(key)
    return train_state_from_variables(init_variables(model, init_key, image_size), tx, run_key)


def train_state_from_variables(variables: Mapping, tx: optax.GradientTransformation,
                               rng: jax.Array) -> TrainState:
    """Step-0 state of a run starting from given variables ({"params", ["batch_stats"]}).

    ``rng``: the run's key (typed or raw); update ``step`` draws from
    ``fold_in(rng, step)``. ``fit`` donates the state, so pass variables that
    are not used elsewhere (e.g. ``jax.tree.map(jnp.copy, shared)``).
    """
    params = variables["params"]
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      rng=jnp.array(_raw_key(rng), copy=True), tx=tx)  # fit donates it


def init_model_variables(model: Any, key: jax.Array, example_inputs: Sequence[Any]) -> dict:
    """``model.init`` on positional ``example_inputs`` (train=False), jitted and memoised per
    (hashable) module: {"params", ["batch_stats"]}. The "params" and "dropout" init streams
    draw from ``split(key)``; for models whose input is not one image (see
    ``create_train_state`` for those)."""
    params_key, dropout_key = jax.random.split(key)
    try:
        init = _jitted_init(model)
    except TypeError:  # unhashable module: no memo
        init = jax.jit(functools.partial(model.init, train=False))
    variables = init({"params": params_key, "dropout": dropout_key}, *example_inputs)
    return {k: v for k, v in variables.items() if k in ("params", "batch_stats")}


@functools.lru_cache(maxsize=16)
def _jitted_init(model: Any) -> Callable:
    return jax.jit(functools.partial(model.init, train=False))


def variables_template(model: Any, example_inputs: Sequence[Any]) -> dict:
    """Shapes of ``init_model_variables``' result without running or compiling the
    initialiser: the ``template`` of ``load_variables``."""
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    shapes = jax.eval_shape(lambda: model.init(rngs, *example_inputs, train=False))
    return {k: v for k, v in shapes.items() if k in ("params", "batch_stats") and v}


# ----------------------------------------------------------------------------- steps


def _logits_of(output: Any) -> jax.Array:
    return output[0] if isinstance(output, tuple) else output


InputKey = str | tuple[str, ...]
# ``augment_fn(key, batch) -> batch``: runs inside the jitted step before the forward pass
# (e.g. noise on selected pixels, or patch sampling that adds the model's inputs).
AugmentFn = Callable[[jax.Array, Mapping[str, jax.Array]], Mapping[str, jax.Array]]


def _loss_input(loss_fn: Callable, output: Any) -> Any:
    """What ``loss_fn`` is given: the logits, or the whole model output when the loss
    says ``takes_model_output = True`` (e.g. a loss on the pooled features)."""
    return output if getattr(loss_fn, "takes_model_output", False) else _logits_of(output)


def _model_inputs(batch: Mapping, input_key: InputKey) -> tuple:
    """The model's positional inputs: batch[input_key], or one per name of a tuple."""
    return tuple(batch[k] for k in input_key) if isinstance(input_key, tuple) else (batch[input_key],)


def _augment_and_dropout_key(rng: jax.Array, step: jax.Array, batch: Mapping,
                             augment_fn: AugmentFn | None) -> tuple[Mapping, jax.Array]:
    """(batch after ``augment_fn``, dropout key) of update ``step``.

    Without augmentation the dropout key is ``fold_in(rng, step)``; with it, that
    key is split into (augmentation key, dropout key).
    """
    step_key = jax.random.fold_in(rng, step)
    if augment_fn is None:
        return batch, step_key
    augment_key, dropout_key = jax.random.split(step_key)
    return augment_fn(augment_key, batch), dropout_key


def _train_mode_apply(model: Any, variables: Mapping, inputs: tuple, dropout_key: jax.Array,
                      batch_stats: Any) -> tuple[Any, Any]:
    """(output, new batch_stats) of a train-mode forward pass (batch_stats as given if none)."""
    if not batch_stats:
        return model.apply(variables, *inputs, train=True, rngs={"dropout": dropout_key}), batch_stats
    output, updates = model.apply({**variables, "batch_stats": batch_stats}, *inputs, train=True,
                                  rngs={"dropout": dropout_key}, mutable=["batch_stats"])
    return output, updates["batch_stats"]


def make_train_step(model: Any, loss_fn: Callable, *, input_key: InputKey = "image",
                    augment_fn: AugmentFn | None = None) -> Callable:
    """Jitted ``train_step(state, batch) -> (state, metrics)``; ``state`` is donated.

    ``loss_fn(logits, batch)`` returns a scalar, or (scalar, dict of scalar
    metrics); a loss with ``takes_model_output = True`` gets the whole model
    output (e.g. ``(logits, {"pooled": ...})``) instead of the logits. The model sees ``batch[input_key]`` (or ``*(batch[k] for k in
    input_key)`` for a tuple of names) in training mode, after the optional
    ``augment_fn(key, batch) -> batch``; BatchNorm statistics are updated; keys
    as in ``_augment_and_dropout_key`` (the dropout key is fold_in(state.rng,
    state.step) without augmentation). metrics: "loss", "lr" (rate used by this
    update), "grad_norm" and any extras. Compiles once per batch shape/dtype.
    The jitted function is memoised on (model, loss_fn, input_key, augment_fn),
    so repeated ``fit`` calls in one process (e.g. a resume) reuse it.
    """
    try:
        return _cached_train_step(model, loss_fn, input_key, augment_fn)
    except TypeError:  # an unhashable model or loss: build without the memo
        return _build_train_step(model, loss_fn, input_key, augment_fn)


@functools.lru_cache(maxsize=16)
def _cached_train_step(model: Any, loss_fn: Callable, input_key: InputKey,
                       augment_fn: AugmentFn | None) -> Callable:
    return _build_train_step(model, loss_fn, input_key, augment_fn)


def _build_train_step(model: Any, loss_fn: Callable, input_key: InputKey,
                      augment_fn: AugmentFn | None) -> Callable:

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        batch, dropout_key = _augment_and_dropout_key(state.rng, state.step, batch, augment_fn)

        def compute_loss(params):
            output, new_batch_stats = _train_mode_apply(
                model, {"params": params}, _model_inputs(batch, input_key), dropout_key,
                state.batch_stats)
            result = loss_fn(_loss_input(loss_fn, output), batch)
            loss, extras = result if isinstance(result, tuple) else (result, {})
            return loss, (new_batch_stats, extras)

        (loss, (new_batch_stats, extras)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_batch_stats,
                                  opt_state=opt_state)
        metrics = {"loss": loss, "lr": current_lr(opt_state), "grad_norm": optax.tree.norm(grads), **extras}
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=0)


def recalibrate_batch_stats(model: Any, variables: Mapping, batch_fn: Callable[[int], Mapping],
                            num_steps: int, rng: jax.Array, *, input_key: InputKey = "image",
                            augment_fn: AugmentFn | None = None) -> dict:
    """Re-estimate BatchNorm running statistics with the weights frozen.

    ``num_steps`` train-mode forward passes (no gradient) over ``batch_fn(0..)``,
    each batch augmented and keyed as update ``step`` of ``fit`` would be with
    ``rng`` as the run's key. The running averages of a model trained at a
    large learning rate trail its final weights; these passes bring them to the
    final weights' statistics (old values decay by the BatchNorm momentum per
    batch). Returns the variables with the new batch_stats (params unchanged);
    as given when ``num_steps`` is 0 or the model has no batch_stats.
    """
    if num_steps <= 0 or not variables.get("batch_stats"):
        return dict(variables)
    stats_step = _cached_stats_step(model, input_key, augment_fn)
    rng = _raw_key(rng)
    variables = dict(variables)
    for step in range(int(num_steps)):
        variables["batch_stats"] = stats_step(variables, batch_fn(step), rng,
                                              jnp.asarray(step, jnp.int32))
    return variables


@functools.lru_cache(maxsize=16)
def _cached_stats_step(model: Any, input_key: InputKey, augment_fn: AugmentFn | None) -> Callable:

    @jax.jit
    def stats_step(variables, batch, rng, step):
        batch, dropout_key = _augment_and_dropout_key(rng, step, batch, augment_fn)
        return _train_mode_apply(model, {"params": variables["params"]},
                                 _model_inputs(batch, input_key), dropout_key,
                                 variables["batch_stats"])[1]

    return stats_step


def make_eval_step(model: Any) -> Callable:
    """Jitted ``eval_step(variables, images) -> logits`` in eval mode (running BN statistics,
    no dropout); memoised per (hashable) model, so repeated ``predict`` calls compile once."""
    try:
        return _cached_eval_step(model)
    except TypeError:  # unhashable model
        return _build_eval_step(model)


@functools.lru_cache(maxsize=16)
def _cached_eval_step(model: Any) -> Callable:
    return _build_eval_step(model)


def _build_eval_step(model: Any) -> Callable:

    def eval_step(variables, images):
        return _logits_of(model.apply(variables, images, train=False))

    return jax.jit(eval_step)


def predict(model: Any, variables: Mapping, batches: Iterable, *, input_key: str = "image") -> jax.Array:
    """Logits for a stream of batches (image arrays or batch dicts), concatenated: [N, num_outputs].

    A smaller last batch is padded to the first batch's size, so the eval step
    compiles once for the whole stream.
    """
    eval_step = make_eval_step(model)
    variables = dict(variables)
    outputs, batch_size = [], None
    for batch in batches:
        images = batch[input_key] if isinstance(batch, Mapping) else batch
        images = jnp.asarray(images)
        n = images.shape[0]
        if batch_size is None:
            batch_size = n
        if n < batch_size:
            pad = jnp.zeros((batch_size - n,) + images.shape[1:], images.dtype)
            logits = eval_step(variables, jnp.concatenate([images, pad]))[:n]
        else:
            logits = eval_step(variables, images)
        outputs.append(logits)
    if not outputs:
        raise ValueError("predict got no batches")
    return jnp.concatenate(outputs)


def group_accuracy(preds: Any, labels: Any, groups: Any) -> dict[str, float]:
    """Accuracy overall and per (target y, confounder a) group.

    Args:
      preds: [N] predicted labels (threshold logits first, e.g. logits > 0).
      labels: [N] true target labels y (ints / bools).
      groups: [N] confounder values a (ints / bools).
    Returns:
      {"overall", "n", "y=<y>,a=<a>" and "n_y=<y>,a=<a>" for every (y, a) pair
      present, "worst_group", "gap" (best minus worst group accuracy)}, plus
      for binary y and a: "aligned" (y == a, the bias-aligned groups of a
      FaceX-style biased subset) and "conflicting" (y != a), NaN if empty.
    """
    preds, labels, groups = (np.asarray(x).astype(np.int64).ravel() for x in (preds, labels, groups))
    if not (preds.shape == labels.shape == groups.shape):
        raise ValueError(
            f"preds, labels and groups must have the same length, got {preds.size}, {labels.size}, {groups.size}"
        )
    if preds.size == 0:
        raise ValueError("group_accuracy got no samples")
    correct = preds == labels
    report: dict[str, float] = {"overall": float(correct.mean()), "n": int(correct.size)}
    pairs = np.unique(np.stack([labels, groups], axis=1), axis=0)
    group_accs = []
    for y, a in pairs:  # a handful of groups, not a hot loop
        selected = (labels == y) & (groups == a)
        acc = float(correct[selected].mean())
        report[f"y={y},a={a}"] = acc
        report[f"n_y={y},a={a}"] = int(selected.sum())
        group_accs.append(acc)
    report["worst_group"] = float(min(group_accs))
    report["gap"] = float(max(group_accs) - min(group_accs))
    if set(np.unique(labels)) <= {0, 1} and set(np.unique(groups)) <= {0, 1}:
        aligned = labels == groups
        report["aligned"] = float(correct[aligned].mean()) if aligned.any() else float("nan")
        report["conflicting"] = float(correct[~aligned].mean()) if (~aligned).any() else float("nan")
    return report


# ----------------------------------------------------------------------------- fit


def check_workdir(workdir: str) -> str:
    """Create ``workdir`` if needed and prove it is writable; returns its absolute path.

    Raises ValueError (workdir.WorkdirError) naming the path otherwise, before
    any training starts.
    """
    return str(workdir_lib.prepare_workdir(workdir))


class CheckpointError(workdir_lib.WorkdirError):
    """No checkpoint step in a folder can be restored intact."""


# The step's Orbax custom metadata (written atomically with the step) holds
# this key: sha256 of the saved arrays, see ``tree_checksum``.
CHECKSUM_KEY = "arrays_sha256"
# Outside this magnitude a float in an unverified checkpoint is taken for damage
# (flipped exponent bits give values near 3e38), not for a trained weight.
_ABSURD = 1e30
DAMAGED_DIR = "damaged_checkpoints"


def tree_checksum(tree: Any) -> str | None:
    """sha256 (hex) over every leaf's key path, dtype, shape and bytes, in tree order.

    None when a leaf is not fully addressable from this process (an array
    sharded over hosts): such checkpoints are saved without a checksum.
    """
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return None
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _bad_values(tree: Any, limit: float) -> list[str]:
    """Key paths of float leaves holding NaN/Inf, or magnitudes above ``limit``."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.floating) and a.size:
            finite = np.isfinite(a)
            if not finite.all() or np.abs(a[finite]).max(initial=0.0) > limit:
                bad.append(jax.tree_util.keystr(path))
    return bad


def _checkpoint_manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
    # cleanup_tmp_directories: Orbax removes the *.orbax-checkpoint-tmp* folders a
    # killed save left behind when the manager opens the folder.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState) -> None:
    """Save ``state`` at its step with the checksum of its arrays in the step's metadata.

    In a multi-process job every process calls this (Orbax's save is
    collective: process 0 writes, all meet at its barriers) with the same
    state; the arrays go as numpy, which Orbax writes from process 0 only
    (it refuses process-local jax.Arrays there).
    """
    tree = state.checkpoint_tree()
    if jax.process_count() > 1:
        tree = jax.device_get(tree)
    checksum = tree_checksum(tree)
    manager.save(int(state.step), args=ocp.args.StandardSave(tree), force=True,
                 custom_metadata=None if checksum is None else {CHECKSUM_KEY: checksum})


def restore_latest(state: TrainState, workdir: str) -> TrainState:
    """``state`` with the arrays of the newest intact checkpoint under workdir/checkpoints.

    Unchanged if there is none; see ``fit`` for what is verified.
    """
    path = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(path):
        return state
    with _checkpoint_manager(os.path.abspath(workdir), 1) as manager:
        return _restore(manager, state)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


# Orbax's step metadata file. Read here, not through the manager, because
# Orbax reads a garbled one as "no custom metadata", which would pass a
# damaged step off as one saved before checksums.
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"


def _custom_metadata(step_dir: str) -> dict:
    """The custom metadata saved with a step ({} if the step has no metadata file)."""
    path = os.path.join(step_dir, _STEP_METADATA_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            metadata = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{_STEP_METADATA_FILE} is not valid JSON ({err})") from None
    return metadata.get("custom_metadata") or {}


def _restore_step(directory: str, step: int, target: Any) -> tuple[Any, str | None]:
    """(tree, None) for an intact step, (None, what is wrong) for a damaged one."""
    # A manager of its own per step: one that met a damaged step (e.g. without
    # default/) changes its idea of the folder's layout and fails on intact ones.
    options = ocp.CheckpointManagerOptions(read_only=True, enable_async_checkpointing=False)
    try:
        with ocp.CheckpointManager(directory, options=options) as manager:
            tree = manager.restore(step, args=ocp.args.StandardRestore(target))
        custom = _custom_metadata(os.path.join(directory, str(step)))
    except Exception as err:  # noqa: BLE001  any failure to read a step makes it unusable
        return None, _first_line(err)
    expected = custom.get(CHECKSUM_KEY)
    if expected is None:
        bad = _bad_values(tree, _ABSURD)
        if bad:
            return None, (f"no checksum, and NaN/Inf or |value| > {_ABSURD:g} in "
                          f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
        warnings.warn(f"checkpoint step {step} in {directory} has no checksum (saved before "
                      "checksums were recorded): its values are finite but unverified", stacklevel=4)
        return tree, None
    found = tree_checksum(tree)
    if found != expected:
        return None, "checksum mismatch: the arrays read back differ from those saved"
    bad = _bad_values(tree, np.inf)
    if bad:  # saved this way: training diverged, the storage is fine
        warnings.warn(f"checkpoint step {step} in {directory} holds NaN/Inf as saved "
                      f"(training diverged?) in {', '.join(bad[:4])}", stacklevel=4)
    return tree, None


def _restore(manager: ocp.CheckpointManager, state: TrainState) -> TrainState:
    """``state`` from the newest intact step; damaged newer steps are moved aside with a warning.

    A step is damaged when it cannot be read, its arrays differ from the sha256
    saved in its Orbax metadata (``tree_checksum``), or (saved before checksums)
    it holds NaN/Inf or absurd magnitudes. Raises CheckpointError naming the
    folder when steps exist but none is intact.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return state
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state.checkpoint_tree())
    folder = str(manager.directory)
    damaged = []
    for step in steps:
        tree, problem = _restore_step(folder, step, target)
        if problem is None:
            if damaged:
                moved_to = _move_aside(manager, [s for s, _ in damaged])
                warnings.warn(
                    f"checkpoint folder {folder}: "
                    + "; ".join(f"step {s} is damaged ({p})" for s, p in damaged)
                    + f". Resuming from step {step}, the newest intact one; the damaged step(s) "
                    f"were moved to {moved_to}", stacklevel=3)
            return state.replace_from_tree(tree)
        damaged.append((step, problem))
    raise CheckpointError(
        f"no intact checkpoint in {folder}: "
        + "; ".join(f"step {s}: {p}" for s, p in damaged)
        + f". Delete {os.path.dirname(folder)} to train from scratch, or use another --workdir")


def _move_aside(manager: ocp.CheckpointManager, steps: Sequence[int]) -> str:
    """Move damaged step folders out of the manager's sight (kept for inspection)."""
    root = os.path.join(os.path.dirname(str(manager.directory)), DAMAGED_DIR)
    os.makedirs(root, exist_ok=True)
    for step in steps:
        dest = os.path.join(root, f"{step}-{int(time.time())}")
        shutil.move(os.path.join(str(manager.directory), str(step)), dest)
    manager.reload()
    return root


def _truncate_metrics(metrics_path: str, last_step: int) -> None:
    """Drop records past ``last_step`` (written by a run killed after its last checkpoint).

    An incomplete last line (a run killed mid-write) is dropped with a warning.
    """
    workdir_lib.keep_jsonl(metrics_path, lambda record: record.get("step", 0) <= last_step)


def _to_python(metrics: Mapping) -> dict:
    return {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in metrics.items()}


def _batch_size(batch: Mapping, input_key: InputKey) -> int:
    """Examples in a batch: the leading size of its (first) model input, or of its first
    array when an ``augment_fn`` makes the inputs inside the step."""
    first = input_key[0] if isinstance(input_key, tuple) else input_key
    return int(np.shape(batch[first] if first in batch else jax.tree.leaves(batch)[0])[0])


class _TrainLog:
    """metrics.jsonl records and the progress bar of one ``fit`` call.

    Throughput: images and wall time between log points, minus the time spent
    checkpointing and evaluating; the first (compiling) step of the call is left
    out. With ``window_mean`` a train record holds the means of the metrics over
    the steps since the previous record (kept on device until then), else the
    metrics of its own step.
    """

    def __init__(self, metrics_file, bar, window_mean: bool):
        self.file, self.bar, self.window_mean = metrics_file, bar, window_mean
        self.start, self.images, self.steps, self.paused = None, 0, 0, 0.0
        self.window: list = []

    def step(self, metrics: Mapping, batch_images: int) -> None:
        if self.start is None:
            jax.block_until_ready(metrics["loss"])
            self.start = time.perf_counter()
        else:
            self.images += batch_images
            self.steps += 1
        if self.window_mean:
            self.window.append(metrics)
        self.bar.update(1)

    def train_record(self, done: int, metrics: Mapping) -> None:
        if self.window_mean:
            metrics = jax.tree.map(lambda *x: jnp.mean(jnp.stack(x)), *self.window)
        values = _to_python(jax.device_get(metrics))
        elapsed = time.perf_counter() - self.start - self.paused
        rate = self.images / elapsed if self.steps and elapsed > 0 else float("nan")
        self.write({"kind": "train", "step": done, **values, "images_per_s": rate})
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", img_s=f"{rate:.0f}")
        self.start, self.images, self.steps, self.paused, self.window = time.perf_counter(), 0, 0, 0.0, []

    def write(self, record: Mapping) -> None:
        workdir_lib.append_jsonl(self.file, record)


def _check_fit_args(num_steps: Any, ckpt_every: Any, log_every: Any, eval_fn: Any, eval_every: Any) -> None:
    for name, value in (("num_steps", num_steps), ("ckpt_every", ckpt_every), ("log_every", log_every)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if name == "num_steps" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'num_steps' else 'positive'} int, got {value!r}")
    if eval_fn is not None and eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be a positive int or None, got {eval_every!r}")


def fit(model: Any, state: TrainState, batch_fn: Callable[[int], Mapping[str, Any]], num_steps: int,
        workdir: str, *, loss_fn: Callable, ckpt_every: int = 500, log_every: int = 50,
        eval_fn: Callable[[TrainState], Mapping[str, Any]] | None = None, eval_every: int | None = None,
        desc: str = "train", max_to_keep: int = 3, input_key: InputKey = "image",
        augment_fn: AugmentFn | None = None, log_window_mean: bool = False,
        progress: bool = True) -> TrainState:
    """Train until ``state.step == num_steps``, resuming from workdir/checkpoints if possible.

    Args:
      model: Flax module (see the module docstring).
      state: a fresh ``create_train_state`` / ``train_state_from_variables`` result
        (replaced by the latest checkpoint if there is one). It is donated.
      batch_fn: step -> batch dict; a deterministic function of the step (a
        resumed run then sees the same batches).
      num_steps: total number of updates of the run (not of this call).
      workdir: checkpoints/ (Orbax, last ``max_to_keep``) and metrics.jsonl
        ({"kind": "train", "step", "loss", "lr", "grad_norm", "images_per_s", ...}
        every ``log_every`` steps, {"kind": "eval", "step", ...} every
        ``eval_every`` steps and at the end).
      loss_fn: ``loss_fn(logits, batch)`` -> scalar or (scalar, metrics dict).
      ckpt_every: checkpoint period in steps; the final step is always saved.
      eval_fn: optional ``eval_fn(state)`` -> dict of scalars.
      input_key, augment_fn: model inputs and in-step augmentation (``make_train_step``).
      log_window_mean: records hold each metric's mean since the previous record.
    Returns the final state. An unwritable workdir raises ValueError before any
    work. Checkpoints are verified on restore (``_restore``: checksums; damaged
    newer steps are moved to workdir/damaged_checkpoints with a warning and the
    run resumes from the newest intact one, replaying the same updates;
    CheckpointError if none is intact); stale Orbax tmp folders are removed and
    an incomplete last line of metrics.jsonl is dropped with a warning.
    """
    workdir = check_workdir(workdir)
    _check_fit_args(num_steps, ckpt_every, log_every, eval_fn, eval_every)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    with _checkpoint_manager(workdir, max_to_keep) as manager:
        state = _restore(manager, state)
        start = int(state.step)
        # One writer of metrics.jsonl: process 0 of a multi-process job.
        log_here = jax.process_index() == 0
        if log_here:
            _truncate_metrics(metrics_path, start)
        if start >= num_steps:
            return state
        train_step = make_train_step(model, loss_fn, input_key=input_key, augment_fn=augment_fn)
        bar = tqdm(total=num_steps, initial=start, desc=desc, disable=not progress, dynamic_ncols=True)
        with open(metrics_path if log_here else os.devnull, "a") as metrics_file:
            log = _TrainLog(metrics_file, bar, log_window_mean)
            for step in range(start, num_steps):
                batch = batch_fn(step)
                state, metrics = train_step(state, batch)
                done = step + 1
                log.step(metrics, _batch_size(batch, input_key))
                if done % log_every == 0 or done == num_steps:
                    log.train_record(done, metrics)
                paused_from = time.perf_counter()
                if done % ckpt_every == 0 or done == num_steps:
                    save_checkpoint(manager, state)
                if eval_fn is not None and ((eval_every and done % eval_every == 0) or done == num_steps):
                    log.write({"kind": "eval", "step": done, **_to_python(eval_fn(state))})
                log.paused += time.perf_counter() - paused_from
        bar.close()
        manager.wait_until_finished()
    return state


def fit_epochs(model: Any, state: TrainState, batch_fn: Callable[[int], Mapping[str, Any]],
               epochs: int, steps_per_epoch: int, scratch_dir: str, **fit_args) -> tuple[TrainState, list[dict]]:
    """``fit`` for whole epochs in a scratch folder, for runs whose final variables are all
    that is kept (``save_variables``): a checkpoint per epoch (a killed run resumes at its
    last epoch), then the folder is removed.

    Returns (state, history): per epoch {"epoch", "loss", and the loss_fn's extra metrics},
    each the mean over the epoch's steps (``log_window_mean``).
    """
    state = fit(model, state, batch_fn, int(epochs) * int(steps_per_epoch), scratch_dir,
                ckpt_every=steps_per_epoch, log_every=steps_per_epoch, log_window_mean=True,
                max_to_keep=1, progress=False, **fit_args)
    history = [{"epoch": r["step"] // steps_per_epoch,
                **{k: v for k, v in r.items() if k not in ("kind", "step", "lr", "grad_norm", "images_per_s")}}
               for r in workdir_lib.read_jsonl(os.path.join(scratch_dir, "metrics.jsonl"))
               if r["kind"] == "train"]
    shutil.rmtree(scratch_dir)
    return state, history


# ----------------------------------------------------------------------------- final variables


def save_variables(directory: str, variables: Any) -> None:
    """A trained model's variables ({"params", ["batch_stats"]}) as an Orbax checkpoint.

    The same format and verification as ``fit``'s checkpoints (one step, 0,
    with the sha256 of its arrays in the step's metadata), for models trained
    outside ``fit`` whose final variables are all that is kept. Overwrites.
    """
    directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    tree = jax.device_get(variables)
    checksum = tree_checksum(tree)
    with ocp.CheckpointManager(directory, options=options) as manager:
        if 0 in manager.all_steps():
            manager.delete(0)
        manager.save(0, args=ocp.args.StandardSave(tree), force=True,
                     custom_metadata=None if checksum is None else {CHECKSUM_KEY: checksum})
        manager.wait_until_finished()


def load_variables(directory: str, template: Any) -> Any | None:
    """The variables saved by ``save_variables``, verified; None if there are none.

    ``template``: arrays or ``jax.ShapeDtypeStruct`` of the same structure (e.g.
    ``jax.eval_shape`` of the model's init). A damaged save raises
    CheckpointError naming the folder and what is wrong.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(os.path.join(directory, "0")):
        return None
    tree, problem = _restore_step(directory, 0, template)
    if problem is not None:
        raise CheckpointError(f"saved variables in {directory} cannot be used: {problem}; "
                              "delete the folder to retrain")
    return tree


def save_keyed_variables(directory: str, variables: Any, fingerprint: str,
                         meta: Mapping | None = None) -> None:
    """``save_variables`` plus the sidecar ``<directory>.json``: {"fingerprint", **meta} (e.g.
    the training history), so a rerun reuses the model only under the same settings."""
    save_variables(directory, variables)
    workdir_lib.write_json(f"{os.path.abspath(directory)}.json", {"fingerprint": fingerprint, **(meta or {})})


def load_keyed_variables(directory: str, template: Any, fingerprint: str) -> tuple[Any | None, dict]:
    """(variables, sidecar) saved by ``save_keyed_variables`` under ``fingerprint``, else (None, {})."""
    meta = workdir_lib.read_json_if(f"{os.path.abspath(directory)}.json", fingerprint)
    variables = None if meta is None else load_variables(directory, template)
    return (None, {}) if variables is None else (variables, meta)
