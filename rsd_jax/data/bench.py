"""Throughput of the data path.

`python -m rsd_jax.data.bench [augment] [--batch 128] [--steps 5]`: the jitted on-device augmentation, CNN recipe
(crop + flip) and ViT/MLP recipe (+ RandAugment, mixup/cutmix, erasing) on uint8 32x32 batches resized to 224, on
whatever device JAX picks.

`python -m rsd_jax.data.bench imagenet --data_dir DIR [--images 512] [--size 224] [--workers 0]`: the host side of
the streamed ImageNet (rsd_jax/data/imagenet.py) on a prepared DIR: records read, JPEGs decoded with timm's random
resized crop, resized and flipped, in one process (the work of one Grain worker), as decoded images/s per worker and
the workers needed for TARGET images/s; with --workers N also the whole Grain pipeline with N worker processes.
"""
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from rsd_jax import cli
from rsd_jax.data import augment
from rsd_jax.errors import UserError

CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def define_flags(FLAGS):
    flags.DEFINE_integer("batch", 128, "images per batch", flag_values=FLAGS)
    flags.DEFINE_integer("steps", 5, "timed batches after the first call", flag_values=FLAGS)
    flags.DEFINE_integer("size", 224, "output resolution", flag_values=FLAGS)
    flags.DEFINE_string("data_dir", None, "imagenet: the prepared --config.data.data_dir", flag_values=FLAGS)
    flags.DEFINE_integer("images", 512, "imagenet: images decoded per measurement", flag_values=FLAGS)
    flags.DEFINE_integer("workers", 0, "imagenet: also time the Grain pipeline with this many worker processes",
                         flag_values=FLAGS)


TARGET = 8000   # images/s: issue 18's target for feeding one GPU (README, ImageNet)


def bench_imagenet(data_dir, images, size, workers):
    """{images_per_s_per_worker, workers_for_target[, pipeline_images_per_s]} of the streamed ImageNet's host side."""
    import ml_collections

    from rsd_jax import data
    from rsd_jax.data import imagenet
    config = ml_collections.ConfigDict(dict(name="imagenet2012", data_dir=data_dir, image_size=size, workers=0,
                                            augment=augment.default_config()))
    split = data.load(config).train
    examples = imagenet.Examples(split.records, len(split), 0, 1, (0, 1), split.transform, True)
    count = min(images, len(split))
    examples(0)                                           # open the files once
    start, cpu_start = time.perf_counter(), time.process_time()
    for position in range(count):
        examples(position)
    rate = count / (time.perf_counter() - start)
    # Per CPU second as well: on a shared machine the wall-clock rate measures the other users too.
    cpu_rate = count / (time.process_time() - cpu_start)
    out = dict(images_per_s_per_worker=rate, workers_for_target=math.ceil(TARGET / rate), images=count,
               images_per_cpu_s=cpu_rate, workers_for_target_at_full_core=math.ceil(TARGET / cpu_rate))
    if workers:
        batch = 32
        stream = imagenet.StreamSplit(split.records, len(split), split.transform, workers)
        stream.train_batch(0, 0, batch, slice(None))      # start the workers
        steps = max(1, count // batch)
        start = time.perf_counter()
        for step in range(1, steps + 1):
            stream.train_batch(0, step, batch, slice(None))
        out["pipeline_images_per_s"] = steps * batch / (time.perf_counter() - start)
        out["workers"] = workers
    return out


def run(FLAGS, args):
    if args and args[0] == "imagenet":
        if not FLAGS.data_dir:
            raise UserError("bench imagenet needs --data_dir (a directory prepared by `python -m "
                            "rsd_jax.data.prepare imagenet`)")
        r = bench_imagenet(FLAGS.data_dir, FLAGS.images, FLAGS.size, FLAGS.workers)
        print(f"imagenet host decode (random resized crop to {FLAGS.size}, flip), {r['images']} images: "
              f"{r['images_per_s_per_worker']:.1f} images/s per worker; {r['workers_for_target']} workers for "
              f"{TARGET} images/s (per CPU second: {r['images_per_cpu_s']:.1f} images/s, "
              f"{r['workers_for_target_at_full_core']} workers with a core each)")
        if "workers" in r:
            print(f"Grain pipeline with {r['workers']} workers: {r['pipeline_images_per_s']:.1f} images/s")
        return
    if args and args[0] != "augment":
        raise UserError(f"unknown benchmark {args[0]!r}; known: augment, imagenet")
    images = jnp.asarray(np.random.RandomState(0).randint(0, 256, (FLAGS.batch, 32, 32, 3)), jnp.uint8)
    labels = jnp.arange(FLAGS.batch) % 100
    cnn = augment.train_batch_transform(augment.default_config(), CIFAR_MEAN, CIFAR_STD, 100, size=FLAGS.size)
    vit = augment.train_batch_transform(augment.vit_recipe(), CIFAR_MEAN, CIFAR_STD, 100, size=FLAGS.size,
                                        group_size=min(128, FLAGS.batch))
    print(f"device: {jax.devices()[0].device_kind}, batch {FLAGS.batch}, 32 -> {FLAGS.size}")
    for name, fn in (("cnn", cnn), ("vit", vit)):
        fn = jax.jit(fn)
        start = time.perf_counter()
        jax.block_until_ready(fn(images, labels, jax.random.key(0)))
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(FLAGS.steps):
            out = fn(images, labels, jax.random.key(step + 1))
        jax.block_until_ready(out)
        per_step = (time.perf_counter() - start) / FLAGS.steps
        print(f"{name}: {FLAGS.batch / per_step:9.1f} images/s ({per_step * 1e3:.1f} ms/batch, "
              f"first call {compile_s:.1f} s)")


def main(argv=None):
    cli.run_main(run, argv, define=define_flags, args=("BENCHMARK...",), compile_cache=False,
                 usage="python -m rsd_jax.data.bench [augment] [--batch 128] [--steps 5] [--size 224] | "
                       "python -m rsd_jax.data.bench imagenet --data_dir DIR [--images 512] [--workers N]")


if __name__ == "__main__":
    main()
