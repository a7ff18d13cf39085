"""ImageNet-1k streamed from ArrayRecord files of JPEG bytes with Grain, without TensorFlow (docs/data.md).

Preparing, once, from the ILSVRC folder layout (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG; the validation images sorted
into class folders, as timm and torchvision expect):
  python -m rsd_jax.data.prepare imagenet --train DIR/train --val DIR/val --data_dir OUT
then `--config.data.name=imagenet2012 --config.data.data_dir=OUT`. OUT/imagenet_rsd_jax/ holds
{train,validation}-NNNNN-of-MMMMM.array_record (one record per image: its label as 4 little-endian bytes, then the
original file's bytes, not re-encoded; group_size 1, so any record is read without its neighbours) and info.json
(format, version, class names = the sorted wnids, counts, shards, the files skipped). The record number in a split is
the example's stable index (CRD's memory bank).

Host side, per example (`train_example`): timm's RandomResizedCrop box over the whole image (`crop_box`, the
distribution of timm's `get_params`), the JPEG decoded at the smallest DCT scale (PIL `draft`: 1/2, 1/4, 1/8) that
keeps at least `size` pixels across the box, the box resized to `size` (bilinear or bicubic, `data.augment.
interpolation`), flipped with `data.augment.hflip`; the device skips those (`Dataset.host_augment`) and does the rest
(RandAugment, mixing, erasing, normalisation). Eval (`eval_example`): the shorter side resized to
`data.host_image_size` (default floor(image_size / 0.875)) and a square of that side cut so that the device eval
transform's centre crop of `image_size` is timm's centre crop (`eval_offset`).

The sampler is a function of (seed, step): global batch `step` holds records epoch_order(N, seed, epoch)[rows of
the step], each process decodes only its rows (`data.process_rows`), and example randomness comes from
(seed, epoch, record), so batches do not depend on the process count, the worker count or what ran before; a
resumed run starts its iterator at the step (O(1)). `data.workers` decoding processes (Grain mp_prefetch).
"""
import io
import json
import math
import os
import struct

import numpy as np

from rsd_jax import data
from rsd_jax.errors import UserError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SUBDIR = "imagenet_rsd_jax"
FORMAT = "rsd_jax-imagenet-array_record"
VERSION = 1
SPLITS = {"train": "train", "validation": "val"}   # stored split: the prepare flag it comes from
RECORDS_PER_SHARD = 1024
HOST_AUGMENT = ("random_resized_crop", "hflip", "interpolation")
PREPARE_HINT = "prepare it once with `python -m rsd_jax.data.prepare imagenet --train DIR/train --val DIR/val " \
               "--data_dir OUT` and set --config.data.data_dir=OUT"


# ------------------------------------------------------------------------------------------------ records
def encode_record(label, image_bytes):
    return struct.pack("<i", label) + image_bytes


def decode_record(record):
    return struct.unpack("<i", record[:4])[0], record[4:]


def shard_paths(directory, split, shards):
    return [os.path.join(directory, f"{split}-{i:05d}-of-{shards:05d}.array_record") for i in range(shards)]


def check_image(path):
    """The bytes of `path` after a cheap full decode at 1/8 scale; UserError naming the file if that fails."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            raw = f.read()
        with Image.open(io.BytesIO(raw)) as image:
            image.draft("RGB", (1, 1))
            image.load()
        return raw
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for a damaged file
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"cannot read image {path}: {reason}") from None


def prepare(train, val, data_dir, skip_bad=False, log=print):
    from array_record.python.array_record_module import ArrayRecordWriter

    from rsd_jax.data import folder
    trees = {"train": folder.class_files(train, "train"), "val": folder.class_files(val, "val")}
    classes = folder.same_classes(trees)
    final = os.path.join(os.path.abspath(os.path.expanduser(data_dir)), SUBDIR)
    counts, shards, skipped = {}, {}, []
    with data.staged_directory(final) as new:
        os.makedirs(new)
        for split, flag in SPLITS.items():
            records = [encode_record(label, raw) for raw, label in
                       folder.readable(folder.labelled_files(classes, trees[flag]), check_image, skip_bad, skipped)]
            shards[split] = max(1, -(-len(records) // RECORDS_PER_SHARD))
            for i, path in enumerate(shard_paths(new, split, shards[split])):
                writer = ArrayRecordWriter(path, "group_size:1")
                for record in records[i * RECORDS_PER_SHARD:(i + 1) * RECORDS_PER_SHARD]:
                    writer.write(record)
                writer.close()
            counts[split] = len(records)
        note = folder.write_info(new, dict(format=FORMAT, version=VERSION, classes=classes, shards=shards,
                                           train_dir=os.path.abspath(train), val_dir=os.path.abspath(val),
                                           **{f"num_{k}": v for k, v in counts.items()}), skipped)
    log(f"prepared {len(classes)} classes ({counts['train']} train / {counts['validation']} val images{note}) in "
        f"{final}; use --config.data.name=imagenet2012 --config.data.data_dir={data_dir}")
    return final


class RecordFiles:
    """(label, image bytes) of record i of our files; opened on first use, in each worker process."""

    def __init__(self, paths):
        self.paths, self._source = paths, None

    def __getstate__(self):
        return dict(self.__dict__, _source=None)

    def __call__(self, i):
        if self._source is None:
            import grain
            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return decode_record(self._source[i])


class TfdsRecords(RecordFiles):
    """(label, JPEG bytes) of example i of a tfds imagenet2012 split prepared as ArrayRecord, undecoded."""

    def __init__(self, directory, split):
        super().__init__(None)
        self.directory, self.split = directory, split

    def __call__(self, i):
        if self._source is None:
            import tensorflow_datasets as tfds
            self._source = tfds.builder_from_directory(self.directory).as_data_source(
                self.split, decoders={"image": tfds.decode.SkipDecoding()})
        record = self._source[i]
        return int(record["label"]), record["image"]


# ------------------------------------------------------------------------------------------------ transforms
def crop_box(rng, width, height, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """timm's RandomResizedCrop.get_params, drawn from the numpy Generator `rng`: (top, left, height, width)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(tries):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return data.central_crop_box(width, height, ratio)


def _open(image_bytes):
    from PIL import Image
    return Image.open(io.BytesIO(image_bytes))


def train_example(image_bytes, rng, size, scale, ratio, interpolation, hflip):
    """(size, size, 3) uint8: a random resized crop of the whole image, flipped with probability `hflip`."""
    from PIL import Image
    image = _open(image_bytes)
    width, height = image.size
    top, left, h, w = crop_box(rng, width, height, scale, ratio)
    if image.format == "JPEG":     # decode at a reduced DCT scale that still has >= size pixels across the box
        image.draft("RGB", (math.ceil(width * size / w), math.ceil(height * size / h)))
    fx, fy = image.size[0] / width, image.size[1] / height
    cubic = rng.random() < 0.5 if interpolation == "random" else interpolation == "bicubic"
    image = image if image.mode == "RGB" else image.convert("RGB")   # (convert copies even an RGB image)
    out = image.resize((size, size), Image.BICUBIC if cubic else Image.BILINEAR,
                                      box=(left * fx, top * fy, (left + w) * fx, (top + h) * fy))
    if rng.random() < hflip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def eval_offset(resized, square, size):
    """Offset of the `square` window in a side of length `resized` such that the centre `size` of the window
    (round((square - size) / 2), the device eval crop) is timm's centre crop of the side (round((resized - size) / 2))."""
    return int(round((resized - size) / 2.0)) - int(round((square - size) / 2.0))


def eval_example(image_bytes, square, size, cubic):
    """(square, square, 3) uint8: shorter side resized to `square` (torchvision Resize(int)), the window whose
    centre `size` crop is timm's eval crop."""
    from PIL import Image
    image = _open(image_bytes).convert("RGB")
    w, h = image.size
    rw, rh = (square, int(square * h / w)) if w <= h else (int(square * w / h), square)
    image = image.resize((rw, rh), Image.BICUBIC if cubic else Image.BILINEAR)
    top, left = eval_offset(rh, square, size), eval_offset(rw, square, size)
    return np.asarray(image.crop((left, top, left + square, top + square)))


# ------------------------------------------------------------------------------------------------ the stream
class Examples:
    """Position -> decoded example of one process's rows: position p is row rows[p % local] of global batch
    first_step + p // local. Picklable (Grain sends it to the worker processes)."""

    def __init__(self, records, num_examples, seed, global_batch, rows, transform, train, first_step=0):
        self.records, self.num_examples, self.seed = records, num_examples, seed
        self.global_batch, self.start, self.local = global_batch, rows[0], rows[1] - rows[0]
        self.transform, self.train, self.first_step = transform, train, first_step

    def record_of(self, position):
        """(epoch, record number) at a local position: train in epoch order, eval in order (padding repeats the
        last record)."""
        step, k = divmod(position, self.local)
        step += self.first_step
        row = self.start + k
        if not self.train:
            return 0, min(step * self.global_batch + row, self.num_examples - 1)
        steps_per_epoch = self.num_examples // self.global_batch
        epoch, index = divmod(step, steps_per_epoch)
        return epoch, int(data.epoch_order(self.num_examples, self.seed, epoch)[index * self.global_batch + row])

    def __call__(self, position):
        epoch, record = self.record_of(position)
        label, image_bytes = self.records(record)
        rng = np.random.default_rng([self.seed, epoch, record])
        return self.transform(image_bytes, rng), np.int32(label), np.int32(record)


def _stack(examples):
    images, labels, index = zip(*examples)
    return np.stack(images), np.asarray(labels, np.int32), np.asarray(index, np.int32)


def iterate(examples, num_positions, workers):
    """Batches of `examples.local` decoded examples over positions 0..num_positions-1, in order, with Grain
    (`workers` processes; 0 = in this process)."""
    import grain
    ds = grain.MapDataset.range(num_positions).map(examples)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * examples.local))
    if workers:
        from absl import flags
        if not flags.FLAGS.is_parsed():   # Grain's workers read their options from absl's global flags; our mains
            flags.FLAGS.mark_as_parsed()  # parse their own FlagValues, so the global ones keep their defaults
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
    return iter(ds.batch(examples.local, batch_fn=_stack))


class StreamSplit:
    """One split of the prepared records; `data.train_batch` / `data.eval_batches` call its two methods."""

    def __init__(self, records, num_examples, transform, workers):
        self.records, self.num_examples, self.transform, self.workers = records, num_examples, transform, workers
        self._cursor = None   # (seed, global_batch, rows, next step, iterator): sequential steps reuse the stream

    def __len__(self):
        return self.num_examples

    @staticmethod
    def _rows(global_batch, rows):
        return (rows.start or 0, global_batch if rows.stop is None else rows.stop)

    def train_batch(self, seed, step, global_batch, rows):
        rows = self._rows(global_batch, rows)
        key = (seed, global_batch, rows)
        if self._cursor is None or self._cursor[:3] != key or self._cursor[3] != step:
            examples = Examples(self.records, self.num_examples, seed, global_batch, rows, self.transform, True,
                                first_step=step)
            # Open-ended: a run reads as many steps as it trains; the iterator only decodes what is asked for.
            self._cursor = key + (step, iterate(examples, 2 ** 40, self.workers))
        images, labels, index = next(self._cursor[4])
        self._cursor = key + (step + 1, self._cursor[4])
        return {"image": images, "label": labels, "label_mask": np.ones(len(labels), np.float32), "index": index}

    def eval_batches(self, global_batch, rows):
        """In record order, the last global batch padded with weight-0 copies of the split's last example."""
        rows = self._rows(global_batch, rows)
        steps = -(-self.num_examples // global_batch)
        examples = Examples(self.records, self.num_examples, 0, global_batch, rows, self.transform, False)
        batches = iterate(examples, steps * (rows[1] - rows[0]), self.workers)
        for step in range(steps):
            images, labels, index = next(batches)
            positions = step * global_batch + np.arange(rows[0], rows[1])
            yield {"image": images, "label": labels, "weight": (positions < self.num_examples).astype(np.float32)}


class TrainTransform:
    """Picklable `train_example` with the config's parameters."""

    def __init__(self, size, augment):
        self.args = (size, tuple(augment.get("scale", (0.08, 1.0))), tuple(augment.get("ratio", (3 / 4, 4 / 3))),
                     augment.get("interpolation", "random"), float(augment.get("hflip", 0.5)))

    def __call__(self, image_bytes, rng):
        return train_example(image_bytes, rng, *self.args)


class EvalTransform:
    def __init__(self, square, size, cubic):
        self.args = (square, size, cubic)

    def __call__(self, image_bytes, rng):
        del rng
        return eval_example(image_bytes, *self.args)


def our_splits(directory):
    """{split: (records, count)} and class names of our preparation in `directory`."""
    with open(os.path.join(directory, "info.json")) as f:
        info = json.load(f)
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise UserError(f"{directory} was not written by this version of rsd_jax: {PREPARE_HINT}")
    splits = {}
    for split in SPLITS:
        paths = shard_paths(directory, split, info["shards"][split])
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise UserError(f"{directory} is incomplete ({missing[0]} is missing): {PREPARE_HINT}")
        splits[split] = (RecordFiles(paths), info[f"num_{split}"])
    return splits, info["classes"]


def tfds_splits(data_dir):
    """{split: (records, count)} and class names of tfds' imagenet2012 prepared as ArrayRecord in data_dir."""
    from rsd_jax.data import tfds_source
    directory = tfds_source.version_dir(data_dir, "imagenet2012")
    with open(os.path.join(directory, "dataset_info.json")) as f:
        file_format = json.load(f).get("fileFormat", "tfrecord")
    if file_format != "array_record":
        raise UserError(f"{directory} holds tfds {file_format} files, which need TensorFlow: prepare it with "
                        f"--file_format=array_record, or {PREPARE_HINT}")
    import tensorflow_datasets as tfds
    info = tfds.builder_from_directory(directory).info
    splits = {split: (TfdsRecords(directory, split), info.splits[split].num_examples) for split in SPLITS}
    return splits, info.features["label"].names


def load(config):
    data_dir = os.path.expanduser(config.get("data_dir", "") or "")
    if data_dir and os.path.isfile(os.path.join(data_dir, SUBDIR, "info.json")):
        splits, classes = our_splits(os.path.join(data_dir, SUBDIR))
    elif data_dir and os.path.isdir(os.path.join(data_dir, "imagenet2012")):
        splits, classes = tfds_splits(data_dir)
    else:
        raise UserError(f"data.data_dir {data_dir or '(unset)'} holds no prepared ImageNet: {PREPARE_HINT} (or tfds' "
                        f"imagenet2012 prepared with --file_format=array_record)")
    size = config.image_size
    augment = config.get("augment", None) or {}
    square = config.get("host_image_size", 0) or math.floor(size / (augment.get("crop_pct", 0) or 0.875))
    cubic = (augment.get("eval_interpolation", "") or "bicubic") == "bicubic"
    workers = int(config.get("workers", 0))
    transforms = {"train": TrainTransform(size, augment), "validation": EvalTransform(square, size, cubic)}
    streams = {split: StreamSplit(records, count, transforms[split], workers)
               for split, (records, count) in splits.items()}
    return data.Dataset(name="imagenet2012", num_classes=len(classes), mean=MEAN, std=STD,
                        train=streams["train"], test=streams["validation"], host_augment=HOST_AUGMENT)
