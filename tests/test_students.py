"""Several students per teacher pass: each student of a run of several (`students=K`, a `sweep`) is the single run
it stands for, the run resumes exactly after SIGKILL, its directories work like a single run's, and bad input is
one line.

Runs are subprocesses of the tiny config on one CPU device (11 steps per epoch), as in test_reliability.py; the
step-level comparisons run in this process on a one-device mesh."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from rsd_jax import models, students, train
from rsd_jax.errors import UserError
from test_reliability import assert_one_line_error, env, student_leaves, wait_for_step
from tiny import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
K = 3
CONFIG = f'''
import sys
sys.path.insert(0, {TESTS!r})
from tiny import tiny_config


def get_config():
    c = tiny_config("rsd", "random", epochs=2, test_fraction=0.8)   # 11 steps per epoch
    c.ema.decay = 0.9
    c.optim.lr = 0.002           # a 25th of the tiny config's: rounding stays rounding over the run (below)
    c.checkpoint_every_steps = 3
    c.log_every_steps = 3
    return c
'''
# The students of one jit and the single runs differ by the rounding of differently fused float32 arithmetic,
# which this tiny net can amplify over a run, chaotically: a parameter difference that stays near 1e-7 for a dozen
# steps may then grow 50x per step. Measured in process (float32 products at full precision, "highest", as the
# runs below), parameters of students 0-2 against their single runs after 22 steps, relative to how far the
# parameters moved: at lr 0.005, 1.4e-5, 6.6e-5 and 0.13 (student 2: 1.8e-7 at step 13, 3.7e-4 at step 15, a
# 1% loss difference at step 17; with the CPU's matrix-product kernel gradients, README Speed); at lr 0.002,
# 1.4e-5, 2.3e-5 and 7.3e-5. The run-level test bounds the difference of the whole tree relative to its norm:
# measured 2.3e-6, 2.9e-6 and 1.5e-5 for the three students (EMA about half); the step-level tests below are exact
# to 1e-6.
PARAM_ATOL = 1e-6
LOSS_RTOL = 1e-6
RUN_PARAM_RTOL = 1e-3    # of the whole variable tree's norm
RUN_METRIC_RTOL = 1e-2     # epoch means; the gradient norm is the most sensitive (0.2% apart, student 2)
RUN_TOP1_ATOL = 0.5      # percent: 7 of the 1438 test images


def run_env():
    return dict(env(), JAX_DEFAULT_MATMUL_PRECISION="highest")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny_students.py"
    path.write_text(CONFIG)
    return str(path)


def main_args(config_file, workdir, *extra):
    return [sys.executable, "-m", "rsd_jax.main", "--config", config_file, "--workdir", str(workdir),
            "--config.progress_bar=False", *extra]


def run_main(config_file, workdir, *extra):
    return subprocess.run(main_args(config_file, workdir, *extra), cwd=REPO, env=run_env(), capture_output=True,
                          text=True, timeout=600)


def run_module(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=300)


def records(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def multi(config_file, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("multi") / "run")
    out = run_main(config_file, workdir, f"--config.students={K}", "--config.model_seed=4")
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


@pytest.mark.parametrize("k", range(K))
def test_each_student_is_the_single_run_of_its_model_seed(config_file, multi, tmp_path, k):
    single = str(tmp_path / "single")
    out = run_main(config_file, single, f"--config.model_seed={4 + k}")
    assert out.returncode == 0, out.stderr[-3000:]
    member = os.path.join(multi, "students", str(k))
    for name in ("student", "student_ema"):
        pairs = list(zip(student_leaves(single, name), student_leaves(member, name), strict=True))
        difference = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in pairs))
        assert difference <= RUN_PARAM_RTOL * np.sqrt(sum(np.sum(b ** 2) for _, b in pairs)), (name, difference)
    for a, b in zip(records(single), records(member), strict=True):
        for key in a:
            if key.startswith("train_") and key != "train_steps":
                np.testing.assert_allclose(a[key], b[key], rtol=RUN_METRIC_RTOL, err_msg=key)
        assert abs(a["top1"] - b["top1"]) <= RUN_TOP1_ATOL and a["step"] == b["step"]
    mine = json.load(open(os.path.join(member, "config.json")))
    theirs = json.load(open(os.path.join(single, "config.json")))
    assert mine == theirs          # the student's directory records the single run's config


def test_run_results_list_every_student_with_mean_and_std(multi):
    summary = json.load(open(os.path.join(multi, "results.json")))
    each = [json.load(open(os.path.join(multi, "students", str(k), "results.json"))) for k in range(K)]
    assert [s["model_seed"] for s in summary["students"]] == [4, 5, 6]
    for row, one in zip(summary["students"], each):
        assert {k: row[k] for k in one} == one
    (setting,) = summary["settings"]
    top1 = np.asarray([r["top1"] for r in each])
    assert setting["top1_mean"] == pytest.approx(top1.mean()) and setting["top1_std"] == pytest.approx(top1.std())
    assert setting["seeds"] == [4, 5, 6]


def test_a_student_directory_evaluates_and_exports_like_a_run(multi, tmp_path):
    member = os.path.join(multi, "students", "1")
    out = run_module("rsd_jax.evaluate", "--workdir", member, "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["top1"] == \
        json.load(open(os.path.join(member, "results.json")))["top1"]
    out = run_module("convert.to_torch", member, "--out", str(tmp_path / "student.pth"))
    assert out.returncode == 0, out.stderr[-2000:]
    import torch
    state_dict = torch.load(tmp_path / "student.pth")
    _, variables = models.load_model(os.path.join(member, "student"))
    assert state_dict["fc.weight"].numpy().T.tolist() == np.asarray(variables["params"]["fc"]["kernel"]).tolist()


def test_sigkill_and_resume_of_several_students_is_exact(config_file, multi, tmp_path):
    workdir = str(tmp_path / "killed")
    args = (f"--config.students={K}", "--config.model_seed=4")
    proc = subprocess.Popen(main_args(config_file, workdir, *args), cwd=REPO, env=run_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert wait_for_step(proc, workdir, 12)      # mid second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = run_main(config_file, workdir, *args)
    assert out.returncode == 0 and "resumed from step" in out.stderr, out.stderr[-3000:]
    for k in range(K):
        a, b = os.path.join(multi, "students", str(k)), os.path.join(workdir, "students", str(k))
        for name in ("student", "student_ema"):
            assert all(np.array_equal(x, y) for x, y in zip(student_leaves(a, name), student_leaves(b, name)))
        assert [r["epoch"] for r in records(b)] == [1, 2] and records(b)[-1]["top1"] == records(a)[-1]["top1"]


# ------------------------------------------------------------------------------------------------ step level
def one_device_run(config):
    config.optim.warmup_epochs = 0       # the full LR from the first step: updates that matter
    return train.build_run(config, Mesh(np.asarray(jax.devices()[:1]), ("data",)))


def steps(run, n=3):
    state, losses = run.initial_state(), []
    for step in range(n):
        state, metrics = run.train_step(state, run.teacher_vars, run.train_batch(step))
        losses.append(np.asarray(metrics["loss"]))
    return state, np.asarray(losses)


def assert_member_equals(state, losses, i, single_state, single_losses, rtol=LOSS_RTOL, atol=PARAM_ATOL):
    np.testing.assert_allclose(losses[:, i], single_losses, rtol=rtol)
    mine = jax.tree_util.tree_leaves(students.member(state, i).params)
    for a, b in zip(mine, jax.tree_util.tree_leaves(single_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol)


@pytest.mark.parametrize("design", ["unroll", "vmap"])
def test_both_designs_give_each_seed_its_single_run(design):
    config = tiny_config("rsd", "random")
    config.students, config.model_seed, config.students_design = 2, 7, design
    state, losses = steps(one_device_run(config))
    for i in range(2):
        single = tiny_config("rsd", "random")
        single.model_seed = 7 + i
        # vmap turns the convolutions into grouped ones, whose sums are ordered otherwise: rounding only, which
        # this tiny net amplifies: measured 3.7e-5 in a parameter after 3 steps at lr 0.05
        tolerance = dict(rtol=1e-4, atol=2e-4) if design == "vmap" else {}
        assert_member_equals(state, losses, i, *steps(one_device_run(single)), **tolerance)


def test_a_kappa_sweep_gives_each_setting_its_single_run():
    config = tiny_config("rsd", "random")
    config.sweep = ("distill.rsd.kappa=0.005", "distill.rsd.kappa=0.02,distill.rsd.loss_weight=0.3")
    state, losses = steps(one_device_run(config))
    assert not np.allclose(losses[:, 0], losses[:, 1])
    single = tiny_config("rsd", "random")
    single.distill.rsd.kappa, single.distill.rsd.loss_weight = 0.02, 0.3
    assert_member_equals(state, losses, 1, *steps(one_device_run(single)))


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("override, words", [
    ("--config.sweep=('distill.rsd.gamma=4',)", "sweep key distill.rsd.gamma cannot vary"),
    ("--config.sweep=('student.model=resnet34',)", "sweep key student.model cannot vary"),
    ("--config.sweep=('distill.method=kd',)", "sweep key distill.method cannot vary"),
    ("--config.sweep=('data.batch_size=16',)", "sweep key data.batch_size cannot vary"),
    ("--config.students=0", "students must be an integer >= 1"),
])
def test_bad_students_or_sweep_is_one_line_and_writes_nothing(config_file, tmp_path, override, words):
    out = run_main(config_file, tmp_path / "run", override)
    assert_one_line_error(out)
    assert words in out.stderr, out.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run")


def test_students_that_do_not_fit_are_refused_with_the_estimate(tmp_path, monkeypatch):
    config = tiny_config("rsd", "random")
    config.students = 4
    monkeypatch.setattr(students, "device_memory_limit", lambda: 2 ** 20)     # 1 MiB
    with pytest.raises(UserError, match=r"4 students need about .* GiB per device .* students=\d+ would fit"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")        # no log.txt, env.json or lock left either
