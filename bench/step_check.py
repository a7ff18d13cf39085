"""The step check's work (the command is `python -m rsd_jax.step_check`): training steps of rsd_jax against a
PyTorch + timm re-statement of the reference's step.

    result = check(config, steps=3)    # {"ok": bool, "steps": [per-step records], "notes": [...], ...}

Every method (rsd, kd, dkd, dist, ofa, fitnet, crd, rkd, correlation, vanilla). Both sides start from the same
weights: timm builds the student and teacher, randomly initialised from --seed or loaded from --student/--teacher
state_dicts, and they are ported to Flax with the converter; the method's modules (projector, OFA branches, FitNet
aligners, CRD/CC embeddings and CRD's memory) start from rsd_jax's initialisation, loaded into the PyTorch
re-statements of bench/torch_distillers.py. CRD's contrast indices are the ones rsd_jax draws in that step.
Each step, rsd_jax's own augmentation (the run's transform, with the run's rng for that step, mixup/cutmix
included) makes the normalised images and targets; the JAX side runs `build_run(config).train_step` on the raw
batch (it draws the same pixels), the PyTorch side (bench/torch_reference.py) gets those pixels as they are.

Per step it reports the losses of both sides, the LR, and the max relative difference (max|a-b| / max|b| per
tensor) of every student and method parameter, BatchNorm statistic and method state (the worst by name), and of
the updates (parameter minus its start value). fp32 on CPU, highest matmul precision. The PyTorch step also runs in
float64 (unless noise_floor=False): rsd_jax is compared with that, and PyTorch float32 vs float64 is reported as the
floor, what float32 rounding alone does to this step, together with `jitter` (default 2) more float64 steps with
the student's conv and linear outputs rounded to a float32-sized grid: for steps that sit on a ReLU kink, where
PyTorch float32 may happen not to flip what rsd_jax's rounding flips. Each step starts both sides from rsd_jax's
weights and statistics (the optimizer state stays each side's own): chained, rounding compounds through BatchNorm
over a few values and ReLU kinks until PyTorch float32 and float64 themselves differ by ~0.5 after 3 smoke steps.
A step fails when a loss, parameter or state differs by more than max(TOLERANCE, FLOOR_FACTOR x floor), or the LR
by more than its tolerance.

What the check changes in the config, and says so: student drop_path_rate/drop_rate 0 (random masks cannot be
matched across frameworks); the checked steps start at epoch `epoch` (default: the first after warmup, so the LR
is large enough for updates to show) with fresh optimizer moments on both sides.
`torch_set` ("KEY=VALUE" items) changes the PyTorch side's config only (to see that a wrong setting is caught).

The check in four steps: `prepare` (configs, both sides built), `align_start` (the same weights, statistics and
optimizer step), per step `step_both` and `compare_step` (losses, parameters, statistics against tolerances and
floors), and `format_record` / `summary` (the report).
"""
import ast
import copy
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import torch
from flax import traverse_util
from jax.sharding import Mesh

from bench import torch_reference
from convert import core
from convert.from_torch import convert_state_dict, extract_state_dict, load_checkpoint, strip_prefixes
from rsd_jax import models, train, trees
from rsd_jax.errors import UserError

# Parameters get 1e-3: a step is discontinuous where an activation sits within float32 rounding of a ReLU kink, and
# such a flip moves the tensors it reaches (BatchNorm biases, whose value is one or two updates) by up to ~1e-2.
TOLERANCE = dict(loss=1e-4, param=1e-3, batch_stats=1e-4, lr=1e-6)
FLOOR_FACTOR = 10     # with the float64 side: a difference passes below max(TOLERANCE, FLOOR_FACTOR x float32's own),
#                       per loss term and per tensor
WORST = 3
NOISE_GRAD = 1e-6     # |grad| <= this x the tensor's max |grad|: zero up to float rounding
GRAD_ROUNDING = 1e-6  # float32 rounding of a gradient element, relative to its tensor's largest
MOVED = 0.5           # AdamW: an element whose step that rounding moves by > this x the tolerance: not compared
JITTER = 5e-7         # --jitter: extra float64 steps round every conv and linear output to a grid of 2 x this x the
#                       channel's RMS: float32's error of a K-term sum, ~sqrt(K) x 6e-8, at the low end (K = 64) of
#                       these layers' fan-in; a smoke step's loss then moves 1-5x as much as in PyTorch float32
JITTER_STEPS = 2      # how many such steps by default (0 with --nonoise_floor)


# ------------------------------------------------------------------------------------------------ mapping
def extra_template(state):
    """The method's variables in the JAX state: {"params": ..., other collections (batch_stats, memory)...}."""
    return dict(state.model_state["extra"], params=state.params["extra"])


def _load(module, variables, table=None):
    """Flax variables -> a torch module (strict), through convert.core's name rule (and a family table)."""
    sd = core.variables_to_state_dict(jax.device_get(variables), table)
    module.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in sd.items()}, strict=True)


def load_extra(ref, template):
    """Give the PyTorch method module the JAX side's variables."""
    if ref.extra is not None:
        _load(ref.extra, template)


def load_state(ref, config, state):
    """Give every PyTorch tensor of the step (student, method modules and their statistics) rsd_jax's value; the
    optimizer state stays each side's own."""
    _load(ref.student, dict(state.model_state["student"], params=state.params["student"]),
          core.family_table(models.family_of(config.student.model)))
    load_extra(ref, extra_template(state))


def torch_variables(ref, config, num_classes, template):
    """The PyTorch side's state in the Flax layout: ({student, extra} params, {student, extra} other collections)."""
    student = _student_to_flax(ref.student.state_dict(), config, num_classes)
    params = {"student": student["params"], "extra": {}}
    stats = {"student": {"batch_stats": student.get("batch_stats", {})}, "extra": {}}
    if ref.extra is not None:
        extra = core.state_dict_to_variables(_numpy(ref.extra.state_dict()), template)
        params["extra"] = extra.pop("params", {})
        stats["extra"] = extra
    return params, stats


def per_parameter(ref, config, num_classes, template, values):
    """{"student.<name>" / "extra.<name>": tensor} over the trained parameters -> the Flax layout ({student, extra});
    zero where a parameter has no value."""
    values = {k: (torch.zeros_like(p) if values.get(k) is None else values[k]) for k, p in ref.named_parameters()}
    sd = {k: values.get(f"student.{k}", v) for k, v in ref.student.state_dict().items()}
    out = {"student": _student_to_flax(sd, config, num_classes)["params"], "extra": {}}
    if ref.extra is not None and template.get("params"):
        extra = {k[len("extra."):]: v for k, v in values.items() if k.startswith("extra.")}
        out["extra"] = core.state_dict_to_variables(_numpy(extra), {"params": template["params"]})["params"]
    return out


def _student_to_flax(state_dict, config, num_classes):
    return convert_state_dict(state_dict, config.student.model, num_classes, dict(config.student.overrides))


def check_layout(state, params, stats):
    """The PyTorch side's variables in the Flax layout (torch_variables) have the JAX state's names and shapes.
    Checked once, at the start: neither side's layout changes in a step."""
    trees.check({"params": state.params, "state": state.model_state}, {"params": params, "state": stats},
                "step_check: the PyTorch side's state (in the Flax layout)", source="PyTorch", target="rsd_jax")


def adam_sensitivity(ref):
    """d(AdamW step) / d(gradient) per element after the last step: (1 - b1) / (1 - b1^t) / (sqrt(v_hat) + eps)."""
    names = {id(p): name for name, p in ref.named_parameters()}
    out = {}
    for group in ref.optimizer.param_groups:
        (b1, b2), eps = group["betas"], group["eps"]
        for p in group["params"]:
            state = ref.optimizer.state.get(p)
            if state:
                t = float(state["step"])
                v_hat = state["exp_avg_sq"] / (1 - b2 ** t)
                out[names[id(p)]] = (1 - b1) / (1 - b1 ** t) / (v_hat.sqrt() + eps)
    return out


def _numpy(state_dict):
    return {k: v.detach().cpu().double().numpy() if v.is_floating_point() else v.cpu().numpy()
            for k, v in state_dict.items()}


def flat(tree, prefix=""):
    """{"a/b/c": float64 array}, in the tree's own order (the report lists ties in it)."""
    return {prefix + "/".join(k): np.asarray(v, np.float64)
            for k, v in traverse_util.flatten_dict(dict(tree) if tree else {}).items()}


def rel(got, want):
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-12)) if want.size else 0.0


# ------------------------------------------------------------------------------------------------ 1. prepare
def configs(config, torch_set):
    """(the checked config, the PyTorch side's config, notes): student drop rates 0, a random teacher (replaced by
    the ported timm one), and `torch_set` on the PyTorch side only."""
    config = copy.deepcopy(config)
    notes = []
    with config.unlocked():
        for section in (config.student,):
            model = models.create_model(section.model, 10, **dict(section.overrides))   # defaults included
            changed = {k: 0.0 for k in ("drop_path_rate", "drop_rate") if getattr(model, k, 0.0)}
            if changed:
                section.overrides = ml_collections.ConfigDict(dict(section.overrides, **changed))
                notes.append(f"student {', '.join(sorted(changed))} set to 0 for the check")
        config.teacher.path = "random"     # replaced by the ported timm teacher below
    torch_config = copy.deepcopy(config)
    with torch_config.unlocked():
        for item in torch_set:
            key, _, value = item.partition("=")
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
            node = torch_config
            *parents, last = key.split(".")
            for p in parents:
                node = node[p]
            if last not in node:
                raise UserError(f"--torch_set: unknown config key {key!r}")
            node[last] = value
            notes.append(f"torch side only: {key}={value!r}")
    return config, torch_config, notes


@dataclasses.dataclass
class Sides:
    """Both sides of the check, built: the JAX run and the PyTorch references (float32 first, the float64 one
    that rsd_jax is compared with last, jittered float64 ones between)."""
    config: Any            # the checked config (the JAX side's)
    run: Any               # train.build_run(config)
    refs: list             # torch_reference.Reference per dtype
    pixels: Callable       # (rng, step, raw images, labels) -> the run's augmented (images, targets)
    notes: list

    @property
    def want(self):
        return self.refs[-1]


def prepare(config, torch_set=(), seed=0, student_file=None, teacher_file=None, noise_floor=True,
            jitter=JITTER_STEPS):
    """The configs and both sides: `build_run` on the JAX side; on the PyTorch side the reference step in float32
    and (noise_floor) in float64, plus `jitter` jittered float64 ones."""
    if jitter < 0:
        raise UserError(f"step_check: --jitter {jitter} is negative")
    config, torch_config, notes = configs(config, torch_set)
    if config.ema.decay:
        notes.append("EMA is not compared")
    torch.manual_seed(seed)
    run = train.build_run(config, Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    if config.distill.method == "rsd" and config.distill.rsd.feature != "pre_logits":
        raise UserError("step_check: RSD on pre_logits only (the reference's only working stage, docs/reference.md §7.1)")
    # The PyTorch side in float32, and (noise_floor) the same in float64: how far float32 rounding alone carries a
    # step here. rsd_jax is compared with the float64 side when there is one. The jittered float64 steps have every
    # conv and linear output rounded to a coarse grid (between the two): where a step is discontinuous (an
    # activation within rounding of a ReLU kink), they show how far such a nudge alone carries it, which PyTorch
    # float32 may happen to miss.
    dtypes = (torch.float32,) + (torch.float64,) * (jitter + 1) if noise_floor else (torch.float32,)
    read = lambda path: None if not path else strip_prefixes(extract_state_dict(load_checkpoint(path))[0])  # noqa: E731
    refs = [torch_reference.build(torch_config, run.dataset.num_classes, run.steps_per_epoch, len(run.dataset.train),
                                  seed=seed, student_state_dict=read(student_file),
                                  teacher_state_dict=read(teacher_file), dtype=dtype)
            for dtype in dtypes]
    for j, r in enumerate(refs[1:-1]):
        _round_outputs_to_grid(r.student, torch.Generator().manual_seed(seed * 1000 + j))

    @jax.jit
    def pixels(rng_data, step, images, labels):
        return run.parts.batch_transform(images, labels, train.step_rngs(rng_data, step, run.parts.num_groups)[0])

    return Sides(config, run, refs, pixels, notes + list(refs[0].notes))


def _round_outputs_to_grid(module, generator):
    """Every conv and linear layer of `module` rounds its output to a grid of JITTER x 2 x (the channel's RMS),
    shifted by a random fraction of a step per channel and call; the gradient passes unchanged. Like float32's
    rounding, it is a function of the value (identical examples stay identical, a constant channel stays constant)
    of the size of the sum's terms rather than of the result (values next to 0 move as much as any)."""
    def hook(layer, _, out):
        channel = 1 if isinstance(layer, torch.nn.Conv2d) else out.ndim - 1
        other = [d for d in range(out.ndim) if d != channel]
        step = 2 * JITTER * out.detach().pow(2).mean(dim=other, keepdim=True).sqrt()
        step = torch.where(step > 0, step, torch.ones_like(step))
        shift = torch.rand(step.shape, generator=generator, dtype=out.dtype) * step
        rounded = torch.round((out.detach() + shift) / step) * step - shift
        return out + (rounded - out.detach())

    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(hook)


# ------------------------------------------------------------------------------------------------ 2. align the start
@dataclasses.dataclass
class Start:
    """Where the checked steps begin, the same on both sides (the PyTorch references are aligned in place)."""
    state: Any             # the JAX TrainState at the first checked step
    teacher_vars: Any      # the ported timm teacher (None without a teacher)
    template: dict         # extra_template of the state: the method's variables
    step: int
    notes: list


def align_start(sides, seed=0, epoch=None, steps=1):
    """The same start on both sides: the timm teacher and student ported into the JAX state, the method's modules
    from rsd_jax's initialisation loaded into the PyTorch ones, and both optimizers at the first step of `epoch`
    (default: the first after warmup) with fresh moments."""
    config, run, refs = sides.config, sides.run, sides.refs
    num_classes = run.dataset.num_classes
    teacher_vars = None     # vanilla: no teacher on the JAX side (the PyTorch side runs one, unused)
    if run.parts.teacher is not None:
        teacher_vars = convert_state_dict(refs[0].teacher.state_dict(), config.teacher.model, num_classes,
                                          dict(config.teacher.overrides))
        teacher_vars = jax.device_put(teacher_vars, jax.tree_util.tree_leaves(run.teacher_vars)[0].sharding)
    state = run.init(jax.random.key(seed))
    template = extra_template(state)
    for r in refs:                   # the method's modules start from rsd_jax's initialisation
        load_extra(r, template)
    params, stats = torch_variables(refs[0], config, num_classes, template)
    check_layout(state, params, stats)
    model_state = dict(state.model_state, student=dict(state.model_state["student"],
                                                       **{k: v for k, v in stats["student"].items() if v}))
    epoch = config.optim.warmup_epochs if epoch is None else epoch
    start = int(epoch) * run.steps_per_epoch
    like = lambda new, old: jax.tree_util.tree_map(   # noqa: E731
        lambda n, o: jax.device_put(jnp.asarray(n, o.dtype), o.sharding), new, old)
    state = state.replace(params=like(params, state.params), model_state=like(model_state, state.model_state),
                          step=jnp.asarray(start, jnp.int32),
                          opt_state=optax.tree_utils.tree_set(state.opt_state, count=jnp.asarray(start, jnp.int32)))
    state = jax.tree_util.tree_map(jnp.copy, state)   # one buffer per leaf: the step donates its state
    for r in refs:
        r.step_count = start
        if start and config.optim.name == "adamw":     # torch AdamW at step `start`, fresh moments
            for group in r.optimizer.param_groups:
                for p in group["params"]:
                    r.optimizer.state[p] = {"step": torch.tensor(float(start)), "exp_avg": torch.zeros_like(p),
                                            "exp_avg_sq": torch.zeros_like(p)}
    notes = [f"steps {start}..{start + steps - 1} (epoch {epoch}) with fresh optimizer moments"] if start else []
    return Start(state, teacher_vars, template, start, notes)


# ------------------------------------------------------------------------------------------------ 3. one step
def step_both(sides, state, teacher_vars, step):
    """Step `step` on every side, from the same batch: rsd_jax's augmentation of it for the PyTorch side, the raw
    batch for the JAX step. Returns (the JAX state after it, its losses, each PyTorch side's losses)."""
    run = sides.run
    batch = run.train_batch(step)
    if not np.all(np.asarray(batch["label_mask"]) == 1):
        raise UserError("step_check needs fully labelled batches (data.labelled_fraction=1)")
    images, targets = sides.pixels(state.rng, state.step, batch["image"], batch["label"])
    torch_batch = {"image": np.asarray(images), "target": np.asarray(targets), "index": np.asarray(batch["index"])}
    if sides.config.distill.method == "crd":
        torch_batch["negatives"] = crd_negatives(run, state, batch)
    t_losses = [r.step(torch_batch) for r in sides.refs]
    state, metrics = run.train_step(state, teacher_vars, batch)
    jax.block_until_ready(state)
    return state, {k: float(v) for k, v in jax.device_get(metrics).items()}, t_losses


def crd_negatives(run, state, batch):
    """The contrast indices rsd_jax's CRD draws in this step (its sown intermediate), (B, K): the reference's
    dataset draws them, so the PyTorch side is given these."""
    _, _, extra_rngs = train.step_rngs(state.rng, state.step, run.parts.num_groups)
    variables = extra_template(state)
    embed = variables["params"]
    c = run.config.distill.crd
    index = jnp.asarray(batch["index"]).reshape(run.parts.num_groups, -1)
    g = index.shape[1]
    outs = [(None, {c.feature: jnp.zeros((g, embed[name]["kernel"].shape[0]))}) for name in ("embed_s", "embed_t")]

    def draw(rng, index):
        _, sown = run.parts.extra.apply(variables, *outs, {"index": index}, train=True, rngs={"dropout": rng},
                                  mutable=["intermediates", "memory"])
        return sown["intermediates"]["negatives"][0]

    return np.asarray(jax.vmap(draw, axis_name="group")(extra_rngs, index)).reshape(-1, c.k)


def rounding_masks(sides, template, lr, tp, masks):
    """`masks` ({name: bool array}, accumulated over the steps) with this step's elements set by rounding added.

    Under AdamW an element's step is lr m_hat / (sqrt(v_hat) + eps). float32 rounds a gradient by ~1e-6 of its
    tensor's largest (M); where that moves the step by more than half the tolerance (small or cancelling gradients:
    a tiny sqrt(v_hat)), or where the true (float64) gradient is zero up to rounding (the key part of a qkv bias:
    softmax ignores it), the step is set by rounding. Such elements are reported, not compared. (SGD turns such noise
    into noise-sized steps: nothing to exclude.)"""
    config, want, num_classes = sides.config, sides.want, sides.run.dataset.num_classes
    masks = dict(masks)
    if config.optim.name not in ("sgd", "momentum"):
        grads = flat(per_parameter(want, config, num_classes, template, want.grads))
        slope = flat(per_parameter(want, config, num_classes, template, adam_sensitivity(want)))
        for k, g in grads.items():
            top = np.max(np.abs(g))
            moved = lr * slope[k] * GRAD_ROUNDING * top > MOVED * TOLERANCE["param"] * np.max(np.abs(tp[k]))
            noise = (np.abs(g) <= NOISE_GRAD * top) | moved
            masks[k] = noise if k not in masks else masks[k] | noise
    masks.update({k: np.zeros(v.shape, bool) for k, v in tp.items() if k not in masks})
    return masks


def noise_floors(sides, template, t_losses, tp, ts, keep):
    """Per loss term and per tensor, the largest difference of PyTorch float32 and of the jittered float64 steps from
    plain float64: it sets the bar where it exceeds the tolerance. A tensor whose true gradient is 0 (a bias followed
    by BatchNorm) moves by rounding noise alone, so its relative difference is O(1) on any float32 side."""
    terms = [k for k in t_losses[-1] if k != "lr"]
    floors = {"loss": {}, "param": {}, "batch_stats": {}}
    for r, side_losses in zip(sides.refs[:-1], t_losses[:-1]):
        fp, fs = map(flat, torch_variables(r, sides.config, sides.run.dataset.num_classes, template))
        for cat, d in (("loss", {k: rel(np.float64(side_losses[k]), np.float64(t_losses[-1][k])) for k in terms}),
                       ("param", {k: rel(fp[k][keep[k]], tp[k][keep[k]]) for k in tp}),
                       ("batch_stats", {k: rel(fs[k], ts[k]) for k in ts})):
            for k, v in d.items():
                floors[cat][k] = max(floors[cat].get(k, 0.0), v)
    return floors


def compare_step(sides, template, state, start_params, masks, j_losses, t_losses, step):
    """The record of step `step`: rsd_jax (`state`, `j_losses`) against the float64 PyTorch side (the float32 one
    without it), each loss term, parameter (and its update from `start_params`) and state tensor against
    max(TOLERANCE, FLOOR_FACTOR x its floor), the LR against its tolerance. Returns (record, masks)."""
    jp, js = flat(state.params), flat(state.model_state)
    tp, ts = map(flat, torch_variables(sides.want, sides.config, sides.run.dataset.num_classes, template))
    masks = rounding_masks(sides, template, t_losses[-1]["lr"], tp, masks)
    keep = {k: ~masks[k] for k in tp}
    param_rel = {k: rel(jp[k][keep[k]], tp[k][keep[k]]) for k in tp}
    update_rel = {k: rel((jp[k] - start_params[k])[keep[k]], (tp[k] - start_params[k])[keep[k]]) for k in tp
                  if np.any(tp[k] != start_params[k])}
    noise_rel = {k: rel(jp[k][masks[k]], tp[k][masks[k]]) for k in tp if np.any(masks[k])}
    stats_rel = {k: rel(js[k], ts[k]) for k in ts}
    terms = [k for k in t_losses[-1] if k != "lr"]
    scalar_rel = lambda a, b: rel(np.float64(a), np.float64(b))   # noqa: E731
    loss_rel = {k: scalar_rel(j_losses[k], t_losses[-1][k]) for k in terms}
    lr_rel = scalar_rel(j_losses["lr"], t_losses[-1]["lr"])
    floors = noise_floors(sides, template, t_losses, tp, ts, keep)
    measured = {"loss": loss_rel, "param": param_rel, "batch_stats": stats_rel}
    excess = {cat: {k: v / max(TOLERANCE[cat], FLOOR_FACTOR * floors[cat].get(k, 0.0)) for k, v in d.items()}
              for cat, d in measured.items()}
    failed = [cat for cat, d in excess.items() if d and max(d.values()) > 1.0]
    if lr_rel > TOLERANCE["lr"]:
        failed.append("lr")
    worst = lambda d: sorted(d.items(), key=lambda kv: -kv[1])[:WORST]   # noqa: E731
    record = dict(step=step, lr_jax=j_losses["lr"], lr_torch=t_losses[-1]["lr"],
                  losses={k: dict(jax=j_losses[k], torch=t_losses[-1][k], rel=loss_rel[k]) for k in terms},
                  max_loss_rel=max(loss_rel.values()),
                  max_param_rel=max(param_rel.values()), worst_params=worst(param_rel),
                  max_update_rel=max(update_rel.values(), default=0.0), worst_updates=worst(update_rel),
                  max_batch_stats_rel=max(stats_rel.values(), default=0.0), worst_batch_stats=worst(stats_rel),
                  floor={cat: max(d.values(), default=0.0) for cat, d in floors.items()}, floors=floors,
                  worst_excess={cat: [(k, measured[cat][k], floors[cat].get(k, 0.0)) for k, _ in
                                      sorted(d.items(), key=lambda kv: -kv[1])[:1]] for cat, d in excess.items() if d},
                  compared=dict(student=sum(k.startswith("student/") for k in param_rel),
                                extra=sum(k.startswith("extra/") for k in param_rel),
                                state=len(stats_rel), memory=sum("/memory/" in k for k in stats_rel)),
                  zero_grad_elements={k: int(np.sum(m)) for k, m in masks.items() if np.any(m)},
                  zero_grad_rel=noise_rel, failed=failed)
    return record, masks


# ------------------------------------------------------------------------------------------------ 4. report
def comparison_notes(noise_floor, jitter):
    """What rsd_jax is compared with, and what the floor covers."""
    notes = []
    if noise_floor:
        notes.append("rsd_jax (float32) compared with the PyTorch step in float64; 'floor' is PyTorch float32 "
                     f"vs float64; each loss term and tensor passes below max(tolerance, {FLOOR_FACTOR} x its "
                     "floor)")
    if jitter:
        notes.append(f"the floor also covers {jitter} float64 step(s) with the student's conv and linear outputs "
                     f"rounded to {2 * JITTER:g} x their channel's RMS (randomly shifted)")
    return notes


def format_record(r):
    """A step's record as the lines the command prints."""
    losses = " ".join(f"{k} {v['jax']:.6g}/{v['torch']:.6g} ({v['rel']:.1e})" for k, v in r["losses"].items())
    names = lambda items: ", ".join(f"{k} {v:.1e}" for k, v in items)   # noqa: E731
    return (f"step {r['step']} | lr {r['lr_jax']:.6g}/{r['lr_torch']:.6g} | jax/torch {losses}\n"
            f"    params max rel {r['max_param_rel']:.2e} (worst: {names(r['worst_params'])})\n"
            f"    updates max rel {r['max_update_rel']:.2e} (worst: {names(r['worst_updates'])})\n"
            f"    state (BatchNorm statistics, memory) max rel {r['max_batch_stats_rel']:.2e} "
            f"(worst: {names(r['worst_batch_stats'])})"
            + (f"\n    floor (PyTorch float32, or jittered float64, vs float64), largest: loss "
               f"{r['floor']['loss']:.1e}, params {r['floor']['param']:.1e}, state {r['floor']['batch_stats']:.1e}; "
               "closest to its bar: "
               + ", ".join(f"{k} {v:.1e} (floor {f:.1e})" for items in r["worst_excess"].values()
                           for k, v, f in items) if any(r["floor"].values()) else "")
            + (f"\n    not compared (gradient zero up to rounding): "
               + ", ".join(f"{k} {n} elements (rel {r['zero_grad_rel'].get(k, 0.0):.1e})"
                           for k, n in r["zero_grad_elements"].items()) if r["zero_grad_elements"] else "")
            + (f"\n    FAILED: {', '.join(r['failed'])} above tolerance" if r["failed"] else ""))


def summary(result):
    """The lines after the steps: the notes and the verdict."""
    return [f"note: {note}" for note in result["notes"]] + [
        ("OK" if result["ok"] else "FAILED") + f": tolerance {TOLERANCE} (relative, fp32, CPU)"]


# ------------------------------------------------------------------------------------------------ the check
def check(config, steps=3, seed=0, epoch=None, torch_set=(), student_file=None, teacher_file=None, out=print,
          noise_floor=True, jitter=JITTER_STEPS):
    """Run the check; returns {"ok": bool, "steps": [per-step records], "notes": [...]}. `out` gets each step's
    lines as it ends."""
    jitter = jitter if noise_floor else 0
    with jax.default_matmul_precision("highest"):
        sides = prepare(config, torch_set, seed, student_file, teacher_file, noise_floor, jitter)
        start = align_start(sides, seed, epoch, steps)
        state, start_params, masks, records = start.state, flat(start.state.params), {}, []
        for step in range(start.step, start.step + steps):
            state, j_losses, t_losses = step_both(sides, state, start.teacher_vars, step)
            record, masks = compare_step(sides, start.template, state, start_params, masks, j_losses, t_losses, step)
            records.append(record)
            out(format_record(record))
            # The next step starts both sides from rsd_jax's weights: each line measures one step. Chained, float32
            # rounding alone compounds through BatchNorm over a few values and ReLU kinks (PyTorch float32 and
            # float64 drift up to ~0.5 apart in 3 steps of a smoke pair).
            for r in sides.refs:
                load_state(r, sides.config, state)
            start_params = flat(state.params)
    notes = sides.notes + start.notes + comparison_notes(noise_floor, jitter)
    return dict(ok=all(not r["failed"] for r in records), steps=records, notes=notes, tolerance=TOLERANCE,
                floor_factor=FLOOR_FACTOR)
