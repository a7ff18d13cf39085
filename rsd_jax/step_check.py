"""Fidelity check: a few training steps of rsd_jax against a PyTorch + timm re-statement of the reference's step.

  python -m rsd_jax.step_check --config configs/swin_resnet18.py:smoke [--steps 3] [--seed 0] [--epoch E] [--json]
      [--student S.pth] [--teacher T.pth] [--config.distill.method=kd] [--torch_set distill.rsd.kappa=0.02]

Both sides start from the same weights: timm builds the student, teacher and (RSD) projector, randomly initialised
from --seed or loaded from --student/--teacher state_dicts, and every tensor is ported to Flax with the converter.
Each step, rsd_jax's own augmentation (the run's transform, with the run's rng for that step, mixup/cutmix
included) makes the normalised images and targets; the JAX side runs `build_run(config).train_step` on the raw
batch (it draws the same pixels), the PyTorch side (bench/torch_reference.py) gets those pixels as they are.
Per step it prints the losses of both sides, the LR, and the max relative difference (max|a-b| / max|b| per
tensor) of every student and extra parameter and BatchNorm statistic (the worst by name), and of the updates
(parameter minus its start value). fp32 on CPU, highest matmul precision. Exit status 1 when a loss, parameter,
statistic or LR differs by more than TOLERANCE; 2 for a bad command line.

What the check changes in the config, and says so: student drop_path_rate/drop_rate 0 (random masks cannot be
matched across frameworks); the checked steps start at epoch --epoch (default: the first after warmup, so the LR
is large enough for updates to show) with fresh optimizer moments on both sides.
`--torch_set KEY=VALUE` changes the PyTorch side's config only (to see that a wrong setting is caught).
"""
import ast
import copy
import json
import sys

import numpy as np

TOLERANCE = dict(loss=1e-4, param=1e-4, batch_stats=1e-4, lr=1e-6)
WORST = 3
NOISE_GRAD = 1e-6     # |grad| <= this x the tensor's max |grad|: zero up to float rounding


# ------------------------------------------------------------------------------------------------ mapping
def projector_to_flax(projector):
    """torch Sequential(Linear, BatchNorm1d, GELU, Linear) -> ({fc1, bn, fc2} params, {bn} batch_stats)."""
    fc1, bn, _, fc2 = projector
    a = lambda t: np.array(t.detach().cpu().numpy(), np.float32)   # noqa: E731
    params = {"fc1": {"kernel": a(fc1.weight).T}, "bn": {"scale": a(bn.weight), "bias": a(bn.bias)},
              "fc2": {"kernel": a(fc2.weight).T}}
    stats = {"bn": {"mean": a(bn.running_mean), "var": a(bn.running_var)}}
    return params, stats


def torch_variables(ref, config, num_classes):
    """The PyTorch side's trainable state in the Flax layout: {params: {student, extra}, batch_stats: {...}}."""
    from convert.from_torch import convert_state_dict
    student = convert_state_dict(ref.student.state_dict(), config.student.model, num_classes,
                                 dict(config.student.overrides))
    params = {"student": student["params"], "extra": {}}
    stats = {"student": student.get("batch_stats", {}), "extra": {}}
    if ref.projector is not None:
        p, s = projector_to_flax(ref.projector)
        params["extra"], stats["extra"] = {"projector": p}, {"projector": s}
    return params, stats


def torch_grads(ref, config, num_classes):
    """The last torch step's gradients in the Flax layout ({student, extra}); None where a parameter had none."""
    import torch

    from convert.from_torch import convert_state_dict
    grads = ref.grads
    sd = {k: (grads.get(f"student.{k}") if f"student.{k}" in grads else v)
          for k, v in ref.student.state_dict().items()}
    sd = {k: torch.zeros_like(ref.student.state_dict()[k]) if v is None else v for k, v in sd.items()}
    out = {"student": convert_state_dict(sd, config.student.model, num_classes,
                                         dict(config.student.overrides))["params"], "extra": {}}
    if ref.projector is not None:
        g = lambda i, n: np.array(grads[f"projector.{i}.{n}"].numpy(), np.float32)   # noqa: E731
        out["extra"] = {"projector": {"fc1": {"kernel": g(0, "weight").T},
                                      "bn": {"scale": g(1, "weight"), "bias": g(1, "bias")},
                                      "fc2": {"kernel": g(3, "weight").T}}}
    return out


def flat(tree, prefix=""):
    from flax import traverse_util
    return {prefix + "/".join(k): np.asarray(v, np.float64)
            for k, v in traverse_util.flatten_dict(dict(tree) if tree else {}).items()}


def rel(got, want):
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-12)) if want.size else 0.0


# ------------------------------------------------------------------------------------------------ check
def _prepare(config, torch_set):
    import ml_collections
    config = copy.deepcopy(config)
    notes = []
    from rsd_jax import models
    with config.unlocked():
        for section in (config.student,):
            fields = models.model_kwargs(section.model, 10, **dict(section.overrides))
            changed = {k: 0.0 for k in ("drop_path_rate", "drop_rate") if fields.get(k)}
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
                from rsd_jax.errors import UserError
                raise UserError(f"--torch_set: unknown config key {key!r}")
            node[last] = value
            notes.append(f"torch side only: {key}={value!r}")
    return config, torch_config, notes


def check(config, steps=3, seed=0, epoch=None, torch_set=(), student_file=None, teacher_file=None, out=print):
    """Run the check; returns {"ok": bool, "steps": [per-step records], "notes": [...]}."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    from jax.sharding import Mesh

    from bench import torch_reference
    from convert.from_torch import convert_state_dict, extract_state_dict, load_checkpoint, strip_prefixes
    from rsd_jax import train
    from rsd_jax.data import augment
    from rsd_jax.errors import UserError

    config, torch_config, notes = _prepare(config, torch_set)
    method = config.distill.method
    if method not in ("rsd", "kd", "vanilla"):
        raise UserError(f"step_check covers rsd, kd and vanilla, not {method!r}")
    if config.ema.decay:
        notes.append("EMA is not compared")
    torch.manual_seed(seed)

    def read(path):
        return None if not path else strip_prefixes(extract_state_dict(load_checkpoint(path))[0])

    with jax.default_matmul_precision("highest"):
        mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
        run = train.build_run(config, mesh)
        num_classes, spe = run.dataset.num_classes, run.steps_per_epoch
        ref = torch_reference.build(torch_config, num_classes, spe, seed=seed, student_state_dict=read(student_file),
                                    teacher_state_dict=read(teacher_file))
        notes += list(ref.notes)
        if method == "rsd" and config.distill.rsd.feature != "pre_logits":
            raise UserError("step_check: RSD on pre_logits only (the reference's only working stage, RSD_SPEC §7.1)")
        if method == "rsd":
            notes.append("RSD on the pre-logit stage only (spec §7.1); CE x gt_loss_weight "
                         f"= {config.distill.gt_loss_weight} (spec §7.2: the reference ignores it)")

        # ------------------------------------------------------------------------ the same start on both sides
        teacher_vars = convert_state_dict(ref.teacher.state_dict(), config.teacher.model, num_classes,
                                          dict(config.teacher.overrides))
        teacher_vars = jax.device_put(teacher_vars, jax.tree_util.tree_leaves(run.teacher_vars)[0].sharding)
        params, stats = torch_variables(ref, config, num_classes)
        state = run.init(jax.random.key(seed))
        if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(state.params):
            raise UserError("step_check: the ported parameters do not have the Flax state's structure")
        model_state = jax.tree_util.tree_map(lambda x: x, state.model_state)
        if stats["student"]:
            model_state["student"] = dict(model_state["student"], batch_stats=stats["student"])
        if stats["extra"]:
            model_state["extra"] = dict(model_state["extra"], batch_stats=stats["extra"])
        epoch = config.optim.warmup_epochs if epoch is None else epoch
        start = int(epoch) * spe
        like = lambda new, old: jax.tree_util.tree_map(   # noqa: E731
            lambda n, o: jax.device_put(jnp.asarray(n, o.dtype), o.sharding), new, old)
        state = state.replace(params=like(params, state.params), model_state=like(model_state, state.model_state),
                              step=jnp.asarray(start, jnp.int32),
                              opt_state=optax.tree_utils.tree_set(state.opt_state,
                                                                  count=jnp.asarray(start, jnp.int32)))
        state = jax.tree_util.tree_map(jnp.copy, state)   # one buffer per leaf: the step donates its state
        ref.step_count = start
        if start and config.optim.name == "adamw":     # torch AdamW at step `start`, fresh moments
            for group in ref.optimizer.param_groups:
                for p in group["params"]:
                    ref.optimizer.state[p] = {"step": torch.tensor(float(start)), "exp_avg": torch.zeros_like(p),
                                              "exp_avg_sq": torch.zeros_like(p)}
        if start:
            notes.append(f"steps {start}..{start + steps - 1} (epoch {epoch}) with fresh optimizer moments")

        # ------------------------------------------------------------------------ the run's own augmentation
        ds, aug = run.dataset, config.data.augment
        if augment.mixing(aug):
            group = config.distill.group_size or config.data.batch_size
            transform = augment.train_batch_transform(aug, ds.mean, ds.std, num_classes,
                                                      config.distill.label_smoothing, size=config.data.image_size,
                                                      group_size=group)
        else:
            image_fn = augment.train_transform(aug, ds.mean, ds.std, size=config.data.image_size)
            transform = lambda images, labels, rng: (image_fn(images, rng), labels)   # noqa: E731

        @jax.jit
        def pixels(rng_data, step, images, labels):
            aug_rng, _ = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(rng_data), step))
            return transform(images, labels, aug_rng)

        start_params = flat(state.params)
        records, ok, masks = [], True, {}
        adaptive = config.optim.name not in ("sgd", "momentum")
        for i in range(steps):
            step = start + i
            batch = run.train_batch(step)
            if not np.all(np.asarray(batch["label_mask"]) == 1):
                raise UserError("step_check needs fully labelled batches (data.labelled_fraction=1)")
            images, targets = pixels(state.rng, state.step, batch["image"], batch["label"])
            t_losses = ref.step({"image": np.asarray(images), "target": np.asarray(targets)})
            state, metrics = run.train_step(state, teacher_vars, batch)
            jax.block_until_ready(state)
            j_losses = {k: float(v) for k, v in jax.device_get(metrics).items()}
            t_params, t_stats = torch_variables(ref, config, num_classes)
            jp, tp = flat(state.params), flat(t_params)
            js = flat({k: v.get("batch_stats", {}) for k, v in state.model_state.items()})
            ts = flat(t_stats)
            if set(jp) != set(tp) or set(js) != set(ts):
                raise UserError(f"step_check: parameter names differ: {sorted(set(jp) ^ set(tp) | set(js) ^ set(ts))}")
            # Under Adam, elements whose gradient is zero up to rounding (the key part of a qkv bias: softmax ignores
            # it; torch may round it to exactly 0 where XLA leaves 1e-10) take steps of up to the LR in a direction
            # set by rounding noise: reported, not compared. (SGD turns such noise into noise-sized steps: nothing to exclude.)
            for k, g in flat(torch_grads(ref, config, num_classes)).items() if adaptive else ():
                noise = np.abs(g) <= NOISE_GRAD * np.max(np.abs(g))
                masks[k] = noise if k not in masks else masks[k] | noise
            masks.update({k: np.zeros(v.shape, bool) for k, v in tp.items() if k not in masks})
            keep = {k: ~masks[k] for k in tp}
            param_rel = {k: rel(jp[k][keep[k]], tp[k][keep[k]]) for k in tp}
            update_rel = {k: rel((jp[k] - start_params[k])[keep[k]], (tp[k] - start_params[k])[keep[k]]) for k in tp
                          if np.any(tp[k] != start_params[k])}
            noise_rel = {k: rel(jp[k][masks[k]], tp[k][masks[k]]) for k in tp if np.any(masks[k])}
            stats_rel = {k: rel(js[k], ts[k]) for k in ts}
            terms = [k for k in t_losses if k != "lr"]
            loss_rel = {k: abs(j_losses[k] - t_losses[k]) / max(abs(t_losses[k]), 1e-12) for k in terms}
            lr_rel = abs(j_losses["lr"] - t_losses["lr"]) / max(abs(t_losses["lr"]), 1e-12)
            worst = lambda d: sorted(d.items(), key=lambda kv: -kv[1])[:WORST]   # noqa: E731
            failed = [name for name, d, tol in (("loss", loss_rel, TOLERANCE["loss"]),
                                                 ("param", param_rel, TOLERANCE["param"]),
                                                 ("batch_stats", stats_rel, TOLERANCE["batch_stats"]),
                                                 ("lr", {"lr": lr_rel}, TOLERANCE["lr"]))
                      if d and max(d.values()) > tol]
            ok &= not failed
            record = dict(step=step, lr_jax=j_losses["lr"], lr_torch=t_losses["lr"],
                          losses={k: dict(jax=j_losses[k], torch=t_losses[k], rel=loss_rel[k]) for k in terms},
                          max_param_rel=max(param_rel.values()), worst_params=worst(param_rel),
                          max_update_rel=max(update_rel.values(), default=0.0), worst_updates=worst(update_rel),
                          max_batch_stats_rel=max(stats_rel.values(), default=0.0), worst_batch_stats=worst(stats_rel),
                          zero_grad_elements={k: int(np.sum(m)) for k, m in masks.items() if np.any(m)},
                          zero_grad_rel=noise_rel, failed=failed)
            records.append(record)
            out(format_record(record))
    return dict(ok=ok, steps=records, notes=notes, tolerance=TOLERANCE)


def format_record(r):
    losses = " ".join(f"{k} {v['jax']:.6g}/{v['torch']:.6g} ({v['rel']:.1e})" for k, v in r["losses"].items())
    names = lambda items: ", ".join(f"{k} {v:.1e}" for k, v in items)   # noqa: E731
    return (f"step {r['step']} | lr {r['lr_jax']:.6g}/{r['lr_torch']:.6g} | jax/torch {losses}\n"
            f"    params max rel {r['max_param_rel']:.2e} (worst: {names(r['worst_params'])})\n"
            f"    updates max rel {r['max_update_rel']:.2e} (worst: {names(r['worst_updates'])})\n"
            f"    batch_stats max rel {r['max_batch_stats_rel']:.2e} (worst: {names(r['worst_batch_stats'])})"
            + (f"\n    not compared (gradient zero up to rounding): "
               + ", ".join(f"{k} {n} elements (rel {r['zero_grad_rel'].get(k, 0.0):.1e})"
                           for k, n in r["zero_grad_elements"].items()) if r["zero_grad_elements"] else "")
            + (f"\n    FAILED: {', '.join(r['failed'])} above tolerance" if r["failed"] else ""))


# ------------------------------------------------------------------------------------------------ CLI
def _flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Python config file, optionally FILE.py:arg.", lock_config=True)
    flags.DEFINE_integer("steps", 3, "Optimizer steps on each side.")
    flags.DEFINE_integer("seed", 0, "Seed of the timm initialisation (and the run's rng).")
    flags.DEFINE_integer("epoch", None, "Epoch of the checked steps (default: optim.warmup_epochs).")
    flags.DEFINE_bool("json", False, "Print one JSON object at the end instead of the summary line.")
    flags.DEFINE_string("student", None, "A torch state_dict / checkpoint file for the student (default: random).")
    flags.DEFINE_string("teacher", None, "A torch state_dict / checkpoint file for the teacher (default: random).")
    flags.DEFINE_multi_string("torch_set", [], "KEY=VALUE applied to the PyTorch side's config only.")
    return flags.FLAGS


def main(argv=None):
    from rsd_jax import cli
    from rsd_jax.errors import UserError
    FLAGS = _flags()
    status = {}

    def run(argv):
        del argv
        if FLAGS.config is None:
            raise UserError("usage: python -m rsd_jax.step_check --config configs/FILE.py[:arg] [--steps N]")
        quiet = FLAGS.json
        result = check(FLAGS.config, FLAGS.steps, FLAGS.seed, FLAGS.epoch, FLAGS.torch_set, FLAGS.student,
                       FLAGS.teacher, out=(lambda s: None) if quiet else print)
        if quiet:
            print(json.dumps(result))
        else:
            for note in result["notes"]:
                print(f"note: {note}")
            print(("OK" if result["ok"] else "FAILED") + f": tolerance {TOLERANCE} (relative, fp32, CPU)")
        status["ok"] = result["ok"]

    cli.run_main(run, argv)
    sys.exit(0 if status.get("ok") else 1)


if __name__ == "__main__":
    main()
