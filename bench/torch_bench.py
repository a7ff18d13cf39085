"""PyTorch baseline for `python -m rsd_jax.bench`: the reference's distillation step, eager, on the same machine.

    python -m bench.torch_bench --config configs/swin_resnet18.py --batch 16 --steps 5 [--amp] [--json] [--config.x=y]

timm models (random init, the config's student and teacher), the teacher in eval mode under no_grad, the student
and the RSD projector in train mode, CE with label smoothing + RSD from the formula on the pre-logits (one loss per
`distill.group_size` group, as the reference's DDP ranks, run one after the other here), SGD-Nesterov with the
reference's weight-decay rule. Inputs are already-augmented float batches on the device: the reference augments on
the CPU in its data loader workers, so augmentation is not part of its step (rsd_jax's step includes it).
`--amp` runs the forward passes under torch.autocast (bfloat16 by default; `--amp_dtype float16` adds a GradScaler
like the reference's native AMP). cudnn.benchmark is on, as in the reference's train.py. `--tf32` lets float32
matrix products use TF32, as cuDNN's convolutions already do by default and as JAX's float32 default precision
does on a GPU (torch's default, and the reference's, is full float32 for them).
`--compile` wraps the whole step (teacher forward, student forward, losses, backward, optimizer step) in
`torch.compile` with `--compile_mode` (default "default": inductor without CUDA graphs or autotuning, what
timm's benchmark and most users turn on; "max-autotune" compiles for much longer); `backward()` and the optimizer
step become their own compiled graphs. The first warm-up step includes the compilation (`first_step_s`).
"""
import json
import statistics
import time

import torch
from absl import flags

from bench import torch_distillers, torch_reference as ref
from rsd_jax import cli
from rsd_jax.bench import _SOURCES, bench_config
from rsd_jax.errors import UserError


def build(config, device, channels_last=False):
    classes = _SOURCES.get(config.data.name, (100, 32))[0]
    student = ref.create_timm(config.student.model, classes, config.student.overrides, config.seed)
    teacher = ref.create_timm(config.teacher.model, classes, config.teacher.overrides, config.seed + 1)
    for p in teacher.parameters():
        p.requires_grad_(False)
    projector = torch_distillers.Projector(student.num_features, teacher.num_features, config.distill.rsd.gamma)
    optimizer = ref.make_optimizer(config, (student, projector))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for m in (student, teacher, projector):
        m.to(device=device, memory_format=fmt)
    return student, teacher, projector, optimizer


def make_step(config, student, teacher, projector, optimizer, amp_dtype, device):
    rsd, smoothing = config.distill.rsd, config.distill.label_smoothing
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else None

    def step(images, labels):
        group = config.distill.group_size or images.shape[0]
        teacher.eval()
        student.train()
        projector.train()
        with torch.no_grad(), (autocast() if autocast else torch.autocast(device.type, enabled=False)):
            _, teacher_pre = ref.features(teacher, images)
        losses = []
        for g0 in range(0, images.shape[0], group):
            sl = slice(g0, g0 + group)
            with autocast() if autocast else torch.autocast(device.type, enabled=False):
                logits, pre = ref.features(student, images[sl])
                projected = projector(pre)
            ce = ref.cross_entropy(logits.float(), labels[sl], smoothing)
            rsd_term = torch_distillers.rsd_loss(projected.float(), teacher_pre[sl].float(), rsd.kappa)
            losses.append(ce + rsd.loss_weight * rsd_term)
        loss = torch.stack(losses).mean()
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return loss.detach()
    return step


def run_bench(config, steps=5, warmup=2, amp=False, amp_dtype="bfloat16", channels_last=False, tf32=False,
              compile_mode=None):
    """Time `steps` steps after `warmup` ones; `compile_mode` (a torch.compile mode) compiles the step."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = tf32
    student, teacher, projector, optimizer = build(config, device, channels_last)
    dtype = getattr(torch, amp_dtype) if amp else None
    step = make_step(config, student, teacher, projector, optimizer, dtype, device)
    if compile_mode:
        step = torch.compile(step, mode=compile_mode)
    b, size = config.data.batch_size, config.data.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, size, size, generator=gen).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = (torch.arange(b) % student.num_classes).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    first_step_s = None
    for _ in range(warmup):
        loss = step(images, labels)
        if first_step_s is None:
            sync()
            first_step_s = time.perf_counter() - t0
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    t_all = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        loss = step(images, labels)
        if device.type == "cpu":
            times.append(time.perf_counter() - t)
    sync()
    step_s = statistics.median(times) if times else (time.perf_counter() - t_all) / steps
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {
        "student": config.student.model, "teacher": config.teacher.model, "method": "rsd", "batch": b,
        "image_size": size, "dtype": f"amp-{amp_dtype}" if amp else "float32", "steps": steps,
        "device": f"{device.type}:{name}", "devices": 1, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "channels_last": channels_last, "tf32_matmul": tf32,
        "compile": compile_mode, "first_step_s": round(first_step_s, 3), "warmup_s": round(warmup_s, 3),
        "step_ms": round(1e3 * step_s, 2), "images_per_s": round(b / step_s, 2), "loss": float(loss),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }


USAGE = ("python -m bench.torch_bench --config configs/FILE.py[:arg] [--batch N] [--steps N] [--amp] "
         "[--amp_dtype bfloat16|float16] [--channels_last] [--tf32] [--compile [--compile_mode MODE]] [--json] "
         "[--config.x=y]")

COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def define_flags(FLAGS):
    flags.DEFINE_integer("batch", 0, "global batch (default, 0: the config's)", flag_values=FLAGS)
    flags.DEFINE_integer("steps", 5, "timed steps after two warm-up steps", flag_values=FLAGS)
    flags.DEFINE_bool("amp", False, "forward passes under torch.autocast", flag_values=FLAGS)
    flags.DEFINE_enum("amp_dtype", "bfloat16", ["bfloat16", "float16"], "autocast dtype (float16 adds a GradScaler)",
                      flag_values=FLAGS)
    flags.DEFINE_bool("channels_last", False, "channels-last memory format", flag_values=FLAGS)
    flags.DEFINE_bool("tf32", False, "float32 matrix products in TF32 (JAX's GPU default)", flag_values=FLAGS)
    flags.DEFINE_bool("compile", False, "torch.compile the whole step", flag_values=FLAGS)
    flags.DEFINE_enum("compile_mode", "default", COMPILE_MODES, "torch.compile mode with --compile", flag_values=FLAGS)
    flags.DEFINE_bool("json", False, "one machine-readable line", flag_values=FLAGS)


def run(FLAGS, args):
    del args
    config = bench_config(FLAGS.config, FLAGS.batch)
    if config.distill.method != "rsd":
        raise UserError(f"the torch baseline implements RSD only, the config's method is {config.distill.method}")
    r = run_bench(config, FLAGS.steps, amp=FLAGS.amp, amp_dtype=FLAGS.amp_dtype, channels_last=FLAGS.channels_last,
                  tf32=FLAGS.tf32, compile_mode=FLAGS.compile_mode if FLAGS.compile else None)
    how = f"compiled ({r['compile']}, first step {r['first_step_s']:.1f} s)" if r["compile"] else "eager"
    print(json.dumps(r) if FLAGS.json else
          f"torch {how} {r['teacher']} -> {r['student']} {r['dtype']} batch {r['batch']} at {r['image_size']}: "
          f"{r['images_per_s']:.1f} images/s ({r['step_ms']:.1f} ms/step) on {r['device']}")
    return r


def main(argv=None):
    return cli.run_main(run, argv, define=define_flags, config=True, required=("config",), usage=USAGE,
                        compile_cache=False)


if __name__ == "__main__":
    main()
