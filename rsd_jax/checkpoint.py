"""The one place orbax is called.

Two kinds of directory:
* a *model directory* (`save_model` / `load_model`): one model's variables (params, batch_stats) as an orbax
  checkpoint in `variables/`, plus `model.json` naming the architecture (`model`, `num_classes`, `overrides`) and
  where it came from. Written by the converter and by training (a trained teacher, an exported student).
* a *run directory*: the train state of a run, managed by `RunCheckpoints` (latest and best by top-1).
Every write goes to a temporary sibling and is renamed into place, so a crash never leaves a half-written directory.
"""
import json
import logging
import os
import shutil
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp

from rsd_jax.errors import UserError

MODEL_JSON = "model.json"
log = logging.getLogger("rsd_jax")


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable or does not fit; the message says which and why."""


def save_model(directory, variables, metadata):
    """Write `variables` and `metadata` (must hold `model` and `num_classes`) to `directory`, atomically."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        raise CheckpointError(f"{directory} already exists; choose another output directory or remove it")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
    try:
        host = jax.tree_util.tree_map(np.asarray, jax.device_get(dict(variables)))
        # Written by one process (process 0 of a multi-process run): no barriers with the others.
        only_me = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                     active_processes={jax.process_index()})
        with ocp.StandardCheckpointer(multiprocessing_options=only_me) as ckpt:
            ckpt.save(os.path.join(tmp, "variables"), host)
        with open(os.path.join(tmp, MODEL_JSON), "w") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_model_metadata(directory):
    path = os.path.join(directory, MODEL_JSON)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} is not a model directory (no {MODEL_JSON}); "
                              "write one with `python -m convert.from_torch` or by training")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), str) or not isinstance(
            meta.get("num_classes"), int):
        raise CheckpointError(f"{path} must hold a 'model' name and an integer 'num_classes'")
    return meta


def check_tree_shapes(template, tree, what):
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped leaf of `tree` vs `template`."""
    from flax import traverse_util
    want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(template)).items()}
    got = {"/".join(k): tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(tree)).items()}
    problems = []
    if missing := sorted(set(want) - set(got)):
        problems.append(f"missing: {', '.join(missing)}")
    if unexpected := sorted(set(got) - set(want)):
        problems.append(f"unexpected: {', '.join(unexpected)}")
    if bad := [f"{k} {got[k]} vs {want[k]}" for k in sorted(set(want) & set(got)) if want[k] != got[k]]:
        problems.append(f"shape mismatch (checkpoint vs model): {'; '.join(bad)}")
    if problems:
        raise CheckpointError(f"{what} does not fit: " + " | ".join(problems))


def load_model_variables(directory, template):
    """Restore the variables of a model directory as numpy arrays, checked leaf by leaf against `template`."""
    path = os.path.join(os.path.abspath(directory), "variables")
    if not os.path.isdir(path):
        raise CheckpointError(f"{directory} has no variables/ directory")
    try:
        with ocp.StandardCheckpointer() as ckpt:
            tree = ckpt.restore(path)
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    check_tree_shapes(template, tree, directory)
    return jax.tree_util.tree_map(np.asarray, tree)


class RunCheckpoints:
    """A run's checkpoints: `checkpoints/latest` (the two newest) and `checkpoints/best` (the best top-1).

    Saves are asynchronous (orbax writes into a temporary directory and renames it when complete, so a save cut short
    is never listed). A listed checkpoint that cannot be read (damaged on disk) is moved aside to
    `checkpoints/unusable-<which>-<step>` with a warning and the previous one is used instead.
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
        digest = state_digest(state)
        self._write_digest("latest", step, digest)
        self._latest.save(step, args=ocp.args.StandardSave(state))
        if best and step not in self._best.all_steps():
            self._write_digest("best", step, digest)
            self._best.save(step, args=ocp.args.StandardSave(state), metrics=dict(metrics))
        return True

    def wait(self):
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

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
        """Compare the leaf shapes stored in checkpoint `step` (orbax's metadata, read without the arrays) with the
        state to restore; unreadable metadata is left to the restore itself to report."""
        try:
            with ocp.StandardCheckpointer() as reader:    # the manager alone knows no handler before a restore
                stored = reader.metadata(os.path.join(self._root, which, str(step), "default"))
            stored = getattr(stored, "item_metadata", stored)
            stored = getattr(stored, "tree", stored)
            stored = {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]
                      if hasattr(x, "shape")}
        except Exception:  # noqa: BLE001
            return
        if not stored:
            return
        want = {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
        differ = sorted(set(want) ^ set(stored)) + sorted(k for k in set(want) & set(stored) if want[k] != stored[k])
        if differ:
            shown = ", ".join(f"{k} {stored.get(k, 'absent')} vs {want.get(k, 'absent')}" for k in differ[:3])
            raise CheckpointError(
                f"checkpoint {self._root}/{which}/{step} was saved by another config: {len(differ)} leaves differ "
                f"(checkpoint vs this config: {shown}{', ...' if len(differ) > 3 else ''}); resume with the run's "
                "own config or use another workdir")

    def _digest_path(self, which, step):
        return os.path.join(self._root, "digests", f"{which}-{step}.json")

    def _write_digest(self, which, step, digest):
        """Checksums of the state being saved, beside orbax's directories (orbax keeps no per-step metrics without
        best_fn); those of steps no longer kept are removed."""
        if jax.process_index() != 0:
            return
        path = self._digest_path(which, step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(digest, f)
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


def _path_name(path):
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_digest(tree):
    """{leaf path: checksum} of a state, the same for a TrainState and the plain tree restored from it."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    values = jax.device_get(_digests([x for _, x in flat]))
    return {_path_name(p): int(v) for (p, _), v in zip(flat, values)}


def _verify_digest(digest, tree):
    if digest is None:     # written before checksums existed
        return
    got = state_digest(tree)
    bad = sorted(k for k, v in digest.items() if got.get(k) != v)
    if bad:
        raise CheckpointError(f"contents differ from their checksums ({', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''})")


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
