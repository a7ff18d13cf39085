"""The bundled dataset: scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes), shipped inside
the scikit-learn package, so the demo needs no download. Images are upsampled to `image_size` (bilinear) and
replicated to 3 channels; a fixed seeded split holds out `test_fraction` of them. Only `labelled_fraction` of the
training images keep their label for the ground-truth loss (a fixed subset), which is the regime where a teacher's
knowledge shows: the distillation terms still see every training image.
"""
import numpy as np

from rsd_jax import data
from rsd_jax.errors import UserError


def _resize_bilinear(images, size):
    """(N, h, w) -> (N, size, size), bilinear with half-pixel centres (align_corners=False)."""
    n, h, w = images.shape

    def weights(src, dst):
        pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, src - 1)
        frac = pos - lo
        m = np.zeros((dst, src))
        m[np.arange(dst), lo] += 1 - frac
        m[np.arange(dst), hi] += frac
        return m

    return np.einsum("yh,nhw,xw->nyx", weights(h, size), images, weights(w, size))


def load(config):
    for key in ("test_fraction", "labelled_fraction"):
        if not 0 <= config[key] <= 1:
            raise UserError(f"data.{key} {config[key]} is not in [0, 1]")
    if config.test_fraction in (0, 1):
        empty = "test" if config.test_fraction == 0 else "training"
        raise UserError(f"data.test_fraction {config.test_fraction} leaves no {empty} images")
    from sklearn.datasets import load_digits
    raw = load_digits()
    grey = _resize_bilinear(raw.images / 16.0, config.image_size)
    images = np.round(np.repeat(grey[..., None], 3, axis=-1) * 255).astype(np.uint8)
    labels = raw.target.astype(np.int32)
    order = np.random.default_rng(config.split_seed).permutation(len(labels))
    n_test = int(round(config.test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    mask = np.zeros(len(train), np.float32)
    mask[np.random.default_rng(config.split_seed + 1).permutation(len(train))[
        :int(round(config.labelled_fraction * len(train)))]] = 1.0
    mean = float(images[train].mean() / 255)
    std = float(images[train].std() / 255)
    return data.Dataset(
        name="digits", num_classes=10, mean=(mean,) * 3, std=(std,) * 3,
        train=data.Split(images[train], labels[train], mask),
        test=data.Split(images[test], labels[test], np.ones(len(test), np.float32)))
