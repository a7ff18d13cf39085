"""Reliability of a training run: exact resume after SIGKILL at any point, SIGTERM, non-finite losses, damaged
checkpoints, a full disk mid-save, one run per workdir, several processes, and garbage input that must end in a
one-line error, never a traceback.

The runs are subprocesses of the tiny config (tests/tiny.py) with a small training split (11 steps per epoch), one
CPU device each, so that results can be compared bit for bit."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsd_jax import checkpoint, models, provenance, reliability, rundir, train
from rsd_jax.errors import UserError
from tiny import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
EPOCHS = 3
CONFIG = f'''
import sys
sys.path.insert(0, {TESTS!r})
from tiny import tiny_config


def get_config(arg="{EPOCHS}"):
    c = tiny_config("vanilla", epochs=int(arg), test_fraction=0.8)   # 359 training images: 11 steps per epoch
    c.ema.decay = 0.9            # resume must restore the EMA too
    c.checkpoint_every_steps = 3
    c.log_every_steps = 3
    return c
'''


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny_run.py"
    path.write_text(CONFIG)
    return str(path)


def env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def main_args(config_file, workdir, *extra, arg=EPOCHS):
    return [sys.executable, "-m", "rsd_jax.main", "--config", f"{config_file}:{arg}", "--workdir", str(workdir),
            *extra]


def run_main(config_file, workdir, *extra, arg=EPOCHS):
    return subprocess.run(main_args(config_file, workdir, *extra, arg=arg), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)


def student_leaves(workdir, name="student"):
    _, variables = models.load_model(os.path.join(workdir, name))
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(variables)]


def assert_one_line_error(out):
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and out.stderr.strip().splitlines()[-1].startswith("error: "), out.stderr[-3000:]


def saved_steps(workdir):
    root = os.path.join(workdir, "checkpoints", "latest")
    return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    out = run_main(config_file, workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def wait_for_step(proc, workdir, step, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if any(s >= step for s in saved_steps(workdir)):
            return True
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {step} within {timeout} s")


def test_sigkill_at_three_random_points_resumes_exactly(config_file, reference, tmp_path):
    workdir = str(tmp_path / "killed")
    rng = np.random.default_rng(9)
    total = EPOCHS * 11
    for i, target in enumerate(sorted(rng.choice(np.arange(3, total - 3), size=3, replace=False))):
        proc = subprocess.Popen(main_args(config_file, workdir), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        assert wait_for_step(proc, workdir, int(target))
        if i == 0:     # a second run on the workdir is refused at once; the SIGKILLed holder's lock dies with it
            assert_refused_while_held(run_main(config_file, workdir), workdir, proc.pid)
        time.sleep(rng.uniform(0, 0.3))      # somewhere in the next steps, maybe during an asynchronous save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    out = run_main(config_file, workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("student", "student_ema"):
        assert all(np.array_equal(a, b) for a, b in zip(student_leaves(reference, name), student_leaves(workdir, name)))
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["epoch"] for r in lines] == list(range(1, EPOCHS + 1))
    want = [json.loads(line) for line in open(os.path.join(reference, "metrics.jsonl"))]
    assert lines[-1]["top1"] == want[-1]["top1"]


def assert_refused_while_held(out, workdir, holder_pid):
    assert_one_line_error(out)
    assert f"workdir {workdir} is in use by another run (host {socket.gethostname()}, pid {holder_pid}, since " \
        in out.stderr, out.stderr[-2000:]
    assert "parameters" not in out.stderr       # refused before building (and compiling) the run


def test_one_run_per_workdir_lock(tmp_path):
    workdir = str(tmp_path / "run")
    with rundir.WorkdirLock(workdir):
        holder = open(os.path.join(workdir, ".lock")).read()
        with pytest.raises(UserError, match=rf"in use by another run \(host .*, pid {os.getpid()}, since "):
            rundir.WorkdirLock(workdir)     # another open file: refused even in the same process
        assert os.listdir(workdir) == [".lock"] and open(os.path.join(workdir, ".lock")).read() == holder
        with rundir.WorkdirLock(workdir, index=1), rundir.WorkdirLock(os.path.join(workdir, "teacher")):
            pass                            # process 1 of the same run, and a sub-run (the demo's) lock their own
        with pytest.raises(UserError, match=r"\.lock-1\)"):
            with rundir.WorkdirLock(workdir, index=1):
                rundir.WorkdirLock(workdir, index=1)     # a second launch of process 1
    with rundir.WorkdirLock(workdir):       # released at the end of the block
        pass
    with pytest.raises(ZeroDivisionError):  # a start that fails in a new workdir leaves no directory behind
        with rundir.WorkdirLock(str(tmp_path / "new")):
            1 / 0
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_full_disk_mid_save_stops_with_one_line_and_keeps_the_previous_checkpoint(config_file, tmp_path):
    """A 1.5 MiB tmpfs: free space for two checkpoints at the start (the check before compiling passes), full
    during the third save (step 9, reported at the epoch end)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        workdir = str(mount / "run")
        out = run_main(config_file, workdir, arg=1)
        assert_one_line_error(out)
        found = re.search(r"no space left while (saving|writing metrics.jsonl at) step (\d+) under (\S+); the "
                          r"checkpoint of step (\d+) is intact", out.stderr)
        assert found and found[3] == workdir, out.stderr[-2000:]
        kept = int(found[4])
        assert kept == max(saved_steps(workdir)) and kept < int(found[2])
        assert any(".orbax-checkpoint-tmp" in d for d in os.listdir(os.path.join(workdir, "checkpoints", "latest")))
        ckpts = checkpoint.RunCheckpoints(workdir)
        assert ckpts.latest_step() == kept         # the next start takes the intact one, not the partial save
        assert int(ckpts.restore_raw()["step"]) == kept     # every array equal to the checksum written with it
        ckpts.close()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_at_the_env_record_keeps_the_error_that_stopped_the_run(tmp_path, monkeypatch):
    """The disk that filled during a save is still full when env.json records the failure: the run's own one-line
    error must come out, not the OSError of that last write (and no env.json.tmp is left)."""
    with pytest.raises(UserError, match="no space left while saving"):
        with provenance.recorded(str(tmp_path), primary=True):
            real_open = open

            def full_open(path, mode="r", *args, **kwargs):
                if "w" in mode:
                    real_open(path, mode).close()
                    raise OSError(28, "No space left on device")
                return real_open(path, mode, *args, **kwargs)
            monkeypatch.setattr("builtins.open", full_open)
            raise UserError("no space left while saving step 9")
    monkeypatch.undo()
    assert json.loads((tmp_path / "env.json").read_text())["status"] == "running"
    assert sorted(os.listdir(tmp_path)) == ["env.json"]


def test_sigterm_saves_a_resumable_checkpoint(config_file, reference, tmp_path):
    workdir = str(tmp_path / "term")
    proc = subprocess.Popen(main_args(config_file, workdir), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert wait_for_step(proc, workdir, 4)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resume" in stdout and "SIGTERM" in stderr
    assert not os.path.exists(os.path.join(workdir, "student"))
    step = max(saved_steps(workdir))
    assert 4 <= step < EPOCHS * 11
    out = run_main(config_file, workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from step {step}" in out.stderr
    assert all(np.array_equal(a, b) for a, b in zip(student_leaves(reference), student_leaves(workdir)))


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_checkpoint(config_file, tmp_path):
    workdir = str(tmp_path / "nan")
    out = run_main(config_file, workdir, "--config.optim.lr=1e30", "--config.optim.warmup_epochs=0", arg=1)
    assert_one_line_error(out)
    assert "non-finite" in out.stderr and "at step" in out.stderr, out.stderr[-2000:]
    assert not os.path.exists(os.path.join(workdir, "student"))
    for step in saved_steps(workdir):        # whatever was saved was finite
        state = checkpoint.RunCheckpoints(workdir).restore_raw()
        assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state["params"])), step


def test_too_little_disk_space_is_reported_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(reliability.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    monkeypatch.setattr(reliability, "StopSignals", None)      # the loop is never reached
    with pytest.raises(UserError, match="MiB free .* checkpoint of this run needs"):
        train.train_and_evaluate(tiny_config("vanilla"), str(tmp_path / "full"))
    assert not os.path.exists(tmp_path / "full")


def test_skip_nonfinite_steps_keeps_the_state_and_counts():
    run = train.build_run(tiny_config("vanilla"), jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    step_fn = reliability.skip_nonfinite(run.train_step, run.abstract_state)
    state = run.init(jax.random.key(0))
    before = [np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)]
    batch = run.train_batch(0)
    poisoned = dict(batch, image=batch["image"].astype(np.float32) * np.nan)
    state, metrics = step_fn(state, run.teacher_vars, poisoned)
    jax.block_until_ready(state)
    assert int(metrics["skipped"]) == 1 and int(state.step) == 1 and float(metrics["loss"]) == 0.0
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree_util.tree_leaves(state.params)))
    state, metrics = step_fn(state, run.teacher_vars, run.train_batch(1))
    jax.block_until_ready(state)
    assert int(metrics["skipped"]) == 0 and np.isfinite(float(metrics["loss"]))
    assert not all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree_util.tree_leaves(state.params)))


def damage(directory, rng, mode):
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs)
    for path in files:
        size = os.path.getsize(path)
        if mode == "truncate":
            with open(path, "r+b") as f:
                f.truncate(size // 2)
        elif rng.random() < 0.5:
            with open(path, "r+b") as f:
                f.seek(int(rng.integers(0, max(size, 1))))
                f.write(rng.bytes(int(rng.integers(1, 64))))
    return files


def test_truncated_latest_checkpoint_falls_back_and_none_usable_is_an_error(config_file, tmp_path):
    workdir = str(tmp_path / "trunc")
    out = run_main(config_file, workdir, "--config.stop_after_epoch=1", arg=2)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = saved_steps(workdir)
    assert steps == [9, 11]
    damage(os.path.join(workdir, "checkpoints", "latest", "11"), None, "truncate")
    out = run_main(config_file, workdir, "--config.stop_after_epoch=1", arg=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "unusable" in out.stderr and "resumed from step 9" in out.stderr, out.stderr[-3000:]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "unusable-latest-11"))
    assert saved_steps(workdir) == [9, 11]       # step 11 written again
    for step in saved_steps(workdir):
        damage(os.path.join(workdir, "checkpoints", "latest", str(step)), None, "truncate")
    out = run_main(config_file, workdir, arg=2)
    assert_one_line_error(out)
    assert "no usable checkpoint" in out.stderr


def test_flipped_bytes_in_array_data_are_caught(tmp_path):
    config = tiny_config("vanilla", test_fraction=0.8)
    run = train.build_run(config, jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    state = run.init(jax.random.key(0))
    ckpts = checkpoint.RunCheckpoints(str(tmp_path))
    for step in (1, 2):
        ckpts.save(state.replace(step=step))
    ckpts.close()
    data_files = sorted((os.path.getsize(os.path.join(r, f)), os.path.join(r, f))
                        for r, _, fs in os.walk(tmp_path / "checkpoints" / "latest" / "2") for f in fs
                        if os.sep + "d" + os.sep in os.path.join(r, f))
    path = data_files[-1][1]                       # the largest array data file
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2:len(blob) // 2 + 8] = bytes(255 - x for x in blob[len(blob) // 2:len(blob) // 2 + 8])
    open(path, "wb").write(blob)
    restored = checkpoint.RunCheckpoints(str(tmp_path)).restore(run.abstract_state)
    assert int(restored.step) == 1
    assert os.path.isdir(tmp_path / "checkpoints" / "unusable-latest-2")


def test_fuzzed_checkpoint_files_never_crash(config_file, tmp_path):
    rng = np.random.default_rng(0)
    workdir = str(tmp_path / "fuzz")
    out = run_main(config_file, workdir, "--config.stop_after_epoch=1", arg=2)
    assert out.returncode == 0, out.stderr[-3000:]
    for step in saved_steps(workdir):
        damage(os.path.join(workdir, "checkpoints", "latest", str(step)), rng, "random")
    out = run_main(config_file, workdir, arg=2)
    if out.returncode != 0:
        assert_one_line_error(out)
    else:    # flipped bytes that orbax reads without complaint are caught by the checksums
        assert "unusable" in out.stderr, out.stderr[-3000:]
    # Model directories: garbage model.json and variables are CheckpointErrors.
    model_dir = str(tmp_path / "model")
    net = models.create_model("resnet18", num_classes=10, **tiny_config().student.overrides)
    models.save_model(model_dir, "resnet18", 10, net.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32)),
                      overrides=tiny_config().student.overrides)
    for trial in range(3):
        damage(os.path.join(model_dir, "variables"), rng, "random")
        try:
            models.load_model(model_dir)
        except checkpoint.CheckpointError:
            pass
    for garbage in (rng.bytes(40), b"[1, 2]", b'{"model": "resnet18", "num_classes": "ten"}', b"\xff\xfe"):
        with open(os.path.join(model_dir, "model.json"), "wb") as f:
            f.write(garbage)
        with pytest.raises(checkpoint.CheckpointError):
            models.load_model(model_dir)


FUZZ_VALUES = ["-1", "0", "nan", "1e30", "abc", "''", "[]", "-0.5", "99999999999"]
FUZZ_KEYS = ["data.batch_size", "data.eval_batch_size", "data.image_size", "data.test_fraction", "optim.lr",
             "optim.epochs", "optim.name", "optim.schedule", "optim.warmup_epochs", "distill.method",
             "distill.group_size", "ema.decay", "eval_every_epochs", "checkpoint_every_steps", "student.model",
             "data.augment.translate", "seed", "log_every_steps"]


def test_fuzzed_config_overrides_are_one_line_errors_or_run(config_file, tmp_path):
    rng = np.random.default_rng(1)
    for trial in range(4):
        overrides = [f"--config.{k}={rng.choice(FUZZ_VALUES)}" for k in rng.choice(FUZZ_KEYS, 2, replace=False)]
        out = run_main(config_file, tmp_path / f"f{trial}", "--config.optim.epochs=1", *overrides, arg=1)
        if out.returncode != 0:
            assert_one_line_error(out)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(config_file, workdir, port):
    return [subprocess.Popen(main_args(config_file, workdir, f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                                       f"--process_id={i}", arg=1),
                             cwd=REPO, env=dict(env(), PYTHONFAULTHANDLER="1"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def finish_two(procs, timeout=240):
    """[(stdout, stderr)] of both processes, each asserted to exit 0."""
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        # A hang (e.g. colliding orbax barriers): SIGABRT makes faulthandler print every thread's stack.
        for p in procs:
            p.send_signal(signal.SIGABRT)
        stacks = [p.communicate(timeout=60)[1] for p in procs]
        pytest.fail("two-process run hung:\n" + "\n".join(f"process {i}:\n{err[-4000:]}"
                                                           for i, err in enumerate(stacks)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


@pytest.fixture(scope="module")
def two_processes(config_file, tmp_path_factory):
    """An uninterrupted run of two processes with one CPU device each (gloo collectives): (workdir, outputs)."""
    workdir = tmp_path_factory.mktemp("two") / "run"
    return workdir, finish_two(launch_two(config_file, workdir, free_port()))


def test_two_processes_match_one(config_file, two_processes, tmp_path):
    """Two processes against one process, same global batch; kept small (1 epoch of 11 steps) for two shared cores.
    Reductions run in another order: close, not bitwise."""
    one = run_main(config_file, tmp_path / "one", arg=1)
    assert one.returncode == 0, one.stderr[-3000:]
    two, outs = two_processes
    assert "top1" in outs[0][0] and "top1" not in outs[1][0]     # only process 0 reports and writes
    for a, b in zip(student_leaves(tmp_path / "one"), student_leaves(two)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)
    lines = open(two / "metrics.jsonl").read().splitlines()
    assert len(lines) == 1


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(config_file, two_processes, tmp_path):
    """SIGTERM to process 1 only: both agree on the step to stop at (at a log step), both write their part of that
    checkpoint and exit 0; the same command on both resumes, and ends equal to the uninterrupted run."""
    workdir = tmp_path / "stopped"
    procs = launch_two(config_file, workdir, free_port())
    assert wait_for_step(procs[1], workdir, 3)
    procs[1].send_signal(signal.SIGTERM)
    outs = finish_two(procs)
    assert "SIGTERM" in outs[1][1] and "a signal to another process" in outs[0][1], outs[0][1][-2000:]
    stopped = max(saved_steps(workdir))
    assert stopped % 3 == 0 or stopped == 11, stopped         # a log step (log_every_steps=3) or the end
    for _, err in outs:
        assert f"after step {stopped} with a checkpoint" in err, err[-2000:]
    outs = finish_two(launch_two(config_file, workdir, free_port()))
    assert f"resumed from step {stopped}" in outs[0][1], outs[0][1][-2000:]
    for a, b in zip(student_leaves(two_processes[0]), student_leaves(workdir)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_loop_bookkeeping_sums_the_metrics_and_keeps_the_first_nonfinite_step():
    first_bad, sums = None, {}
    losses = [1.0, 2.0, float("nan"), 4.0, float("inf")]
    for step, loss in enumerate(losses, start=10):
        metrics = {"loss": jnp.float32(loss), "lr": jnp.float32(0.5), "skipped": jnp.int32(step % 2)}
        first_bad, sums = reliability.bookkeeping(first_bad, sums, metrics, step, watch_nonfinite=True)
        if step == 11:
            assert not bool(first_bad["found"]) and float(sums["loss"]) == 3.0
    assert bool(first_bad["found"]) and int(first_bad["step"]) == 12 and np.isnan(float(first_bad["loss"]))
    assert float(sums["lr"]) == 2.5 and int(sums["skipped"]) == 2
    unwatched, _ = reliability.bookkeeping(None, {}, metrics, 0, watch_nonfinite=False)
    assert unwatched is None


def test_resume_with_another_config_is_refused_and_keeps_the_checkpoint(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    config = tiny_config("vanilla", epochs=2, test_fraction=0.8)
    config.stop_after_epoch = 1
    assert train.train_and_evaluate(config, workdir) is None
    steps = saved_steps(workdir)
    wider = tiny_config("vanilla", epochs=2, test_fraction=0.8)
    wider.student.overrides = dict(wider.student.overrides, widths=(8, 16, 16, 64))
    reseeded = tiny_config("vanilla", epochs=2, test_fraction=0.8)
    reseeded.seed = 7          # fits the checkpoint's shapes, but is not the same run
    for other, what in ((wider, "student.overrides.widths"), (reseeded, "seed")):
        with pytest.raises(UserError, match=f"another config .*{what}"):
            train.train_and_evaluate(other, workdir)
        assert saved_steps(workdir) == steps and not any(d.startswith("unusable")
                                                         for d in os.listdir(os.path.join(workdir, "checkpoints")))
    # what the non-finite error suggests may change: a lower LR resumes, and config.json follows
    lower = tiny_config("vanilla", epochs=2, test_fraction=0.8)
    lower.optim.lr = config.optim.lr / 2
    with caplog.at_level("INFO", logger="rsd_jax"):
        assert train.train_and_evaluate(lower, workdir) is not None
    assert "resumed from step" in caplog.text and "optim.lr" in caplog.text
    assert json.load(open(os.path.join(workdir, "config.json")))["optim"]["lr"] == lower.optim.lr


def test_a_checkpoint_of_another_shape_is_an_error_not_damage(tmp_path):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    run = train.build_run(tiny_config("vanilla", test_fraction=0.8), mesh)
    ckpts = checkpoint.RunCheckpoints(str(tmp_path))
    ckpts.save(run.init(jax.random.key(0)).replace(step=3))
    ckpts.close()
    wider = tiny_config("vanilla", test_fraction=0.8)
    wider.student.overrides = dict(wider.student.overrides, widths=(8, 16, 16, 64))
    other = train.build_run(wider, mesh)
    with pytest.raises(checkpoint.CheckpointError, match=r"saved by another config: \d+ leaves differ .*layer1_0"):
        checkpoint.RunCheckpoints(str(tmp_path)).restore(other.abstract_state)
    assert os.listdir(tmp_path / "checkpoints" / "latest") == ["3"]


def test_a_fresh_start_replaces_the_config_of_a_run_that_failed(tmp_path):
    workdir = str(tmp_path / "run")
    bad = tiny_config("vanilla", epochs=1, test_fraction=0.8)
    bad.optim.update(lr=1e30, warmup_epochs=0)
    with pytest.raises(UserError, match="non-finite"):
        train.train_and_evaluate(bad, workdir)
    assert saved_steps(workdir) == []
    good = tiny_config("vanilla", epochs=1, test_fraction=0.8)
    good.student.overrides = dict(good.student.overrides, widths=(8, 16, 16, 64))
    assert train.train_and_evaluate(good, workdir) is not None
    stored = json.load(open(os.path.join(workdir, "config.json")))
    assert stored["optim"]["lr"] == good.optim.lr and stored["student"]["overrides"]["widths"] == [8, 16, 16, 64]
