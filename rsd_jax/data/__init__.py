"""Dataset sources. A source gives whole splits as host arrays (uint8 NHWC images at the source resolution, int
labels); batches are drawn in a per-epoch order that depends only on (seed, epoch), so a resumed run sees the
batches the uninterrupted run would have seen. Augmentation runs on the device, inside the train step
(`rsd_jax.data.augment`).
"""
import dataclasses

import numpy as np

from rsd_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray        # (N, H, W, 3) uint8
    labels: np.ndarray        # (N,) int32
    label_mask: np.ndarray    # (N,) float32: 1 where the label may be used by the ground-truth loss

    def __len__(self):
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    num_classes: int
    mean: tuple               # per-channel, on the 0..1 scale
    std: tuple
    train: Split
    test: Split


def load(config):
    """The dataset named by the `data` config section."""
    if config.name == "digits":
        from rsd_jax.data import digits
        return digits.load(config)
    raise UserError(f"unknown dataset {config.name!r}; known: digits")


def epoch_order(num_examples, seed, epoch):
    """The permutation of the training set used in `epoch`."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batch(split, seed, step, global_batch):
    """Host arrays of global batch `step` (epochs of len(split) // global_batch batches; the remainder dropped)."""
    steps_per_epoch = len(split) // global_batch
    epoch, index = divmod(step, steps_per_epoch)
    idx = epoch_order(len(split), seed, epoch)[index * global_batch:(index + 1) * global_batch]
    return {"image": split.images[idx], "label": split.labels[idx], "label_mask": split.label_mask[idx]}


def eval_batches(split, global_batch):
    """The whole split in order, the last batch padded; `weight` is 0 on padding."""
    n = len(split)
    for start in range(0, n, global_batch):
        idx = np.arange(start, start + global_batch)
        weight = (idx < n).astype(np.float32)
        idx = np.minimum(idx, n - 1)
        yield {"image": split.images[idx], "label": split.labels[idx], "weight": weight}
