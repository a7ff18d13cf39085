"""Any prepared tensorflow-datasets image-classification dataset that fits in memory, without TensorFlow:
`--config.data.name=tfds:<name>` (also `tfds:<name>/<config>` and `...:<version>`; the newest prepared version
otherwise).

The dataset must have been prepared as ArrayRecord (`tfds build <name> --file_format=array_record`, or
`file_format="array_record"` in Python): those files are read through tfds' data source (`builder.as_data_source`,
what `tfds.data_source` returns), whose random access needs only array_record and pillow; tfds' default tfrecord
files need TensorFlow and are refused with a hint. The builder is rebuilt from the prepared directory
(`tfds.builder_from_directory`), so datasets whose code is not installed (one's own builders) load too.

`data.image_key` / `data.label_key` name the features (default `image` / `label`); the class count is the label
feature's `num_classes`. `data.train_split` (default `train`) and `data.test_split` (default: `test`, else
`validation`) choose the splits. All images of a split must have one size (the device augmentation crops and
resizes from there); grey images are repeated to 3 channels. The splits become the host arrays CIFAR-100 uses.

Mean and std: `data.mean` / `data.std` when given, else computed once over the training split and cached in
`<version dir>/rsd_jax_mean_std.json` (written atomically; not cached where the directory is read-only).
`data.data_dir` defaults to $TFDS_DATA_DIR, then ~/tensorflow_datasets, as in tfds.
"""
import json
import os

import numpy as np

from rsd_jax import data
from rsd_jax.errors import UserError

STATS_FILE = "rsd_jax_mean_std.json"


def data_dir_of(config):
    return os.path.expanduser(config.get("data_dir", "") or os.environ.get("TFDS_DATA_DIR", "")
                              or "~/tensorflow_datasets")


def _version_key(version):
    return tuple(int(p) if p.isdigit() else -1 for p in version.split("."))


def version_dir(data_dir, spec):
    """The prepared directory DATA_DIR/<name>[/<config>]/<version> of `spec` = name[/config][:version]."""
    name, _, version = spec.partition(":")
    root = os.path.join(data_dir, *name.split("/"))
    hint = f"prepare it as ArrayRecord first: `tfds build {name} --data_dir {data_dir} --file_format=array_record`"
    if not name or not os.path.isdir(root):
        raise UserError(f"no tfds dataset {name!r} in {data_dir} (data.data_dir, $TFDS_DATA_DIR or "
                        f"~/tensorflow_datasets): {hint}")
    prepared = [v for v in os.listdir(root) if os.path.isfile(os.path.join(root, v, "dataset_info.json"))]
    if version:
        if version not in prepared:
            raise UserError(f"tfds dataset {name} has no prepared version {version} in {data_dir} "
                            f"(prepared: {', '.join(sorted(prepared, key=_version_key)) or 'none'})")
        return os.path.join(root, version)
    if not prepared:
        raise UserError(f"{root} holds no completely prepared version of {name}: {hint}")
    return os.path.join(root, max(prepared, key=_version_key))


def load(config):
    spec = config.name[len("tfds:"):]
    directory = version_dir(data_dir_of(config), spec)
    with open(os.path.join(directory, "dataset_info.json")) as f:
        file_format = json.load(f).get("fileFormat", "tfrecord")
    if file_format != "array_record":
        raise UserError(f"{directory} holds tfds {file_format} files, which need TensorFlow; prepare it again with "
                        f"--file_format=array_record")
    import tensorflow_datasets as tfds
    builder = tfds.builder_from_directory(directory)
    image_key, label_key = config.get("image_key", "image"), config.get("label_key", "label")
    features = builder.info.features
    for key, what in ((image_key, "image_key"), (label_key, "label_key")):
        if key not in features:
            raise UserError(f"tfds {spec} has no feature {key!r} (data.{what}); its features: "
                            f"{', '.join(sorted(features.keys()))}")
    num_classes = getattr(features[label_key], "num_classes", None)
    if not num_classes:
        raise UserError(f"tfds {spec} feature {label_key!r} is not a ClassLabel, so it has no class count")
    splits = builder.info.splits
    train_name = config.get("train_split", "") or "train"
    test_name = config.get("test_split", "") or next((s for s in ("test", "validation") if s in splits), "test")
    for name in (train_name, test_name):
        if name not in splits:
            raise UserError(f"tfds {spec} has no split {name!r}; its splits: {', '.join(sorted(splits.keys()))}")
    train = read_split(builder, train_name, image_key, label_key, num_classes)
    test = read_split(builder, test_name, image_key, label_key, num_classes)
    mean, std = data.configured_mean_std(config) or cached_mean_std(directory, train_name, train[0])
    return data.Dataset(name=config.name, num_classes=num_classes, mean=mean, std=std,
                        train=_as_split(*train), test=_as_split(*test))


def _as_split(images, labels):
    return data.Split(images, labels, np.ones(len(labels), np.float32))


def read_split(builder, split, image_key, label_key, num_classes, chunk=256):
    """(images (N, H, W, 3) uint8, labels (N,) int32) of a whole split, read through the data source."""
    source = builder.as_data_source(split=split)
    n = len(source)
    if n == 0:
        raise UserError(f"tfds split {split} of {builder.name} is empty")
    images = labels = None
    for start in range(0, n, chunk):
        records = source.__getitems__(list(range(start, min(n, start + chunk))))
        for i, record in enumerate(records, start):
            image = np.asarray(record[image_key])
            if image.ndim == 2:
                image = image[..., None]
            if image.ndim != 3 or image.shape[-1] not in (1, 3) or image.dtype != np.uint8:
                raise UserError(f"tfds {builder.name} feature {image_key!r} is {image.dtype} {image.shape}, not "
                                f"a uint8 image (H, W, 1 or 3)")
            if images is None:
                images = np.empty((n,) + image.shape[:2] + (3,), np.uint8)
                labels = np.empty((n,), np.int32)
            if image.shape[:2] != images.shape[1:3]:
                raise UserError(f"tfds {builder.name} split {split}: example {i} is {image.shape[0]}x"
                                f"{image.shape[1]}, example 0 {images.shape[1]}x{images.shape[2]}; images of several "
                                f"sizes need `python -m rsd_jax.data.prepare folder` (one stored size)")
            images[i] = image
            labels[i] = record[label_key]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"tfds {builder.name} split {split}: labels outside 0..{num_classes - 1}")
    return images, labels


def cached_mean_std(directory, split, images):
    """The training split's mean/std from the cache next to the dataset, computed and cached when absent."""
    path = os.path.join(directory, STATS_FILE)
    try:
        with open(path) as f:
            cached = json.load(f)
        if cached.get("split") == split and cached.get("num_examples") == len(images):
            return tuple(cached["mean"]), tuple(cached["std"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    mean, std = data.mean_std(images)
    try:
        data.write_json_atomic(path, dict(split=split, num_examples=len(images), mean=mean, std=std))
    except OSError:
        pass   # a read-only dataset directory: computed again next time
    return mean, std
