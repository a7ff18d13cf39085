"""Dataset sources: CIFAR-100 archives in both real on-disk formats -> prepare -> load; batch order determinism and
per-process rows; `evaluate --model` on a tiny model directory. The other sources (tfds:, folder:, imagenet2012) are
tested in test_data_sources.py."""
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import ml_collections
import numpy as np
import pytest

from rsd_jax import data
from rsd_jax.data import cifar, prepare
from rsd_jax.errors import UserError

N_TRAIN, N_TEST = 64, 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_cifar(seed=0, n_train=N_TRAIN, n_test=N_TEST):
    """{split: (images NHWC uint8, fine, coarse)} with random pixels and labels."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        out[name] = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 100, n),
                     rng.integers(0, 20, n))
    return out


def _planes(images):
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def _tar(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return str(path)


def write_python_archive(path, splits, top="cifar-100-python"):
    """The layout of cifar-100-python.tar.gz: protocol-2 pickles of dicts with bytes keys."""
    files = {}
    for name, (images, fine, coarse) in splits.items():
        d = {b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
             b"batch_label": f"{name} batch".encode(), b"fine_labels": [int(x) for x in fine],
             b"coarse_labels": [int(x) for x in coarse], b"data": _planes(images)}
        files[f"{top}/{name}"] = pickle.dumps(d, protocol=2)
    files[f"{top}/meta"] = pickle.dumps({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                                         b"coarse_label_names": [f"super{i}".encode() for i in range(20)]},
                                        protocol=2)
    return _tar(path, files)


def write_binary_archive(path, splits):
    """The layout of cifar-100-binary.tar.gz: records of <coarse byte><fine byte><3072 pixel bytes>."""
    files = {}
    for name, (images, fine, coarse) in splits.items():
        records = np.concatenate([np.asarray(coarse, np.uint8)[:, None], np.asarray(fine, np.uint8)[:, None],
                                  _planes(images)], axis=1)
        files[f"cifar-100-binary/{name}.bin"] = records.tobytes()
    files["cifar-100-binary/fine_label_names.txt"] = "\n".join(f"class{i}" for i in range(100)).encode()
    files["cifar-100-binary/coarse_label_names.txt"] = "\n".join(f"super{i}" for i in range(20)).encode()
    return _tar(path, files)


def data_config(data_dir, name="cifar100"):
    return ml_collections.ConfigDict(dict(name=name, data_dir=str(data_dir), image_size=32))


def check_dataset(ds, splits):
    assert (ds.name, ds.num_classes, ds.mean, ds.std) == ("cifar100", 100, cifar.MEAN, cifar.STD)
    for got, (images, fine, _) in ((ds.train, splits["train"]), (ds.test, splits["test"])):
        assert got.images.dtype == np.uint8 and got.images.shape == images.shape
        np.testing.assert_array_equal(got.images, images)
        np.testing.assert_array_equal(got.labels, fine)
        assert got.labels.dtype == np.int32 and np.all(got.label_mask == 1)


@pytest.mark.parametrize("kind", ["python", "binary"])
def test_prepare_then_load(tmp_path, kind):
    splits = fake_cifar(seed=1 if kind == "python" else 2)
    write = write_python_archive if kind == "python" else write_binary_archive
    archive = write(tmp_path / f"cifar-100-{kind}.tar.gz", splits)
    messages = []
    prepare.prepare_cifar100(archive, str(tmp_path / "d"), log=messages.append)
    check_dataset(data.load(data_config(tmp_path / "d")), splits)
    info = json.load(open(tmp_path / "d" / cifar.SUBDIR / "info.json"))
    assert info["archive_kind"] == kind and not info["official_archive"] and info["classes"][7] == "class7"
    assert "50000" in messages[0]    # a non-standard size is pointed out

    # Preparing again replaces the old data completely, leaving no staging directories behind.
    splits2 = fake_cifar(seed=3)
    prepare.prepare_cifar100(write(tmp_path / "again.tar.gz", splits2), str(tmp_path / "d"), log=lambda m: None)
    check_dataset(data.load(data_config(tmp_path / "d")), splits2)
    assert os.listdir(tmp_path / "d") == [cifar.SUBDIR]


def test_pixel_layout_matches_the_archive_format(tmp_path):
    """Pixel (y, x, c) of image i is byte c*1024 + y*32 + x of its row, as in the CIFAR documentation."""
    splits = fake_cifar(seed=4)
    archive = write_binary_archive(tmp_path / "b.tar.gz", splits)
    prepare.prepare_cifar100(archive, str(tmp_path / "d"), log=lambda m: None)
    raw = np.frombuffer(tarfile.open(archive).extractfile("cifar-100-binary/test.bin").read(), np.uint8)
    record = raw.reshape(-1, 3074)[5]
    ds = data.load(data_config(tmp_path / "d"))
    y, x, c = 3, 17, 2
    assert ds.test.images[5, y, x, c] == record[2 + c * 1024 + y * 32 + x]
    assert ds.test.labels[5] == record[1]


def _run_prepare(*args):
    return subprocess.run([sys.executable, "-m", "rsd_jax.data.prepare", "cifar100", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_bad_archives_are_one_line_errors_and_write_nothing(tmp_path):
    splits = fake_cifar()
    bad = {
        "cifar10": write_python_archive(tmp_path / "c10.tar.gz", splits, top="cifar-10-batches-py"),
        "truncated": str(tmp_path / "trunc.tar.gz"),
        "garbage": str(tmp_path / "garbage.tar.gz"),
        "missing": str(tmp_path / "nope.tar.gz"),
        "hostile_pickle": _tar(tmp_path / "evil.tar.gz", {
            "cifar-100-python/train": pickle.dumps(os.getcwd, protocol=2),   # a callable: must not be loaded
            "cifar-100-python/test": b"", "cifar-100-python/meta": b""}),
        "bad_labels": write_binary_archive(tmp_path / "labels.tar.gz", {
            k: (im, np.full(len(im), 150), c) for k, (im, f, c) in splits.items()}),
    }
    good = open(write_binary_archive(tmp_path / "good.tar.gz", splits), "rb").read()
    open(bad["truncated"], "wb").write(good[:len(good) // 2])
    open(bad["garbage"], "wb").write(b"\x1f\x8b" + os.urandom(1000))
    for what, archive in bad.items():
        out = tmp_path / f"out_{what}"
        if what == "truncated":
            r = _run_prepare("--archive", archive, "--data_dir", out)
            assert r.returncode == 2 and r.stdout == "", (what, r)
            assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, (what, r.stderr)
        else:
            with pytest.raises(UserError):
                prepare.prepare_cifar100(archive, str(out))
        assert not out.exists(), what


def test_missing_or_unprepared_data_dir(tmp_path):
    for config in (data_config(""), data_config(tmp_path / "absent"), data_config(tmp_path)):
        with pytest.raises(UserError, match="python -m rsd_jax.data.prepare cifar100"):
            data.load(config)
    broken = tmp_path / cifar.SUBDIR
    broken.mkdir()
    (broken / "info.json").write_text(json.dumps({"format": cifar.FORMAT, "version": cifar.VERSION,
                                                  "num_train": 10, "num_test": 10}))
    with pytest.raises(UserError, match="incomplete or corrupted"):
        data.load(data_config(tmp_path))


def test_unprepared_data_dir_fails_before_compiling(tmp_path):
    """build_run loads the data before building models or compiling anything."""
    from tiny import tiny_config

    from rsd_jax import train
    config = tiny_config(method="vanilla")
    config.data.name = "cifar100"
    config.data.data_dir = str(tmp_path)
    config.student.overrides = dict(config.student.overrides, img_size=32)
    config.data.image_size = 32
    with pytest.raises(UserError, match="rsd_jax.data.prepare"):
        train.build_run(config)


def test_tfds_array_record_route_without_tensorflow(tmp_path):
    """The tfds route reads through tfds.data_source (no TensorFlow); mock_data stands in for a prepared dir."""
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        images, labels = cifar.tfds_split(str(tmp_path), "train")
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (12,) and labels.min() >= 0 and labels.max() < 100


# ------------------------------------------------------------------------------------------------ batches
def _split(n=100):
    rng = np.random.default_rng(0)
    return data.Split(rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), np.arange(n, dtype=np.int32),
                      np.ones(n, np.float32))


def test_train_batches_are_a_function_of_seed_and_step():
    split = _split()
    b = lambda seed, step: data.train_batch(split, seed, step, 16)["label"]
    steps_per_epoch = 100 // 16
    np.testing.assert_array_equal(b(0, 3), b(0, 3))
    assert not np.array_equal(b(0, 3), b(1, 3))                       # the seed matters
    assert not np.array_equal(b(0, 2), b(0, 2 + steps_per_epoch))     # each epoch has its own order
    epoch = np.concatenate([b(0, s) for s in range(steps_per_epoch)])
    assert len(set(epoch.tolist())) == len(epoch)                     # no example twice within an epoch
    # Asking out of order (as a resumed run does) gives the same batches.
    later = [b(5, s) for s in (9, 2, 7)]
    for s, got in zip((9, 2, 7), later):
        np.testing.assert_array_equal(got, b(5, s))


@pytest.mark.parametrize("processes", [1, 2, 4, 8])
def test_process_rows_partition_the_global_batch(processes):
    split, batch = _split(), 32
    whole = data.train_batch(split, 0, 4, batch)
    parts = [data.train_batch(split, 0, 4, batch, p, processes) for p in range(processes)]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[key])
    rows = [range(batch)[data.process_rows(batch, p, processes)] for p in range(processes)]
    assert sorted(i for r in rows for i in r) == list(range(batch))   # disjoint and covering
    assert all(len(r) == batch // processes for r in rows)
    evals = [list(data.eval_batches(split, batch, p, processes)) for p in range(processes)]
    for i, full in enumerate(data.eval_batches(split, batch)):
        for key in full:
            np.testing.assert_array_equal(np.concatenate([e[i][key] for e in evals]), full[key])
    with pytest.raises(UserError):
        data.process_rows(30, 0, 4)


def test_process_rows_match_sharding_to_global(monkeypatch):
    """sharding.to_global feeds process p's devices with rows process_rows(B, p, P) of the global batch."""
    import jax

    from rsd_jax import sharding
    seen = []
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    monkeypatch.setattr(jax, "process_index", lambda: 2)
    monkeypatch.setattr(jax, "make_array_from_process_local_data",
                        lambda sharding_, local, shape: seen.append(local))
    batch = np.arange(32)
    sharding.to_global({"x": batch}, sharding.make_mesh())
    np.testing.assert_array_equal(seen[0], batch[data.process_rows(32, 2, 4)])


# ------------------------------------------------------------------------------------------------ evaluate --model
def test_evaluate_model_directory(tmp_path):
    """`evaluate --model` on a tiny model directory and a tiny prepared CIFAR-100: the metrics of a direct
    computation with the reference's eval transform for that model; --json prints one line."""
    import jax
    import jax.numpy as jnp

    from rsd_jax import evaluate, models
    from rsd_jax.data import augment
    splits = fake_cifar(seed=5, n_train=16, n_test=24)
    prepare.prepare_cifar100(write_binary_archive(tmp_path / "b.tar.gz", splits), str(tmp_path / "d"),
                             log=lambda m: None)
    overrides = dict(img_size=32, widths=(4, 4, 8, 8), layers=(1, 1, 1, 1))
    model = models.create_model("resnet18", num_classes=100, **overrides)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    models.save_model(tmp_path / "m", "resnet18", 100, variables, overrides=overrides)

    result = evaluate.evaluate_model(str(tmp_path / "m"), "cifar100", str(tmp_path / "d"), batch_size=16)
    assert set(result) == {"top1", "top5", "loss", "step", "crop_pct", "interpolation", "parameters"}
    assert (result["step"], result["crop_pct"], result["interpolation"]) == (None, 0.875, "bilinear")
    assert result["parameters"] == sum(np.size(x) for x in jax.tree_util.tree_leaves(variables["params"]))
    # The reference's eval transform for resnet18 (crop_pct 0.875, bilinear: 32 -> 36 -> centre 32), not a no-op.
    transform = augment.eval_transform(augment.default_config(), cifar.MEAN, cifar.STD, size=32, model="resnet18")
    images = transform(jnp.asarray(splits["test"][0]))
    plain = (splits["test"][0] / 255.0 - np.asarray(cifar.MEAN)) / np.asarray(cifar.STD)
    assert np.abs(np.asarray(images) - plain).max() > 0.1
    logits = np.asarray(model.apply(variables, images, train=False)[0])
    labels = splits["test"][1]
    top5 = np.argsort(-logits, axis=1)[:, :5]
    log_z = np.asarray(jax.nn.logsumexp(logits, axis=1))
    expected_loss = float(np.mean(log_z - logits[np.arange(len(labels)), labels]))
    assert result["top1"] == pytest.approx(100 * np.mean(top5[:, 0] == labels), abs=1e-4)
    assert result["top5"] == pytest.approx(100 * np.mean(np.any(top5 == labels[:, None], 1)), abs=1e-4)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-4)

    cmd = [sys.executable, "-m", "rsd_jax.evaluate", "--model", str(tmp_path / "m"), "--dataset", "cifar100",
           "--data_dir", str(tmp_path / "d"), "--batch_size", "8", "--json"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == pytest.approx({k: result[k] for k in ("top1", "top5", "loss")}, rel=1e-4)

    r = subprocess.run(cmd[:-5] + ["--data_dir", str(tmp_path / "absent")], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=300)
    assert r.returncode == 2 and "rsd_jax.data.prepare" in r.stderr and r.stderr.count("\n") == 1, r.stderr
