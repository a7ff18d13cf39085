"""The training program: sharded steps, the frozen teacher, resume, evaluation, the CLI's handling of bad input."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from rsd_jax import models, train
from rsd_jax.evaluate import evaluate_workdir
from tiny import TINY_TEACHER, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def run_steps(run, n):
    state = run.init(jax.random.key(0))
    for step in range(n):
        state, metrics = run.train_step(state, run.teacher_vars, run.train_batch(step))
        jax.block_until_ready(state)   # fake CPU devices deadlock on back-to-back sharded steps otherwise
    return state, metrics


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A (random) tiny teacher saved as a model directory, the format the converter and training write."""
    path = str(tmp_path_factory.mktemp("teacher") / "vit")
    model = models.create_model(TINY_TEACHER["model"], num_classes=10, **TINY_TEACHER["overrides"])
    variables = model.init(jax.random.key(3), np.zeros((1, 16, 16, 3), np.float32))
    models.save_model(path, TINY_TEACHER["model"], 10, variables, overrides=TINY_TEACHER["overrides"])
    return path


def test_eight_devices_match_one_device_with_statistics_groups(teacher_dir):
    assert jax.device_count() == 8
    config = tiny_config("rsd", teacher_dir)
    config.distill.group_size = 8          # 4 groups of 8: per-group BatchNorm and RSD statistics
    one = train.build_run(config, Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    eight = train.build_run(config, Mesh(np.asarray(jax.devices()), ("data",)))
    state1, metrics1 = run_steps(one, 3)
    state8, metrics8 = run_steps(eight, 3)
    assert len(state8.params["student"]["fc"]["kernel"].sharding.device_set) == 8
    for a, b in zip(leaves((state1.params, state1.model_state)), leaves((state8.params, state8.model_state))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Three chained steps let the rounding of the 8-way split reductions grow (a tiny net at gradient norm ~60):
    # rsd 1.802624 vs 1.802590 (1.9e-5) on an AMD EPYC host, so the bound of the parameters above; one step agrees
    # to float32 rounding.
    np.testing.assert_allclose(float(metrics1["rsd"]), float(metrics8["rsd"]), rtol=1e-4)
    _, grouped = run_steps(one, 1)
    _, grouped8 = run_steps(eight, 1)
    np.testing.assert_allclose(float(grouped["rsd"]), float(grouped8["rsd"]), rtol=3e-6)
    # The groups matter: whole-batch statistics give another loss.
    config.distill.group_size = 0
    _, whole = run_steps(train.build_run(config, Mesh(np.asarray(jax.devices()[:1]), ("data",))), 1)
    assert abs(float(whole["rsd"]) - float(grouped["rsd"])) > 1e-3


def loops_with_collectives(hlo):
    """op names of the while loops of a compiled HLO module whose body or condition runs a collective."""
    comps, current = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            current = head.group(1)
            comps[current] = []
        elif current:
            comps[current].append(line)
    collective = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(-start)?\(")

    def runs_collective(name, seen=()):
        body = "\n".join(comps.get(name, []))
        return name not in seen and (bool(collective.search(body)) or any(
            runs_collective(callee, seen + (name,))
            for callee in re.findall(r"(?:to_apply|calls|body|condition)=%?([\w.\-]+)", body)))

    return [re.search(r'op_name="([^"]*)"', line).group(1) for lines in comps.values() for line in lines
            if " while(" in line and any(runs_collective(c) for c in re.findall(r"(?:body|condition)=%?([\w.\-]+)",
                                                                                 line))]


def test_mixup_draws_run_without_collectives_in_loops(teacher_dir):
    """mixup's beta sampler is a rejection loop: split across devices by statistics group it would all-reduce its
    predicate in every iteration (fake CPU devices have aborted in XLA's collective watchdog there)."""
    config = tiny_config("rsd", teacher_dir)
    config.distill.group_size = 8
    config.data.augment.update(dict(mixup=0.8, cutmix=1.0))
    run = train.build_run(config, Mesh(np.asarray(jax.devices()), ("data",)))
    hlo = run.train_step.lower(jax.eval_shape(run.init, jax.random.key(0)), run.teacher_vars,
                               run.train_batch(0)).compile().as_text()
    assert " while(" in hlo and "all-reduce" in hlo     # the sampler's loop and the step's collectives are there
    assert loops_with_collectives(hlo) == []


def test_teacher_is_bit_identical_after_training(teacher_dir):
    run = train.build_run(tiny_config("rsd", teacher_dir))
    before = leaves(run.teacher_vars)
    _, metrics = run_steps(run, 3)
    assert float(metrics["rsd"]) > 0
    after = leaves(run.teacher_vars)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    _, on_disk = models.load_model(teacher_dir)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(on_disk), after))


def test_resume_equals_uninterrupted_and_evaluate_reproduces(tmp_path, teacher_dir):
    config = tiny_config("rsd", teacher_dir, epochs=2)
    full = train.train_and_evaluate(config, str(tmp_path / "full"))

    stopped = tiny_config("rsd", teacher_dir, epochs=2)
    stopped.stop_after_epoch = 1
    assert train.train_and_evaluate(stopped, str(tmp_path / "resumed")) is None
    assert not os.path.exists(tmp_path / "resumed" / "student")
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))

    _, a = models.load_model(str(tmp_path / "full" / "student"))
    _, b = models.load_model(str(tmp_path / "resumed" / "student"))
    assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
    assert resumed["top1"] == full["top1"]

    again = evaluate_workdir(str(tmp_path / "full"))
    assert again["top1"] == full["top1"] and again["top5"] == full["top5"]
    np.testing.assert_allclose(again["loss"], full["loss"], rtol=1e-6)
    lines = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["epoch"] for r in lines] == [1, 2] and lines[-1]["top1"] == full["top1"]


def run_cli(*args, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def demo_smoke_args(workdir, *extra):
    return ("rsd_jax.main", "--config", "configs/demo.py:smoke", "--workdir", workdir,
            "--config.progress_bar=False", *extra)


def test_demo_smoke_and_evaluate_cli(tmp_path):
    # stopped after the teacher's first epoch: the demo stops there (no student run) and the same command resumes
    out = run_cli(*demo_smoke_args(str(tmp_path / "demo"), "--config.stop_after_epoch=1"))
    assert out.returncode == 0 and "stopped early" in out.stdout, out.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "demo")) == [".lock", "teacher"]
    out = run_cli(*demo_smoke_args(str(tmp_path / "demo")))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from step" in out.stderr
    results = json.load(open(tmp_path / "demo" / "results.json"))
    for key in ("teacher_top1", "scratch_top1", "kd_top1", "rsd_top1"):
        assert 0 <= results[key] <= 100
    assert "teacher" in out.stdout and "rsd" in out.stdout
    # the smoke demo trains 2 students per method in one run; the second one's directory evaluates like a run's
    ev = run_cli("rsd_jax.evaluate", "--workdir", str(tmp_path / "demo" / "rsd" / "students" / "1"), "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert abs(json.loads(ev.stdout.strip().splitlines()[-1])["top1"] - results["rsd_top1_runs"][1]) < 1e-9


@pytest.mark.parametrize("case", ["unknown_key", "missing_teacher", "wrong_arch", "wrong_classes", "unwritable",
                                  "missing_config", "bad_value", "no_get_config", "bad_config_arg", "stray_argument",
                                  "zero_interval", "bad_model_option", "teacher_file"])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, teacher_dir, case):
    workdir = str(tmp_path / "run")
    train_args = ("rsd_jax.main", "--config", "configs/demo.py:smoke", "--workdir", workdir,
                  "--config.program=train", "--config.teacher.model=vit_small_patch16_224",
                  f"--config.teacher.path={teacher_dir}")
    args = {
        "unknown_key": train_args + ("--config.optim.not_a_key=1",),
        "missing_teacher": train_args + ("--config.teacher.path=/nonexistent/teacher",),
        "wrong_arch": train_args + ("--config.teacher.model=swin_tiny_patch4_window7_224",),
        "wrong_classes": train_args,    # the teacher fixture has 10 classes; see below
        "unwritable": ("rsd_jax.main", "--config", "configs/demo.py:smoke", "--workdir", "/proc/rsd_jax_run"),
        "missing_config": ("rsd_jax.main", "--config", "configs/nope.py", "--workdir", workdir),
        "bad_value": train_args + ("--config.optim.lr=fast",),
        "no_get_config": ("rsd_jax.main", "--config", os.path.join(REPO, "rsd_jax", "errors.py"), "--workdir", workdir),
        "bad_config_arg": ("rsd_jax.main", "--config", "configs/demo.py:bogus", "--workdir", workdir),
        "stray_argument": train_args + ("optim.lr=0.1",),
        "zero_interval": train_args + ("--config.eval_every_epochs=0",),
        "bad_model_option": train_args + ("--config.student.overrides.widths=abc",),
        "teacher_file": train_args + (f"--config.teacher.path={os.path.join(teacher_dir, 'model.json')}",),
    }[case]
    if case == "wrong_classes":
        teacher100 = str(tmp_path / "teacher100")
        meta_src = json.load(open(os.path.join(teacher_dir, "model.json")))
        os.makedirs(teacher100)
        os.symlink(os.path.join(teacher_dir, "variables"), os.path.join(teacher100, "variables"))
        json.dump(dict(meta_src, num_classes=100), open(os.path.join(teacher100, "model.json"), "w"))
        args = train_args + (f"--config.teacher.path={teacher100}",)
    out = run_cli(*args)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not os.path.exists(workdir)
    expected = {"missing_config": "config file configs/nope.py not found", "no_get_config": "has no get_config()",
                "bad_config_arg": "unknown config argument 'bogus'", "stray_argument": "unexpected argument",
                "zero_interval": "eval_every_epochs must be an integer >= 1", "bad_model_option": "model option widths=",
                "teacher_file": "is a file, not a model directory"}
    assert expected.get(case, "") in lines[0]


def test_ema_follows_its_recursion(teacher_dir):
    config = tiny_config("kd", teacher_dir)
    config.ema.decay = 0.75
    run = train.build_run(config)
    state = run.init(jax.random.key(0))
    ema = leaves(state.ema)
    for step in range(3):
        state, _ = run.train_step(state, run.teacher_vars, run.train_batch(step))
        jax.block_until_ready(state)
        current = leaves({"params": state.params["student"], "model_state": state.model_state["student"]})
        ema = [0.75 * e + 0.25 * c for e, c in zip(ema, current)]
    for got, want in zip(leaves(state.ema), ema):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    metrics = run.evaluate(state)
    assert {"top1", "ema_top1", "ema_top5", "ema_loss"} <= set(metrics)


def test_student_init_loads_weights_and_reinitialises_another_head(tmp_path):
    config = tiny_config("vanilla")
    source = models.create_model(config.student.model, num_classes=7, **config.student.overrides)
    variables = source.init(jax.random.key(5), np.zeros((1, 16, 16, 3), np.float32))
    models.save_model(str(tmp_path / "src"), config.student.model, 7, variables, overrides=config.student.overrides)
    config.student.init = str(tmp_path / "src")
    state = train.build_run(config).init(jax.random.key(0))
    got = state.params["student"]
    np.testing.assert_array_equal(got["conv1"]["kernel"], variables["params"]["conv1"]["kernel"])
    np.testing.assert_array_equal(state.model_state["student"]["batch_stats"]["bn1"]["var"],
                                  variables["batch_stats"]["bn1"]["var"])
    assert got["fc"]["kernel"].shape[-1] == 10
    # Another architecture is refused with a message.
    config.student.model = "mobilenetv2_100"
    config.student.overrides = dict(img_size=16, channel_multiplier=0.25)
    with pytest.raises(Exception, match="is a resnet18"):
        train.build_run(config)
