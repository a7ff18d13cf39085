"""The fidelity check (rsd_jax.step_check): rsd_jax's train step against the PyTorch re-statement of the reference
(bench/torch_reference.py), 3 steps at smoke size; and a deliberately wrong setting on one side is caught."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")

from bench import step_check  # noqa: E402
from configs import presets  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke(teacher, student, method):
    config = presets.cifar_pair(teacher, student, "smoke")
    config.distill.method = method
    return config


@pytest.mark.parametrize("teacher,student,method", [
    ("swin_tiny_patch4_window7_224", "resnet18", "rsd"),          # CNN student, SGD-Nesterov, 2 groups
    ("convnext_tiny", "deit_tiny_patch16_224", "rsd"),            # token student, AdamW, clipping, mixup/cutmix
    ("convnext_tiny", "deit_tiny_patch16_224", "kd"),
])
def test_three_steps_within_tolerance(teacher, student, method):
    result = step_check.check(smoke(teacher, student, method), steps=3, out=lambda s: None)
    assert result["ok"], [r["failed"] for r in result["steps"]]
    last = result["steps"][-1]
    assert method in last["losses"] and last["max_update_rel"] > 0     # the steps moved the parameters
    assert last["lr_jax"] > 1e-4                                          # past warmup: the updates show


CNN, TOKENS = ("swin_tiny_patch4_window7_224", "resnet18"), ("convnext_tiny", "deit_tiny_patch16_224")


@pytest.mark.parametrize("pair,method", [(CNN, m) for m in ("vanilla", "dkd", "dist", "ofa", "fitnet", "crd", "rkd",
                                                            "correlation")]
                         + [(TOKENS, "ofa"), (TOKENS, "fitnet")])
def test_baselines_within_tolerance(pair, method):
    """Every method against its PyTorch re-statement (bench/torch_distillers.py), 2 steps: the method's parameters
    and state (branches, aligners, embeddings, CRD memory) and the student's, from the same start."""
    config = smoke(*pair, method)
    config.distill.crd.k = 256
    result = step_check.check(config, steps=2, out=lambda s: None)
    assert result["ok"], [(r["failed"], r["max_loss_rel"], r["max_param_rel"]) for r in result["steps"]]
    last = result["steps"][-1]
    assert (method in last["losses"] or method == "vanilla") and last["max_update_rel"] > 0
    if method in ("ofa", "fitnet", "crd", "correlation"):     # the method's own parameters were compared
        assert last["compared"]["extra"] > 0
    if method == "crd":                                        # and its memory banks
        assert last["compared"]["memory"] == 4     # student and teacher banks, Z and its flag


def test_wrong_baseline_setting_is_caught():
    result = step_check.check(smoke(*CNN, "dkd"), steps=1, torch_set=["distill.dkd.beta=4.0"], out=lambda s: None)
    assert not result["ok"] and "loss" in result["steps"][0]["failed"]


def test_wrong_kappa_on_one_side_is_caught():
    """The jittered float64 steps widen the floor only by what a rounding-sized nudge does: a wrong kappa fails."""
    result = step_check.check(smoke("swin_tiny_patch4_window7_224", "resnet18", "rsd"), steps=1,
                              torch_set=["distill.rsd.kappa=0.02"], out=lambda s: None)
    step = result["steps"][0]
    assert not result["ok"] and "loss" in step["failed"]
    assert 0 < step["floor"]["loss"] < 1e-5


def test_cli_exit_status():
    env = dict(os.environ, XLA_FLAGS="")
    cmd = [sys.executable, "-m", "rsd_jax.step_check", "--config", "configs/swin_resnet18.py:smoke", "--steps", "1"]
    bad = subprocess.run(cmd + ["--torch_set", "distill.optim_typo=1"], cwd=REPO, env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "unknown config key" in bad.stderr
    bad = subprocess.run(cmd + ["--jitter=-1"], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ") and "jitter" in bad.stderr
    wrong = subprocess.run(cmd + ["--config.distill.method=kd", "--torch_set", "distill.kd.temperature=2.0", "--json"],
                           cwd=REPO, env=env, capture_output=True, text=True)
    assert wrong.returncode == 1, wrong.stderr[-2000:]
    assert '"ok": false' in wrong.stdout
