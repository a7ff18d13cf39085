"""Data in the formats people have, each written in its real on-disk format and read back: a tfds dataset prepared as
ArrayRecord (a tiny builder, no TensorFlow), an image folder through `prepare folder`, and ImageNet's ILSVRC layout
through `prepare imagenet` and the Grain stream (crop distribution against timm, eval transform against timm)."""
import io
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from rsd_jax import data
from rsd_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_config(**kw):
    return ml_collections.ConfigDict(dict(dict(data_dir="", image_size=32, image_key="image", label_key="label",
                                               train_split="train", test_split="", mean=(), std=()), **kw))


def _run(module, *args, env=None):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env=env)


# ------------------------------------------------------------------------------------------------ tfds
def _png(array):
    f = io.BytesIO()
    Image.fromarray(array).save(f, format="PNG")
    f.seek(0)
    return f


def write_tfds(data_dir, splits):
    """A tiny tfds dataset `tiny_shapes` with features `picture` (PNG) and `kind` (4 classes), prepared as
    ArrayRecord into data_dir. The images go in as PNG files: encoding arrays would need TensorFlow."""
    import tensorflow_datasets as tfds

    class TinyShapes(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "picture": tfds.features.Image(shape=(6, 5, 3)), "kind": tfds.features.ClassLabel(num_classes=4)}))

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(name) for name in splits}

        def _generate_examples(self, name):
            images, labels = splits[name]
            for i, (image, label) in enumerate(zip(images, labels)):
                yield i, {"picture": _png(image), "kind": int(label)}

    TinyShapes(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_dataset_read_back_without_tensorflow(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    splits = {name: (rng.integers(0, 256, (n, 6, 5, 3), dtype=np.uint8), rng.integers(0, 4, n))
              for name, n in (("train", 20), ("validation", 7))}
    write_tfds(tmp_path, splits)
    assert "tensorflow" not in sys.modules
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))     # data.data_dir unset: $TFDS_DATA_DIR
    ds = data.load(data_config(name="tfds:tiny_shapes", image_key="picture", label_key="kind"))
    assert "tensorflow" not in sys.modules
    assert ds.num_classes == 4
    for got, name in ((ds.train, "train"), (ds.test, "validation")):   # no test split: validation
        # tfds stores the examples in its own shuffled order: compare as sets of (pixels, label).
        want = sorted((img.tobytes(), int(lab)) for img, lab in zip(*splits[name]))
        assert sorted((img.tobytes(), int(lab)) for img, lab in zip(got.images, got.labels)) == want
        assert got.images.shape == splits[name][0].shape and got.images.dtype == np.uint8
    pixels = splits["train"][0].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(ds.mean, pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(ds.std, pixels.std(0), rtol=1e-9)
    cache = tmp_path / "tiny_shapes" / "1.0.0" / "rsd_jax_mean_std.json"
    cached = json.loads(cache.read_text())
    assert cached["num_examples"] == 20 and cached["mean"] == list(ds.mean)
    # The cache is what a second load uses (made visibly different here), and the config overrides both.
    cache.write_text(json.dumps(dict(cached, mean=[0.1, 0.2, 0.3])))
    config = data_config(name="tfds:tiny_shapes:1.0.0", data_dir=str(tmp_path), image_key="picture",
                         label_key="kind")
    assert data.load(config).mean == (0.1, 0.2, 0.3)
    config.update(dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    assert (data.load(config).mean, data.load(config).std) == ((0.5,) * 3, (0.25,) * 3)

    for bad, match in ((dict(name="tfds:tiny_shapes"), "no feature 'image'"),
                       (dict(name="tfds:nothing_here", image_key="picture"), "tfds build nothing_here"),
                       (dict(name="tfds:tiny_shapes:2.0.0"), "no prepared version 2.0.0"),
                       (dict(name="tfds:tiny_shapes", image_key="picture", label_key="kind", test_split="test"),
                        "no split 'test'")):
        with pytest.raises(UserError, match=match):
            data.load(data_config(data_dir=str(tmp_path), **dict(dict(label_key="kind"), **bad)))


# ------------------------------------------------------------------------------------------------ image folder
def write_tree(root, sizes_by_class, seed=0, formats=("JPEG", "PNG")):
    """root/<class>/<i>.jpg|png with random images of the given (width, height) sizes; returns {path: array}."""
    rng = np.random.default_rng(seed)
    written = {}
    for cls, sizes in sizes_by_class.items():
        os.makedirs(root / cls, exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            fmt = formats[i % len(formats)]
            path = root / cls / f"{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
            # Smooth images (a small random image upsampled) so that JPEG keeps them close to what was written.
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR).save(
                path, format=fmt)
            written[str(path)] = np.asarray(Image.open(path).convert("RGB"))
    return written


def timm_eval_square(path, size):
    """timm's eval transform at crop_pct 1 with bicubic, in PIL (the independent reference)."""
    import torchvision.transforms as T
    transform = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    return np.asarray(transform(Image.open(path).convert("RGB")))


def test_prepare_folder_then_load(tmp_path):
    pytest.importorskip("torchvision")
    from rsd_jax.data import folder
    sizes = {"cat": [(20, 14), (9, 13)], "dog": [(16, 16), (30, 11), (12, 12)], "eel": [(17, 25)]}
    train = write_tree(tmp_path / "train", sizes, seed=1)
    val = write_tree(tmp_path / "val", {c: s[:1] for c, s in sizes.items()}, seed=2)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image: ignored")
    messages = []
    out = tmp_path / "out"
    folder.prepare(str(tmp_path / "train"), str(tmp_path / "val"), 8, str(out), log=messages.append)
    ds = data.load(data_config(name=f"folder:{out}"))
    assert ds.num_classes == 3 and json.loads((out / "info.json").read_text())["classes"] == ["cat", "dog", "eel"]
    for got, written in ((ds.train, train), (ds.test, val)):
        paths = sorted(written, key=lambda p: (p.split(os.sep)[-2], p))
        assert got.images.shape == (len(paths), 8, 8, 3) and got.images.dtype == np.uint8
        assert [["cat", "dog", "eel"][i] for i in got.labels] == [p.split(os.sep)[-2] for p in paths]
        for image, path in zip(got.images, paths):
            np.testing.assert_array_equal(image, timm_eval_square(path, 8))
    pixels = ds.train.images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(ds.mean, pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(ds.std, pixels.std(0), rtol=1e-9)
    assert "3 classes (6 train / 3 val" in messages[0]
    assert sorted(os.listdir(tmp_path)) == ["out", "train", "val"]      # no staging left

    # A corrupt file: a one-line error naming it through the command line, nothing written; --skip_bad counts it.
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = _run("rsd_jax.data.prepare", "folder", "--train", tmp_path / "train", "--val", tmp_path / "val",
             "--size", 8, "--data_dir", tmp_path / "out2")
    assert r.returncode == 2 and r.stderr.startswith("error: cannot read image ") and "broken.jpg" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "out2").exists(), r.stderr
    assert sorted(os.listdir(tmp_path)) == ["out", "train", "val"]
    folder.prepare(str(tmp_path / "train"), str(tmp_path / "val"), 8, str(out), skip_bad=True,
                   log=messages.append)
    assert "1 unreadable files skipped" in messages[-1] and len(data.load(data_config(name=f"folder:{out}")).train) == 6

    # A class only in one split, an empty class.
    write_tree(tmp_path / "val", {"fox": [(8, 8)]})
    with pytest.raises(UserError, match="class 'fox' is in --val but not in --train"):
        folder.prepare(str(tmp_path / "train"), str(tmp_path / "val"), 8, str(tmp_path / "o3"))
    (tmp_path / "train" / "fox").mkdir()
    with pytest.raises(UserError, match="class 'fox' of --train .* holds no"):
        folder.prepare(str(tmp_path / "train"), str(tmp_path / "val"), 8, str(tmp_path / "o3"))
    assert not (tmp_path / "o3").exists()
    with pytest.raises(UserError, match="holds no prepared image folder"):
        data.load(data_config(name=f"folder:{tmp_path / 'o3'}"))


# ------------------------------------------------------------------------------------------------ imagenet
SIZES = [(50, 37), (37, 50), (64, 64), (90, 40), (30, 72), (45, 45)]   # (width, height), as PIL


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory):
    """A tiny ILSVRC layout (3 wnids; 27 train and 9 val JPEGs of several sizes) prepared with `prepare imagenet`."""
    from rsd_jax.data import imagenet
    root = tmp_path_factory.mktemp("ilsvrc")
    wnids = ["n01440764", "n01443537", "n01484850"]
    files = {}
    for split, per_class, seed in (("train", 9, 3), ("val", 3, 4)):
        files[split] = write_tree(root / split, {w: [SIZES[(i + j) % len(SIZES)] for i in range(per_class)]
                                                 for j, w in enumerate(wnids)}, seed=seed, formats=("JPEG",))
    imagenet.prepare(str(root / "train"), str(root / "val"), str(root / "out"), log=lambda m: None)
    return root, files


def imagenet_config(root, **kw):
    from rsd_jax.data import augment
    return data_config(**dict(dict(name="imagenet2012", data_dir=str(root / "out"), image_size=16, workers=0,
                                   augment=augment.default_config()), **kw))


def test_prepare_imagenet_records_hold_the_files(ilsvrc):
    import grain

    from rsd_jax.data import imagenet
    root, files = ilsvrc
    directory = root / "out" / imagenet.SUBDIR
    info = json.loads((directory / "info.json").read_text())
    assert info["classes"] == ["n01440764", "n01443537", "n01484850"]
    assert (info["num_train"], info["num_validation"]) == (27, 9)
    for split, flag in imagenet.SPLITS.items():
        source = grain.sources.ArrayRecordDataSource(imagenet.shard_paths(str(directory), split,
                                                                          info["shards"][split]))
        paths = sorted(files[flag], key=lambda p: (p.split(os.sep)[-2], p))
        assert len(source) == len(paths)
        for i, path in enumerate(paths):
            label, raw = imagenet.decode_record(source[i])
            assert info["classes"][label] == path.split(os.sep)[-2] and raw == open(path, "rb").read()


def test_imagenet_batches_are_a_function_of_seed_and_step(ilsvrc):
    root, _ = ilsvrc
    ds = data.load(imagenet_config(root))
    assert "tensorflow" not in sys.modules and ds.num_classes == 3 and len(ds.train) == 27
    batch, steps_per_epoch = 8, 27 // 8
    seq = [data.train_batch(ds.train, 5, s, batch) for s in range(2 * steps_per_epoch)]
    assert seq[0]["image"].shape == (batch, 16, 16, 3) and seq[0]["image"].dtype == np.uint8
    # Each epoch: distinct records in epoch_order; the labels are those of the records.
    for e in range(2):
        index = np.concatenate([b["index"] for b in seq[e * steps_per_epoch:(e + 1) * steps_per_epoch]])
        np.testing.assert_array_equal(index, data.epoch_order(27, 5, e)[:len(index)])
    labels = np.concatenate([b["label"] for b in seq])
    np.testing.assert_array_equal(labels, np.concatenate([b["index"] for b in seq]) // 9)
    # A fresh dataset (a resumed run) asked for step 4 directly, then 5: the uninterrupted batches, bit for bit.
    resumed = data.load(imagenet_config(root))
    for s in (4, 5, 1):
        got = data.train_batch(resumed.train, 5, s, batch)
        for key in got:
            np.testing.assert_array_equal(got[key], seq[s][key])
    # Process shards: each process decodes its rows; together the global batch. Another seed: another batch.
    halves = [data.train_batch(resumed.train, 5, 3, batch, p, 2) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), seq[3]["image"])
    assert not np.array_equal(data.train_batch(resumed.train, 6, 3, batch)["index"], seq[3]["index"])
    # Worker processes (Grain) change nothing.
    workers = data.load(imagenet_config(root, workers=2))
    got = data.train_batch(workers.train, 5, 2, batch)
    np.testing.assert_array_equal(got["image"], seq[2]["image"])
    evals = list(data.eval_batches(resumed.test, 4))
    assert len(evals) == 3 and [e["weight"].sum() for e in evals] == [4, 4, 1]
    assert all(e["image"].shape == (4, 18, 18, 3) for e in evals)   # floor(16 / 0.875) = 18


def _quantiles(boxes, width, height):
    boxes = np.asarray(boxes, np.float64)
    top, left, h, w = boxes.T
    q = np.linspace(0.05, 0.95, 19)
    return (np.quantile(h * w / (width * height), q), np.quantile(np.log(w / h), q),
            np.quantile(top / max(1, height - h.min()), q), np.mean((h == height) & (w == width)))


@pytest.mark.parametrize("width, height", [(500, 375), (375, 500), (100, 100), (40, 160)])
def test_crop_box_distribution_matches_timm(width, height):
    """20,000 draws each of ours and timm's get_params on the same size: the quantiles of the area fraction, the log
    aspect ratio and the vertical offset agree within 0.02 (about 4 standard errors), and so does the rate of
    the whole-image box (timm's fallback where it applies)."""
    import random

    pytest.importorskip("torch")
    from timm.data.transforms import RandomResizedCropAndInterpolation

    from rsd_jax.data import imagenet
    image = Image.new("RGB", (width, height))
    random.seed(0)
    theirs = [RandomResizedCropAndInterpolation.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(20000)]
    rng = np.random.default_rng(0)
    ours = [imagenet.crop_box(rng, width, height) for _ in range(20000)]
    for box in ours[:200]:
        top, left, h, w = box
        assert 0 <= top and 0 <= left and top + h <= height and left + w <= width and h >= 1 and w >= 1
    for a, b in zip(_quantiles(ours, width, height), _quantiles(theirs, width, height)):
        np.testing.assert_allclose(a, b, atol=0.02)


def test_imagenet_transforms_match_timm(ilsvrc):
    """Eval: our host square, centre-cropped as the device does, is timm's eval transform (PIL) exactly. Train: with
    timm's box, our crop (a reduced JPEG decode where the box allows) is PIL's crop + resize within a few levels."""
    pytest.importorskip("torch")
    from timm.data import create_transform

    from rsd_jax.data import imagenet
    root, files = ilsvrc
    for path in files["val"]:
        raw = open(path, "rb").read()
        for size, crop_pct, interp in ((16, 0.875, "bicubic"), (24, 0.95, "bilinear")):
            timm_eval = create_transform(size, is_training=False, crop_pct=crop_pct, interpolation=interp)
            pil_steps = [t for t in timm_eval.transforms if type(t).__name__ in ("Resize", "CenterCrop")]
            assert len(pil_steps) == 2
            want = Image.open(io.BytesIO(raw)).convert("RGB")
            for t in pil_steps:
                want = t(want)
            square = int(size / crop_pct)
            got = imagenet.eval_example(raw, square, size, interp == "bicubic")
            off = int(round((square - size) / 2.0))
            np.testing.assert_array_equal(got[off:off + size, off:off + size], np.asarray(want), err_msg=path)
    rng = np.random.default_rng(1)
    for path in files["train"]:
        raw = open(path, "rb").read()
        full = Image.open(io.BytesIO(raw)).convert("RGB")
        seed = int(rng.integers(1 << 30))
        got = imagenet.train_example(raw, np.random.default_rng(seed), 16, (0.08, 1.0), (3 / 4, 4 / 3),
                                     "bicubic", 0.0)
        top, left, h, w = imagenet.crop_box(np.random.default_rng(seed), *full.size)
        want = np.asarray(full.crop((left, top, left + w, top + h)).resize((16, 16), Image.BICUBIC), np.float64)
        assert np.abs(got - want).mean() < 4, path
        flipped = imagenet.train_example(raw, np.random.default_rng(seed), 16, (0.08, 1.0), (3 / 4, 4 / 3),
                                         "bicubic", 1.0)
        np.testing.assert_array_equal(flipped, got[:, ::-1])


def test_imagenet_errors(tmp_path, ilsvrc):
    from rsd_jax.data import imagenet
    for config in (data_config(name="imagenet2012"), data_config(name="imagenet2012", data_dir=str(tmp_path))):
        with pytest.raises(UserError, match="rsd_jax.data.prepare imagenet"):
            data.load(config)
    root, files = ilsvrc
    train = tmp_path / "train"
    write_tree(train, {"n1": [(20, 20)], "n2": [(20, 20)]}, formats=("JPEG",))
    write_tree(tmp_path / "val", {"n1": [(20, 20)], "n2": [(20, 20)]}, formats=("JPEG",))
    good = open(train / "n2" / "0.jpg", "rb").read()
    (train / "n2" / "1.JPEG").write_bytes(good[:len(good) // 3])        # truncated
    r = _run("rsd_jax.data.prepare", "imagenet", "--train", train, "--val", tmp_path / "val",
             "--data_dir", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.startswith("error: cannot read image ") and "1.JPEG" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and os.listdir(tmp_path / "out") == []    # nothing written
    imagenet.prepare(str(train), str(tmp_path / "val"), str(tmp_path / "out"), skip_bad=True, log=lambda m: None)
    info = json.loads((tmp_path / "out" / imagenet.SUBDIR / "info.json").read_text())
    assert info["num_train"] == 2 and len(info["skipped"]) == 1


def test_device_leaves_out_what_the_host_did():
    """With the streamed ImageNet's host_augment the device train transform is only the normalisation (no second
    crop or flip); the config itself is untouched."""
    import jax
    import jax.numpy as jnp

    from rsd_jax.data import augment, imagenet
    config = augment.default_config()
    device = augment.on_device(config, imagenet.HOST_AUGMENT)
    assert config.random_resized_crop and config.hflip == 0.5
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)), jnp.uint8)
    mean, std = imagenet.MEAN, imagenet.STD
    got = augment.train_transform(device, mean, std, size=16)(images, jax.random.key(0))
    np.testing.assert_allclose(got, augment.normalize(images, mean, std), atol=1e-6)
    assert augment.on_device(config, ()) is config


def test_tfds_imagenet2012_as_array_record(tmp_path, ilsvrc):
    """tfds' imagenet2012 layout prepared as ArrayRecord (a stand-in builder of the same name and features, over the
    tiny ILSVRC JPEGs) streams like ours: the labels and JPEG bytes of its records, eval as timm."""
    import tensorflow_datasets as tfds

    from rsd_jax.data import imagenet
    root, files = ilsvrc
    wnids = ["n01440764", "n01443537", "n01484850"]
    with tfds.core.registered.skip_registration():
        class Imagenet2012(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("5.1.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=wnids)}))

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples(flag) for split, flag in imagenet.SPLITS.items()}

            def _generate_examples(self, flag):
                for path in sorted(files[flag]):
                    yield path, {"image": io.BytesIO(open(path, "rb").read()),
                                 "label": wnids.index(path.split(os.sep)[-2])}

    Imagenet2012(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    ds = data.load(imagenet_config(root, data_dir=str(tmp_path)))
    assert ds.num_classes == 3 and (len(ds.train), len(ds.test)) == (27, 9) and "tensorflow" not in sys.modules
    by_bytes = {open(p, "rb").read(): wnids.index(p.split(os.sep)[-2]) for p in files["train"]}
    for i in range(len(ds.train)):
        label, raw = ds.train.records(i)
        assert by_bytes[raw] == label
    batch = data.train_batch(ds.train, 0, 1, 8)
    np.testing.assert_array_equal(batch["label"], [ds.train.records(i)[0] for i in batch["index"]])
    evals = list(data.eval_batches(ds.test, 9))
    assert evals[0]["image"].shape == (9, 18, 18, 3) and evals[0]["weight"].sum() == 9


def test_bench_imagenet_reports_the_decode_rate(ilsvrc, capsys):
    from rsd_jax.data import bench
    root, _ = ilsvrc
    r = bench.bench_imagenet(str(root / "out"), images=6, size=16, workers=0)
    assert r["images"] == 6 and r["images_per_s_per_worker"] > 0
    assert r["workers_for_target"] == -(-bench.TARGET // r["images_per_s_per_worker"])
    bench.main(["imagenet", "--data_dir", str(root / "out"), "--images", "4", "--size", "16"])
    assert "images/s per worker" in capsys.readouterr().out
