"""Time one model's train-mode forward + backward alone, for A/B trials of a model option:

    python -m bench.model_step --model resnet18 --batch 16 --size 224 --steps 3 [--set stem_space_to_depth=true]

The loss is the sum of the logits and pre-logits (as `rsd_jax.bench --breakdown`'s student forward+backward);
prints one JSON line: compile and median step time.
"""
import argparse
import json
import subprocess
import sys
import time


def parse_value(text):
    return json.loads(text.lower() if text.lower() in ("true", "false", "null") else text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", help="a model option (JSON value)")
    p.add_argument("--ab", metavar="OPTION=VALUE", help="instead: alternate runs without and with this option "
                   "in fresh processes, --rounds times")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    if args.ab:
        return alternate(args)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rsd_jax import bench, models
    overrides = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    model = models.create_model(args.model, num_classes=100, **overrides)
    x = jnp.asarray(np.random.RandomState(0).randn(args.batch, args.size, args.size, 3), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x[:1])

    @jax.jit
    def grad(variables, x):
        def loss(params):
            (logits, feats), _ = model.apply(dict(variables, params=params), x, train=True, mutable=["batch_stats"],
                                             rngs={"dropout": jax.random.key(0)})
            return jnp.sum(logits) + jnp.sum(feats["pre_logits"])
        return jax.grad(loss)(variables["params"])

    t = time.perf_counter()
    first, step = bench._time(grad, variables, x, steps=args.steps)
    print(json.dumps({"model": args.model, "overrides": overrides, "batch": args.batch, "size": args.size,
                      "compile_s": round(first - step, 2), "step_ms": round(1e3 * step, 1),
                      "total_s": round(time.perf_counter() - t, 1)}))


def alternate(args):
    base = [sys.executable, "-m", "bench.model_step", "--model", args.model, "--batch", str(args.batch), "--size",
            str(args.size), "--steps", str(args.steps)] + [a for s in args.set for a in ("--set", s)]
    for r in range(args.rounds):
        for cmd in (base, base + ["--set", args.ab]):
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            load = open("/proc/loadavg").read().split()[0]
            print(f"round {r}: {out} load {load}", flush=True)


if __name__ == "__main__":
    main()
