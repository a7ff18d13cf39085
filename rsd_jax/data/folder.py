"""An image folder: one subdirectory per class (JPEG/PNG files), a training and a validation tree, stored once as
uint8 arrays of one size and then read like CIFAR-100:

  python -m rsd_jax.data.prepare folder --train DIR --val DIR --size S --data_dir OUT
  --config.data.name=folder:OUT

Each image is converted to RGB, its shorter side resized to S (PIL bicubic, antialiased; the longer side keeps the
aspect, truncated, as torchvision's Resize(int)) and the centre SxS square kept (timm's CenterCrop offsets): timm's
eval transform at crop_pct 1. The device augmentation then crops and resizes from that square. Classes are the
sorted subdirectory names of the training tree; the validation tree must have the same ones.

OUT holds {train,test}_images.npy (N, S, S, 3) uint8, {train,test}_labels.npy (N,) int32 and info.json (format,
version, size, class names, counts, the training split's mean/std, the files skipped). It is written into a
temporary directory next to OUT and renamed at the end, so a failure leaves nothing half-written; a previous
preparation in OUT is replaced only by a complete new one.
"""
import json
import os

import numpy as np

from rsd_jax import data
from rsd_jax.errors import UserError

FORMAT = "rsd_jax-folder-npy"
VERSION = 1
EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLITS = {"train": "train", "test": "val"}   # stored split: the prepare flag it comes from


def class_files(root, what):
    """{class name: sorted image paths} of a class-per-subdirectory tree; UserError on an empty class or tree."""
    if not root or not os.path.isdir(root):
        raise UserError(f"--{what} {root or '(unset)'} is not a directory")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise UserError(f"--{what} {root} has no class subdirectories")
    out = {}
    for name in classes:
        directory = os.path.join(root, name)
        out[name] = sorted(os.path.join(directory, f) for f in os.listdir(directory)
                           if f.lower().endswith(EXTENSIONS) and not f.startswith("."))
        if not out[name]:
            raise UserError(f"class {name!r} of --{what} {root} holds no .jpg/.jpeg/.png images")
    return out


def same_classes(trees):
    """The class names shared by all trees ({flag: {class: files}}); UserError naming a class only in some."""
    names = {what: set(tree) for what, tree in trees.items()}
    every = set.union(*names.values())
    for cls in sorted(every):
        missing = [what for what, have in names.items() if cls not in have]
        if missing:
            present = [what for what in names if what not in missing]
            raise UserError(f"class {cls!r} is in --{', --'.join(present)} but not in --{', --'.join(missing)}")
    return sorted(every)


def centre_square(image, size):
    """A PIL image -> (size, size, 3) uint8: shorter side to `size` (bicubic), centre crop, as timm's eval."""
    from PIL import Image
    w, h = image.size
    rw, rh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    resized = image.convert("RGB").resize((rw, rh), Image.BICUBIC)
    top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def read_image(path):
    """The decoded PIL image of `path`; UserError naming the file when it cannot be decoded."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for a damaged file
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"cannot read image {path}: {reason}") from None


def readable(files, read, skip_bad, skipped):
    """(read(path), label) of each (path, label) in `files`; an unreadable file (read raises UserError) stops
    everything, or with `skip_bad` is appended to `skipped` and left out."""
    for path, label in files:
        try:
            value = read(path)
        except UserError:
            if not skip_bad:
                raise
            skipped.append(path)
            continue
        yield value, label


def labelled_files(classes, tree):
    """[(path, class number)] of a tree, class by class."""
    return [(path, label) for label, cls in enumerate(classes) for path in tree[cls]]


def write_info(directory, info, skipped):
    """info.json of a preparation; the note on the skipped files for its closing message."""
    with open(os.path.join(directory, "info.json"), "w") as f:
        json.dump(dict(info, skipped=skipped), f, indent=1)
    return f", {len(skipped)} unreadable files skipped" if skipped else ""


def prepare(train, val, size, out, skip_bad=False, log=print):
    if size < 1:
        raise UserError(f"--size {size} must be positive")
    trees = {"train": class_files(train, "train"), "val": class_files(val, "val")}
    classes = same_classes(trees)
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, "info.json")):
        raise UserError(f"--data_dir {out} exists and is not an image-folder preparation: choose a new directory")
    with data.staged_directory(out) as new:
        os.makedirs(new)
        counts, skipped = {}, []
        for split, flag in SPLITS.items():
            files = labelled_files(classes, trees[flag])
            images = np.lib.format.open_memmap(os.path.join(new, f"{split}_images.npy"), "w+", np.uint8,
                                               (len(files), size, size, 3))
            labels = []
            for image, label in readable(files, lambda path: centre_square(read_image(path), size), skip_bad,
                                         skipped):
                images[len(labels)] = image
                labels.append(label)
            images.flush()
            del images
            if len(labels) < len(files):   # skipped files: keep only the rows written
                kept = np.load(os.path.join(new, f"{split}_images.npy"), mmap_mode="r")[:len(labels)]
                np.save(os.path.join(new, f"{split}_images.tmp.npy"), kept)
                del kept
                os.replace(os.path.join(new, f"{split}_images.tmp.npy"), os.path.join(new, f"{split}_images.npy"))
            empty = sorted(set(range(len(classes))) - set(labels))
            if empty:
                raise UserError(f"class {classes[empty[0]]!r} of --{flag} has no readable image left")
            np.save(os.path.join(new, f"{split}_labels.npy"), np.asarray(labels, np.int32))
            counts[split] = len(labels)
        mean, std = data.mean_std(np.load(os.path.join(new, "train_images.npy"), mmap_mode="r"))
        note = write_info(new, dict(format=FORMAT, version=VERSION, size=size, classes=classes, mean=mean, std=std,
                                    train_dir=os.path.abspath(train), val_dir=os.path.abspath(val),
                                    **{f"num_{k}": v for k, v in counts.items()}), skipped)
    log(f"prepared {len(classes)} classes ({counts['train']} train / {counts['test']} val images, {size}x{size}"
        f"{note}) in {out}; use --config.data.name=folder:{out}")
    return out


def load(config):
    out = os.path.expanduser(config.name[len("folder:"):])
    hint = f"run `python -m rsd_jax.data.prepare folder --train DIR --val DIR --size S --data_dir {out or 'OUT'}`"
    broken = f"{out} is incomplete or corrupted: delete it and {hint}"
    try:
        with open(os.path.join(out, "info.json")) as f:
            info = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{out or '(empty)'} holds no prepared image folder: {hint}") from None
    except (OSError, ValueError):
        raise UserError(broken) from None
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise UserError(f"{out} was not written by this version of `prepare folder`: {hint}")
    splits = {}
    try:
        for split in SPLITS:
            images = np.load(os.path.join(out, f"{split}_images.npy"), mmap_mode="r")
            labels = np.load(os.path.join(out, f"{split}_labels.npy"))
            n, size = info[f"num_{split}"], info["size"]
            if images.shape != (n, size, size, 3) or images.dtype != np.uint8 or labels.shape != (n,):
                raise UserError(broken)
            splits[split] = data.Split(images, labels.astype(np.int32), np.ones(n, np.float32))
    except (OSError, ValueError, KeyError):
        raise UserError(broken) from None
    mean, std = data.configured_mean_std(config) or (tuple(info["mean"]), tuple(info["std"]))
    return data.Dataset(name=config.name, num_classes=len(info["classes"]), mean=mean, std=std,
                        train=splits["train"], test=splits["test"])
