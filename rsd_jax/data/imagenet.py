"""ImageNet-1k (tfds `imagenet2012`) from a data_dir the user prepared with tensorflow-datasets, streamed on the host
with tf.data (TensorFlow needed: `pip install tensorflow-cpu`; it is kept off the GPU).

Preparing is the user's step, once, from the two official tars (tfds cannot download ImageNet):
  tfds build imagenet2012 --data_dir DIR --manual_dir DIR_WITH_ILSVRC2012_img_{train,val}.tar
then `--config.data.name=imagenet2012 --config.data.data_dir=DIR`.

The host decodes each JPEG, resizes its shorter side to `data.host_image_size` (bicubic, antialiased) and takes the
centre square, so batches are fixed-size uint8; the device augmentation does the rest on that square (the random
resized crop then sees the centre square only: a documented simplification). With `host_image_size` =
floor(image_size / crop_pct) the device eval transform's resize is the identity and its centre crop is the
reference's.

Batches are a function of (seed, step) and the process: the train order of epoch e comes from tfds' file shuffle
and a shuffle buffer seeded with (seed, e), with tf.data's deterministic mode; a resumed run skips to its step. Each
process reads whole global batches of undecoded records and decodes only its own rows (`data.process_rows`).
Batches carry no "index" (a streamed split has no stable example index), so methods needing one (CRD) cannot run.
"""
import numpy as np

from rsd_jax import data
from rsd_jax.errors import UserError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 1000
PREPARE_HINT = ("prepare it once with `tfds build imagenet2012 --data_dir DIR --manual_dir DIR_OF_THE_TARS` "
                "and set --config.data.data_dir=DIR")


def import_tensorflow():
    """TensorFlow for tf.data on the host only: it must never take the accelerator away from JAX."""
    try:
        import tensorflow as tf
    except ImportError:
        raise UserError("dataset imagenet2012 streams with tf.data: `pip install tensorflow-cpu`") from None
    tf.config.set_visible_devices([], "GPU")
    return tf


def load(config):
    import os
    data_dir = os.path.expanduser(config.get("data_dir", "") or "")
    if not data_dir or not os.path.isdir(os.path.join(data_dir, "imagenet2012")):
        raise UserError(f"data.data_dir {data_dir or '(unset)'} holds no tfds imagenet2012: {PREPARE_HINT}")
    tf = import_tensorflow()
    import tensorflow_datasets as tfds
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    if not builder.is_prepared():
        raise UserError(f"{data_dir}/imagenet2012 is not completely prepared: {PREPARE_HINT}")
    size = config.get("host_image_size", 0) or int(config.image_size / 0.875)
    return data.Dataset(name="imagenet2012", num_classes=NUM_CLASSES, mean=MEAN, std=STD,
                        train=StreamSplit(tf, builder, "train", size, shuffle=True),
                        test=StreamSplit(tf, builder, "validation", size, shuffle=False))


def split_size(builder, split):
    return builder.info.splits[split].num_examples


class StreamSplit:
    """A split read with tf.data; `data.train_batch` / `data.eval_batches` call its two methods."""

    def __init__(self, tf, builder, split, size, shuffle, shuffle_buffer=16_384):
        self.tf, self.builder, self.split, self.size = tf, builder, split, size
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.num_examples = split_size(builder, split)
        self._cursor = None   # (seed, global_batch, rows, next step, iterator): sequential steps reuse the stream

    def __len__(self):
        return self.num_examples

    def _records(self, seed, epoch):
        import tensorflow_datasets as tfds
        tf = self.tf
        read_config = tfds.ReadConfig(shuffle_seed=int(np.random.default_rng([seed, epoch]).integers(2**31)),
                                      interleave_cycle_length=16)
        ds = self.builder.as_dataset(split=self.split, shuffle_files=self.shuffle, read_config=read_config,
                                     decoders={"image": tfds.decode.SkipDecoding()})
        options = tf.data.Options()
        options.deterministic = True
        ds = ds.with_options(options)
        if self.shuffle:
            ds = ds.shuffle(self.shuffle_buffer, seed=read_config.shuffle_seed, reshuffle_each_iteration=False)
        return ds.map(lambda r: (r["image"], tf.cast(r["label"], tf.int32)))

    def _decode(self, jpeg):
        tf = self.tf
        image = tf.io.decode_image(jpeg, channels=3, expand_animations=False)
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        scale = self.size / tf.cast(tf.minimum(h, w), tf.float32)
        new_h = tf.maximum(self.size, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
        new_w = tf.maximum(self.size, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
        image = tf.image.resize(image, (new_h, new_w), method="bicubic", antialias=True)
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        image = image[top:top + self.size, left:left + self.size]
        return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)

    def _local(self, ds, global_batch, rows, drop_remainder):
        """Global batches of records -> this process's rows, decoded."""
        tf = self.tf
        start, stop = rows.start or 0, rows.stop if rows.stop is not None else global_batch
        ds = ds.batch(global_batch, drop_remainder=drop_remainder)
        ds = ds.map(lambda jpeg, label: (jpeg[start:stop], label[start:stop]))
        ds = ds.unbatch().map(lambda jpeg, label: (self._decode(jpeg), label), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(stop - start).prefetch(2)

    def train_batch(self, seed, step, global_batch, rows):
        steps_per_epoch = self.num_examples // global_batch
        epoch, index = divmod(step, steps_per_epoch)
        c = self._cursor
        if c is None or c[:4] != (seed, global_batch, (rows.start, rows.stop), step):
            ds = self._local(self._records(seed, epoch), global_batch, rows, drop_remainder=True)
            c = (seed, global_batch, (rows.start, rows.stop), step, iter(ds.skip(index)))
        images, labels = next(c[4])
        self._cursor = (c[0], c[1], c[2], step + 1, c[4]) if index + 1 < steps_per_epoch else None
        return {"image": images.numpy(), "label": labels.numpy(), "label_mask": np.ones(len(labels), np.float32)}

    def eval_batches(self, global_batch, rows):
        """In tfds order, the last global batch padded with weight-0 copies of the split's last example."""
        n = self.num_examples
        padded = -(-n // global_batch) * global_batch
        records = self._records(0, 0)
        last = records.skip(n - 1).take(1)
        records = records.concatenate(last.repeat(padded - n))
        start = 0
        for images, labels in self._local(records, global_batch, rows, drop_remainder=True):
            positions = np.arange(start, start + global_batch)[rows]
            yield {"image": images.numpy(), "label": labels.numpy(),
                   "weight": (positions < n).astype(np.float32)}
            start += global_batch
