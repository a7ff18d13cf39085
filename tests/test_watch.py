"""Watching and comparing runs: TensorBoard event files, log.txt, env.json, evaluate's --ema/--results_file and the
report, on one tiny KD run (a random teacher, 3 epochs of 11 steps) that is SIGKILLed once and resumed, shared by the
tests of this module. Its stdout and stderr are pipes, not a terminal, with the progress bar left on."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from rsd_jax import models, report, tensorboard
from rsd_jax.evaluate import evaluate_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
EPOCHS, STEPS_PER_EPOCH, LOG_EVERY = 3, 11, 2
CONFIG = f'''
import sys
sys.path.insert(0, {TESTS!r})
from tiny import tiny_config


def get_config():
    c = tiny_config("kd", epochs={EPOCHS}, test_fraction=0.8)   # 359 training images: 11 steps per epoch
    c.ema.decay = 0.9
    c.log_every_steps = {LOG_EVERY}
    c.checkpoint_every_steps = 0      # checkpoints at epoch ends only: most log steps lie past the latest one
    c.progress_bar = True             # on, but stderr is no terminal here: plain lines instead
    return c
'''
LOG_STEPS = sorted(set(range(LOG_EVERY, EPOCHS * STEPS_PER_EPOCH + 1, LOG_EVERY)) | {EPOCHS * STEPS_PER_EPOCH})


def env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def logged_steps(logdir):
    """Steps of the scalar events in `logdir`, read with our own reader (to decide when to kill)."""
    return [tensorboard.event_step(r) for path in tensorboard.event_files(logdir)
            for r in tensorboard.read_records(path)[1:]]


def saved_steps(workdir):
    root = os.path.join(workdir, "checkpoints", "latest")
    return [int(d) for d in os.listdir(root) if d.isdigit()] if os.path.isdir(root) else []


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """(workdir, the step events reached before the kill, the step resumed from, the resumed run's output)."""
    root = tmp_path_factory.mktemp("watch")
    config = root / "tiny_kd.py"
    config.write_text(CONFIG)
    workdir = str(root / "run")
    args = [sys.executable, "-m", "rsd_jax.main", "--config", str(config), "--workdir", workdir]
    proc = subprocess.Popen(args, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    logged, t0 = [], time.time()
    # Kill once TensorBoard holds a step past the latest checkpoint (of an epoch end): the resume must purge it.
    while proc.poll() is None and time.time() - t0 < 300:
        logged = logged_steps(os.path.join(workdir, "tb")) if os.path.isdir(os.path.join(workdir, "tb")) else []
        saved = saved_steps(workdir)
        if logged and saved and max(logged) > max(saved):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert logged, "the run logged nothing before it ended"
    out = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = [int(line.split()[-1]) for line in out.stderr.splitlines() if line.startswith("resumed from step")]
    return workdir, max(logged), (resumed or [0])[0], out


def board(logdir):
    """{tag: [(step, value), ...]} of every scalar in `logdir`, read with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util
    out = {}
    for path in tensorboard.event_files(logdir):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, float(tensor_util.make_ndarray(value.tensor))))
    return out


def records(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_event_files_equal_metrics_with_one_value_per_logged_step(killed_run):
    workdir, last_logged, resumed_from, _ = killed_run
    assert last_logged > resumed_from         # the killed session had logged steps that the resume runs again
    scalars = board(os.path.join(workdir, "tb"))
    for tag in ("train/loss", "train/ce", "train/kd", "train/lr", "train/grad_norm"):
        assert [s for s, _ in scalars[tag]] == LOG_STEPS, tag     # exactly one value per logged step, in order
    # images/s is a rate since the previous log step: none at a session's first step (compiling)
    assert [s for s, _ in scalars["train/images_per_s"]] == [s for s in LOG_STEPS if s != resumed_from + 1]
    lines = records(workdir)
    assert [r["epoch"] for r in lines] == list(range(1, EPOCHS + 1))
    for r in lines:
        expected = {f"eval/{k}": r[k] for k in ("top1", "top5", "loss", "ema_top1", "ema_top5", "ema_loss")}
        expected.update({f"epoch/{k}": r[k] for k in ("train_loss", "train_ce", "train_kd", "train_lr",
                                                      "images_per_s", "elapsed_s")})
        for tag, value in expected.items():
            got = [v for s, v in scalars[tag] if s == r["step"]]
            assert got == [float(np.float32(value))], (tag, r["step"])      # simple_value is a float32
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert scalars["teacher/top1"] == [(STEPS_PER_EPOCH, float(np.float32(results["teacher_top1"])))]
    assert lines[0]["teacher_top1"] == results["teacher_top1"] and "teacher_top1" not in lines[1]
    # a random 10-class teacher is at chance level
    assert 0 < results["teacher_top1"] < 30 and results["teacher_top5"] > results["teacher_top1"]


def test_log_file_has_plain_lines_and_no_carriage_return(killed_run):
    workdir, _, _, out = killed_run
    text = open(os.path.join(workdir, "log.txt"), newline="").read()
    assert "\r" not in text and "\r" not in out.stderr
    # both sessions, appended: the killed one's start and the resumed one's end
    assert text.count("compiling the training step ... done in") >= 1 and "resumed from step" in text
    assert f"step {EPOCHS * STEPS_PER_EPOCH}/{EPOCHS * STEPS_PER_EPOCH} | epoch {EPOCHS} | loss " in text
    assert f"epoch {EPOCHS} | loss" in text and "teacher vit_small_patch16_224: top1 " in text
    stamps = [line[:19] for line in text.splitlines()]
    assert all(time.strptime(s, "%Y-%m-%d %H:%M:%S") for s in stamps)
    for r in records(workdir):
        assert r["time"].endswith("Z") and r["elapsed_s"] > 0
    assert [r["elapsed_s"] for r in records(workdir)] == sorted(r["elapsed_s"] for r in records(workdir))


def test_env_json_names_the_installed_versions(killed_run):
    import importlib.metadata
    workdir = killed_run[0]
    env_json = json.load(open(os.path.join(workdir, "env.json")))
    assert env_json["versions"]["jax"] == jax.__version__ == importlib.metadata.version("jax")
    assert env_json["versions"]["flax"] == importlib.metadata.version("flax")
    assert env_json["status"] == "finished" and env_json["end_time"] >= env_json["start_time"]
    assert env_json["device_count"] == 1 and env_json["process_count"] == 1 and env_json["platform"] == "cpu"
    assert "--workdir" in env_json["command"]
    git = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert env_json["git"]["commit"] == git
    # the SIGKILLed session: started, never ended
    assert [(p["status"], p["end_time"]) for p in env_json["previous"]] == [("running", None)]


def test_evaluate_ema_and_results_file(killed_run, tmp_path):
    workdir = killed_run[0]
    results = json.load(open(os.path.join(workdir, "results.json")))
    ema = evaluate_workdir(workdir, ema=True)
    assert ema["top1"] == results["ema_top1"] and ema["step"] == EPOCHS * STEPS_PER_EPOCH
    np.testing.assert_allclose(ema["loss"], results["ema_loss"], rtol=1e-5)
    path = tmp_path / "eval.json"
    out = subprocess.run([sys.executable, "-m", "rsd_jax.evaluate", "--workdir", workdir,
                          f"--results_file={path}"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    written = json.load(open(path))
    assert written["top1"] == results["top1"] and (written["crop_pct"], written["interpolation"]) == (1.0, "bilinear")
    _, variables = models.load_model(os.path.join(workdir, "student"))
    assert written["parameters"] == sum(np.size(x) for x in jax.tree_util.tree_leaves(variables["params"]))


def test_report_numbers_equal_results_and_pngs_decode(killed_run, tmp_path):
    workdir = killed_run[0]
    runs = tmp_path / "runs"
    shutil.copytree(workdir, runs / "seed0", ignore=shutil.ignore_patterns("checkpoints", "student*", "tb"))
    # a second seed of the same setting, with its own (different) results
    shutil.copytree(runs / "seed0", runs / "seed1")
    config = json.load(open(runs / "seed1" / "config.json"))
    config["seed"] = 1
    json.dump(config, open(runs / "seed1" / "config.json", "w"))
    other = dict(json.load(open(runs / "seed1" / "results.json")), top1=50.0, best_top1=61.0, ema_top1=55.5)
    json.dump(other, open(runs / "seed1" / "results.json", "w"))
    # another setting, still running (no results.json): reported from its metrics so far
    shutil.copytree(runs / "seed0", runs / "lr" / "running")
    config["optim"]["lr"] = 0.1
    json.dump(config, open(runs / "lr" / "running" / "config.json", "w"))
    os.remove(runs / "lr" / "running" / "results.json")
    lines = records(workdir)
    open(runs / "lr" / "running" / "metrics.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in lines[:2]))

    out = subprocess.run([sys.executable, "-m", "rsd_jax.report", str(runs), "--out", str(tmp_path / "rep")],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "rep" / "summary.csv")))
    groups, by_run = [r for r in rows if r["kind"] == "group"], {r["run"]: r for r in rows if r["kind"] == "run"}
    assert len(groups) == 2 and set(by_run) == {"seed0", "seed1", os.path.join("lr", "running")}
    mine = json.load(open(os.path.join(workdir, "results.json")))
    for name, res in (("seed0", mine), ("seed1", other)):
        assert float(by_run[name]["final_top1_mean"]) == res["top1"]
        assert float(by_run[name]["best_top1_mean"]) == res["best_top1"]
        assert float(by_run[name]["ema_top1_mean"]) == res["ema_top1"]
        assert float(by_run[name]["teacher_top1_mean"]) == res["teacher_top1"]
    two = next(g for g in groups if g["runs"] == "2")
    assert float(two["final_top1_mean"]) == pytest.approx(np.mean([mine["top1"], 50.0]), rel=1e-12)
    assert float(two["final_top1_std"]) == pytest.approx(np.std([mine["top1"], 50.0]), rel=1e-12)
    assert float(two["wall_s_mean"]) == lines[-1]["elapsed_s"]
    running = by_run[os.path.join("lr", "running")]
    assert running["status"] == "running" and float(running["final_top1_mean"]) == lines[1]["top1"]
    assert float(running["best_top1_mean"]) == max(lines[0]["top1"], lines[1]["top1"])
    md = open(tmp_path / "rep" / "summary.md").read()
    assert f"{np.mean([mine['top1'], 50.0]):.2f} +- {np.std([mine['top1'], 50.0]):.2f}" in md
    assert f"running (2/{EPOCHS} epochs)" in md and "1 running" in out.stdout
    # decoded, the expected size, not blank, and drawn: the first run's blue lines, the red dots of the runs
    for name, size, (high, low) in (("curves.png", (1500, 60 + 300 * 2), (2, 0)),
                                    ("comparison.png", (900, 120 + 50 * 2), (0, 1))):
        image = Image.open(tmp_path / "rep" / name)
        image.load()
        pixels = np.asarray(image.convert("RGB")).astype(int)
        assert image.size == size and pixels.std() > 10, name
        assert ((pixels[..., high] - pixels[..., low]) > 100).sum() > 20, name


def test_report_of_no_run_is_one_line_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    out = subprocess.run([sys.executable, "-m", "rsd_jax.report", str(tmp_path / "empty")], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'empty'} holds no run (no directory with config.json and metrics.jsonl under it)"]
    assert os.listdir(tmp_path / "empty") == ["sub"]      # nothing written


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(report.UserError, match=r"pip install 'rsd_jax\[report\]'"):
        report._pyplot()


def test_purge_keeps_steps_up_to_the_restored_one_and_drops_a_cut_off_record(tmp_path):
    logdir = str(tmp_path / "tb")
    with tensorboard.EventWriter(logdir, keep_until=0) as writer:
        for step in range(1, 6):
            writer.scalars(step, {"train/loss": step / 10})
    path = tensorboard.event_files(logdir)[0]
    with open(path, "ab") as f:
        f.write(tensorboard.frame(tensorboard.scalar_event(6, {"train/loss": 0.6}))[:-3])    # killed mid-write
    with tensorboard.EventWriter(logdir, keep_until=3) as writer:
        writer.scalars(4, {"train/loss": 4.0})
    assert board(logdir) == {"train/loss": [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)),
                                            (3, pytest.approx(0.3)), (4, 4.0)]}
    assert tensorboard.crc32c(b"123456789") == 0xE3069283      # the CRC-32C check value
