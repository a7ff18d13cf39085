"""A run's checkpoints: `RunCheckpoints`, the one place orbax is called for a run's train state.

`checkpoints/latest` (the two newest) and `checkpoints/best` (the best top-1), each with per-array checksums in
`checkpoints/digests/`. Model directories (one model's variables) are `rsd_jax.model_dir`'s.
"""
import contextlib
import errno
import json
import logging
import os
import shutil
import traceback

import jax
import numpy as np
import orbax.checkpoint as ocp

from rsd_jax import trees
from rsd_jax.errors import CheckpointError, UserError

log = logging.getLogger("rsd_jax")


class RunCheckpoints:
    """A run's checkpoints: `checkpoints/latest` (the two newest) and `checkpoints/best` (the best top-1).

    Saves are asynchronous (orbax writes into a temporary directory and renames it when complete, so a save cut short
    is never listed). A full disk, wherever orbax reports it (the save itself, the next save, `wait` or `close`), is
    a UserError naming the step being saved and the newest complete one, which is untouched. A listed checkpoint that
    cannot be read (damaged on disk) is moved aside to `checkpoints/unusable-<which>-<step>` with a warning and the
    previous one is used instead.
    """

    def __init__(self, workdir):
        self._root = os.path.join(os.path.abspath(workdir), "checkpoints")
        # Both managers save the same step at an epoch end; in a multi-process run their barriers (named after the
        # step only) collide and the save hangs unless each manager prefixes its own.
        self._latest = ocp.CheckpointManager(
            os.path.join(self._root, "latest"), options=ocp.CheckpointManagerOptions(
                max_to_keep=2, multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix="latest")))
        self._best = ocp.CheckpointManager(
            os.path.join(self._root, "best"), options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda m: m["top1"], best_mode="max",
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="best")))
        self._saving = None      # the step of the save that may still be in flight
        for name in ("absl", "asyncio"):    # orbax's save threads, and its tasks' errors collected at exit
            logger = logging.getLogger(name)
            if not any(isinstance(f, _ReportedOrbaxErrors) for f in logger.filters):
                logger.addFilter(_ReportedOrbaxErrors())

    def latest_step(self, which="latest"):
        return self._manager(which).latest_step()

    def _manager(self, which):
        return {"latest": self._latest, "best": self._best}[which]

    def save(self, state, metrics=None, best=False):
        """Start an asynchronous save of `state` (and of the best checkpoint if `best`); False if this step is
        already saved."""
        step = int(state.step)
        if step in self._latest.all_steps():
            return False
        self.wait()       # a failure of the previous save is reported as that step's
        self._saving = step
        with self._full_disk_is_a_user_error():
            digest = state_digest(state)
            self._write_digest("latest", step, digest)
            self._latest.save(step, args=ocp.args.StandardSave(state))
            if best and step not in self._best.all_steps():
                self._write_digest("best", step, digest)
                self._best.save(step, args=ocp.args.StandardSave(state), metrics=dict(metrics))
        return True

    def wait(self):
        with self._full_disk_is_a_user_error():
            self._latest.wait_until_finished()
            self._best.wait_until_finished()
        self._saving = None

    def _full_disk_is_a_user_error(self):
        return full_disk_is_a_user_error(os.path.dirname(self._root), "saving", self._saving)

    def _restore_newest_usable(self, which, args, repair, abstract_state=None):
        """The newest readable checkpoint of `which` as (step, tree); with `repair`, damaged ones are moved aside
        (so that the run's next saves are listed as the newest). A readable checkpoint of another shape than
        `abstract_state` is an error, never moved aside: it belongs to another config."""
        manager = self._manager(which)
        if which == "latest":
            steps = sorted(manager.all_steps(), reverse=True)
        else:
            steps = [s for s in [manager.best_step()] if s is not None]
        problems = []
        for step in steps:
            if abstract_state is not None:
                self._check_fits(which, step, abstract_state)
            try:
                tree = manager.restore(step, args=args)
                _verify_digest(self._read_digest(which, step), tree)
                return step, tree
            except Exception as e:  # orbax raises many types for a damaged directory
                reason = _first_line(e)
                problems.append(f"step {step}: {reason}")
                log.warning("checkpoint %s/%s/%d is unusable (%s)%s; trying the previous one",
                            self._root, which, step, reason, f"; moved to unusable-{which}-{step}" if repair else "")
                if repair:
                    self._move_aside(manager, which, step)
        if problems:
            raise CheckpointError(f"no usable checkpoint in {self._root}/{which} ({'; '.join(problems)}); "
                                  f"remove {self._root} to start the run afresh")
        return None, None

    def _check_fits(self, which, step, abstract_state):
        """Compare the leaves stored in checkpoint `step` (orbax's metadata, read without the arrays) with the state
        to restore; unreadable metadata is left to the restore itself to report."""
        try:
            with ocp.StandardCheckpointer() as reader:    # the manager alone knows no handler before a restore
                stored = reader.metadata(os.path.join(self._root, which, str(step), "default"))
            stored = getattr(stored, "item_metadata", stored)
            stored = {k: x for k, x in trees.flat_leaves(getattr(stored, "tree", stored)).items()
                      if hasattr(x, "shape")}
        except Exception:  # noqa: BLE001
            return
        if not stored:
            return
        differences = trees.diff(abstract_state, stored)   # shapes only: orbax records scalar dtypes loosely
        if differences:
            raise CheckpointError(
                f"checkpoint {self._root}/{which}/{step} was saved by another config: {len(differences)} leaves "
                f"differ ({differences.describe('checkpoint', 'this config', limit=3)}); resume with the run's own "
                "config or use another workdir")

    def _digest_path(self, which, step):
        return os.path.join(self._root, "digests", f"{which}-{step}.json")

    def _write_digest(self, which, step, digest):
        """Checksums of the state being saved, beside orbax's directories (orbax keeps no per-step metrics without
        best_fn); those of steps no longer kept are removed."""
        if jax.process_index() != 0:
            return
        path = self._digest_path(which, step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(digest, f)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + ".tmp")
            raise
        os.replace(path + ".tmp", path)
        keep = set(self._manager(which).all_steps()) | {step}
        for name in os.listdir(os.path.dirname(path)):
            w, _, rest = name.partition("-")
            if w == which and rest.endswith(".json") and rest[:-5].isdigit() and int(rest[:-5]) not in keep:
                os.remove(os.path.join(os.path.dirname(path), name))

    def _read_digest(self, which, step):
        path = self._digest_path(which, step)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            digest = json.load(f)
        if not isinstance(digest, dict):
            raise CheckpointError(f"{path} is not a checksum table")
        return digest

    def _move_aside(self, manager, which, step):
        if jax.process_index() == 0:
            src = os.path.join(self._root, which, str(step))
            dst = os.path.join(self._root, f"unusable-{which}-{step}")
            if os.path.isdir(src):
                shutil.rmtree(dst, ignore_errors=True)
                os.rename(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"rsd_jax_move_aside_{which}_{step}")
        manager.reload()

    def restore(self, abstract_state, which="latest"):
        """The newest usable checkpoint restored into `abstract_state`'s structure and shardings, or None; damaged
        newer ones are moved aside (for resuming training)."""
        return self._restore_newest_usable(which, ocp.args.StandardRestore(abstract_state), repair=True,
                                           abstract_state=abstract_state)[1]

    def restore_raw(self, which="latest"):
        """The saved state as a plain tree (dicts of arrays), without rebuilding the run; None if none."""
        return self._restore_newest_usable(which, ocp.args.StandardRestore(), repair=False)[1]

    def best_metrics(self):
        step = self._best.best_step()
        if step is None:
            return None
        try:
            metrics = self._best.metrics(step)
            float(metrics["top1"])
            return metrics
        except Exception as e:
            log.warning("the best checkpoint's metrics are unreadable (%s); ignoring them", _first_line(e))
            return None

    def close(self):
        self.wait()
        self._latest.close()
        self._best.close()


def _leaf_digest(x):
    """A uint32 checksum of an array's bytes (position-weighted sum, wrapping): orbax reads flipped bytes in its data
    files without complaint, so a checkpoint carries these to be checked against after restoring."""
    x = jax.numpy.asarray(x).ravel()
    if x.dtype == bool:
        bits = x.astype(np.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, {4: np.uint32, 2: np.uint16, 1: np.uint8}[x.dtype.itemsize])
        bits = bits.astype(np.uint32)
    weights = jax.lax.iota(np.uint32, x.size) * np.uint32(2654435761) + np.uint32(1)
    return jax.numpy.sum(bits * weights, dtype=np.uint32)


_digests = jax.jit(lambda leaves: [_leaf_digest(x) for x in leaves])


def state_digest(tree):
    """{leaf path: checksum} of a state, the same for a TrainState and the plain tree restored from it."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    values = jax.device_get(_digests([x for _, x in flat]))
    return {trees.path_name(p): int(v) for (p, _), v in zip(flat, values)}


def _verify_digest(digest, tree):
    if digest is None:     # written before checksums existed
        return
    got = state_digest(tree)
    bad = sorted(k for k, v in digest.items() if got.get(k) != v)
    if bad:
        raise CheckpointError(f"contents differ from their checksums ({', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''})")


@contextlib.contextmanager
def full_disk_is_a_user_error(workdir, doing, step):
    """A full disk inside the block becomes one line: "no space left while <doing> step <step> under <workdir>; the
    checkpoint of step M is intact" (M the newest complete one), with what to do."""
    try:
        yield
    except Exception as e:  # orbax and tensorstore wrap the OSError in their own types
        if not _is_disk_full(e):
            raise
        root = os.path.join(workdir, "checkpoints", "latest")
        complete = [int(d) for d in os.listdir(root) if d.isdigit()] if os.path.isdir(root) else []  # renamed: whole
        kept = f"the checkpoint of step {max(complete)} is intact" if complete else "no checkpoint is complete yet"
        raise UserError(f"no space left while {doing} step {step} under {workdir}; {kept}: free some space and run "
                        "the same command again to resume") from None


def _is_disk_full(e):
    """Whether `e`, or an exception it was raised from, is a full disk (or quota): an OSError's errno, or the text
    that tensorstore's and orbax's wrappers keep of it."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(e) for text in ("No space left on device", "Disk quota exceeded", "ENOSPC")):
            return True
        e = e.__cause__ or e.__context__
    return False


class _ReportedOrbaxErrors(logging.Filter):
    """Drops orbax's error records that `RunCheckpoints` reports itself, once, as one line: a full disk (one record
    per save thread and task, each with a traceback), and the reads of a damaged checkpoint that failed beside the
    one whose error the restore caught (asyncio's "Task exception was never retrieved", with orbax's traceback)."""

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        if _is_disk_full(error) or "No space left on device" in record.getMessage():
            return False
        return not (record.getMessage().startswith("Task exception was never retrieved") and error is not None
                    and _raised_in_orbax(error))


def _raised_in_orbax(e):
    return any(f"{os.sep}orbax{os.sep}" in frame.f_code.co_filename for frame, _ in traceback.walk_tb(e.__traceback__))


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
