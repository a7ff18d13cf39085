"""Every CIFAR pair config of the reference's train.sh builds and takes a training step at smoke size."""
import glob
import importlib.util
import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from rsd_jax import models, train
from rsd_jax.data import augment

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "[a-z]*_*.py")))


def load(path, arg=None):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_twelve_pairs_with_reference_settings():
    assert len(CONFIGS) == 12
    for path in CONFIGS:
        c = load(path)
        assert c.data.name == "cifar100" and c.data.image_size == 224 and c.data.batch_size == 256
        assert c.distill.method == "rsd" and c.distill.group_size == 128
        assert (c.distill.rsd.loss_weight, c.distill.rsd.kappa, c.distill.rsd.gamma) == (0.1, 0.01, 2)
        assert models.family_of(c.student.model) and models.family_of(c.teacher.model)
        cnn = c.student.model in ("resnet18", "mobilenetv2_100")
        assert c.optim.name == ("sgd" if cnn else "adamw")
        assert (c.data.augment.mixup, c.data.augment.cutmix) == ((0.0, 0.0) if cnn else (0.8, 1.0))
        # eval: the student's crop_pct, resized bilinear (the reference's CIFAR data_config), not its default
        assert augment.eval_config(c.data.augment, c.student.model) == \
            (augment.EVAL_CONFIGS[c.student.model][0], "bilinear")


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p)[:-3] for p in CONFIGS])
def test_smoke_config_trains(path):
    # One device: this checks the configs; sharding is tests/test_train.py's job (and 8 fake CPU devices under a
    # loaded CI machine have aborted in XLA's collective watchdog here).
    run = train.build_run(load(path, "smoke"), Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    state = run.init(jax.random.key(0))
    state, metrics = run.train_step(state, run.teacher_vars, run.train_batch(0))
    jax.block_until_ready(state)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["rsd"]) > 0
