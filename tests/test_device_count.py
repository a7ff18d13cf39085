"""What a device count changes (README's feature table): not the batches (nor the augmentation and keys, which depend
only on seed and step); one step only by float32 rounding (sharded reductions sum in another order)."""
import jax
import numpy as np
from jax.sharding import Mesh

from rsd_jax import train
from tiny import tiny_config

# Per-leaf max|a - b| / max|a| after one step on 1 vs 8 devices: 1.2e-6 measured for the demo's smoke student,
# 3.2e-6 for this one (the loss: 8e-8), BatchNorm statistics 2.7e-7: no statistic is reduced per device (that is
# another statistics group: more than 1e-3 in the loss, tests/test_train.py). Later steps grow the difference about tenfold every two or three (1e-3 by step 8 on the demo's
# student, gradient norms 5 to 90), as fast as a 1e-7 perturbation of the initial parameters on one device grows.
ONE_STEP_BOUND = 2e-5


def relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def test_one_step_on_one_and_eight_devices_differs_only_by_rounding():
    """The demo students' path: whole-batch statistics (group_size=0) and a 10% label mask."""
    config = tiny_config("vanilla", labelled_fraction=0.1, test_fraction=0.8)
    config.distill.group_size = 0
    out = []
    for devices in (jax.devices()[:1], jax.devices()):
        run = train.build_run(config, Mesh(np.asarray(devices), ("data",)))
        batch = run.train_batch(0)
        state, metrics = run.train_step(run.init(jax.random.key(0)), run.teacher_vars, batch)
        jax.block_until_ready(state)
        out.append((jax.device_get(batch), jax.device_get((state.params, state.model_state)), metrics))
    (batch1, state1, metrics1), (batch8, state8, metrics8) = out
    assert len(jax.devices()) == 8 and 0 < batch1["label_mask"].sum() < len(batch1["label_mask"])
    assert all(np.array_equal(batch1[k], batch8[k]) for k in batch1)     # the same examples, bit for bit
    flat1, flat8 = jax.tree_util.tree_flatten_with_path(state1)[0], jax.tree_util.tree_leaves(state8)
    worst = max((relative(a, b), jax.tree_util.keystr(path)) for (path, a), b in zip(flat1, flat8))
    assert worst[0] < ONE_STEP_BOUND, worst
    assert relative(metrics1["loss"], metrics8["loss"]) < ONE_STEP_BOUND


def test_a_checkpoint_of_eight_devices_resumes_on_two_and_one(tmp_path):
    """Resuming on another device count: the restored state is the saved one bit for bit, laid out on the new mesh,
    and the next step differs from the 8-device one only by rounding (the same bound as above)."""
    from rsd_jax import checkpoint
    config = tiny_config("vanilla", labelled_fraction=0.1, test_fraction=0.8)
    runs = {n: train.build_run(config, Mesh(np.asarray(jax.devices()[:n]), ("data",))) for n in (8, 2, 1)}
    state = runs[8].init(jax.random.key(0))
    for step in range(2):
        state, _ = runs[8].train_step(state, None, runs[8].train_batch(step))
        jax.block_until_ready(state)
    ckpts = checkpoint.RunCheckpoints(str(tmp_path))
    ckpts.save(state)
    ckpts.close()
    saved = jax.device_get(state)
    next8, _ = runs[8].train_step(state, None, runs[8].train_batch(2))
    next8 = jax.device_get(jax.block_until_ready(next8))
    for n in (2, 1):
        restored = checkpoint.RunCheckpoints(str(tmp_path)).restore(runs[n].abstract_state)
        assert {d.id for d in jax.tree_util.tree_leaves(restored)[0].sharding.device_set} == \
            {d.id for d in jax.devices()[:n]}
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(saved),
                                                         jax.tree_util.tree_leaves(jax.device_get(restored))))
        after, _ = runs[n].train_step(restored, None, runs[n].train_batch(2))
        after = jax.device_get(jax.block_until_ready(after))
        worst = max(relative(a, b) for a, b in zip(jax.tree_util.tree_leaves((next8.params, next8.model_state)),
                                                   jax.tree_util.tree_leaves((after.params, after.model_state))))
        assert worst < ONE_STEP_BOUND, (n, worst)
