"""Throughput of the on-device augmentation: `python -m rsd_jax.data.bench [--batch 128] [--steps 5]`.

Times the jitted CNN recipe (crop + flip) and ViT/MLP recipe (+ RandAugment, mixup/cutmix, erasing) on uint8
32x32 batches resized to 224, on whatever device JAX picks.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from rsd_jax import cli
from rsd_jax.data import augment

CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def define_flags(FLAGS):
    flags.DEFINE_integer("batch", 128, "images per batch", flag_values=FLAGS)
    flags.DEFINE_integer("steps", 5, "timed batches after the first call", flag_values=FLAGS)
    flags.DEFINE_integer("size", 224, "output resolution", flag_values=FLAGS)


def run(FLAGS, args):
    del args
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
    cli.run_main(run, argv, define=define_flags, usage="python -m rsd_jax.data.bench [--batch 128] [--steps 5] "
                 "[--size 224]", compile_cache=False)


if __name__ == "__main__":
    main()
