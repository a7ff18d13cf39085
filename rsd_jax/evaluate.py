"""Evaluate a run's student, restored from its orbax checkpoints:

  python -m rsd_jax.evaluate --workdir DIR [--which latest|best] [--json]

prints top-1 and top-5 (percent) and the mean cross-entropy on the run's test split, with the run's own config.
"""
import json
import os

import jax
import ml_collections
from absl import flags

from rsd_jax import checkpoint, cli, data, sharding, train
from rsd_jax.data import augment
from rsd_jax.errors import UserError

flags.DEFINE_string("workdir", None, "A training run's directory.")
flags.DEFINE_enum("which", "latest", ["latest", "best"], "Which checkpoint to evaluate.")
flags.DEFINE_bool("json", False, "Print one JSON line {\"top1\": .., \"top5\": .., \"loss\": ..}.")


def evaluate_workdir(workdir, which="latest"):
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{workdir} is not a training run directory (no config.json)")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    ckpts = checkpoint.RunCheckpoints(workdir)
    state = ckpts.restore_raw(which)
    ckpts.close()
    if state is None:
        raise UserError(f"{workdir} has no {which} checkpoint yet")
    dataset = data.load(config.data)
    student = train.build_student(config, dataset.num_classes)
    mesh = sharding.make_mesh()
    transform = augment.eval_transform(config.data.augment, dataset.mean, dataset.std)

    def eval_step(params, batch_stats, batch):
        logits, _ = student.apply({"params": params, "batch_stats": batch_stats}, transform(batch["image"]),
                                  train=False)
        return train.metrics_sums(logits, batch["label"], batch["weight"])

    params = jax.device_put(state["params"]["student"], sharding.replicated(mesh))
    stats = jax.device_put(state["batch_stats"]["student"], sharding.replicated(mesh))
    return train.evaluate_split(jax.jit(eval_step), params, stats, dataset.test, config.data.eval_batch_size,
                                mesh)


def run(argv):
    del argv
    if not flags.FLAGS.workdir:
        raise UserError("usage: python -m rsd_jax.evaluate --workdir DIR [--which latest|best] [--json]")
    result = evaluate_workdir(flags.FLAGS.workdir, flags.FLAGS.which)
    if flags.FLAGS.json:
        print(json.dumps(result))
    else:
        print(f"top1 {result['top1']:.2f} | top5 {result['top5']:.2f} | loss {result['loss']:.4f}")


def main():
    cli.run_main(run)


if __name__ == "__main__":
    main()
