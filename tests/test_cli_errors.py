"""`python -m rsd_jax.evaluate` and `rsd_jax.main` on bad input: one `error:` line and exit status 2, never a
traceback."""
import json
import os

import jax
import pytest
from jax.sharding import Mesh
import numpy as np

from rsd_jax import checkpoint, train
from test_train import run_cli
from tiny import tiny_config



def evaluate(*args):
    return run_cli("rsd_jax.evaluate", *map(str, args))


def assert_one_line_error(out, message):
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    assert message in lines[0], lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run directory: the tiny config's config.json and a checkpoint of its initial state."""
    d = tmp_path_factory.mktemp("run")
    config = tiny_config("vanilla")
    run = train.build_run(config, Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    ckpts = checkpoint.RunCheckpoints(d)
    ckpts.save(run.init(jax.random.key(0)))
    ckpts.close()
    (d / "config.json").write_text(config.to_json_best_effort())
    return d


@pytest.mark.parametrize("batch", [0, -8])
def test_model_batch_size_must_be_positive(batch, tmp_path):
    assert_one_line_error(evaluate("--model", tmp_path, "--dataset", "digits", "--batch_size", batch),
                          "--batch_size must be positive")


@pytest.mark.parametrize("text", ["{bad", "[1, 2]"])
def test_unreadable_config_json(text, tmp_path):
    (tmp_path / "config.json").write_text(text)
    assert_one_line_error(evaluate("--workdir", tmp_path), f"{tmp_path / 'config.json'} is unreadable")


def test_checkpoint_that_does_not_fit_the_config_json(workdir, tmp_path):
    os.symlink(workdir / "checkpoints", tmp_path / "checkpoints")
    config = json.loads((workdir / "config.json").read_text())
    config["student"]["overrides"]["widths"] = [8, 8, 8, 16]      # conv1 and layer1 twice as wide as trained
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_one_line_error(evaluate("--workdir", tmp_path), "does not fit: shape mismatch (checkpoint vs model): ")
    assert evaluate("--workdir", workdir).returncode == 0      # the same checkpoint with its own config


def test_unknown_config_key_names_the_key_and_the_nearest_one(tmp_path):
    # ml_collections' KeyError text (quotes, a newline, "Did you mean") must not leak into the message.
    out = run_cli("rsd_jax.main", "--config", "configs/demo.py:smoke", "--workdir", str(tmp_path / "run"),
                  "--config.teachers=3")
    assert_one_line_error(out, "unknown config key 'teachers' (did you mean 'teacher'?)")
    assert out.stderr.strip() == "error: unknown config key 'teachers' (did you mean 'teacher'?)"
    assert not (tmp_path / "run").exists()
