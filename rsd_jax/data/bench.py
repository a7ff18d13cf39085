"""Throughput of the on-device augmentation: `python -m rsd_jax.data.bench [--batch 128] [--steps 5]`.

Times the jitted CNN recipe (crop + flip) and ViT/MLP recipe (+ RandAugment, mixup/cutmix, erasing) on uint8
32x32 batches resized to 224, on whatever device JAX picks.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from rsd_jax.data import augment

CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    images = jnp.asarray(np.random.RandomState(0).randint(0, 256, (args.batch, 32, 32, 3)), jnp.uint8)
    labels = jnp.arange(args.batch) % 100
    cnn = augment.train_batch_transform(augment.default_config(), CIFAR_MEAN, CIFAR_STD, 100, size=args.size)
    vit = augment.train_batch_transform(augment.vit_recipe(), CIFAR_MEAN, CIFAR_STD, 100, size=args.size,
                                        group_size=min(128, args.batch))
    print(f"device: {jax.devices()[0].device_kind}, batch {args.batch}, 32 -> {args.size}")
    for name, fn in (("cnn", cnn), ("vit", vit)):
        fn = jax.jit(fn)
        start = time.perf_counter()
        jax.block_until_ready(fn(images, labels, jax.random.key(0)))
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(args.steps):
            out = fn(images, labels, jax.random.key(step + 1))
        jax.block_until_ready(out)
        per_step = (time.perf_counter() - start) / args.steps
        print(f"{name}: {args.batch / per_step:9.1f} images/s ({per_step * 1e3:.1f} ms/batch, "
              f"first call {compile_s:.1f} s)")


if __name__ == "__main__":
    main()
