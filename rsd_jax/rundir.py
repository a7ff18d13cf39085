"""A run's directory, apart from its checkpoints (`rsd_jax.checkpoint`): `config.json` (the config the checkpoints
follow, and the resume check against it), `metrics.jsonl` (one line per epoch), `results.json`, and the exported
model directories `student/` and `student_ema/`. Only process 0 writes these files; every write is atomic.
`.lock` (and `.lock-<i>` of process i of a run over several processes) is held while a run trains there
(`WorkdirLock`).
"""
import contextlib
import errno
import fcntl
import json
import os
import socket
import time

import jax

from rsd_jax import cli, models
from rsd_jax.checkpoint import full_disk_is_a_user_error
from rsd_jax.errors import UserError

# What may change when a run resumes: how it is run, logged and checkpointed, where its inputs live, and the fixes
# that the non-finite-loss error suggests. Any other difference from the run's config.json is refused.
RESUMABLE_KEYS = frozenset({
    "stop_after_epoch", "progress_bar", "log_every_steps", "checkpoint_every_epochs", "checkpoint_every_steps",
    "eval_every_epochs", "data.data_dir", "data.eval_batch_size", "teacher.path", "skip_nonfinite_steps",
    "optim.lr", "optim.clip_grad"})

EXPORTS = ("student", "student_ema")     # the model directories a finished run writes
# In <workdir>/students/<i>/ of a run of several students: {"index": i, "students": N, "run": "../.."}, the
# checkpoints being the run's.
MEMBER_JSON = "member.json"


def check_workdir(workdir):
    """Fail early (before any compilation or writing) when the workdir cannot be created or written."""
    cli.check_writable(workdir, f"workdir {workdir}")
    for name in ("checkpoints",) + EXPORTS:     # the run's directories, if a file took their place
        path = os.path.join(workdir, name)
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"{path} is a file, not the run's {name} directory; move it or use another workdir")


class WorkdirLock(contextlib.AbstractContextManager):
    """One run per workdir: an exclusive `flock` on `<workdir>/.lock`, held until `release` (or the end of the
    `with` block, or the process: the OS drops it when the process dies, so a killed run leaves no stale lock).
    Process i > 0 of a run over several processes locks `.lock-<i>` instead, so that the processes of one run share
    the workdir while a second launch of the same job is refused by each of them. A workdir that is held is a
    UserError naming the holder (host, process id, since when), with nothing written."""

    def __init__(self, workdir, index=None):
        index = jax.process_index() if index is None else index
        self.path = os.path.join(workdir, ".lock" if index == 0 else f".lock-{index}")
        self._created = not os.path.exists(workdir)
        os.makedirs(workdir, exist_ok=True)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:     # another user's lock file, or a directory in its place
            self._remove_if_created(workdir)
            raise UserError(f"cannot open the lock file {self.path} ({e.strerror}); use another --workdir") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self._fd, 500, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            self._fd = None
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                self._remove_if_created(workdir)
                raise UserError(f"cannot lock {self.path} ({e.strerror})") from None
            raise UserError(f"workdir {workdir} is in use by another run ({holder}, lock {self.path}); wait for it to "
                            "end or stop it, or choose another --workdir") from None
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {since}\n".encode(), 0)

    def release(self):
        if self._fd is not None:
            os.close(self._fd)      # closing the only descriptor drops the flock; the file stays, harmless
            self._fd = None

    def _remove_if_created(self, workdir):
        """A start that failed before writing anything leaves no new directory."""
        if self._created and set(os.listdir(workdir)) <= {os.path.basename(self.path)}:
            if os.path.isfile(self.path):
                os.remove(self.path)
            os.rmdir(workdir)

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self._remove_if_created(os.path.dirname(self.path))
        self.release()


def write_atomic(path, text):
    """Write `text` to `path` through a temporary file and a rename, so that `path` is never half-written."""
    try:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    except BaseException:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise


def read_run_config(config_path):
    """A run's config.json as a dict; a UserError if it cannot be read as a JSON object."""
    try:
        with open(config_path) as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise UserError(f"{config_path} is unreadable: {e}") from None
    return config


def read_metrics(path):
    """The records of a metrics.jsonl (dicts with an integer `step`), skipping a cut-off or foreign line; [] if
    there is no such file."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    records.append(record)
    return records


def flat(tree, prefix=""):
    """A nested config dict as {"a.b": value}."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}


def check_resume_config(config_path, config):
    """Before resuming: the command's config (a JSON-like dict) against the run's config.json. Returns the changed
    RESUMABLE_KEYS as 'key: old -> new' lines; a UserError for any other difference. Keys that only one side has
    (options added or removed by another version) are not compared."""
    if not os.path.exists(config_path):
        return []     # written by a version that kept no config.json
    stored, given = flat(read_run_config(config_path)), flat(config)
    differ = sorted(k for k in set(stored) & set(given) if stored[k] != given[k])
    refused = [k for k in differ if k not in RESUMABLE_KEYS]
    if refused:
        shown = "; ".join(f"{k}: {stored[k]!r} there, {given[k]!r} now" for k in refused[:3])
        raise UserError(f"this workdir holds a run with another config ({shown}{'; ...' if len(refused) > 3 else ''}"
                        f"); resume with the run's config ({config_path}) or use another workdir")
    return [f"{k}: {stored[k]!r} -> {given[k]!r}" for k in differ]


class RunDir:
    """The files of the run in `workdir`; `primary` (process 0) writes them, the other processes only read."""

    def __init__(self, workdir, primary, member=None):
        self.workdir, self.primary, self.member = workdir, primary, member
        self.config_path = os.path.join(workdir, "config.json")
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")

    def start(self, config, resuming):
        """Record the run's config: when `resuming`, first check it against config.json (returns the changed
        settings as lines); a fresh start replaces a failed run's config.json."""
        os.makedirs(self.workdir, exist_ok=True)
        text = config.to_json_best_effort(indent=2, sort_keys=True)
        changed = check_resume_config(self.config_path, json.loads(text)) if resuming else []
        if self.primary:
            write_atomic(self.config_path, text)
            if self.member is not None:
                index, count = self.member
                write_atomic(os.path.join(self.workdir, MEMBER_JSON),
                             json.dumps({"index": index, "students": count, "run": "../.."}))
        return changed

    def best_top1(self, default):
        """The highest evaluated top-1 in metrics.jsonl (`default` when none is there, e.g. on a process that
        does not write it)."""
        return max((r["top1"] for r in self.records() if "top1" in r), default=default)

    def truncate_metrics(self, step):
        """Drop metrics.jsonl lines of steps after `step` (and any cut-off last line), so none is written twice:
        an epoch's line is written before its checkpoint, so lines past the restored step are of steps that run
        again."""
        if not self.primary or not os.path.exists(self.metrics_path):
            return
        kept = [json.dumps(r) + "\n" for r in read_metrics(self.metrics_path) if r["step"] <= step]
        write_atomic(self.metrics_path, "".join(kept))

    def records(self):
        return read_metrics(self.metrics_path)

    def append_metrics(self, record):
        if self.primary:
            with full_disk_is_a_user_error(self.workdir, "writing metrics.jsonl at", record["step"]), \
                    open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def finish(self, config, num_classes, exports, results):
        """Write the model directories of `exports` ({name: (params, model_state)}) that do not exist yet, then
        results.json (last, so that its presence means the run is complete)."""
        if not self.primary:
            return
        with full_disk_is_a_user_error(self.workdir, "exporting the models of", results["steps"]):
            for name, (params, model_state) in exports.items():
                if not os.path.exists(os.path.join(self.workdir, name)):
                    models.save_model(os.path.join(self.workdir, name), config.student.model, num_classes,
                                      dict(model_state, params=params), overrides=dict(config.student.overrides),
                                      source=os.path.abspath(self.workdir))
            self.write_results(results)

    def write_results(self, results):
        if self.primary:
            write_atomic(os.path.join(self.workdir, "results.json"), json.dumps(results, indent=2))
