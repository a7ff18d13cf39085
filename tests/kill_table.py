"""The kill -9 table of README "Long runs": SIGKILL a run of the tests' tiny config at seeded random moments, resume
each to the end, and compare with the uninterrupted run; then stop a run on 8 fake CPU devices after its first epoch,
resume it on 2 and on 1, and compare with a run on 8 throughout. Too slow for CI (a run each trial); run by hand:

  python tests/kill_table.py --trials 10 [--seed 0] [--epochs 2]

Each kill lands at a uniform random time after the run's first checkpoint, within the time the uninterrupted run
took from there to its end, so it falls in a step, an asynchronous save, an evaluation or the export at the end as
those share that time. Prints one line per trial and
the table's rows; exit 1 if a killed and resumed run differs (another device count only rounds otherwise: its
differences are reported).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
sys.path[:0] = [REPO, TESTS]     # this checkout's rsd_jax, as the runs' `python -m` from REPO

from test_reliability import CONFIG, student_leaves  # noqa: E402  (the same tiny run as the tests)


def env(devices):
    flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)


def args(config_file, epochs, workdir, *extra):
    return [sys.executable, "-m", "rsd_jax.main", "--config", f"{config_file}:{epochs}", "--workdir", workdir,
            *extra]


def finish(config_file, epochs, workdir, devices=1, *extra):
    out = subprocess.run(args(config_file, epochs, workdir, *extra), cwd=REPO, env=env(devices),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"run in {workdir} failed: {out.stderr[-2000:]}")
    return out.stderr


def first_checkpoint(proc, workdir):
    """Wait for the run's first checkpoint (past start-up and compiling); its step."""
    latest = os.path.join(workdir, "checkpoints", "latest")
    while proc.poll() is None:
        steps = [int(d) for d in os.listdir(latest) if d.isdigit()] if os.path.isdir(latest) else []
        if steps:
            return min(steps)
        time.sleep(0.02)
    raise SystemExit(f"the run in {workdir} ended before its first checkpoint")


def final(workdir):
    """The compared result: both exported students' leaves and the results."""
    import json
    return ([x for name in ("student", "student_ema") for x in student_leaves(workdir, name)],
            json.load(open(os.path.join(workdir, "results.json"))))


def equal(a, b):
    return len(a[0]) == len(b[0]) and all(np.array_equal(x, y) for x, y in zip(a[0], b[0])) and a[1] == b[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    opts = parser.parse_args()
    root = tempfile.mkdtemp(prefix="kill_table-")
    config_file = os.path.join(root, "tiny_run.py")
    with open(config_file, "w") as f:
        f.write(CONFIG)
    proc = subprocess.Popen(args(config_file, opts.epochs, os.path.join(root, "reference")), cwd=REPO, env=env(1),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = first_checkpoint(proc, os.path.join(root, "reference"))
    t0 = time.time()
    if proc.wait() != 0:
        raise SystemExit("the uninterrupted run failed")
    duration = time.time() - t0
    reference = final(os.path.join(root, "reference"))
    print(f"uninterrupted run: {duration:.0f} s from its first checkpoint (step {first}) to its end")
    rng = np.random.default_rng(opts.seed)
    rows = []
    for trial in range(opts.trials):
        workdir = os.path.join(root, f"kill{trial}")
        at = float(rng.uniform(0, duration))
        proc = subprocess.Popen(args(config_file, opts.epochs, workdir), cwd=REPO, env=env(1),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first_checkpoint(proc, workdir)
        time.sleep(at)
        killed = proc.poll() is None
        proc.kill()
        proc.wait()
        log = finish(config_file, opts.epochs, workdir)
        resumed = re.search(r"resumed from step (\d+)", log)
        same = equal(final(workdir), reference)
        rows.append(same)
        print(f"trial {trial}: SIGKILL {at:.1f} s after the first checkpoint ({'killed' if killed else 'had already ended'}), resumed from "
              f"{'step ' + resumed[1] if resumed else 'the start'}: {'equal' if same else 'DIFFERENT'}", flush=True)
    # another device count: 8 fake devices stop after epoch 1, then resume on 2 and on 1, against 8 throughout
    finish(config_file, opts.epochs, os.path.join(root, "reference8"), 8)
    reference = final(os.path.join(root, "reference8"))
    device_rows = []
    for devices in (2, 1):
        workdir = os.path.join(root, f"devices8to{devices}")
        finish(config_file, opts.epochs, workdir, 8, "--config.stop_after_epoch=1")
        finish(config_file, opts.epochs, workdir, devices)
        got = final(workdir)
        worst = max(float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))
                    for a, b in zip(reference[0], got[0]) if a.size)
        loss = abs(got[1]["loss"] - reference[1]["loss"]) / abs(reference[1]["loss"])
        device_rows.append(f"8 -> {devices}: {'equal' if equal(got, reference) else 'not bitwise'}, "
                           f"evaluation loss {loss:.1e} relative, parameters {worst:.1e}")
        print(device_rows[-1], flush=True)
    print(f"\n| SIGKILL at a random moment, then resume | {len(rows)} | {sum(rows)} equal |")
    print(f"| resume on another device count after 8 (the remaining steps round otherwise) | {len(device_rows)} | "
          f"{'; '.join(device_rows)} |")
    return 0 if all(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
