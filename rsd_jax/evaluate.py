"""Evaluate a run's student, restored from its orbax checkpoints, or any model directory:

  python -m rsd_jax.evaluate --workdir DIR [--which latest|best] [--ema] [--data_dir DATA] [--json]
  python -m rsd_jax.evaluate --model DIR --dataset cifar100 --data_dir DATA [--batch_size 128] [--json]

prints top-1 and top-5 (percent) and the mean cross-entropy on the test split: with the run's own config, or, for a
model directory (converter output, a run's <workdir>/student), with the reference's eval transform for that model.
--ema evaluates the run's EMA student; --data_dir with --workdir reads the dataset from another place than the run
did; --results_file FILE also writes the result, with the step, the eval transform and the parameter count, as JSON.
"""
import json
import os

import jax
import ml_collections
from absl import flags

from rsd_jax import checkpoint, cli, data, evaluation, model_dir, models, rundir, run_models, sharding, trees
from rsd_jax.data import augment
from rsd_jax.errors import CheckpointError, UserError

USAGE = ("python -m rsd_jax.evaluate --workdir DIR [--which latest|best] [--ema] [--data_dir DATA] [--json]  or  "
         "--model DIR --dataset cifar100 --data_dir DATA [--batch_size N] [--json]  (either: [--results_file FILE])")


def define_flags(FLAGS):
    flags.DEFINE_string("workdir", None, "A training run's directory.", flag_values=FLAGS)
    flags.DEFINE_string("model", None, "A model directory (instead of --workdir).", flag_values=FLAGS)
    flags.DEFINE_string("dataset", "cifar100", "With --model: the dataset (data.name) whose test split to use.",
                        flag_values=FLAGS)
    flags.DEFINE_string("data_dir", "", "The dataset's directory (data.data_dir); with --workdir: instead of the "
                        "run's.", flag_values=FLAGS)
    flags.DEFINE_integer("batch_size", 128, "With --model: the global eval batch.", flag_values=FLAGS)
    flags.DEFINE_enum("which", "latest", ["latest", "best"], "Which checkpoint to evaluate.", flag_values=FLAGS)
    flags.DEFINE_bool("ema", False, "With --workdir: evaluate the EMA of the student (a run with ema.decay > 0).",
                      flag_values=FLAGS)
    flags.DEFINE_string("results_file", "", "Also write the result as JSON (top1, top5, loss, step, crop_pct, "
                        "interpolation, parameters) to this file.", flag_values=FLAGS)
    flags.DEFINE_bool("json", False, "Print one JSON line {\"top1\": .., \"top5\": .., \"loss\": ..}.",
                      flag_values=FLAGS)


def _parameter_count(params):
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def evaluate_workdir(workdir, which="latest", ema=False, data_dir=""):
    """top1/top5/loss of a run's student (or its EMA) from its `which` checkpoint, with the run's config (its data
    directory replaced by `data_dir` when given), and the step, eval transform and parameter count."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{workdir} is not a training run directory (no config.json)")
    config = ml_collections.ConfigDict(rundir.read_run_config(config_path))
    if data_dir:
        config.data.data_dir = data_dir
    state = _restore_raw(workdir, which)
    if ema:
        if not state.get("ema"):
            raise UserError(f"{workdir} has no EMA student (its run has ema.decay=0)")
        params, stats = state["ema"]["params"], state["ema"]["model_state"]
    else:
        params, stats = state["params"]["student"], state["model_state"]["student"]
    dataset = data.load(config.data)
    student = run_models.build_student(config, dataset.num_classes)
    # A stale config.json (another model than the run trained) would otherwise fail inside the jitted step.
    trees.check(models.init_shapes(student), dict(stats, params=params),
                f"the {which} checkpoint of {workdir} (vs the student in its config.json)", error=CheckpointError)
    mesh = sharding.make_mesh()
    eval_step = evaluation.make_eval_step(student, evaluation.eval_transform_for(config, dataset))
    result = evaluation.evaluate_split(eval_step, jax.device_put(params, sharding.replicated(mesh)),
                                       jax.device_put(stats, sharding.replicated(mesh)), dataset.test,
                                       config.data.eval_batch_size, mesh, desc="eval")
    crop_pct, interpolation = augment.eval_config(config.data.augment, config.student.model)
    return dict(result, step=int(state["step"]), crop_pct=crop_pct, interpolation=interpolation,
                parameters=_parameter_count(params))


def _restore_raw(workdir, which):
    """The raw checkpoint `which` of the run in `workdir`; for <workdir>/students/<i>/ of a run of several students,
    student i's slice of that run's checkpoint."""
    member_path = os.path.join(workdir, rundir.MEMBER_JSON)
    member = rundir.read_run_config(member_path) if os.path.isfile(member_path) else None
    source = os.path.normpath(os.path.join(workdir, member["run"])) if member else workdir
    ckpts = checkpoint.RunCheckpoints(source)
    state = ckpts.restore_raw(which)
    ckpts.close()
    if state is None:
        raise UserError(f"{source} has no {which} checkpoint yet")
    if member:
        step = state.pop("step")
        state = dict(jax.tree_util.tree_map(lambda x: x[member["index"]], state), step=step)
    return state


def evaluate_model(directory, dataset="cifar100", data_dir="", batch_size=128):
    """top1/top5/loss of a model directory on a dataset's test split, with the eval transform for that model (and
    that transform and the parameter count; step None)."""
    from rsd_jax import config as base
    data_config = base.base_config().data
    data_config.update(dict(name=dataset, data_dir=data_dir, eval_batch_size=batch_size))
    dataset = data.load(data_config)     # before the model: a missing dataset fails fast
    model, variables = models.load_model(directory)
    model_name = model_dir.read_model_metadata(directory)["model"]
    if model.num_classes != dataset.num_classes:
        raise UserError(f"{directory} has {model.num_classes} classes, dataset {data_config.name} has "
                        f"{dataset.num_classes}")
    mesh = sharding.make_mesh()
    sharding.check_batch_size(batch_size, mesh)
    # The reference's eval resize for this model (crop_pct, interpolation), to the model's input size.
    transform = augment.eval_transform(data_config.augment, dataset.mean, dataset.std, size=model.img_size,
                                       model=model_name)
    eval_step = evaluation.make_eval_step(model, transform)
    variables = jax.device_put(dict(variables), sharding.replicated(mesh))
    params = variables.pop("params")
    result = evaluation.evaluate_split(eval_step, params, variables, dataset.test, batch_size, mesh, desc="eval")
    crop_pct, interpolation = augment.eval_config(data_config.augment, model_name)
    return dict(result, step=None, crop_pct=crop_pct, interpolation=interpolation,
                parameters=_parameter_count(params))


def run(FLAGS, args):
    del args
    if bool(FLAGS.workdir) == bool(FLAGS.model):
        raise UserError(f"usage: {USAGE}")
    if FLAGS.batch_size < 1:
        raise UserError("--batch_size must be positive")
    if FLAGS.ema and FLAGS.model:
        raise UserError("--ema goes with --workdir (a model directory holds one set of weights)")
    if FLAGS.results_file:
        cli.check_writable(FLAGS.results_file, f"--results_file {FLAGS.results_file}")
    if FLAGS.model:
        result = evaluate_model(FLAGS.model, FLAGS.dataset, FLAGS.data_dir, FLAGS.batch_size)
    else:
        result = evaluate_workdir(FLAGS.workdir, FLAGS.which, FLAGS.ema, FLAGS.data_dir)
    if FLAGS.results_file:
        rundir.write_atomic(FLAGS.results_file, json.dumps(result, indent=2))
    if FLAGS.json:
        print(json.dumps({k: result[k] for k in ("top1", "top5", "loss")}))
    else:
        print(f"top1 {result['top1']:.2f} | top5 {result['top5']:.2f} | loss {result['loss']:.4f}")


def main(argv=None):
    cli.run_main(run, argv, define=define_flags, usage=USAGE)


if __name__ == "__main__":
    main()
