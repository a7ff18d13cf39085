"""DKD (Zhao et al., 2022): decoupled KD = alpha * TCKD + beta * NCKD (docs/reference.md §2).

TCKD is the KL between the binary (target vs rest) probabilities of teacher and student; NCKD is the KL over the
non-target classes, the target removed by subtracting 1000 from its logit before the softmax, as the reference does.
Both are times T^2 and batch means. Soft (B, C) labels are reduced to their argmax.
Difference from the reference (docs/reference.md §7.4): its forward reads attributes that do not exist and crashes; this is the
intended method with `alpha`, `beta`, `temperature` from the config.
"""
import jax
import jax.numpy as jnp
import ml_collections

from rsd_jax.distillers.base import Method


def default_config():
    return ml_collections.ConfigDict(dict(loss_weight=1.0, alpha=1.0, beta=2.0, temperature=1.0))


def hard_labels(labels, num_classes):
    """Integer labels from integer or soft (B, C) labels (argmax, as the reference)."""
    labels = jnp.asarray(labels)
    return jnp.argmax(labels, axis=-1) if labels.ndim == 2 else labels.astype(jnp.int32)


def _kl(p, log_p, log_q):
    """sum_c p (log p - log q), with 0 log 0 = 0 (torch's kl_div)."""
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def dkd_loss(student_logits, teacher_logits, labels, *, alpha=1.0, beta=2.0, temperature=1.0):
    t = temperature
    zs, zt = student_logits.astype(jnp.float32) / t, teacher_logits.astype(jnp.float32) / t
    gt = jax.nn.one_hot(hard_labels(labels, zs.shape[-1]), zs.shape[-1], dtype=jnp.float32)
    ps, pt = jax.nn.softmax(zs, axis=-1), jax.nn.softmax(zt, axis=-1)
    bs = jnp.stack([jnp.sum(ps * gt, -1), jnp.sum(ps * (1 - gt), -1)], -1)    # (B, 2): target, rest
    bt = jnp.stack([jnp.sum(pt * gt, -1), jnp.sum(pt * (1 - gt), -1)], -1)
    tckd = _kl(bt, jnp.log(bt), jnp.log(bs))
    log_ps_nt = jax.nn.log_softmax(zs - 1000.0 * gt, axis=-1)
    log_pt_nt = jax.nn.log_softmax(zt - 1000.0 * gt, axis=-1)
    nckd = _kl(jnp.exp(log_pt_nt), log_pt_nt, log_ps_nt)
    return (alpha * jnp.mean(tckd) + beta * jnp.mean(nckd)) * t * t


class DKD(Method):
    config: ml_collections.ConfigDict
    context: object

    def __call__(self, student_out, teacher_out, batch, train: bool):
        c = self.config
        loss = dkd_loss(student_out[0], teacher_out[0], batch["label"], alpha=c.alpha, beta=c.beta,
                        temperature=c.temperature)
        return {"dkd": c.loss_weight * loss}
