"""Dataset sources. A source gives whole splits as host arrays (uint8 NHWC images at the source resolution, int
labels); batches are drawn in a per-epoch order that depends only on (seed, epoch), so a resumed run sees the
batches the uninterrupted run would have seen. Augmentation runs on the device, inside the train step
(`rsd_jax.data.augment`).
"""
import dataclasses
import functools

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
    if config.name == "cifar100":
        from rsd_jax.data import cifar
        return cifar.load(config)
    if config.name in ("imagenet2012", "imagenet"):
        from rsd_jax.data import imagenet
        return imagenet.load(config)
    raise UserError(f"unknown dataset {config.name!r}; known: digits, cifar100, imagenet2012")


@functools.lru_cache(maxsize=2)
def epoch_order(num_examples, seed, epoch):
    """The permutation of the training set used in `epoch` (read-only). Cached: redrawn per step it was most of the
    host's work on a batch (README, Speed)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    order.setflags(write=False)
    return order


def process_rows(global_batch, process_index, process_count):
    """The rows of a global batch that process `process_index` of `process_count` feeds to its devices
    (`sharding.to_global` takes the same rows): consecutive, equal blocks, disjoint and covering the batch."""
    if global_batch % process_count:
        raise UserError(f"global batch {global_batch} is not divisible by the {process_count} processes")
    rows = global_batch // process_count
    return slice(process_index * rows, (process_index + 1) * rows)


def train_batch(split, seed, step, global_batch, process_index=None, process_count=None):
    """Host arrays of global batch `step` (epochs of len(split) // global_batch batches; the remainder dropped).
    Given `process_index` and `process_count`, only that process's rows (`process_rows`); otherwise all of them.
    The result depends only on (split, seed, step, global_batch) and the process: never on what ran before."""
    rows = slice(None) if process_count is None else process_rows(global_batch, process_index, process_count)
    if not isinstance(split, Split):     # a streamed source (imagenet) draws its own batches
        return split.train_batch(seed, step, global_batch, rows)
    steps_per_epoch = len(split) // global_batch
    epoch, index = divmod(step, steps_per_epoch)
    idx = epoch_order(len(split), seed, epoch)[index * global_batch:(index + 1) * global_batch][rows]
    return {"image": split.images[idx], "label": split.labels[idx], "label_mask": split.label_mask[idx],
            "index": idx.astype(np.int32)}


def eval_batches(split, global_batch, process_index=None, process_count=None):
    """The whole split in order, the last batch padded; `weight` is 0 on padding. Given `process_index` and
    `process_count`, each batch holds only that process's rows."""
    rows = slice(None) if process_count is None else process_rows(global_batch, process_index, process_count)
    if not isinstance(split, Split):
        yield from split.eval_batches(global_batch, rows)
        return
    n = len(split)
    for start in range(0, n, global_batch):
        idx = np.arange(start, start + global_batch)[rows]
        weight = (idx < n).astype(np.float32)
        idx = np.minimum(idx, n - 1)
        yield {"image": split.images[idx], "label": split.labels[idx], "weight": weight}
