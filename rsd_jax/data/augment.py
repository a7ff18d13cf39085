"""On-device augmentation, inside the jitted step: uint8 NHWC batches in, normalised float32 out."""
import jax
import jax.numpy as jnp


def normalize(images, mean, std):
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_translate(images, rng, pad):
    """Shift each image by up to `pad` pixels in each direction, filling with zeros (crop of a padded image)."""
    if pad == 0:
        return images
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(rng, (n, 2), 0, 2 * pad + 1)
    crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
    return jax.vmap(crop)(padded, offsets)


def train_transform(config, mean, std):
    """images (uint8), rng -> normalised float32 images, per the `data.augment` config."""
    def transform(images, rng):
        images = random_translate(images, rng, config.translate)
        return normalize(images, mean, std)
    return transform


def eval_transform(config, mean, std):
    return lambda images: normalize(images, mean, std)
