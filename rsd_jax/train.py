"""Training of one distillation run.

* `train_step(state, teacher_vars, batch, *, parts)` and `init_state(rng, parts)`: pure functions of the run's
  `Parts` (models, method, optimizer, transform). The student and the method's extra modules are trained; the
  teacher's variables are a separate argument that is never differentiated, updated or checkpointed.
* `build_run(config)`: checks the config, loads data and models, wires the parts and jits the steps.
* `train_and_evaluate(config, workdir)`: resumes, runs the loop (log, evaluate, checkpoint and stop as the
  `Schedule` says) and writes the results.
"""
import contextlib
import dataclasses
import datetime
import functools
import logging
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rsd_jax import (checkpoint, cli, data, distillers, evaluation, models, optim, provenance, reliability, run_models,
                     sharding, students, tensorboard)
from rsd_jax.config import check_counts, compute_dtype
from rsd_jax.data import augment
from rsd_jax.errors import UserError
from rsd_jax.rundir import RunDir, WorkdirLock, check_workdir
from rsd_jax.state import TrainState

log = logging.getLogger("rsd_jax")


# ------------------------------------------------------------------------------------------------ the step
@dataclasses.dataclass(frozen=True)
class Parts:
    """What the step computes with: fixed for a run, built by `build_run`."""
    student: Any                # flax Module
    teacher: Any                # flax Module, or None for methods without a teacher
    teacher_shapes: Any         # the teacher's (logits, features) for two examples (ShapeDtypeStructs), or None
    extra: Any                  # the method's module (a distillers.base.Method), or None for vanilla
    init_student: Callable      # fresh student variables -> those training starts from (student.init)
    tx: Any                     # the optax optimizer of the student and extra parameters
    lr_schedule: Callable       # step -> learning rate (logged)
    batch_transform: Callable   # (raw images, labels, augmentation key) -> (normalised images, targets)
    num_groups: int             # statistics groups per batch
    dtype: Any                  # compute dtype: float32, or bfloat16 on float32 parameters
    gt_weight: float            # weight of the ground-truth cross-entropy
    label_smoothing: float
    ema_decay: float            # 0: no EMA of the student


def step_rngs(rng_data, step, num_groups):
    """The keys of training step `step`: (augmentation, per-group student dropout (G,), per-group method (G,))."""
    aug_rng, dropout_rng = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(rng_data), step))
    student_rngs, extra_rngs = jax.vmap(jax.random.split, out_axes=1)(jax.random.split(dropout_rng, num_groups))
    return aug_rng, student_rngs, extra_rngs


def cast_floats(tree, dtype):
    """Floating leaves of `tree` in `dtype` (integer leaves, e.g. CRD's indices, untouched)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


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


def example_input(student):
    return jnp.zeros((2,) + models.input_shape(student)[1:])


def init_state(rng, parts):
    """The state training starts from: the student (fresh or from student.init), the method's modules, the
    optimizer state and the EMA; the step's keys derive from `rng`."""
    student_rng, extra_rng = jax.random.split(rng)
    example = example_input(parts.student)
    variables = dict(parts.init_student(parts.student.init(student_rng, example, train=False)))
    params = {"student": variables.pop("params"), "extra": {}}
    model_state = {"student": variables, "extra": {}}
    if parts.extra is not None:
        student_out = parts.student.apply(dict(variables, params=params["student"]), example, train=False)
        teacher_out = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), parts.teacher_shapes)
        # A method's modules reduce over the "group" axis of the step's vmap (pmean, all_gather): initialise them
        # as a vmap over one group, then drop that axis.
        extra_vars = jax.vmap(lambda: parts.extra.init(extra_rng, student_out, teacher_out,
                                                       parts.extra.example_batch(2), train=False),
                              axis_size=1, axis_name="group")()
        extra_vars = jax.tree_util.tree_map(lambda x: x[0], dict(extra_vars))
        params["extra"] = extra_vars.pop("params", {})
        model_state["extra"] = extra_vars
    ema = {"params": params["student"], "model_state": model_state["student"]} if parts.ema_decay else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=parts.tx.init(params), rng=jax.random.key_data(jax.random.fold_in(rng, 1)), ema=ema)


def prepare_batch(teacher_vars, batch, step, *, parts):
    """What every student of step `step` shares: the augmented images (in the compute dtype), their targets and the
    teacher's outputs. The augmentation's key comes from the batch's `data_rng` (the run's `seed`), so that students
    of other model seeds see the same pixels."""
    aug_rng = step_rngs(batch["data_rng"], step, parts.num_groups)[0]
    images, targets = parts.batch_transform(batch["image"], batch["label"], aug_rng)
    # Mixed precision (compute_dtype=bfloat16): models compute on bf16 copies of the float32 parameters and
    # inputs; gradients, optimizer state and BatchNorm statistics stay float32, and BatchNorm/LayerNorm
    # statistics, the CE and the RSD statistics are computed in float32. float32: every cast is a no-op.
    images = images.astype(parts.dtype)
    # The teacher sees exactly the student's augmented batch, in inference mode.
    teacher_out = jax.lax.stop_gradient(parts.teacher.apply(teacher_vars, images, train=False)) \
        if parts.teacher else None
    return images, targets, teacher_out


def train_step(state, teacher_vars, batch, *, parts):
    """One optimizer step on a global batch: (state, teacher variables, batch) -> (new state, metrics)."""
    return student_step(state, *prepare_batch(teacher_vars, batch, state.step, parts=parts), batch, parts=parts)


def student_step(state, images, targets, teacher_out, batch, *, parts):
    """The student's (and its method's) update from prepared inputs (`prepare_batch`): -> (new state, metrics)."""
    _, student_rngs, extra_rngs = step_rngs(state.rng, state.step, parts.num_groups)

    def group_loss(params, images, labels, teacher_out, student_rng, extra_rng):
        # One statistics group: BatchNorm and RSD statistics over these examples only, as one DDP rank.
        params = cast_floats(params, parts.dtype)
        student_out, new_student = parts.student.apply(
            dict(state.model_state["student"], params=params["student"]), images,
            train=True, mutable=list(state.model_state["student"]), rngs={"dropout": student_rng})
        terms = {"ce": parts.gt_weight * masked_cross_entropy(student_out[0], labels["label"], labels["label_mask"],
                                                              parts.label_smoothing)}
        new_extra = state.model_state["extra"]
        if parts.extra is not None:
            extra_terms, new_extra = parts.extra.apply(
                dict(state.model_state["extra"], params=params["extra"]), student_out, teacher_out, labels,
                train=True, mutable=list(state.model_state["extra"]), rngs={"dropout": extra_rng})
            terms.update(extra_terms)
        return sum(terms.values()), (terms, {"student": new_student, "extra": new_extra})

    def loss_fn(params):
        labels = {"label": targets, "label_mask": batch["label_mask"], "index": batch["index"]}
        losses, (terms, model_state) = jax.vmap(group_loss, in_axes=(None, 0, 0, 0, 0, 0), axis_name="group")(
            params, *_groups((images, labels, teacher_out), parts.num_groups), student_rngs, extra_rngs)
        return jnp.mean(losses), (jax.tree_util.tree_map(jnp.mean, terms), merge_groups(model_state))

    (loss, (terms, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = parts.tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              model_state=new_model_state, opt_state=opt_state)
    if parts.ema_decay:
        decay = parts.ema_decay
        current = {"params": new_state.params["student"], "model_state": new_state.model_state["student"]}
        new_state = new_state.replace(ema=jax.tree_util.tree_map(
            lambda e, x: decay * e + (1 - decay) * x, state.ema, current))
    metrics = dict(terms, loss=loss, lr=parts.lr_schedule(state.step), grad_norm=optax.tree.norm(grads))
    return new_state, metrics


# ------------------------------------------------------------------------------------------------ several students
def init_members(seeds, *, settings, per_setting):
    """The stacked state of N = len(settings) * per_setting members: member i starts as a single run of setting
    i // per_setting with model seed `seeds[i]` would."""
    return students.stack([init_state(jax.random.key(seeds[i]), settings[i // per_setting])
                           for i in range(len(settings) * per_setting)])


def members_step(state, teacher_vars, batch, *, settings, per_setting, design):
    """One step of every member (stacked `state`) on one global batch: one augmentation and one teacher pass, then
    each member's update, unrolled one after another or vmapped over the seeds of each setting (`design`).
    Metrics have a leading member axis."""
    images, targets, teacher_out = prepare_batch(teacher_vars, batch, state.step, parts=settings[0])
    aug_rng = step_rngs(batch["data_rng"], state.step, settings[0].num_groups)[0]
    new, metrics = [], []
    for j, parts in enumerate(settings):
        # The same pixels for every setting; only soft targets (mixup/cutmix with another label smoothing) differ.
        targets_j = targets if j == 0 else parts.batch_transform(batch["image"], batch["label"], aug_rng)[1]
        update = functools.partial(student_step, images=images, targets=targets_j, teacher_out=teacher_out,
                                   batch=batch, parts=parts)
        if design == "vmap":
            seeds = students.member(state, slice(j * per_setting, (j + 1) * per_setting))
            out, m = jax.vmap(lambda s: update(s.replace(step=state.step)))(seeds.replace(step=None))
            new.append(out.replace(step=state.step + 1))
            metrics.append(m)
        else:
            for i in range(j * per_setting, (j + 1) * per_setting):
                out, m = update(students.member(state, i))
                new.append(students.stack([out]))
                metrics.append(jax.tree_util.tree_map(lambda x: x[None], m))
    return students.concat(new), jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *metrics)


# ------------------------------------------------------------------------------------------------ the run
@dataclasses.dataclass
class Run:
    """Everything a run computes with, built from its config; no state and nothing written. A run of several
    students (`students.member_configs`) has a stacked state and metrics with a leading member axis."""
    config: Any
    mesh: Any
    dataset: data.Dataset
    parts: Parts              # of the first (or only) setting
    members: list             # the members' single-run configs ([config] for a single-student run)
    teacher_vars: Any         # on the devices, in the compute dtype; None without a teacher
    data_rng: Any             # key data of the augmentation (from `seed`), replicated; every batch carries it
    steps_per_epoch: int
    total_steps: int
    abstract_state: Any       # ShapeDtypeStructs with shardings
    init: Callable            # rng -> TrainState (born sharded); for several members: their N model seeds
    train_step: Callable      # (state, teacher_vars, batch) -> (state, metrics) (jitted, state donated)
    eval_step: Callable       # (student params, student model_state, batch) -> metric sums (jitted)

    @property
    def num_members(self):
        return len(self.members)

    def initial_state(self):
        """The state training starts from, from the model seed(s)."""
        if self.num_members == 1:
            return self.init(jax.random.key(students.model_seed(self.config)))
        return self.init([students.model_seed(c) for c in self.members])

    def member_state(self, state, i):
        """Member i's state (the state itself in a single-student run)."""
        return state if self.num_members == 1 else students.member(state, i)

    def train_batch(self, step):
        batch = data.train_batch(self.dataset.train, self.config.seed, step, self.config.data.batch_size,
                                 jax.process_index(), jax.process_count())
        return dict(sharding.to_global(batch, self.mesh, local=True), data_rng=self.data_rng)

    def evaluate_teacher(self):
        """Test metrics of the teacher with the student's eval transform (its resolution and resize), the images the
        student is evaluated on."""
        eval_step = evaluation.make_eval_step(self.parts.teacher, evaluation.eval_transform_for(self.config,
                                                                                                self.dataset),
                                              out_shardings=sharding.replicated(self.mesh))
        model_state = dict(self.teacher_vars)
        params = model_state.pop("params")
        return evaluation.evaluate_split(eval_step, params, model_state, self.dataset.test,
                                         self.config.data.eval_batch_size, self.mesh,
                                         desc="teacher" if self.config.progress_bar else None)

    def evaluate(self, state):
        """Test metrics of the student, and of its EMA (keys prefixed `ema_`) when EMA is on (of one member)."""
        split, batch_size = self.dataset.test, self.config.data.eval_batch_size
        out = evaluation.evaluate_split(self.eval_step, state.params["student"], state.model_state["student"], split,
                                        batch_size, self.mesh, desc="eval" if self.config.progress_bar else None)
        if state.ema is not None:
            ema = evaluation.evaluate_split(self.eval_step, state.ema["params"], state.ema["model_state"], split,
                                            batch_size, self.mesh,
                                            desc="eval (EMA)" if self.config.progress_bar else None)
            out.update({f"ema_{k}": v for k, v in ema.items()})
        return out

    def evaluate_members(self, state):
        """[test metrics of each member]."""
        return [self.evaluate(self.member_state(state, i)) for i in range(self.num_members)]


def _statistics_groups(config, num_train):
    """(steps per epoch, statistics groups per batch), checked."""
    batch_size = config.data.batch_size
    steps_per_epoch = num_train // batch_size
    if steps_per_epoch == 0:
        raise UserError(f"batch size {batch_size} is larger than the {num_train} training images")
    group_size = config.distill.group_size or batch_size
    if batch_size % group_size:
        raise UserError(f"batch size {batch_size} is not a multiple of distill.group_size {group_size}")
    return steps_per_epoch, batch_size // group_size


def _batch_transform(config, dataset, num_groups, replicated):
    size = config.data.image_size
    device_augment = augment.on_device(config.data.augment, dataset.host_augment)
    if augment.mixing(device_augment):   # mixup/cutmix within each statistics group, as the reference mixes each GPU's batch
        return augment.train_batch_transform(
            device_augment, dataset.mean, dataset.std, dataset.num_classes, config.distill.label_smoothing,
            size=size, group_size=config.data.batch_size // num_groups,
            pin=lambda draws: jax.lax.with_sharding_constraint(draws, replicated))
    image_transform = augment.train_transform(device_augment, dataset.mean, dataset.std, size=size)
    return lambda images, labels, rng: (image_transform(images, rng), labels)


def _awaited(fn, mesh):
    """`fn` whose result is ready when it returns, where the mesh needs that (sharding.sync_each_step)."""
    return (lambda *args: jax.block_until_ready(fn(*args))) if sharding.sync_each_step(mesh) else fn


def build_run(config, mesh=None, dataset=None):
    """Check the config, load data (or take `dataset`, e.g. synthetic batches for benchmarks) and models, wire the
    parts and jit the init, train and eval steps."""
    distillers.check_method(config.distill.method)
    check_counts(config)
    dtype = compute_dtype(config)
    mesh = mesh or sharding.make_mesh()
    sharding.check_batch_size(config.data.batch_size, mesh)
    sharding.check_batch_size(config.data.eval_batch_size, mesh)
    replicated = sharding.replicated(mesh)
    dataset = dataset or data.load(config.data)
    steps_per_epoch, num_groups = _statistics_groups(config, len(dataset.train))

    student = run_models.build_student(config, dataset.num_classes)
    if student.img_size != config.data.image_size:
        raise UserError(f"student input size {student.img_size} differs from data.image_size "
                        f"{config.data.image_size}")
    teacher, teacher_vars, teacher_shapes = None, None, None
    if distillers.needs_teacher(config.distill.method):
        teacher, teacher_vars = run_models.load_teacher(config, dataset.num_classes)
        # Inference precision: the teacher's variables are stored in the compute dtype (bf16 halves its reads).
        teacher_vars = jax.device_put(cast_floats(teacher_vars, dtype), replicated)
        teacher_shapes = jax.eval_shape(lambda v: teacher.apply(v, example_input(student), train=False),
                                        teacher_vars)
    context = distillers.Context(num_classes=dataset.num_classes, num_train_examples=len(dataset.train),
                                 teacher_dim=teacher_shapes[1]["pre_logits"].shape[-1] if teacher else 0)
    init_student = run_models.student_initializer(config, student, dataset.num_classes)

    def parts_of(c):     # what may differ between the settings of a sweep: scalars read at trace time
        return Parts(
            student=student, teacher=teacher, teacher_shapes=teacher_shapes,
            extra=distillers.build(c.distill.method, c.distill.get(c.distill.method), context),
            init_student=init_student, tx=optim.create(c.optim, steps_per_epoch),
            lr_schedule=optim.schedule(c.optim, steps_per_epoch),
            batch_transform=_batch_transform(c, dataset, num_groups, replicated), num_groups=num_groups,
            dtype=dtype, gt_weight=c.distill.gt_loss_weight, label_smoothing=c.distill.label_smoothing,
            ema_decay=c.ema.decay)

    members = students.member_configs(config)
    settings = [parts_of(c) for c in students.settings(config)] if len(members) > 1 else [parts_of(config)]
    if len(members) == 1:
        init, step, example = (functools.partial(init_state, parts=settings[0]),
                               functools.partial(train_step, parts=settings[0]), jax.random.key(0))
    else:
        per_setting = config.students
        init = functools.partial(init_members, settings=settings, per_setting=per_setting)
        step = functools.partial(members_step, settings=settings, per_setting=per_setting,
                                 design=students.design(config, jax.devices()[0].platform))
        example = jnp.zeros((len(members),), jnp.uint32)
    abstract_state = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                                            jax.eval_shape(init, example))
    state_sharding = jax.tree_util.tree_map(lambda s: s.sharding, abstract_state)
    if len(members) == 1:
        init = jax.jit(init, out_shardings=state_sharding)
    else:
        # Each member through a single run's init (one small program, the same for every seed, instead of N
        # initialisations in one: that compiled for minutes on CPU), then stacked.
        single_inits = [jax.jit(functools.partial(init_state, parts=p)) for p in settings]
        stack = jax.jit(students.stack, out_shardings=state_sharding)
        init = lambda seeds: stack([single_inits[i // per_setting](jax.random.key(int(seed)))  # noqa: E731
                                    for i, seed in enumerate(seeds)])
    batch_sharding = sharding.batch_sharding(mesh)
    batch_shardings = dict(image=batch_sharding, label=batch_sharding, label_mask=batch_sharding,
                           index=batch_sharding, data_rng=replicated)
    eval_transform = evaluation.eval_transform_for(config, dataset)
    return Run(
        config=config, mesh=mesh, dataset=dataset, parts=settings[0], members=members, teacher_vars=teacher_vars,
        data_rng=jax.device_put(jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), 1)), replicated),
        steps_per_epoch=steps_per_epoch, total_steps=config.optim.epochs * steps_per_epoch,
        abstract_state=abstract_state, init=_awaited(init, mesh),
        train_step=jax.jit(step, in_shardings=(state_sharding, replicated, batch_shardings),
                           out_shardings=(state_sharding, replicated), donate_argnums=(0,)),
        eval_step=evaluation.make_eval_step(student, eval_transform, out_shardings=replicated))


# ------------------------------------------------------------------------------------------------ the loop
@dataclasses.dataclass(frozen=True)
class Schedule:
    """When things happen, counted in steps done: one rule for every `*_every_steps` and `*_every_epochs`."""
    steps_per_epoch: int
    total_steps: int

    def epoch_end(self, step):
        return step % self.steps_per_epoch == 0

    def itstime(self, step, every_steps=0, every_epochs=0):
        """Whether `step` completes a period of `every_steps` steps or of `every_epochs` epochs (0: never), or the
        run."""
        return bool(step == self.total_steps or (every_steps and step % every_steps == 0)
                    or (every_epochs and self.epoch_end(step) and step // self.steps_per_epoch % every_epochs == 0))

    def stop_after(self, step, epoch):
        """Whether `stop_after_epoch=epoch` (0: never) stops the run after `step`, short of its end."""
        return bool(epoch and self.epoch_end(step) and step // self.steps_per_epoch >= epoch
                    and step != self.total_steps)


@dataclasses.dataclass(frozen=True)
class Tally:
    """The running epoch's metrics: sums kept on the device until the epoch ends, the first non-finite step (when
    watched), and the steps done since the epoch (or the resume) began."""
    sums: dict
    first_bad: Any
    steps: int
    started: float

    @staticmethod
    def start(first_bad=None):
        return Tally(sums={}, first_bad=first_bad, steps=0, started=time.time())

    def add(self, metrics, step, watch_nonfinite):
        first_bad, sums = reliability.bookkeeping(self.first_bad, self.sums, metrics, step,
                                                  watch_nonfinite=watch_nonfinite)
        return dataclasses.replace(self, sums=sums, first_bad=first_bad, steps=self.steps + 1)

    def raise_if_nonfinite(self, ckpts):
        def kept_step():
            ckpts.wait()
            return ckpts.latest_step()
        reliability.raise_if_nonfinite(self.first_bad, kept_step)


def epoch_records(run, tally, step, evals, elapsed_s):
    """The metrics.jsonl line of each member for the epoch ending at `step`: the mean training metrics (after a
    mid-epoch resume, of the steps run since: `train_steps`), images/s (of the step: images through it per
    second), the member's test metrics from `evals` (a list, or None if the epoch was not evaluated), `time` (UTC,
    ISO 8601) and `elapsed_s`, the run's training wall time so far (summed over its sessions)."""
    sums = jax.device_get(tally.sums)
    images_per_s = tally.steps * run.config.data.batch_size / (time.time() - tally.started)
    records = []
    for i in range(run.num_members):
        mine = {k: v if run.num_members == 1 else v[i] for k, v in sums.items()}
        skipped = int(mine.pop("skipped", 0))
        means = {f"train_{k}": float(v) / max(tally.steps - skipped, 1) for k, v in mine.items()}
        record = {"epoch": step // run.steps_per_epoch, "step": step, **means, "train_steps": tally.steps,
                  "images_per_s": images_per_s, "time": provenance.utc_now(), "elapsed_s": round(elapsed_s, 3)}
        if "skipped" in sums:
            record["skipped_steps"] = skipped
            if skipped:
                log.warning("epoch %d%s: %d steps with a non-finite loss or gradient were skipped", record["epoch"],
                            f" student {i}" if run.num_members > 1 else "", skipped)
        records.append(dict(record, **(evals[i] if evals else {})))
    return records


def save(ckpts, state, tally, top1, best_top1):
    """Checkpoint `state` (never a non-finite one; also as the best when `top1` beats `best_top1`); returns the best
    top-1 so far. Several students: `top1` is their mean."""
    tally.raise_if_nonfinite(ckpts)
    top1 = -1.0 if top1 is None else top1
    ckpts.save(state, {"top1": top1}, best=top1 > best_top1)
    return max(best_top1, top1)


def train_and_evaluate(config, workdir):
    """Train (or resume) the run in `workdir`; returns its final metrics (also in `workdir/results.json`), or None
    when it stopped early (stop_after_epoch, SIGTERM/SIGINT) with a checkpoint to resume from. A run of several
    students returns the summary of `students.summary`."""
    check_workdir(workdir)
    with WorkdirLock(workdir):     # one run per workdir, refused before anything compiles
        run = build_run(config)    # a bad config is refused before log.txt or env.json is written
        reliability.check_free_space(workdir, run.abstract_state)    # so is a full disk, before anything compiles
        if run.num_members > 1:    # students that do not fit the device: refused before anything is written
            compiled = students.compile_if_fits(run)
            if not config.get("skip_nonfinite_steps"):    # (that wraps the step in a jit of its own)
                run = dataclasses.replace(run, train_step=compiled)
        primary = jax.process_index() == 0
        with cli.log_file(workdir, primary), provenance.recorded(workdir, primary) as session:
            results = _train_and_evaluate(run, workdir)
            session.outcome = "stopped" if results is None else "finished"
            return results


def member_dirs(run, workdir):
    """The RunDir of each member: the workdir itself, or <workdir>/students/<i>/ for several students."""
    primary = jax.process_index() == 0     # only process 0 writes files but checkpoints
    if run.num_members == 1:
        return [RunDir(workdir, primary)]
    return [RunDir(os.path.join(workdir, "students", str(i)), primary, member=(i, run.num_members))
            for i in range(run.num_members)]


def _train_and_evaluate(run, workdir):
    config = run.config
    n_student, n_extra = (sum(x.size for x in jax.tree_util.tree_leaves(run.abstract_state.params[k]))
                          // run.num_members for k in ("student", "extra"))
    log.info("student %s: %.2fM parameters; %s extra: %.2fM%s", config.student.model, n_student / 1e6,
             config.distill.method, n_extra / 1e6,
             f"; {run.num_members} students in one step" if run.num_members > 1 else "")
    rundir = RunDir(workdir, primary=jax.process_index() == 0)
    dirs = member_dirs(run, workdir)
    ckpts = checkpoint.RunCheckpoints(workdir)
    resuming = ckpts.latest_step() is not None
    changed = rundir.start(config, resuming=resuming)
    if changed:
        log.info("resuming with changed settings: %s", "; ".join(changed))
    if run.num_members > 1:
        for d, c in zip(dirs, run.members):
            d.start(c, resuming=resuming)
    state = ckpts.restore(run.abstract_state)
    if state is None:
        state = run.initial_state()
    else:
        log.info("resumed from step %d", int(state.step))
    for d in dirs:
        d.truncate_metrics(int(state.step))
    kept = dirs[0].records()
    best = ckpts.best_metrics()

    teacher = _teacher_metrics(run, kept)
    # TensorBoard: one run per student directory (TensorBoard lists the sub-directories of --logdir as runs)
    with contextlib.ExitStack() as boards:
        writers = [boards.enter_context(tensorboard.EventWriter(os.path.join(d.workdir, "tb"),
                                                                keep_until=int(state.step), primary=d.primary))
                   for d in dirs]
        state, last_evals = _loop(run, state, ckpts, dirs, best["top1"] if best else -1.0,
                                  elapsed_before=kept[-1].get("elapsed_s", 0.0) if kept else 0.0, boards=writers,
                                  first_record={} if kept else teacher)
    if state is None:
        return None
    if last_evals is None:     # resumed after the last step
        last_evals = run.evaluate_members(state)
    best = ckpts.best_metrics()
    results = []
    for i, (d, c, last_eval) in enumerate(zip(dirs, run.members, last_evals)):
        if run.num_members == 1:
            best_top1 = best["top1"] if best else last_eval["top1"]
        else:     # the best checkpoint is the students' best mean; each student's own best is in its metrics
            best_top1 = d.best_top1(default=last_eval["top1"])
        results.append(dict(last_eval, best_top1=best_top1, steps=int(state.step),
                            **{k: v for k, v in teacher.items() if k != "teacher_loss"}))
        member = run.member_state(state, i)
        exports = {"student": (member.params["student"], member.model_state["student"])}
        if member.ema is not None:
            exports["student_ema"] = (member.ema["params"], member.ema["model_state"])
        d.finish(c, run.dataset.num_classes, exports, results[-1])
    if run.num_members == 1:
        return results[0]
    summary = students.summary(config, results)
    rundir.write_results(summary)
    return summary


def _teacher_metrics(run, records):
    """{"teacher_top1", "teacher_top5", "teacher_loss"} of the run's teacher ({} without one): from the first
    metrics.jsonl record, which holds them once written, else evaluated now (before training; logged)."""
    if run.parts.teacher is None:
        return {}
    if records and "teacher_top1" in records[0]:
        return {k: records[0][k] for k in ("teacher_top1", "teacher_top5", "teacher_loss") if k in records[0]}
    log.info("evaluating the teacher ...")
    started = time.time()
    metrics = {f"teacher_{k}": v for k, v in run.evaluate_teacher().items()}
    log.info("teacher %s: top1 %.2f | top5 %.2f | loss %.4f (%s test split at the student's eval transform, %.1f s)",
             run.config.teacher.model, metrics["teacher_top1"], metrics["teacher_top5"], metrics["teacher_loss"],
             run.config.data.name, time.time() - started)
    return metrics


def _loop(run, state, ckpts, dirs, best_top1, elapsed_before, boards, first_record):
    """Train from `state` to the end: (final state, the last evaluation of each member), or (None, None) after a
    checkpoint when asked to stop early. `dirs`: each member's RunDir; `elapsed_before`: the training wall time of
    the sessions before this one; `boards`: each member's TensorBoard writer (the step's metrics at log steps, each
    metrics.jsonl record at its step); `first_record`: fields for the next records written (the teacher's
    evaluation, in the run's first record)."""
    session_started = time.time()
    config, schedule = run.config, Schedule(run.steps_per_epoch, run.total_steps)
    skip = config.get("skip_nonfinite_steps")
    step_fn = reliability.skip_nonfinite(run.train_step, run.abstract_state) if skip else run.train_step
    sync_each_step = sharding.sync_each_step(run.mesh)
    start = int(state.step)
    tally, saved, last_evals = Tally.start(), start, None
    progress = _Progress(config, run.total_steps, start, run.steps_per_epoch)
    signals = reliability.StopSignals()
    try:
        for step in range(start, run.total_steps):
            if step == start:
                log.info("compiling the training step ...")
                compile_started = time.time()
            state, metrics = step_fn(state, run.teacher_vars, run.train_batch(step))
            if step == start:
                jax.block_until_ready(state)
                log.info("compiling the training step ... done in %.1f s (its first step included)",
                         time.time() - compile_started)
            tally = tally.add(metrics, step, watch_nonfinite=not skip)
            done = step + 1
            at_log = schedule.itstime(done, every_steps=config.log_every_steps)
            if sync_each_step:        # there a non-finite loss is caught at its step, elsewhere at log steps
                jax.block_until_ready(state)
            if sync_each_step or at_log or schedule.epoch_end(done):
                tally.raise_if_nonfinite(ckpts)
            logged = jax.device_get(metrics) if at_log else None
            shown = logged if logged is None or run.num_members == 1 else \
                {k: float(np.mean(v)) for k, v in logged.items()}
            images_per_s = progress.step(done, shown)
            for i, board in enumerate(boards if logged is not None else ()):
                mine = logged if run.num_members == 1 else {k: v[i] for k, v in logged.items()}
                board.scalars(done, {f"train/{k}": v for k, v in dict(mine, images_per_s=images_per_s).items()
                                     if v is not None})
            records = []
            if schedule.epoch_end(done):
                evaluated = schedule.itstime(done, every_epochs=config.eval_every_epochs)
                last_evals = run.evaluate_members(state) if evaluated else last_evals
                elapsed = elapsed_before + time.time() - session_started
                records = [dict(r, **first_record)
                           for r in epoch_records(run, tally, done, last_evals if evaluated else None, elapsed)]
                first_record = {}
                for d, board, record in zip(dirs, boards, records):   # before its checkpoint: a resume drops lines
                    d.append_metrics(record)                           # past its step
                    board.scalars(done, tensorboard.epoch_scalars(record))
                tally = Tally.start(tally.first_bad)
            top1 = float(np.mean([r["top1"] for r in records])) if records and "top1" in records[0] else None
            # checkpoint_every_steps between epoch ends, checkpoint_every_epochs at them (and the last step)
            if schedule.itstime(done, every_steps=0 if schedule.epoch_end(done) else config.checkpoint_every_steps,
                                every_epochs=config.checkpoint_every_epochs):
                best_top1, saved = save(ckpts, state, tally, top1, best_top1), done
            for i, record in enumerate(records):
                progress.write(_format_record(record, i if run.num_members > 1 else None))
            signalled = signals.requested(at_log)      # every step: several processes agree at log steps
            if signalled or schedule.stop_after(done, config.stop_after_epoch):
                if saved != done:
                    save(ckpts, state, tally, None, best_top1)
                ckpts.close()
                if signalled:
                    log.warning("stopped by %s after step %d with a checkpoint; run the same command again to "
                                "resume", signals.name, done)
                else:
                    log.info("stopping after epoch %d as configured; run the same command again to resume",
                             config.stop_after_epoch)
                return None, None
    finally:
        signals.restore()
        progress.close()
    tally.raise_if_nonfinite(ckpts)
    ckpts.close()
    return state, last_evals


class _Progress:
    """Process 0's progress: a tqdm bar when `progress_bar` and stderr is a terminal; elsewhere (nohup, a batch job,
    a file) one plain log line every `log_every_steps`, so that log files get no carriage returns. Log messages go
    through the bar while it is shown, so that they do not break it."""

    def __init__(self, config, total_steps, start_step, steps_per_epoch):
        self.total, self.steps_per_epoch, self.batch_size = total_steps, steps_per_epoch, config.data.batch_size
        self.primary = jax.process_index() == 0
        self.last = self.origin = None       # (step, time) of the last log step, and of the session's first step
        self.bar, self.redirect = None, contextlib.nullcontext()
        if config.progress_bar and self.primary and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)
            self.redirect = logging_redirect_tqdm([log])
        self.redirect.__enter__()

    def step(self, done, metrics):
        """After step `done` (counted from 1); `metrics` (on the host) at log steps, else None. Returns the images/s
        since the previous log step (None between log steps)."""
        now = time.time()
        if self.bar is not None:
            self.bar.update(1)
        if self.origin is None:      # the session's first step, compilation included: not a rate
            self.last = self.origin = (done, now)
        if metrics is None or done == self.last[0]:
            return None
        images_per_s = (done - self.last[0]) * self.batch_size / (now - self.last[1])
        self.last = (done, now)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", img_s=f"{images_per_s:.1f}")
        elif self.primary:
            eta = (self.total - done) * (now - self.origin[1]) / (done - self.origin[0])
            log.info("step %d/%d | epoch %d | loss %.4f | lr %.2e | %.1f img/s | ETA %s", done, self.total,
                     (done - 1) // self.steps_per_epoch + 1, metrics["loss"], metrics["lr"], images_per_s,
                     datetime.timedelta(seconds=round(eta)))
        return images_per_s

    def write(self, line):
        if self.primary:
            log.info(line)

    def close(self):
        self.redirect.__exit__(None, None, None)
        if self.bar is not None:
            self.bar.close()


def _format_record(r, member=None):
    parts = [f"epoch {r['epoch']}" + (f" student {member}" if member is not None else ""),
             f"loss {r['train_loss']:.4f}"]
    parts += [f"{k[6:]} {v:.4f}" for k, v in r.items() if k.startswith("train_") and k not in
              ("train_loss", "train_lr", "train_grad_norm", "train_steps")]
    if "top1" in r:
        parts += [f"top1 {r['top1']:.2f}", f"top5 {r['top5']:.2f}"]
    parts.append(f"{r['images_per_s']:.1f} img/s")
    return " | ".join(parts)
