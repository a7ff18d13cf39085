"""Print the model zoo table: parameters, forward GFLOPs at the model's input size (XLA's cost analysis, batch 1)
and CPU compile time of a batch-8 eval forward.

  python -m rsd_jax.models.summary [--num-classes 100] [names...]
"""
import argparse
import time

import jax
import jax.numpy as jnp

from rsd_jax import models


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=models.list_models())
    parser.add_argument("--num-classes", type=int, default=100)
    args = parser.parse_args()
    print("| model | parameters | GFLOPs (224) | CPU compile, batch 8 |")
    print("| --- | ---: | ---: | ---: |")
    for name in args.names:
        params, flops, seconds = summarize(name, args.num_classes)
        print(f"| {name} | {params / 1e6:.2f}M | {flops / 2e9:.2f} | {seconds:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
