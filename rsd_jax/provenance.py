"""What a run ran on: `<workdir>/env.json` (`Provenance`), written by process 0 when a session starts and again when
it ends. It holds the rsd_jax version and git commit (and whether the tree had uncommitted changes), the versions of
jax, jaxlib, flax, optax and orbax, the devices and processes, the command line, and the session's start and end
times with how it ended; the sessions before a resume are kept under `previous`, oldest first."""
import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

from rsd_jax.rundir import write_atomic

PACKAGES = ("rsd_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint")


def utc_now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(directory=None):
    """{"commit", "dirty"} of the git checkout holding `directory` (default: this package's), or None outside one."""
    directory = directory or os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        return subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout
    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def environment():
    """The session's environment as a JSON-able dict (no start or end time)."""
    import jax
    devices = jax.devices()
    return {
        "versions": {p: _version(p) for p in PACKAGES},
        "python": platform.python_version(),
        "git": git_state(),
        "platform": devices[0].platform, "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(), "host": platform.node(),
        "command": [sys.executable, *sys.argv],
    }


class Provenance:
    """env.json of the run in `workdir`: `start()` records this session (keeping earlier ones under `previous`),
    `end(status)` adds its end time and how it ended ("finished", "stopped", "failed")."""

    def __init__(self, workdir, primary):
        self.path = os.path.join(workdir, "env.json")
        self.primary = primary
        self.record = None
        self.outcome = "finished"

    def start(self):
        if not self.primary:
            return
        previous = []
        try:
            with open(self.path) as f:
                earlier = json.load(f)
            previous = earlier.pop("previous", []) + [earlier]
        except (OSError, ValueError, AttributeError):
            pass     # a first start (or an unreadable file, replaced)
        self.record = dict(environment(), start_time=utc_now(), end_time=None, status="running", previous=previous)
        self._write()

    def end(self, status):
        if self.record is not None:
            self.record.update(end_time=utc_now(), status=status)
            self._write()

    def _write(self):
        write_atomic(self.path, json.dumps(self.record, indent=2))


@contextlib.contextmanager
def recorded(workdir, primary):
    """env.json around a session: started on entry, ended on exit with the `outcome` the block set on the yielded
    Provenance ("finished" unless it says otherwise), or "failed" when the block raised."""
    session = Provenance(workdir, primary)
    session.start()
    try:
        yield session
    except BaseException:
        try:
            session.end("failed")
        except OSError:
            pass    # a full disk, the likely cause, must not replace the error that stopped the run with its own
        raise
    session.end(session.outcome)
