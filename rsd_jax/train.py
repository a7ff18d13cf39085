"""Training and evaluation of one distillation run: `train_and_evaluate(config, workdir)`.

One linear function in banner sections. The student and the method's extra modules are trained; the teacher's
variables are a separate argument of the step that is never differentiated, updated or checkpointed.
"""
import dataclasses
import functools
import json
import logging
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rsd_jax import checkpoint, cli, data, distillers, models, optim, sharding
from rsd_jax.data import augment
from rsd_jax.errors import UserError
from rsd_jax.state import TrainState

log = logging.getLogger("rsd_jax")


# ------------------------------------------------------------------------------------------------ helpers
def _overrides(section):
    """Model overrides from a config section; JSON round trips turn tuples into lists, models want tuples."""
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(section.overrides).items()}


def check_workdir(workdir):
    """Fail early (before any compilation or writing) when the workdir cannot be created or written."""
    cli.check_writable(workdir, f"workdir {workdir}")
    for name in ("checkpoints", "student", "student_ema"):     # the run's directories, if a file took their place
        path = os.path.join(workdir, name)
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"{path} is a file, not the run's {name} directory; move it or use another workdir")


def build_student(config, num_classes):
    return models.create_model(config.student.model, num_classes=num_classes, **_overrides(config.student))


def load_teacher(config, num_classes):
    """(teacher module, variables), checked against the config's architecture and the dataset's class count."""
    path = config.teacher.path
    if not path:
        raise UserError(f"method {config.distill.method!r} needs a teacher: set --config.teacher.path "
                        "(a model directory from convert.from_torch or a finished run's <workdir>/student)")
    if path == "random":
        log.warning("teacher.path=random: the teacher is randomly initialised (smoke tests and benchmarks only)")
        teacher = models.create_model(config.teacher.model, num_classes=num_classes, **_overrides(config.teacher))
        # jitted: op-by-op initialisation of a full-size teacher takes about a minute on CPU
        init = jax.jit(lambda rng: teacher.init(rng, jnp.zeros(models.input_shape(teacher)), train=False))
        variables = jax.block_until_ready(init(jax.random.key(config.seed + 1)))
        return teacher, variables
    if os.path.isfile(path):
        raise UserError(f"teacher {path} is a file, not a model directory; convert a PyTorch checkpoint with "
                        f"python -m convert.from_torch {path} --out DIR and set teacher.path=DIR")
    if not os.path.isdir(path):
        raise UserError(f"teacher directory {path} does not exist")
    meta = checkpoint.read_model_metadata(path)
    if config.teacher.model and meta["model"] != config.teacher.model:
        raise UserError(f"teacher {path} is a {meta['model']}, but the config names {config.teacher.model}")
    if meta["num_classes"] != num_classes:
        raise UserError(f"teacher {path} has {meta['num_classes']} classes, the dataset {num_classes}")
    return models.load_model(path)


def _awaited(fn):
    """`fn` whose result is ready when it returns, on CPU: fake CPU devices deadlock when a sharded computation
    follows another that has not finished (shared/MACHINE_NOTES.md); the training loop awaits each step itself."""
    if jax.default_backend() != "cpu":
        return fn
    return lambda *args: jax.block_until_ready(fn(*args))


def student_initializer(config, student, num_classes):
    """variables -> variables: `student.init`'s weights (and BatchNorm statistics) where they fit, the fresh ones
    elsewhere (a classifier for another class count). Another architecture, or any other mismatch, is an error."""
    if not config.student.init:
        return lambda variables: variables
    path = config.student.init
    if not os.path.isdir(path):
        raise UserError(f"student.init directory {path} does not exist")
    meta = checkpoint.read_model_metadata(path)
    if meta["model"] != config.student.model:
        raise UserError(f"student.init {path} is a {meta['model']}, but the student is a {config.student.model}")
    source = models.create_model(meta["model"], num_classes=meta["num_classes"], **meta.get("overrides", {}))
    loaded = checkpoint.load_model_variables(path, models.init_shapes(source))
    fresh = models.init_shapes(student)
    flat_loaded, flat_fresh = (flax.traverse_util.flatten_dict(t) for t in (loaded, fresh))
    mismatched = [k for k in flat_fresh if k not in flat_loaded or flat_loaded[k].shape != flat_fresh[k].shape]
    heads = [k for k in mismatched if meta["num_classes"] != num_classes and flat_fresh[k].shape[-1] == num_classes]
    if set(mismatched) - set(heads) or set(flat_loaded) - set(flat_fresh):
        raise UserError(f"student.init {path} does not fit the student: "
                        f"{sorted('/'.join(k) for k in set(mismatched) - set(heads))}")
    if heads:
        log.info("student.init: %s re-initialised (%d classes in %s, %d here)", ", ".join("/".join(k) for k in heads),
                 meta["num_classes"], path, num_classes)

    def init(variables):
        flat = flax.traverse_util.flatten_dict(variables)
        flat.update({k: jnp.asarray(v) for k, v in flat_loaded.items() if k not in heads})
        return flax.traverse_util.unflatten_dict(flat)
    return init


def eval_transform_for(config, dataset):
    """The evaluation transform of a run: the reference's resize and centre crop for the student (RSD_SPEC §4.1)."""
    return augment.eval_transform(config.data.augment, dataset.mean, dataset.std, size=config.data.image_size,
                                  model=config.student.model)


def masked_cross_entropy(logits, labels, mask, smoothing):
    """Label-smoothed CE, (1-e)*NLL + e*mean_c(-log p_c), averaged over the examples whose mask is 1. Soft (B, C)
    labels (mixup/cutmix targets, which carry their own smoothing) are used as they are."""
    num_classes = logits.shape[-1]
    targets = labels if labels.ndim == 2 else optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
    per_example = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def merge_groups(model_state):
    """Per-group collections -> one. Running statistics: the mean over groups, every step (the gradient is DDP's
    average of per-rank gradients). The reference differs slightly: DDP broadcasts rank 0's buffers before each
    forward and distribute_bn averages them at epoch ends, so its statistics follow rank 0's batches; both are
    estimates of the same quantity. Any other collection is updated identically in every group, so group 0 holds
    it."""
    def merge(path, x):
        return jnp.mean(x, axis=0) if any(getattr(k, "key", None) == "batch_stats" for k in path) else x[0]
    return jax.tree_util.tree_map_with_path(merge, model_state)


def _groups(tree, num_groups):
    return jax.tree_util.tree_map(lambda x: x.reshape((num_groups, -1) + x.shape[1:]), tree)


# ------------------------------------------------------------------------------------------------ run
@dataclasses.dataclass
class Run:
    """Everything a run computes with, built from its config; no state and nothing written."""
    config: Any
    mesh: Any
    dataset: data.Dataset
    student: Any
    teacher: Any              # None for methods without a teacher
    teacher_vars: Any
    extra: Any                # the method's module (rsd_jax.distillers), None for vanilla
    num_groups: int           # statistics groups per batch
    batch_transform: Callable   # (raw images, labels, augmentation key) -> (normalised images, targets)
    steps_per_epoch: int
    total_steps: int
    abstract_state: Any       # ShapeDtypeStructs with shardings
    init: Callable            # rng -> TrainState (jitted, born sharded)
    train_step: Callable      # (state, teacher_vars, batch) -> (state, metrics) (jitted, state donated)
    eval_step: Callable       # (student params, student model_state, batch) -> metric sums (jitted)

    def train_batch(self, step):
        batch = data.train_batch(self.dataset.train, self.config.seed, step, self.config.data.batch_size,
                                 jax.process_index(), jax.process_count())
        return sharding.to_global(batch, self.mesh, local=True)

    def evaluate(self, state):
        """Test metrics of the student, and of its EMA (keys prefixed `ema_`) when EMA is on."""
        split, batch_size = self.dataset.test, self.config.data.eval_batch_size
        out = evaluate_split(self.eval_step, state.params["student"], state.model_state["student"], split,
                             batch_size, self.mesh)
        if state.ema is not None:
            ema = evaluate_split(self.eval_step, state.ema["params"], state.ema["model_state"], split, batch_size,
                                 self.mesh)
            out.update({f"ema_{k}": v for k, v in ema.items()})
        return out


def step_rngs(rng_data, step, num_groups):
    """The keys of training step `step`: (augmentation, per-group student dropout (G,), per-group method (G,))."""
    aug_rng, dropout_rng = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(rng_data), step))
    student_rngs, extra_rngs = jax.vmap(jax.random.split, out_axes=1)(jax.random.split(dropout_rng, num_groups))
    return aug_rng, student_rngs, extra_rngs


# Integer settings and their least value (0 where 0 means off).
_COUNTS = {"data.batch_size": 1, "data.eval_batch_size": 1, "data.image_size": 1, "optim.epochs": 1,
           "log_every_steps": 1, "eval_every_epochs": 1, "checkpoint_every_epochs": 1, "checkpoint_every_steps": 0,
           "stop_after_epoch": 0, "distill.group_size": 0}


def check_counts(config):
    for key, least in _COUNTS.items():
        section, _, name = key.rpartition(".")
        holder = config[section] if section else config
        value = holder.get(name, least)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"{key} must be an integer >= {least}, got {value!r}")


def compute_dtype(config):
    """The train step's compute dtype, `config.compute_dtype` ("float32", the default, or "bfloat16")."""
    name = config.get("compute_dtype", "float32") or "float32"
    if name not in ("float32", "bfloat16"):
        raise UserError(f"unknown compute_dtype {name!r}; known: float32, bfloat16")
    return jnp.dtype(name)


def cast_floats(tree, dtype):
    """Floating leaves of `tree` in `dtype` (integer leaves, e.g. CRD's indices, untouched)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def build_run(config, mesh=None, dataset=None):
    """Check the config, load data (or take `dataset`, e.g. synthetic batches for benchmarks) and models, and build
    the jitted init, train and eval steps."""
    distillers.check_method(config.distill.method)
    check_counts(config)
    dtype = compute_dtype(config)

    # ---------------------------------------------------------------------------------------- mesh
    mesh = mesh or sharding.make_mesh()
    sharding.check_batch_size(config.data.batch_size, mesh)
    sharding.check_batch_size(config.data.eval_batch_size, mesh)
    replicated = sharding.replicated(mesh)

    # ---------------------------------------------------------------------------------------- data
    dataset = dataset or data.load(config.data)
    batch_size = config.data.batch_size
    steps_per_epoch = len(dataset.train) // batch_size
    if steps_per_epoch == 0:
        raise UserError(f"batch size {batch_size} is larger than the {len(dataset.train)} training images")
    group_size = config.distill.group_size or batch_size
    if batch_size % group_size:
        raise UserError(f"batch size {batch_size} is not a multiple of distill.group_size {group_size}")
    num_groups = batch_size // group_size
    if augment.mixing(config.data.augment):   # mixup/cutmix within each statistics group, as the reference mixes each GPU's batch
        batch_transform = augment.train_batch_transform(
            config.data.augment, dataset.mean, dataset.std, dataset.num_classes, config.distill.label_smoothing,
            size=config.data.image_size, group_size=group_size,
            pin=lambda draws: jax.lax.with_sharding_constraint(draws, replicated))
    else:
        image_transform = augment.train_transform(config.data.augment, dataset.mean, dataset.std,
                                                  size=config.data.image_size)
        batch_transform = lambda images, labels, rng: (image_transform(images, rng), labels)   # noqa: E731
    eval_transform = eval_transform_for(config, dataset)

    # ---------------------------------------------------------------------------------------- models
    student = build_student(config, dataset.num_classes)
    if student.img_size != config.data.image_size:
        raise UserError(f"student input size {student.img_size} differs from data.image_size "
                        f"{config.data.image_size}")
    teacher, teacher_vars = None, None
    if distillers.needs_teacher(config.distill.method):
        teacher, teacher_vars = load_teacher(config, dataset.num_classes)
        # Inference precision: the teacher's variables are stored in the compute dtype (bf16 halves its reads).
        teacher_vars = jax.device_put(cast_floats(teacher_vars, dtype), replicated)
    example = jnp.zeros((2,) + models.input_shape(student)[1:])
    teacher_shapes = jax.eval_shape(lambda v: teacher.apply(v, example, train=False), teacher_vars) \
        if teacher else None
    context = distillers.Context(num_classes=dataset.num_classes, num_train_examples=len(dataset.train),
                                 teacher_dim=teacher_shapes[1]["pre_logits"].shape[-1] if teacher else 0)
    extra = distillers.build(config.distill.method, config.distill.get(config.distill.method), context)

    # ---------------------------------------------------------------------------------------- state
    tx = optim.create(config.optim, steps_per_epoch)
    ema_decay = config.ema.decay
    init_student = student_initializer(config, student, dataset.num_classes)

    def init(rng):
        student_rng, extra_rng = jax.random.split(rng)
        variables = dict(init_student(student.init(student_rng, example, train=False)))
        params = {"student": variables.pop("params"), "extra": {}}
        model_state = {"student": variables, "extra": {}}
        if extra is not None:
            student_out = student.apply(dict(variables, params=params["student"]), example, train=False)
            teacher_out = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), teacher_shapes)
            example_batch = {"label": jnp.zeros((2,), jnp.int32), "label_mask": jnp.ones((2,)),
                             "index": jnp.zeros((2,), jnp.int32)}
            extra_vars = dict(jax.vmap(lambda: extra.init(extra_rng, student_out, teacher_out, example_batch,
                                                          train=False), axis_size=1, axis_name="group")())
            extra_vars = jax.tree_util.tree_map(lambda x: x[0], extra_vars)
            params["extra"] = extra_vars.pop("params", {})
            model_state["extra"] = extra_vars
        ema = {"params": params["student"], "model_state": model_state["student"]} if ema_decay else None
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                          opt_state=tx.init(params), rng=jax.random.key_data(jax.random.fold_in(rng, 1)), ema=ema)

    abstract_state = jax.eval_shape(init, jax.random.key(0))
    state_sharding = jax.tree_util.tree_map(lambda _: replicated, abstract_state)
    abstract_state = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, state_sharding)

    # ---------------------------------------------------------------------------------------- step functions
    gt_weight = config.distill.gt_loss_weight
    smoothing = config.distill.label_smoothing
    lr_schedule = optim.schedule(config.optim, steps_per_epoch)

    def train_step(state, teacher_vars, batch):
        aug_rng, student_rngs, extra_rngs = step_rngs(state.rng, state.step, num_groups)
        images, targets = batch_transform(batch["image"], batch["label"], aug_rng)
        # Mixed precision (compute_dtype=bfloat16): models compute on bf16 copies of the float32 parameters and
        # inputs; gradients, optimizer state and BatchNorm statistics stay float32, and BatchNorm/LayerNorm
        # statistics, the CE and the RSD statistics are computed in float32. float32: every cast is a no-op.
        images = images.astype(dtype)
        # The teacher sees exactly the student's augmented batch, in inference mode.
        teacher_out = jax.lax.stop_gradient(teacher.apply(teacher_vars, images, train=False)) if teacher else None

        def group_loss(params, images, labels, teacher_out, student_rng, extra_rng):
            # One statistics group: BatchNorm and RSD statistics over these examples only, as one DDP rank.
            params = cast_floats(params, dtype)
            student_out, new_student = student.apply(
                dict(state.model_state["student"], params=params["student"]), images,
                train=True, mutable=list(state.model_state["student"]), rngs={"dropout": student_rng})
            terms = {"ce": gt_weight * masked_cross_entropy(student_out[0], labels["label"], labels["label_mask"],
                                                            smoothing)}
            new_extra = state.model_state["extra"]
            if extra is not None:
                extra_terms, new_extra = extra.apply(
                    dict(state.model_state["extra"], params=params["extra"]), student_out, teacher_out, labels,
                    train=True, mutable=list(state.model_state["extra"]), rngs={"dropout": extra_rng})
                terms.update(extra_terms)
            return sum(terms.values()), (terms, {"student": new_student, "extra": new_extra})

        def loss_fn(params):
            labels = {"label": targets, "label_mask": batch["label_mask"], "index": batch["index"]}
            losses, (terms, model_state) = jax.vmap(group_loss, in_axes=(None, 0, 0, 0, 0, 0), axis_name="group")(
                params, *_groups((images, labels, teacher_out), num_groups), student_rngs, extra_rngs)
            return jnp.mean(losses), (jax.tree_util.tree_map(jnp.mean, terms), merge_groups(model_state))

        (loss, (terms, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  model_state=new_model_state, opt_state=opt_state)
        if ema_decay:
            current = {"params": new_state.params["student"], "model_state": new_state.model_state["student"]}
            new_state = new_state.replace(ema=jax.tree_util.tree_map(
                lambda e, x: ema_decay * e + (1 - ema_decay) * x, state.ema, current))
        metrics = dict(terms, loss=loss, lr=lr_schedule(state.step), grad_norm=optax.tree.norm(grads))
        return new_state, metrics

    batch_spec = sharding.batch_sharding(mesh)
    return Run(
        config=config, mesh=mesh, dataset=dataset, student=student, teacher=teacher, teacher_vars=teacher_vars,
        extra=extra, num_groups=num_groups, batch_transform=batch_transform, steps_per_epoch=steps_per_epoch,
        total_steps=config.optim.epochs * steps_per_epoch, abstract_state=abstract_state,
        init=_awaited(jax.jit(init, out_shardings=state_sharding)),
        train_step=jax.jit(train_step, in_shardings=(state_sharding, replicated, batch_spec),
                           out_shardings=(state_sharding, replicated), donate_argnums=(0,)),
        eval_step=make_eval_step(student, eval_transform, out_shardings=replicated))


def train_and_evaluate(config, workdir):
    """Train (or resume) the run in `workdir`; returns its final metrics (also in `workdir/results.json`), or None
    when it stopped early (stop_after_epoch, SIGTERM/SIGINT) with a checkpoint to resume from."""
    check_workdir(workdir)
    run = build_run(config)
    n_student = sum(x.size for x in jax.tree_util.tree_leaves(run.abstract_state.params["student"]))
    n_extra = sum(x.size for x in jax.tree_util.tree_leaves(run.abstract_state.params["extra"]))
    log.info("student %s: %.2fM parameters; %s extra: %.2fM", config.student.model, n_student / 1e6,
             config.distill.method, n_extra / 1e6)
    check_free_space(workdir, run.abstract_state)    # before anything compiles
    primary = jax.process_index() == 0               # only process 0 writes files other than checkpoints

    # ---------------------------------------------------------------------------------------- resume
    os.makedirs(workdir, exist_ok=True)
    config_path = os.path.join(workdir, "config.json")
    ckpts = checkpoint.RunCheckpoints(workdir)
    config_text = config.to_json_best_effort(indent=2, sort_keys=True)
    if ckpts.latest_step() is not None:
        changed = check_resume_config(config_path, json.loads(config_text))
        if changed:
            log.info("resuming with changed settings: %s", "; ".join(changed))
    if primary:   # the config the checkpoints now follow (a fresh start replaces a failed run's)
        write_atomic(config_path, config_text)
    state = ckpts.restore(run.abstract_state)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if state is None:
        state = run.init(jax.random.key(config.seed))
    else:
        log.info("resumed from step %d", int(state.step))
    if primary:
        # An epoch's line is written before its checkpoint: lines past the restored step are from steps that run again.
        _truncate_metrics(metrics_path, int(state.step))
    best = ckpts.best_metrics()
    best_top1 = best["top1"] if best else -1.0

    # ---------------------------------------------------------------------------------------- loop
    # Fake CPU devices deadlock on back-to-back sharded steps unless each step is awaited (MACHINE_NOTES); there
    # a non-finite loss is caught at its step. Elsewhere the check runs every log_every_steps and before each save,
    # without a host sync per step.
    sync_each_step = jax.default_backend() == "cpu"
    train_step = guard_nonfinite(run.train_step, run.abstract_state) if config.get("skip_nonfinite_steps") \
        else run.train_step
    every_steps = config.get("checkpoint_every_steps", 0)
    total_steps, steps_per_epoch, batch_size = run.total_steps, run.steps_per_epoch, config.data.batch_size
    start_step = int(state.step)
    bar = _progress(config, total_steps, start_step)
    epoch_sums, epoch_count, t0, seen = {}, 0, time.time(), 0
    first_bad = None          # on device: the metrics (and step) of the first non-finite step since the last check
    last_eval, last_saved = None, start_step
    stop = _StopSignals()
    stopping_after_epoch = False

    def check_finite():
        if first_bad is None:
            return
        bad = jax.device_get(first_bad)
        if bad["found"]:
            ckpts.wait()
            kept = ckpts.latest_step()
            terms = [k for k in bad if k not in ("found", "step") and not np.isfinite(bad[k])]
            raise UserError(f"non-finite {' and '.join(terms) or 'loss'} at step {int(bad['step'])}; the last good "
                            f"checkpoint ({'step ' + str(kept) if kept is not None else 'none yet'}) is kept: lower "
                            "optim.lr, set optim.clip_grad, or set skip_nonfinite_steps=True to skip such steps")

    def save(metrics=None, best=False):
        nonlocal last_saved
        check_finite()
        ckpts.save(state, metrics or {"top1": -1.0}, best=best)
        last_saved = int(state.step)

    # ------------------------------------------------------------------------------------ epoch end
    def epoch_end():
        nonlocal epoch_sums, epoch_count, t0, seen, last_eval, best_top1, stopping_after_epoch
        step = int(state.step) - 1
        check_finite()
        epoch = (step + 1) // steps_per_epoch
        sums = jax.device_get(epoch_sums)
        skipped = int(sums.pop("skipped", 0))
        # After a mid-epoch resume the train metrics cover the steps run since the resume (train_steps).
        train_metrics = {k: float(v) / max(epoch_count - skipped, 1) for k, v in sums.items()}
        record = {"epoch": epoch, "step": step + 1, **{f"train_{k}": v for k, v in train_metrics.items()},
                  "train_steps": epoch_count, "images_per_s": seen / (time.time() - t0)}
        if "skipped" in metrics:
            record["skipped_steps"] = skipped
            if skipped:
                log.warning("epoch %d: %d steps with a non-finite loss or gradient were skipped", epoch, skipped)
        is_last = step + 1 == total_steps
        if epoch % config.eval_every_epochs == 0 or is_last:
            last_eval = run.evaluate(state)
            record.update(last_eval)
        if primary:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if epoch % config.checkpoint_every_epochs == 0 or is_last:
            improved = "top1" in record and record["top1"] > best_top1
            save({"top1": record.get("top1", -1.0)}, best=improved)
            best_top1 = max(best_top1, record.get("top1", -1.0))
        if bar is not None:
            bar.write(_format_record(record))
        else:
            log.info(_format_record(record))
        epoch_sums, epoch_count, t0, seen = {}, 0, time.time(), 0
        if config.stop_after_epoch and epoch >= config.stop_after_epoch and not is_last:
            if last_saved != step + 1:
                save()
            stopping_after_epoch = True

    try:
        for step in range(start_step, total_steps):
            state, metrics = train_step(state, run.teacher_vars, run.train_batch(step))
            first_bad, epoch_sums = _bookkeeping(first_bad, epoch_sums, metrics, step,
                                                 watch_nonfinite=not config.get("skip_nonfinite_steps"))
            if sync_each_step:
                jax.block_until_ready(state)
                check_finite()
            epoch_count += 1
            seen += batch_size
            at_log = (step + 1) % config.log_every_steps == 0 or step + 1 == total_steps
            if at_log:
                check_finite()
            if bar is not None and at_log:
                m = jax.device_get(metrics)
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}",
                                img_s=f"{seen / (time.time() - t0):.1f}")
            if bar is not None:
                bar.update(1)
            if every_steps and (step + 1) % every_steps == 0 and (step + 1) % steps_per_epoch:
                save()
            if (step + 1) % steps_per_epoch == 0:
                epoch_end()
            if stop.requested(at_log):
                if last_saved != step + 1:
                    save()
                ckpts.close()
                log.warning("stopped by %s after step %d with a checkpoint; run the same command again to resume",
                            stop.name, step + 1)
                return None
            if stopping_after_epoch:
                log.info("stopping after epoch %d as configured; run the same command again to resume",
                         config.stop_after_epoch)
                ckpts.close()
                return None
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
    check_finite()
    ckpts.close()

    # ---------------------------------------------------------------------------------------- results
    if last_eval is None:
        last_eval = run.evaluate(state)
    best = ckpts.best_metrics()
    results = dict(last_eval, best_top1=best["top1"] if best else last_eval["top1"], steps=int(state.step))
    exports = {"student": (state.params["student"], state.model_state["student"])}
    if state.ema is not None:
        exports["student_ema"] = (state.ema["params"], state.ema["model_state"])
    if primary:
        for name, (params, model_state) in exports.items():
            if not os.path.exists(os.path.join(workdir, name)):
                models.save_model(os.path.join(workdir, name), config.student.model, run.dataset.num_classes,
                                  dict(model_state, params=params), overrides=_overrides(config.student),
                                  source=os.path.abspath(workdir))
        write_atomic(os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
    return results


# ------------------------------------------------------------------------------------------------ reliability
def check_free_space(workdir, abstract_state):
    """Fail before compiling when the workdir's disk cannot hold a checkpoint (twice the state's bytes: orbax writes
    the new one before deleting the oldest)."""
    need = 2 * sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract_state))
    probe = os.path.abspath(workdir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free < need:
        raise UserError(f"only {free / 2**20:.1f} MiB free under {probe}; a checkpoint of this run needs about "
                        f"{need / 2**20:.1f} MiB: free some space or choose another --workdir")


def guard_nonfinite(train_step, abstract_state):
    """The train step, but a step whose loss, loss terms or gradient norm are not finite leaves the state as it was
    (except the step counter, so the data order goes on) and reports `skipped`=1 with zeroed metrics."""
    shardings = jax.tree_util.tree_map(lambda s: s.sharding, abstract_state)

    def step(state, teacher_vars, batch):
        new, metrics = train_step(state, teacher_vars, batch)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree_util.tree_leaves(metrics)]))
        kept = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, state).replace(step=new.step)
        metrics = {k: jnp.where(finite, v, jnp.zeros_like(v)) for k, v in metrics.items()}
        metrics["skipped"] = 1 - finite.astype(jnp.int32)
        return kept, metrics

    return jax.jit(step, out_shardings=(shardings, None), donate_argnums=(0,))


@functools.partial(jax.jit, static_argnames="watch_nonfinite")
def _bookkeeping(first_bad, sums, metrics, step, watch_nonfinite):
    """The loop's per-step bookkeeping on the device, in one dispatch and no host sync (done eagerly it was ~50
    small dispatches, 0.44 ms of host time per step on CPU): the epoch's running sums of the metrics, and, when
    watching, the metrics and step of the first step with a non-finite metric."""
    sums = metrics if not sums else jax.tree_util.tree_map(jnp.add, sums, metrics)
    if watch_nonfinite:
        finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in metrics.values()]))
        current = dict(metrics, found=~finite, step=jnp.asarray(step, jnp.int32))
        first_bad = current if first_bad is None else jax.tree_util.tree_map(
            lambda old, new: jnp.where(first_bad["found"], old, new), first_bad, current)
    return first_bad, sums


class _StopSignals:
    """SIGTERM/SIGINT ask the loop to stop after the current step (with a checkpoint); a second one stops at once.
    With several processes the request is agreed on at log steps, so every process saves the same step."""

    def __init__(self):
        self.name = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.name is not None:        # the second signal: the default behaviour
            self.restore()
            signal.raise_signal(signum)
            return
        self.name = signal.Signals(signum).name
        log.warning("%s received: stopping after this step with a checkpoint (again to stop at once)", self.name)

    def requested(self, at_log_step):
        if jax.process_count() == 1:
            return self.name is not None
        if not at_log_step:
            return False
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.asarray(self.name is not None, np.int32))
        if np.any(flags) and self.name is None:
            self.name = "a signal to another process"
        return bool(np.any(flags))

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# What may change when a run resumes: how it is run, logged and checkpointed, where its inputs live, and the fixes
# that the non-finite-loss error suggests. Any other difference from the run's config.json is refused.
RESUMABLE_KEYS = frozenset({
    "stop_after_epoch", "progress_bar", "log_every_steps", "checkpoint_every_epochs", "checkpoint_every_steps",
    "eval_every_epochs", "data.data_dir", "data.eval_batch_size", "teacher.path", "skip_nonfinite_steps",
    "optim.lr", "optim.clip_grad"})


def _flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def check_resume_config(config_path, config):
    """Before resuming: the command's config (a JSON-like dict) against the run's config.json. Returns the changed
    RESUMABLE_KEYS as 'key: old -> new' lines; a UserError for any other difference. Keys that only one side has
    (options added or removed by another version) are not compared."""
    if not os.path.exists(config_path):
        return []     # written by a version that kept no config.json
    stored, given = _flat(read_run_config(config_path)), _flat(config)
    differ = sorted(k for k in set(stored) & set(given) if stored[k] != given[k])
    refused = [k for k in differ if k not in RESUMABLE_KEYS]
    if refused:
        shown = "; ".join(f"{k}: {stored[k]!r} there, {given[k]!r} now" for k in refused[:3])
        raise UserError(f"this workdir holds a run with another config ({shown}{'; ...' if len(refused) > 3 else ''}"
                        f"); resume with the run's config ({config_path}) or use another workdir")
    return [f"{k}: {stored[k]!r} -> {given[k]!r}" for k in differ]


def read_run_config(config_path):
    """A run's config.json as a dict; a UserError if it cannot be read as a JSON object."""
    try:
        with open(config_path) as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise UserError(f"{config_path} is unreadable: {e}") from None
    return config


def write_atomic(path, text):
    """Write `text` to `path` through a temporary file and a rename, so that `path` is never half-written."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _truncate_metrics(path, step):
    """Drop metrics.jsonl lines of steps after `step` (and any cut-off last line), so none is written twice."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(json.dumps(record) + "\n")
    write_atomic(path, "".join(kept))


# ------------------------------------------------------------------------------------------------ eval
def metrics_sums(logits, labels, weight):
    """Weighted sums of correct top-1, top-5 and cross-entropy over a batch (padding has weight 0)."""
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    k = min(5, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    top1 = (topk[:, 0] == labels).astype(jnp.float32)
    top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
    return {"top1": jnp.sum(top1 * weight), "top5": jnp.sum(top5 * weight), "loss": jnp.sum(ce * weight),
            "count": jnp.sum(weight)}


def make_eval_step(model, transform, **jit_kwargs):
    """The jitted `(params, model_state, batch) -> metric sums` of `model` on `transform`ed images (eval mode)."""
    def eval_step(params, model_state, batch):
        logits, _ = model.apply(dict(model_state, params=params), transform(batch["image"]), train=False)
        return metrics_sums(logits, batch["label"], batch["weight"])
    return jax.jit(eval_step, **jit_kwargs)


def evaluate_split(eval_step, params, model_state, split, batch_size, mesh):
    """top1/top5 in percent and mean loss over a whole split."""
    totals = None
    for batch in data.eval_batches(split, batch_size, jax.process_index(), jax.process_count()):
        sums = eval_step(params, model_state, sharding.to_global(batch, mesh, local=True))
        sums = jax.device_get(sums)
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    count = float(totals["count"])
    return {"top1": 100.0 * float(totals["top1"]) / count, "top5": 100.0 * float(totals["top5"]) / count,
            "loss": float(totals["loss"]) / count}


def _progress(config, total_steps, start_step):
    if not config.progress_bar or jax.process_index() != 0:
        return None
    from tqdm import tqdm
    return tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)


def _format_record(r):
    parts = [f"epoch {r['epoch']}", f"loss {r['train_loss']:.4f}"]
    parts += [f"{k[6:]} {v:.4f}" for k, v in r.items() if k.startswith("train_") and k not in
              ("train_loss", "train_lr", "train_grad_norm", "train_steps")]
    if "top1" in r:
        parts += [f"top1 {r['top1']:.2f}", f"top5 {r['top5']:.2f}"]
    parts.append(f"{r['images_per_s']:.1f} img/s")
    return " | ".join(parts)
