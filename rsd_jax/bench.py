"""Throughput of the full distillation step: `python -m rsd_jax.bench --config configs/swin_resnet18.py [--batch N]
[--steps N] [--dtype float32|bfloat16] [--json] [--config.x=y]`.

The step timed is the training step itself (on-device augmentation, teacher forward, student forward and
backward, RSD, optimizer update), with a random teacher (teacher.path=random) and one synthetic uint8 batch at
the dataset's source resolution kept on the device, so no dataset and no host input pipeline is involved.
Reported: images/s, compile time, FLOPs per step (XLA's cost analysis of the compiled step), peak device memory
where the backend reports it, and MFU against the chip's dense bf16 peak where it is known.

`python -m rsd_jax.bench --compare_torch --config ... --batch N` runs this bench and the PyTorch baseline
(bench/torch_bench.py, the reference's step), eager and under torch.compile (`--notorch_compile`: eager only),
alternately in fresh processes and prints the ratios.
"""
import json
import os
import statistics
import subprocess
import sys
import time

from absl import flags

from rsd_jax import cli
from rsd_jax.errors import UserError

# Dense bf16 peak per chip (FLOP/s); H200 is the H100 chip with more memory.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}

# Synthetic data: (classes, source image size or None for data.image_size) per dataset name.
_SOURCES = {"cifar100": (100, 32), "digits": (10, None), "imagenet2012": (1000, None), "imagenet": (1000, None)}


def check_args(args):
    """Counts in range before anything is built: 0 or less would divide by zero or time nothing."""
    for flag in ("batch", "steps", "repeats"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be positive")
    if args.profile < 0:
        raise UserError("--profile must not be negative")


def bench_config(config, batch=None, dtype="float32"):
    """The config as benchmarked: random teacher, `batch` (statistics groups shrunk to fit), `dtype` compute."""
    config = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
    if batch:
        config.data.batch_size = batch
    b = config.data.batch_size
    config.data.eval_batch_size = b
    if config.distill.group_size and b % config.distill.group_size:
        config.distill.group_size = b
    config.teacher.path = "random" if config.teacher.model else ""
    config.compute_dtype = dtype
    config.progress_bar = False
    return config


def synthetic_dataset(config):
    """Random uint8 images at the dataset's source resolution: one global batch for train and test."""
    import numpy as np

    from rsd_jax import data
    from rsd_jax.data import cifar
    classes, size = _SOURCES.get(config.data.name, (100, 32))
    size = size or config.data.image_size
    n = config.data.batch_size
    rng = np.random.RandomState(0)
    split = data.Split(images=rng.randint(0, 256, (n, size, size, 3)).astype(np.uint8),
                       labels=(np.arange(n) % classes).astype(np.int32), label_mask=np.ones((n,), np.float32))
    return data.Dataset(name=f"synthetic-{config.data.name}", num_classes=classes, mean=cifar.MEAN, std=cifar.STD,
                        train=split, test=split)


def peak_flops(device):
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in kind), None)


def _flops(lowered):
    """FLOPs of the whole (unpartitioned) program from XLA's cost analysis of the lowered (not yet optimised) HLO: the
    compiled program's count misses convolutions that the GPU compiler turns into cuDNN custom calls. GPU
    backends (PJRT plugins) do not analyse a lowered program, so there it is analysed by the CPU client, which
    is platform-independent at this stage (through jaxlib's private hook; None if that is gone)."""
    cost = lowered.cost_analysis()
    if not cost:
        try:
            import jax
            from jax._src.lib import _jax
            cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client,
                                                 lowered.compiler_ir("hlo").as_hlo_module())
        except Exception:  # noqa: BLE001
            return None
    if isinstance(cost, (list, tuple)):      # older jax: one dict per program
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0)) if cost else None


def run_bench(config, steps=5, warmup=1, profile=0):
    """Build, compile and time `steps` train steps of `config` (already passed through `bench_config`), then
    trace `profile` more steps (`device_profile`). Returns a dict of the measurements (the `--json` line)."""
    import jax
    import numpy as np

    from rsd_jax import sharding, students, train

    t0 = time.perf_counter()
    run = train.build_run(config, dataset=synthetic_dataset(config))
    state = run.initial_state()
    batch = run.train_batch(0)
    jax.block_until_ready((state, batch))
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    lowered = run.train_step.lower(state, run.teacher_vars, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    devices = run.mesh.size
    flops = _flops(lowered)
    memory = compiled.memory_analysis()

    # Each step awaited only where the mesh needs it, as in training.
    sync_each_step = sharding.sync_each_step(run.mesh)
    for _ in range(warmup):
        state, metrics = compiled(state, run.teacher_vars, batch)
        jax.block_until_ready(state)
    times = []
    t_all = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, run.teacher_vars, batch)
        if sync_each_step:
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t)
    jax.block_until_ready(state)
    total_s = time.perf_counter() - t_all
    step_s = statistics.median(times) if times else total_s / steps
    loss = float(np.mean(jax.device_get(metrics["loss"])))

    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    b = config.data.batch_size
    out = {
        "student": config.student.model, "teacher": config.teacher.model, "method": config.distill.method,
        "batch": b, "image_size": config.data.image_size, "dtype": config.compute_dtype, "steps": steps,
        "device": f"{device.platform}:{device.device_kind}", "devices": devices, "jax": jax.__version__,
        "build_s": round(build_s, 3), "compile_s": round(compile_s, 3), "step_ms": round(1e3 * step_s, 2),
        "images_per_s": round(b / step_s, 2), "loss": loss,
        # Several students (`students`, a sweep): each sees the batch, so K x B student images per step.
        "students": run.num_members, "student_images_per_s": round(run.num_members * b / step_s, 2),
        "design": students.design(config, device.platform) if run.num_members > 1 else "single",
        # The lowered program is the whole step, before SPMD partitioning splits it over the devices.
        "flops_per_step": flops,
        "peak_memory_bytes": (stats or {}).get("peak_bytes_in_use"),
        "temp_memory_bytes": getattr(memory, "temp_size_in_bytes", None) if memory is not None else None,
    }
    peak = peak_flops(device)
    if out["flops_per_step"]:
        out["tflops_per_s"] = round(out["flops_per_step"] / step_s / 1e12, 3)
        if peak:
            out["mfu"] = round(out["flops_per_step"] / step_s / (peak * devices), 4)
    if not np.isfinite(loss):
        out["error"] = "non-finite loss"
    if profile:
        def steps_to_trace():
            nonlocal state
            for _ in range(profile):
                state, _ = compiled(state, run.teacher_vars, batch)
            jax.block_until_ready(state)
        try:   # a trace the profiler cannot read must not cost the measurements above
            out["profile"] = device_profile(steps_to_trace, profile)
        except Exception as e:  # noqa: BLE001
            out["profile"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def device_profile(fn, steps, top=30):
    """Device time of `fn()` (which runs `steps` steps) from a jax.profiler trace: `summarize_profile`."""
    import glob
    import tempfile

    import jax
    from jax.profiler import ProfileData
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            fn()
        path = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)[0]
        return summarize_profile(ProfileData.from_file(path), steps, top)


def summarize_profile(data, steps, top=30):
    """Per step, from a trace (jax.profiler.ProfileData) of `steps` steps: the total of each trace line of the
    device planes; the kernels (the "Stream" lines) and the ops of each other line (e.g. XLA Ops) ranked by time,
    each with one event's string stats; and the kernel time per model scope (the first two components of the op
    name after the jitted function's, e.g. `SwinTransformer/layers_2` or `transpose(jvp(ResNet))/layer4_1`, taken
    from the first stat that holds one; kernels inside CUDA command buffers carry none)."""
    import collections
    events = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))   # group -> name -> [ns, n]
    examples = {}
    scopes = collections.defaultdict(int)
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            group = "kernels" if line.name.startswith("Stream") else line.name
            for event in line.events:
                e = events[group][event.name]
                e[0] += event.duration_ns
                e[1] += 1
                if (group, event.name) not in examples:
                    examples[group, event.name] = {k: v for k, v in event.stats if isinstance(v, str)}
                if group == "kernels":
                    scope = next((v for v in examples[group, event.name].values()
                                  if "/" in v and ("jit(" in v or "jvp(" in v or "transpose(" in v)), "")
                    parts = [p for p in scope.split("/") if p and not p.startswith("jit(")]
                    scopes["/".join(parts[:2]) or "(none)"] += event.duration_ns
    ms = lambda ns: round(ns / steps / 1e6, 3)   # noqa: E731
    out = {"steps": steps, "scopes_ms_per_step": {k: ms(v) for k, v in sorted(scopes.items(), key=lambda kv: -kv[1])}}
    for group, names in events.items():
        ranked = sorted(names.items(), key=lambda kv: -kv[1][0])
        out[group] = {"ms_per_step": ms(sum(v[0] for v in names.values())), "distinct": len(names), "top": [
            {"name": name[:200], "ms_per_step": ms(ns), "calls_per_step": n / steps,
             "stats": {k: v[:300] for k, v in examples[group, name].items()}} for name, (ns, n) in ranked[:top]]}
    return out


def _time(fn, *args, steps=3):
    """(first call incl. compile, median later call) in seconds of a jitted fn, each call awaited."""
    import jax
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def breakdown(config, steps=3):
    """Where the step's time goes: the augmentation, the teacher forward and the student's forward + backward
    (train mode, a scalar of its outputs as the loss), each jitted and timed alone on one device."""
    import jax
    import jax.numpy as jnp

    from rsd_jax import run_models, train
    from rsd_jax.config import compute_dtype
    from rsd_jax.data import augment
    dtype = compute_dtype(config)
    dataset = synthetic_dataset(config)
    student = run_models.build_student(config, dataset.num_classes)
    teacher, teacher_vars = run_models.load_teacher(config, dataset.num_classes)
    teacher_vars = train.cast_floats(teacher_vars, dtype)
    transform = augment.train_transform(config.data.augment, dataset.mean, dataset.std, size=config.data.image_size)
    raw = jnp.asarray(dataset.train.images)
    images = jax.jit(transform)(raw, jax.random.key(0))
    variables = jax.jit(lambda x: student.init(jax.random.key(0), x, train=False))(images[:1])

    def student_grad(variables, x):
        def loss(params):
            (logits, feats), _ = student.apply(dict(variables, params=train.cast_floats(params, dtype)), x,
                                               train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
            return jnp.sum(logits.astype(jnp.float32)) + jnp.sum(feats["pre_logits"].astype(jnp.float32))
        return jax.grad(loss)(variables["params"])

    out = {}
    for name, fn, args in (
            ("augment", jax.jit(transform), (raw, jax.random.key(1))),
            ("teacher_forward", jax.jit(lambda v, x: teacher.apply(v, x, train=False)),
             (teacher_vars, images.astype(dtype))),
            ("student_forward_backward", jax.jit(student_grad), (variables, images.astype(dtype)))):
        first, step = _time(fn, *args, steps=steps)
        out[name + "_ms"] = round(1e3 * step, 2)
        out[name + "_compile_s"] = round(first - step, 2)
    return out


def format_result(r):
    parts = [f"{r['teacher']} -> {r['student']} {r['method']} {r['dtype']} batch {r['batch']} at {r['image_size']}",
             f"{r['images_per_s']:.1f} images/s ({r['step_ms']:.1f} ms/step, compile {r['compile_s']:.1f} s)"]
    if r.get("students", 1) > 1:
        parts.insert(1, f"{r['students']} students ({r['design']}): {r['student_images_per_s']:.1f} student images/s")
    if r.get("flops_per_step"):
        parts.append(f"{r['flops_per_step'] / 1e12:.2f} TFLOP/step, {r['tflops_per_s']:.2f} TFLOP/s")
    if "mfu" in r:
        parts.append(f"MFU {100 * r['mfu']:.1f}% of bf16 peak")
    if r.get("peak_memory_bytes"):
        parts.append(f"peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB")
    parts.append(f"on {r['device']} x{r['devices']}")
    pieces = [f"{k[:-3]} {v:.1f} ms" for k, v in r.items() if k.endswith("_ms") and k != "step_ms"]
    if pieces:
        parts.append("alone: " + ", ".join(pieces))
    return " | ".join(parts)


def config_args(FLAGS):
    """--config and its --config.x=y overrides as given (absl's serialization), for a child process."""
    from ml_collections import config_flags
    flag = FLAGS["config"]
    overrides = [line for path in config_flags.get_override_values(flag)
                 for line in FLAGS[f"config.{path}"].serialize().splitlines()]
    return ["--config", config_flags.get_config_filename(flag), *overrides]


def compare_torch(args):
    """JAX, torch eager and (with --torch_compile) torch.compile benches alternately in fresh processes; the
    ratios of their median images/s."""
    common = [*config_args(args), "--steps", str(args.steps), "--json"] + \
        (["--batch", str(args.batch)] if args.batch is not None else [])
    jax_cmd = [sys.executable, "-m", "rsd_jax.bench", "--dtype", args.dtype] + common
    torch_cmd = [sys.executable, "-m", "bench.torch_bench"] + common + (["--amp"] if args.dtype == "bfloat16" else [])
    runs = {"jax": jax_cmd, "torch": torch_cmd}
    if args.torch_compile:
        runs["torch_compiled"] = torch_cmd + ["--compile"]
    results = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, cmd in runs.items():
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            results[name].append(json.loads(lines[-1]))
            print(f"{name}: {results[name][-1]['images_per_s']:.2f} images/s", file=sys.stderr)
    median = lambda name, key: statistics.median(r[key] for r in results[name])   # noqa: E731
    j, t = median("jax", "images_per_s"), median("torch", "images_per_s")
    summary = {"jax_images_per_s": j, "torch_images_per_s": t, "jax_over_torch": round(j / t, 3),
               "jax_step_ms": median("jax", "step_ms"), "torch_step_ms": median("torch", "step_ms"),
               "dtype": args.dtype, "repeats": args.repeats}
    text = f"JAX {j:.2f} images/s, torch eager {t:.2f} images/s: JAX/torch = {j / t:.2f}"
    if args.torch_compile:
        c = median("torch_compiled", "images_per_s")
        summary.update(torch_compiled_images_per_s=c, jax_over_torch_compiled=round(j / c, 3),
                       torch_compiled_step_ms=median("torch_compiled", "step_ms"),
                       torch_compile_first_step_s=median("torch_compiled", "first_step_s"))
        text += (f", torch.compile {c:.2f} images/s (first step {summary['torch_compile_first_step_s']:.0f} s): "
                 f"JAX/compiled = {j / c:.2f}")
    print(json.dumps(summary) if args.json else f"{text} ({args.dtype}, median of {args.repeats})")
    return summary


USAGE = ("python -m rsd_jax.bench --config configs/FILE.py[:arg] [--batch N] [--steps N] [--dtype float32|bfloat16] "
         "[--json] [--breakdown] [--profile N] [--compare_torch [--repeats N] [--notorch_compile]] [--config.x=y]")


def define_flags(FLAGS):
    flags.DEFINE_integer("batch", None, "global batch (default: the config's)", flag_values=FLAGS)
    flags.DEFINE_integer("steps", 5, "timed steps after one warm-up step", flag_values=FLAGS)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype", flag_values=FLAGS)
    flags.DEFINE_bool("json", False, "one machine-readable line", flag_values=FLAGS)
    flags.DEFINE_bool("breakdown", False, "also time augmentation, teacher forward and student forward+backward alone",
                      flag_values=FLAGS)
    flags.DEFINE_integer("profile", 0, "trace N more steps and add the device time per kernel and per model scope "
                         "(`profile` in the JSON line)", flag_values=FLAGS)
    flags.DEFINE_list("students", None, "students per step, e.g. 1,2,4,8: each measured in turn, with the gain in "
                      "student images/s over the first (and, with --breakdown, the bound set by the teacher's share "
                      "of the step)", flag_values=FLAGS)
    flags.DEFINE_bool("compare_torch", False, "alternate with bench.torch_bench", flag_values=FLAGS)
    flags.DEFINE_integer("repeats", 2, "runs of each with --compare_torch", flag_values=FLAGS)
    flags.DEFINE_bool("torch_compile", True, "--compare_torch also times torch.compile of the torch step",
                      flag_values=FLAGS)


def run(FLAGS, args):
    del args
    check_args(FLAGS)
    if FLAGS.compare_torch:
        return compare_torch(FLAGS)
    config = bench_config(FLAGS.config, FLAGS.batch, FLAGS.dtype)
    if FLAGS.students:
        return several_students(config, _counts(FLAGS.students), FLAGS)
    result = run_bench(config, steps=FLAGS.steps, profile=FLAGS.profile)
    if FLAGS.breakdown:
        result.update(breakdown(config, steps=FLAGS.steps))
    print(json.dumps(result) if FLAGS.json else format_result(result))
    return result


def _counts(values):
    try:
        counts = [int(v) for v in values]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UserError(f"--students takes positive integers such as 1,2,4, got {','.join(values)}")
    return counts


def several_students(config, counts, FLAGS):
    """The bench at each number of students in `counts` (one process, one compile each): student images/s, the
    gain over the first count, and with --breakdown the bound 1 / (1 - teacher share of the first count's step)
    that sharing the teacher's forward pass allows."""
    shares = breakdown(config, steps=FLAGS.steps) if FLAGS.breakdown else {}
    results = []
    for k in counts:
        c = config.copy_and_resolve_references()
        c.students = k
        result = run_bench(c, steps=FLAGS.steps)
        base = results[0] if results else result
        result["gain"] = round(result["student_images_per_s"] / base["student_images_per_s"], 3)
        if shares:
            result.update(shares)
            share = shares["teacher_forward_ms"] / base["step_ms"]
            result["teacher_share"] = round(share, 3)
            result["bound"] = round(1 / (1 - share), 3) if share < 1 else None
        results.append(result)
        print(json.dumps(result) if FLAGS.json else format_result(result) + f" | gain {result['gain']:.2f}x"
              + (f" (bound {result['bound']:.2f}x)" if result.get("bound") else ""))
    return results


def main(argv=None):
    # No persistent compilation cache here (unless the environment sets one): compile_s is a real compile.
    return cli.run_main(run, argv, define=define_flags, config=True, required=("config",), usage=USAGE,
                        compile_cache=False)


if __name__ == "__main__":
    main()
