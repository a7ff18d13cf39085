"""Dataset sources. A source gives whole splits as host arrays (uint8 NHWC images at the source resolution, int
labels); batches are drawn in a per-epoch order that depends only on (seed, epoch), so a resumed run sees the
batches the uninterrupted run would have seen. Augmentation runs on the device, inside the train step
(`rsd_jax.data.augment`).
"""
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import tempfile

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
    # `data.augment` keys the source already applied on the host (the streamed ImageNet crops and flips there);
    # the device augmentation leaves them out (`augment.on_device`).
    host_augment: tuple = ()


def load(config):
    """The dataset named by the `data` config section: a fixed name, `tfds:<name>` (a prepared tfds directory) or
    `folder:<dir>` (written by `python -m rsd_jax.data.prepare folder`)."""
    if config.name.startswith("tfds:"):
        from rsd_jax.data import tfds_source
        return tfds_source.load(config)
    if config.name.startswith("folder:"):
        from rsd_jax.data import folder
        return folder.load(config)
    if config.name == "digits":
        from rsd_jax.data import digits
        return digits.load(config)
    if config.name == "cifar100":
        from rsd_jax.data import cifar
        return cifar.load(config)
    if config.name in ("imagenet2012", "imagenet"):
        from rsd_jax.data import imagenet
        return imagenet.load(config)
    raise UserError(f"unknown dataset {config.name!r}; known: digits, cifar100, imagenet2012, tfds:<name>, "
                    f"folder:<dir>")


def mean_std(images, chunk=4096):
    """Per-channel mean and (population) std of uint8 NHWC images on the 0..1 scale, accumulated in float64 in
    chunks so that a large split needs no float copy."""
    total = np.zeros(images.shape[-1])
    squares = np.zeros(images.shape[-1])
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].reshape(-1, images.shape[-1]).astype(np.float64)
        total += block.sum(0)
        squares += np.square(block).sum(0)
    count = images[..., 0].size
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0))
    return tuple(float(m) for m in mean / 255), tuple(float(s) for s in std / 255)


def write_json_atomic(path, value):
    """`value` as JSON in `path` through a uniquely named temporary file in the same directory and a rename: readers
    (and concurrent writers: several processes of one run) never see a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_directory(final):
    """Yields a path (not yet created) in a temporary directory next to `final` to write a prepared dataset into;
    when the block ends without an error it replaces `final` (a previous version is removed only then), otherwise
    nothing is left behind. An OSError becomes a UserError."""
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    except OSError as e:
        raise UserError(f"cannot write to {parent}: {e.strerror or e}") from None
    old = os.path.join(staging, "old")
    try:
        yield os.path.join(staging, "new")
        if os.path.exists(final):
            os.rename(final, old)
        os.rename(os.path.join(staging, "new"), final)
    except OSError as e:
        if not os.path.exists(final) and os.path.exists(old):
            os.rename(old, final)
        raise UserError(f"cannot write to {parent}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def configured_mean_std(config):
    """(mean, std) given in the config (`data.mean`, `data.std`, 3 values each), or None when both are empty."""
    mean, std = tuple(config.get("mean", ()) or ()), tuple(config.get("std", ()) or ())
    if not mean and not std:
        return None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise UserError(f"data.mean {mean} and data.std {std} need 3 values each (0..1 scale, std > 0), or neither")
    return tuple(map(float, mean)), tuple(map(float, std))


def central_crop_box(width, height, ratio):
    """timm RandomResizedCrop's fallback when no try fits: the central box of the whole image clipped to the
    aspect range `ratio`, as (top, left, height, width)."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


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
