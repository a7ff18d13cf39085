"""CIFAR-100 (50,000 train / 10,000 test 32x32 RGB images, 100 fine classes) from a local directory, no network.

`data.data_dir` may hold either of two layouts; `load` takes the first it finds:

1. Ours, written by `python -m rsd_jax.data.prepare cifar100 --archive cifar-100-python.tar.gz --data_dir DIR`
   (or the binary archive `cifar-100-binary.tar.gz`): `DIR/cifar100_rsd_jax/` with `{train,test}_images.npy`
   (N, 32, 32, 3) uint8 NHWC, `{train,test}_labels.npy` (N,) int32 fine labels, `{train,test}_coarse_labels.npy`
   and `info.json` (format name and version, counts, class names, the archive's name and checksums). Plain .npy:
   fast to load, and needs neither TensorFlow nor pickle.
2. tensorflow-datasets' `cifar100` prepared into DIR (`DIR/cifar100/<version>/`): array_record files are read
   through `tfds.data_source` without TensorFlow; tfrecord files (tfds' default) need TensorFlow.

Images keep the archive's order (tfds: its own shuffled order); the train order is drawn per epoch elsewhere.
"""
import json
import os

import numpy as np

from rsd_jax import data
from rsd_jax.errors import UserError

MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)
NUM_CLASSES = 100
NUM_COARSE = 20
SUBDIR = "cifar100_rsd_jax"
FORMAT = "rsd_jax-cifar100-npy"
VERSION = 1
SIZES = {"train": 50_000, "test": 10_000}


def prepare_hint(data_dir):
    return (f"run `python -m rsd_jax.data.prepare cifar100 --archive cifar-100-python.tar.gz "
            f"--data_dir {data_dir or 'DIR'}` (no network needed)")


def load(config):
    data_dir = config.get("data_dir", "")
    if not data_dir:
        raise UserError(f"dataset cifar100 needs --config.data.data_dir: {prepare_hint('')}")
    data_dir = os.path.expanduser(data_dir)
    if not os.path.isdir(data_dir):
        raise UserError(f"data.data_dir {data_dir} does not exist: {prepare_hint(data_dir)}")
    if os.path.isfile(os.path.join(data_dir, SUBDIR, "info.json")):
        splits = read_prepared(data_dir)
    elif _tfds_version_dir(data_dir):
        splits = read_tfds(data_dir)
    else:
        raise UserError(f"data.data_dir {data_dir} holds no prepared CIFAR-100: {prepare_hint(data_dir)}")
    return make_dataset(*splits)


def make_dataset(train, test):
    """Dataset from (images, labels) pairs of the two splits."""
    def split(images, labels):
        return data.Split(images, labels.astype(np.int32), np.ones(len(labels), np.float32))
    return data.Dataset(name="cifar100", num_classes=NUM_CLASSES, mean=MEAN, std=STD,
                        train=split(*train), test=split(*test))


# ------------------------------------------------------------------------------------------------ our layout
def write_prepared(directory, splits, info):
    """Write our layout into `directory` (which must be new): splits = {name: (images, fine, coarse)}."""
    os.makedirs(directory)
    for name, (images, fine, coarse) in splits.items():
        np.save(os.path.join(directory, f"{name}_images.npy"), np.ascontiguousarray(images, np.uint8))
        np.save(os.path.join(directory, f"{name}_labels.npy"), np.asarray(fine, np.int32))
        np.save(os.path.join(directory, f"{name}_coarse_labels.npy"), np.asarray(coarse, np.int32))
    info = dict(info, format=FORMAT, version=VERSION, **{f"num_{k}": len(v[1]) for k, v in splits.items()})
    with open(os.path.join(directory, "info.json"), "w") as f:
        json.dump(info, f, indent=1)


def read_prepared(data_dir):
    directory = os.path.join(data_dir, SUBDIR)
    broken = f"{directory} is incomplete or corrupted: delete it and {prepare_hint(data_dir)}"
    try:
        with open(os.path.join(directory, "info.json")) as f:
            info = json.load(f)
        if info.get("format") != FORMAT or info.get("version") != VERSION:
            raise UserError(f"{directory} was written by another version of rsd_jax "
                            f"({info.get('format')} v{info.get('version')}): {prepare_hint(data_dir)}")
        out = []
        for name in ("train", "test"):
            images = np.load(os.path.join(directory, f"{name}_images.npy"))
            labels = np.load(os.path.join(directory, f"{name}_labels.npy"))
            n = info[f"num_{name}"]
            if images.shape != (n, 32, 32, 3) or images.dtype != np.uint8 or labels.shape != (n,) or \
                    labels.min() < 0 or labels.max() >= NUM_CLASSES:
                raise UserError(broken)
            out.append((images, labels))
    except (OSError, ValueError, KeyError):
        raise UserError(broken) from None
    return out


# ------------------------------------------------------------------------------------------------ tfds layout
def _tfds_version_dir(data_dir):
    """DIR/cifar100/<version> holding a tfds dataset_info.json, or None."""
    root = os.path.join(data_dir, "cifar100")
    if not os.path.isdir(root):
        return None
    versions = sorted((v for v in os.listdir(root)
                       if os.path.isfile(os.path.join(root, v, "dataset_info.json"))),
                      key=lambda v: tuple(int(p) if p.isdigit() else 0 for p in v.split(".")))
    return os.path.join(root, versions[-1]) if versions else None


def read_tfds(data_dir):
    version_dir = _tfds_version_dir(data_dir)
    with open(os.path.join(version_dir, "dataset_info.json")) as f:
        file_format = json.load(f).get("fileFormat", "tfrecord")
    if file_format == "array_record":
        return [tfds_split(data_dir, name) for name in ("train", "test")]
    try:
        import tensorflow as tf  # noqa: F401
    except ImportError:
        raise UserError(f"{version_dir} holds tfds {file_format} files, which need TensorFlow: "
                        f"`pip install tensorflow-cpu`, or {prepare_hint(data_dir)}") from None
    return [_tfds_split_tf(data_dir, name) for name in ("train", "test")]


def tfds_split(data_dir, split):
    """(images, labels) of one split through `tfds.data_source` (array_record; PNG decoding by pillow)."""
    import tensorflow_datasets as tfds
    source = tfds.data_source("cifar100", split=split, data_dir=data_dir, download=False)
    n = len(source)
    images = np.empty((n, 32, 32, 3), np.uint8)
    labels = np.empty((n,), np.int32)
    for i in range(n):
        record = source[i]
        images[i] = record["image"]
        labels[i] = record["label"]
    return images, labels


def _tfds_split_tf(data_dir, split):
    import tensorflow as tf
    import tensorflow_datasets as tfds
    tf.config.set_visible_devices([], "GPU")
    arrays = tfds.as_numpy(tfds.load("cifar100", split=split, data_dir=data_dir, download=False, batch_size=-1))
    return np.asarray(arrays["image"], np.uint8), np.asarray(arrays["label"], np.int32)
