"""What keeps a long run safe: the free-space check before compiling, the one non-finite mechanism (watch and stop,
or skip), and SIGTERM/SIGINT handling that stops after the current step with a checkpoint."""
import functools
import logging
import os
import shutil
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np

from rsd_jax.errors import UserError

log = logging.getLogger("rsd_jax")


def check_free_space(workdir, abstract_state):
    """Fail before compiling when the workdir's disk cannot hold a checkpoint (twice the state's bytes: orbax writes
    the new one before deleting the oldest)."""
    need = 2 * sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract_state))
    probe = os.path.abspath(workdir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free < need:
        raise UserError(f"only {free / 2**20:.1f} MiB free under {probe}; a checkpoint of this run needs about "
                        f"{need / 2**20:.1f} MiB: free some space or choose another --workdir")


# ------------------------------------------------------------------------------------------------ non-finite steps
# One predicate, two policies: by default the loop watches for the first step whose metrics are not finite
# (`bookkeeping`, on the device) and stops with that step (`raise_if_nonfinite`), keeping the last good checkpoint;
# with `skip_nonfinite_steps` the step itself leaves the state unchanged instead (`skip_nonfinite`).
def all_finite(metrics):
    """Whether every metric (the loss, its terms, the gradient norm) is finite: a scalar bool on the device."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree_util.tree_leaves(metrics)]))


def skip_nonfinite(train_step, abstract_state):
    """The train step, but a step whose metrics are not finite leaves the state as it was (except the step counter,
    so the data order goes on) and reports `skipped`=1 with zeroed metrics. In a run of several students (metrics
    with a leading member axis) this holds for each student on its own."""
    shardings = jax.tree_util.tree_map(lambda s: s.sharding, abstract_state)

    def step(state, teacher_vars, batch):
        new, metrics = train_step(state, teacher_vars, batch)
        finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in jax.tree_util.tree_leaves(metrics)]), axis=0)

        def keep(n, o):
            return jnp.where(finite.reshape(finite.shape + (1,) * (n.ndim - finite.ndim)), n, o)
        kept = jax.tree_util.tree_map(keep, new.replace(step=None), state.replace(step=None)).replace(step=new.step)
        metrics = {k: jnp.where(finite, v, jnp.zeros_like(v)) for k, v in metrics.items()}
        metrics["skipped"] = 1 - finite.astype(jnp.int32)
        return kept, metrics

    return jax.jit(step, out_shardings=(shardings, None), donate_argnums=(0,))


@functools.partial(jax.jit, static_argnames="watch_nonfinite")
def bookkeeping(first_bad, sums, metrics, step, watch_nonfinite):
    """The loop's per-step bookkeeping on the device, in one dispatch and no host sync: the epoch's running sums of
    the metrics, and, when watching, the metrics and step of the first step with a non-finite metric (None when not
    watching)."""
    sums = metrics if not sums else jax.tree_util.tree_map(jnp.add, sums, metrics)
    if watch_nonfinite:
        current = dict(metrics, found=~all_finite(metrics), step=jnp.asarray(step, jnp.int32))
        first_bad = current if first_bad is None else jax.tree_util.tree_map(
            lambda old, new: jnp.where(first_bad["found"], old, new), first_bad, current)
    return first_bad, sums


def raise_if_nonfinite(first_bad, kept_step):
    """Stop the run if the watched steps had a non-finite metric (reads `first_bad` from the device); `kept_step()`
    gives the step of the newest complete checkpoint, which is kept."""
    if first_bad is None:
        return
    bad = jax.device_get(first_bad)
    if bad["found"]:
        kept = kept_step()
        terms = [k for k in bad if k not in ("found", "step") and not np.all(np.isfinite(bad[k]))]
        where = ""
        if terms and np.ndim(bad[terms[0]]):     # several students: which
            where = " (students " + ", ".join(str(i) for i in np.flatnonzero(~np.isfinite(bad[terms[0]]))) + ")"
        raise UserError(f"non-finite {' and '.join(terms) or 'loss'} at step {int(bad['step'])}{where}; the last good "
                        f"checkpoint ({'step ' + str(kept) if kept is not None else 'none yet'}) is kept: lower "
                        "optim.lr, set optim.clip_grad, or set skip_nonfinite_steps=True to skip such steps")


# ------------------------------------------------------------------------------------------------ signals
class StopSignals:
    """SIGTERM/SIGINT ask the loop to stop after the current step (with a checkpoint); a second one stops at once.
    With several processes the request is agreed on at log steps, so every process saves the same step."""

    def __init__(self):
        self.name = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.name is not None:        # the second signal: the default behaviour
            self.restore()
            signal.raise_signal(signum)
            return
        self.name = signal.Signals(signum).name
        log.warning("%s received: stopping after this step with a checkpoint (again to stop at once)", self.name)

    def requested(self, at_log_step):
        if jax.process_count() == 1:
            return self.name is not None
        if not at_log_step:
            return False
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.asarray(self.name is not None, np.int32))
        if np.any(flags) and self.name is None:
            self.name = "a signal to another process"
        return bool(np.any(flags))

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
