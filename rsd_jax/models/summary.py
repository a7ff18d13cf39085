"""Print the model zoo table: parameters, forward GFLOPs at the model's input size (XLA's cost analysis, batch 1)
and CPU compile time of a batch-8 eval forward.

  python -m rsd_jax.models.summary [--num_classes 100] [names...]
"""
import time

import jax
import jax.numpy as jnp
from absl import flags

from rsd_jax import cli, models


def summarize(name, num_classes):
    model = models.create_model(name, num_classes=num_classes)
    variables = models.init_shapes(model)
    params = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    one = jax.ShapeDtypeStruct(models.input_shape(model, 1), jnp.float32)
    cost = forward.lower(variables, one).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    t0 = time.perf_counter()
    forward.lower(variables, jax.ShapeDtypeStruct(models.input_shape(model, 8), jnp.float32)).compile()
    return params, cost.get("flops", float("nan")), time.perf_counter() - t0


def define_flags(FLAGS):
    flags.DEFINE_integer("num_classes", 100, "classifier size", flag_values=FLAGS)


def run(FLAGS, names):
    print("| model | parameters | GFLOPs (224) | CPU compile, batch 8 |")
    print("| --- | ---: | ---: | ---: |")
    for name in names or models.list_models():
        params, flops, seconds = summarize(name, FLAGS.num_classes)
        print(f"| {name} | {params / 1e6:.2f}M | {flops / 2e9:.2f} | {seconds:.1f} s |", flush=True)


def main(argv=None):
    # No persistent compilation cache: the compile time is what the table reports.
    cli.run_main(run, argv, define=define_flags, args=("NAME...",), compile_cache=False,
                 usage="python -m rsd_jax.models.summary [--num_classes 100] [NAME ...]")


if __name__ == "__main__":
    main()
