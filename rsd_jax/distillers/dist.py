"""DIST (Huang et al., 2022): relations between probability vectors instead of their values (docs/reference.md §2).

With p = softmax(z / tau): inter = 1 - mean_b pearson_c(p_s[b], p_t[b]) (across classes, per example),
intra = 1 - mean_c pearson_b(p_s[:, c], p_t[:, c]) (across the batch, per class); L = tau^2 (beta inter +
gamma intra). Pearson is the cosine of centred vectors with eps 1e-8 added to the product of norms.
"""
import jax
import jax.numpy as jnp
import ml_collections

from rsd_jax.distillers.base import Method


def default_config():
    return ml_collections.ConfigDict(dict(loss_weight=1.0, beta=1.0, gamma=1.0, tau=1.0))


def _pearson_rows(a, b, eps=1e-8):
    a = a - jnp.mean(a, axis=1, keepdims=True)
    b = b - jnp.mean(b, axis=1, keepdims=True)
    norms = jnp.linalg.norm(a, axis=1) * jnp.linalg.norm(b, axis=1)
    return jnp.sum(a * b, axis=1) / (norms + eps)


def dist_loss(student_logits, teacher_logits, *, beta=1.0, gamma=1.0, tau=1.0):
    ps = jax.nn.softmax(student_logits.astype(jnp.float32) / tau, axis=-1)
    pt = jax.nn.softmax(teacher_logits.astype(jnp.float32) / tau, axis=-1)
    inter = 1.0 - jnp.mean(_pearson_rows(ps, pt))
    intra = 1.0 - jnp.mean(_pearson_rows(ps.T, pt.T))
    return tau * tau * (beta * inter + gamma * intra)


class DIST(Method):
    config: ml_collections.ConfigDict
    context: object

    def __call__(self, student_out, teacher_out, batch, train: bool):
        c = self.config
        loss = dist_loss(student_out[0], teacher_out[0], beta=c.beta, gamma=c.gamma, tau=c.tau)
        return {"dist": c.loss_weight * loss}
