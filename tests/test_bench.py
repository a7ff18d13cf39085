"""The speed benchmark and what it relies on: its JSON fields, bf16 mixed precision agreeing with fp32, and a train
step that compiles once and donates its state."""
import json
import logging

import jax
from jax.sharding import Mesh
import numpy as np

from rsd_jax import bench, train
from tiny import tiny_config


def test_bench_runs_at_smoke_size_and_reports_its_fields():
    config = bench.bench_config(tiny_config("rsd"), batch=16)
    r = bench.run_bench(config, steps=2)
    for key in ("images_per_s", "step_ms", "compile_s", "flops_per_step", "dtype", "device", "batch", "loss"):
        assert key in r, key
    assert r["batch"] == 16 and r["dtype"] == "float32" and r["images_per_s"] > 0
    assert r["flops_per_step"] > 1e6 and np.isfinite(r["loss"]) and "error" not in r
    assert "mfu" not in r                       # no known peak for a CPU
    assert json.loads(json.dumps(r)) == r       # the --json line
    assert "images/s" in bench.format_result(r)


def _one_step(dtype):
    config = tiny_config("rsd")
    config.compute_dtype = dtype
    run = train.build_run(config, Mesh(np.asarray(jax.devices()[:1]), ("data",)),
                          dataset=bench.synthetic_dataset(bench.bench_config(config)))
    state = run.init(jax.random.key(0))
    before = jax.device_get(state.params)
    state, metrics = run.train_step(state, run.teacher_vars, run.train_batch(0))
    return before, jax.device_get(state), jax.device_get(metrics)


def test_bfloat16_step_agrees_with_float32():
    before, s32, m32 = _one_step("float32")
    _, s16, m16 = _one_step("bfloat16")
    # Parameters, optimizer state and BatchNorm statistics stay float32 under bf16 compute.
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves((s16.params, s16.model_state)))
    assert abs(float(m16["loss"]) - float(m32["loss"])) < 0.02 * abs(float(m32["loss"]))
    # The update the step makes (params after - before) points the same way overall (cosine > 0.95), and agrees
    # to 10% of its norm in the head and the projector. (Early layers of the tiny zero-init-residual ResNet get
    # small gradients through several train-mode BatchNorm backward passes, which amplify bf16 rounding: ~30%.)
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])   # noqa: E731
    d32, d16 = flat(s32.params) - flat(before), flat(s16.params) - flat(before)
    assert d32 @ d16 > 0.95 * np.linalg.norm(d32) * np.linalg.norm(d16)
    for part in (lambda p: p["extra"], lambda p: p["student"]["fc"]):
        a, b = flat(part(s32.params)) - flat(part(before)), flat(part(s16.params)) - flat(part(before))
        assert np.linalg.norm(b - a) < 0.1 * np.linalg.norm(a)
    np.testing.assert_allclose(flat(s16.params), flat(s32.params), atol=1e-4)

def test_train_step_compiles_once_and_donates_the_state(caplog):
    config = tiny_config("rsd")
    run = train.build_run(config, Mesh(np.asarray(jax.devices()[:1]), ("data",)),
                          dataset=bench.synthetic_dataset(bench.bench_config(config)))
    state = run.init(jax.random.key(0))
    state, _ = run.train_step(state, run.teacher_vars, run.train_batch(0))
    jax.block_until_ready(state)
    caplog.set_level(logging.DEBUG)
    with jax.log_compiles(True):
        for step in range(1, 4):      # fresh host batches, the previous step's output state
            old = state
            state, metrics = run.train_step(state, run.teacher_vars, run.train_batch(step))
            jax.block_until_ready(state)
            assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(old.params))   # donated
    compiles = [r.getMessage() for r in caplog.records if "train_step" in r.getMessage()
                and "ompil" in r.getMessage()]
    assert not compiles, compiles
    assert run.train_step._cache_size() == 1
    assert np.isfinite(float(metrics["loss"]))
