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
