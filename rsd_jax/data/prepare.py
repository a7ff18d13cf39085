"""Prepare a dataset directory from a downloaded archive, offline and without TensorFlow:

  python -m rsd_jax.data.prepare cifar100 --archive cifar-100-python.tar.gz --data_dir DIR
  python -m rsd_jax.data.prepare cifar100 --archive cifar-100-binary.tar.gz --data_dir DIR

  python -m rsd_jax.data.prepare folder --train DIR --val DIR --size S --data_dir OUT [--skip_bad]
  python -m rsd_jax.data.prepare imagenet --train DIR/train --val DIR/val --data_dir OUT [--skip_bad]

then train or evaluate with `--config.data.name=cifar100 --config.data.data_dir=DIR`, `--config.data.name=folder:OUT`
(rsd_jax/data/folder.py) or `--config.data.name=imagenet2012 --config.data.data_dir=OUT` (rsd_jax/data/imagenet.py). The archive is parsed and
checked completely before anything is written; the result appears in DIR/cifar100_rsd_jax/ in one rename, so a
failure leaves nothing half-written (a previous preparation is replaced only by a complete new one).
The python archive holds Python-2 pickles; they are read with an unpickler that accepts nothing but numpy arrays
and plain containers, so a hostile archive cannot run code.
"""
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
from absl import flags

from rsd_jax import cli, data
from rsd_jax.data import cifar
from rsd_jax.errors import UserError

# torchvision's and tfds' checksums of the official archives (www.cs.toronto.edu/~kriz).
OFFICIAL = {
    "python": dict(md5="eb9058c3a382ffc7106e4002c42a8d85"),
    "binary": dict(sha256="58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Only what a pickled numpy array needs; anything else is not a CIFAR file."""
    # _codecs.encode: how Python 3 writes bytes in a protocol-2 pickle (a pure function).
    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                         "numpy._core.numeric") for n in ("_reconstruct", "scalar", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR pickle")
        return super().find_class(module, name)


def _unpickle(raw):
    return _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()


def _checked(name, images, fine, coarse):
    fine = np.asarray(fine)
    coarse = np.asarray(coarse)
    n = len(images)
    if fine.shape != (n,) or coarse.shape != (n,):
        raise ValueError(f"{name}: {n} images but {fine.shape} fine and {coarse.shape} coarse labels")
    if n == 0 or fine.min() < 0 or fine.max() >= cifar.NUM_CLASSES or coarse.min() < 0 or \
            coarse.max() >= cifar.NUM_COARSE:
        raise ValueError(f"{name}: labels outside 0..99 (fine) / 0..19 (coarse), or no images")
    return images, fine.astype(np.int32), coarse.astype(np.int32)


def _planes_to_nhwc(flat):
    """(N, 3072) bytes as the archives store them (R, G, B planes of 32x32, row-major) -> (N, 32, 32, 3)."""
    return np.ascontiguousarray(np.asarray(flat, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def parse_python(members):
    splits = {}
    for name in ("train", "test"):
        d = _unpickle(members[f"cifar-100-python/{name}"])
        flat = np.asarray(d[b"data"])
        if flat.dtype != np.uint8 or flat.ndim != 2 or flat.shape[1] != 3072:
            raise ValueError(f"{name}: data is {flat.dtype} {flat.shape}, expected uint8 (N, 3072)")
        splits[name] = _checked(name, _planes_to_nhwc(flat), d[b"fine_labels"], d[b"coarse_labels"])
    meta = _unpickle(members["cifar-100-python/meta"])
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[b"fine_label_names"]]
    return splits, classes


def parse_binary(members):
    splits = {}
    for name in ("train", "test"):
        raw = np.frombuffer(members[f"cifar-100-binary/{name}.bin"], np.uint8)
        if raw.size % 3074:
            raise ValueError(f"{name}.bin: {raw.size} bytes is not a whole number of 3074-byte records")
        records = raw.reshape(-1, 3074)
        splits[name] = _checked(name, _planes_to_nhwc(records[:, 2:]), records[:, 1], records[:, 0])
    names = members.get("cifar-100-binary/fine_label_names.txt", b"").decode().split()
    return splits, names


def read_archive(path):
    """(kind, {split: (images, fine, coarse)}, class names, checksums) from a CIFAR-100 archive; UserError if not."""
    if not os.path.isfile(path):
        raise UserError(f"archive {path} does not exist")
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
            sha256.update(block)
    sums = dict(md5=md5.hexdigest(), sha256=sha256.hexdigest())
    try:
        with tarfile.open(path, "r:*") as tar:
            names = [m.name for m in tar.getmembers() if m.isfile()]
            tops = {n.split("/")[0] for n in names}
            if "cifar-100-python" in tops:
                kind, wanted = "python", [f"cifar-100-python/{n}" for n in ("train", "test", "meta")]
            elif "cifar-100-binary" in tops:
                kind, wanted = "binary", [f"cifar-100-binary/{n}" for n in ("train.bin", "test.bin")]
            else:
                what = "CIFAR-10" if tops & {"cifar-10-batches-py", "cifar-10-batches-bin"} else \
                    f"an archive of {', '.join(sorted(tops)[:3]) or 'nothing'}"
                raise UserError(f"{path} is {what}, not cifar-100-python.tar.gz or cifar-100-binary.tar.gz")
            missing = [n for n in wanted if n not in names]
            if missing:
                raise UserError(f"{path} is not a complete CIFAR-100 archive: missing {', '.join(missing)}")
            extra = ["cifar-100-binary/fine_label_names.txt"] if kind == "binary" else []
            members = {n: tar.extractfile(n).read() for n in wanted + [n for n in extra if n in names]}
        splits, classes = (parse_python if kind == "python" else parse_binary)(members)
    except UserError:
        raise
    except tarfile.ReadError:
        raise UserError(f"{path} is not a CIFAR-100 archive (not a readable .tar.gz file)") from None
    except Exception as e:  # tarfile, gzip, zlib, pickle and numpy all have their own errors for a bad file
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"{path} is not a readable CIFAR-100 archive ({reason})") from None
    return kind, splits, classes, sums


def prepare_cifar100(archive, data_dir, log=print):
    kind, splits, classes, sums = read_archive(archive)
    official = all(sums[k] == v for k, v in OFFICIAL[kind].items())
    counts = {k: len(v[0]) for k, v in splits.items()}
    if counts != cifar.SIZES:
        log(f"note: {counts['train']} train / {counts['test']} test images; the real CIFAR-100 has 50000 / 10000")
    elif not official:
        log(f"note: {archive} has the right shape but is not byte-identical to the official {kind} archive")
    info = dict(source=os.path.basename(archive), archive_kind=kind, official_archive=official,
                classes=classes, **sums)
    data_dir = os.path.expanduser(data_dir)
    final = os.path.join(data_dir, cifar.SUBDIR)
    with data.staged_directory(final) as new:
        cifar.write_prepared(new, splits, info)
    log(f"prepared CIFAR-100 ({counts['train']} train / {counts['test']} test, {kind} archive"
        f"{', official' if official else ''}) in {final}; use --config.data.name=cifar100 "
        f"--config.data.data_dir={data_dir}")
    return final


USAGES = {
    "cifar100": "python -m rsd_jax.data.prepare cifar100 --archive FILE.tar.gz --data_dir DIR",
    "folder": "python -m rsd_jax.data.prepare folder --train DIR --val DIR --size S --data_dir OUT [--skip_bad]",
    "imagenet": "python -m rsd_jax.data.prepare imagenet --train DIR --val DIR --data_dir OUT [--skip_bad]",
}
REQUIRED = {"cifar100": ("archive",), "folder": ("train", "val", "size"), "imagenet": ("train", "val")}
USAGE = " | ".join(USAGES.values())
DATASETS = tuple(USAGES)


def define_flags(FLAGS):
    flags.DEFINE_string("archive", None, "cifar100: cifar-100-python.tar.gz or cifar-100-binary.tar.gz",
                        flag_values=FLAGS)
    flags.DEFINE_string("data_dir", None, "the directory to write (cifar100, imagenet: to use as "
                        "--config.data.data_dir; folder: as --config.data.name=folder:DIR)", flag_values=FLAGS)
    flags.DEFINE_string("train", None, "folder, imagenet: the training tree, one subdirectory per class",
                        flag_values=FLAGS)
    flags.DEFINE_string("val", None, "folder, imagenet: the validation tree, the same class subdirectories",
                        flag_values=FLAGS)
    flags.DEFINE_integer("size", None, "folder: the stored square size (shorter side resized, centre crop)",
                         flag_values=FLAGS)
    flags.DEFINE_bool("skip_bad", False, "folder, imagenet: skip (and count) unreadable images instead of failing",
                      flag_values=FLAGS)


def run(FLAGS, args):
    if args[0] not in DATASETS:
        raise UserError(f"unknown dataset {args[0]!r}; known: {', '.join(DATASETS)}")
    missing = [name for name in REQUIRED[args[0]] if FLAGS[name].value in (None, "")]
    if missing:
        raise UserError(f"missing --{missing[0]}; usage: {USAGES[args[0]]}")
    if args[0] == "cifar100":
        prepare_cifar100(FLAGS.archive, FLAGS.data_dir)
    elif args[0] == "folder":
        from rsd_jax.data import folder
        folder.prepare(FLAGS.train, FLAGS.val, FLAGS.size, FLAGS.data_dir, skip_bad=FLAGS.skip_bad)
    else:
        from rsd_jax.data import imagenet
        imagenet.prepare(FLAGS.train, FLAGS.val, FLAGS.data_dir, skip_bad=FLAGS.skip_bad)


def main(argv=None):
    cli.run_main(run, argv, define=define_flags, args=("DATASET",), required=("data_dir",), usage=USAGE,
                 compile_cache=False)


if __name__ == "__main__":
    main()
