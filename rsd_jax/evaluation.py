"""Evaluation: top-1, top-5 and cross-entropy of a model over a test split, in eval mode, with the eval transform of
the model (the reference's resize and centre crop, docs/reference.md §4.1). Training and `rsd_jax.evaluate` use it."""
import sys

import jax
import jax.numpy as jnp
import optax

from rsd_jax import data, sharding
from rsd_jax.data import augment


def eval_transform_for(config, dataset):
    """The evaluation transform of a run: the reference's resize and centre crop for the student."""
    return augment.eval_transform(config.data.augment, dataset.mean, dataset.std, size=config.data.image_size,
                                  model=config.student.model)


def metrics_sums(logits, labels, weight):
    """Weighted sums of correct top-1, top-5 and cross-entropy over a batch (padding has weight 0)."""
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    k = min(5, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    top1 = (topk[:, 0] == labels).astype(jnp.float32)
    top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
    return {"top1": jnp.sum(top1 * weight), "top5": jnp.sum(top5 * weight), "loss": jnp.sum(ce * weight),
            "count": jnp.sum(weight)}


def make_eval_step(model, transform, **jit_kwargs):
    """The jitted `(params, model_state, batch) -> metric sums` of `model` on `transform`ed images (eval mode)."""
    def eval_step(params, model_state, batch):
        logits, _ = model.apply(dict(model_state, params=params), transform(batch["image"]), train=False)
        return metrics_sums(logits, batch["label"], batch["weight"])
    return jax.jit(eval_step, **jit_kwargs)


def _shown(batches, total, desc):
    """`batches` through a tqdm bar when `desc` is given, on process 0, and stderr is a terminal (as training's)."""
    if desc is None or jax.process_index() != 0 or not sys.stderr.isatty():
        return batches
    from tqdm import tqdm
    return tqdm(batches, total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


def evaluate_split(eval_step, params, model_state, split, batch_size, mesh, desc=None):
    """top1/top5 in percent and mean loss over a whole split (with a progress bar named `desc` on a terminal)."""
    totals = None
    batches = data.eval_batches(split, batch_size, jax.process_index(), jax.process_count())
    total = -(-len(split) // batch_size) if hasattr(split, "__len__") else None
    for batch in _shown(batches, total, desc):
        sums = eval_step(params, model_state, sharding.to_global(batch, mesh, local=True))
        sums = jax.device_get(sums)
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    count = float(totals["count"])
    return {"top1": 100.0 * float(totals["top1"]) / count, "top5": 100.0 * float(totals["top5"]) / count,
            "loss": float(totals["loss"]) / count}
