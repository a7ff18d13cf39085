"""The speed benchmark and what it relies on: its JSON fields, bf16 mixed precision agreeing with fp32, and a train
step that compiles once and donates its state."""
import json
import logging
import os
import re
import subprocess

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import pytest

from configs.presets import SMOKE_OVERRIDES
from rsd_jax import bench, models, train
from tiny import tiny_config

PAIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "swin_resnet18.py")


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
    # FLOPs are the whole step's on any device count (the lowered program, before SPMD partitioning): the bench on
    # 8 devices reports what one device's lowering counts.
    run = train.build_run(config, Mesh(np.asarray(jax.devices()[:1]), ("data",)),
                          dataset=bench.synthetic_dataset(config))
    one_device = bench._flops(run.train_step.lower(jax.eval_shape(run.init, jax.random.key(0)), run.teacher_vars,
                                                   run.train_batch(0)))
    assert r["devices"] == 8
    np.testing.assert_allclose(r["flops_per_step"], one_device, rtol=0.01)


@pytest.mark.parametrize("args,message", [
    (["--config", "configs/nope.py"], "config file configs/nope.py not found"),
    (["--config", f"{PAIR}:bogus"], "unknown config argument 'bogus'"),
    (["--config", f"{PAIR}:smoke", "--batch", "-4"], "--batch must be positive"),
    (["--config", f"{PAIR}:smoke", "--batch", "0"], "--batch must be positive"),
    (["--config", f"{PAIR}:smoke", "--steps", "0"], "--steps must be positive"),
    (["--config", f"{PAIR}:smoke", "--steps", "-1"], "--steps must be positive"),
    (["--config", f"{PAIR}:smoke", "--profile", "-1"], "--profile must not be negative"),
    (["--config", f"{PAIR}:smoke", "--compare_torch", "--repeats", "0"],
     "--repeats must be positive"),
    (["--config", f"{PAIR}:smoke", "--config.distill.rsd.kapa=0.02"],
     "unknown config key 'distill.rsd.kapa' (did you mean 'distill.rsd.kappa'?)"),
    (["--config", f"{PAIR}:smoke", "--config.distill.rsd.kappa=small"], "could not convert string to float"),
])
def test_bad_command_line_is_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        bench.main(args)
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and err.startswith("error: ") and "\n" not in err and message in err, err


def test_config_overrides_reach_the_bench_and_both_sides_of_compare_torch(monkeypatch, capsys):
    # The bench takes --config FILE[:arg] --config.x=y as training does; run_bench and the child processes are
    # stand-ins, so only the command line is under test.
    seen = []

    def fake_bench(config, **kwargs):
        seen.append(config)
        return {"kappa": config.distill.rsd.kappa}
    monkeypatch.setattr(bench, "run_bench", fake_bench)
    args = ["--config", f"{PAIR}:smoke", "--batch", "16", "--json", "--config.distill.rsd.kappa=0.02"]
    assert bench.main(args) == {"kappa": 0.02}
    assert json.loads(capsys.readouterr().out) == {"kappa": 0.02} and seen[0].data.batch_size == 16
    assert bench.main(args[:-1])["kappa"] != 0.02       # the file's own value: the override made the difference

    commands = []

    def child(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(
            {"images_per_s": 2.0 if "--compile" in cmd else 1.0, "step_ms": 1.0, "first_step_s": 9.0}), stderr="")
    monkeypatch.setattr(bench.subprocess, "run", child)
    summary = bench.main(args + ["--compare_torch", "--repeats", "1"])
    assert [c[2] for c in commands] == ["rsd_jax.bench", "bench.torch_bench", "bench.torch_bench"]
    assert "--compile" in commands[2] and "--compile" not in commands[1]
    assert summary["jax_over_torch"] == 1.0 and summary["jax_over_torch_compiled"] == 0.5
    assert all("--config.distill.rsd.kappa=0.02" in c and f"{PAIR}:smoke" in c for c in commands), commands


def test_flops_of_a_program_its_backend_does_not_analyse_come_from_the_cpu_client():
    # GPU backends return no cost analysis for a lowered program; the bench then asks the CPU client.
    lowered = jax.jit(lambda a, b: jax.lax.conv_general_dilated(a, b, (1, 1), "SAME") @ jnp.ones((8, 8))).lower(
        jnp.ones((2, 3, 16, 8)), jnp.ones((8, 3, 3, 3)))

    class Unanalysed:
        cost_analysis = staticmethod(lambda: None)
        compiler_ir = staticmethod(lowered.compiler_ir)
    conv = 2 * 2 * 8 * 16 * 8 * 3 * 3 * 3           # 2 x outputs (N, C_out, H, W) x kernel taps (C_in x 3 x 3)
    matmul = 2 * 2 * 8 * 16 * 8 * 8
    flops = bench._flops(Unanalysed())
    assert flops == bench._flops(lowered)
    assert matmul + conv / 2 < flops <= matmul + conv       # XLA leaves out the taps on SAME padding


def test_profile_summary_ranks_device_kernels_per_step_and_attributes_scopes():
    # A GPU trace in the profiler's own format (there is no GPU here): two steps of three kernels on one stream,
    # one XLA Ops line, and a host plane that must be left out.
    from jax.profiler import ProfileData
    ev = lambda meta, start_us, dur_us, stat="": (    # noqa: E731
        f"events {{ metadata_id: {meta} offset_ps: {start_us * 10**6} duration_ps: {dur_us * 10**6} {stat} }}")
    conv = 'stats { metadata_id: 10 str_value: "jit(train_step)/transpose(jvp(ResNet))/layer1_0/conv1/conv" }'
    fusion = 'stats { metadata_id: 11 str_value: "command_buffer_3" }'
    kernels = " ".join([ev(1, 0, 300, conv), ev(2, 400, 100, fusion), ev(1, 600, 300, conv), ev(2, 1000, 100, fusion)])
    text = f"""
    planes {{ name: "/device:GPU:0"
      lines {{ name: "Stream #7(Compute)" {kernels} }}
      lines {{ name: "XLA Ops" {ev(3, 0, 900)} }}
      event_metadata {{ key: 1 value {{ id: 1 name: "sm90_wgrad_kernel" }} }}
      event_metadata {{ key: 2 value {{ id: 2 name: "loop_add_fusion" }} }}
      event_metadata {{ key: 3 value {{ id: 3 name: "cudnn-conv-bw-filter.1" }} }}
      stat_metadata {{ key: 10 value {{ id: 10 name: "name" }} }}
      stat_metadata {{ key: 11 value {{ id: 11 name: "hlo_op" }} }} }}
    planes {{ name: "/host:CPU" lines {{ name: "python" {ev(1, 0, 5000)} }}
      event_metadata {{ key: 1 value {{ id: 1 name: "host_work" }} }} }}"""
    data = ProfileData.from_serialized_xspace(ProfileData.text_proto_to_serialized_xspace(text))
    p = bench.summarize_profile(data, steps=2)
    assert p["kernels"]["ms_per_step"] == 0.4 and p["kernels"]["distinct"] == 2
    first, second = p["kernels"]["top"]
    assert (first["name"], first["ms_per_step"], first["calls_per_step"]) == ("sm90_wgrad_kernel", 0.3, 1.0)
    assert (second["name"], second["ms_per_step"], second["stats"]) == (
        "loop_add_fusion", 0.1, {"hlo_op": "command_buffer_3"})
    assert p["XLA Ops"]["ms_per_step"] == 0.45
    assert p["scopes_ms_per_step"] == {"transpose(jvp(ResNet))/layer1_0": 0.3, "(none)": 0.1}
    assert "host_work" not in json.dumps(p)


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


def _smoke_models():
    """The smoke-size member of every bundled family, and a Swin with a shifted-window block (the smoke Swins have
    one unshifted block per stage)."""
    shifted = dict(SMOKE_OVERRIDES["swin_tiny_patch4_window7_224"], depths=(2, 1, 1, 1))
    return list(SMOKE_OVERRIDES.items()) + [("swin_tiny_patch4_window7_224", shifted)]


def _float32_products(lowered):
    """The dot_general and convolution ops of a lowered program that take a float32 operand."""
    ops = re.findall(r"stablehlo\.(?:dot_general|convolution)[^\n]*:\s*\((tensor<[^)]*)\)\s*->", lowered.as_text())
    return [types for types in ops if "xf32>" in types]


@pytest.mark.parametrize("name,overrides", _smoke_models(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_product_of_a_bfloat16_model_runs_in_bfloat16(name, overrides):
    # A float32 constant or mask added to a bf16 activation promotes everything after it to float32: on a GPU the
    # bf16 Swin-T teacher then ran most of its matrix products as float32 (TF32) GEMMs, 15% of the step.
    model = models.create_model(name, num_classes=10, **overrides)
    x = jnp.zeros(models.input_shape(model, 2), jnp.bfloat16)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    variables = train.cast_floats(jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), x.dtype)
    inference = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
    training = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                rngs={"dropout": jax.random.key(0)})).lower(variables, x)
    for lowered in (inference, training):
        assert re.search(r"stablehlo\.(dot_general|convolution)", lowered.as_text())
        assert not _float32_products(lowered)


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
