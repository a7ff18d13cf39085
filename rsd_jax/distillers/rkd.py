"""RKD (Park et al., 2019): distance- and angle-wise relations of the pre-logit features (docs/reference.md §2).

Distances: pairwise Euclidean (squared if `squared`), clamped below at eps, diagonal zeroed, divided by the mean of
the positive entries; angles: cosines between the difference vectors e_j - e_i and e_k - e_i (unit length; a zero
difference stays 0 and passes no gradient, where the reference's F.normalize(eps=1e-12) passes 1e12 times the
error). Both compared with smooth L1 (beta 1), mean over entries:
L = distance_weight * sl1(d_s, d_t) + angle_weight * sl1(a_s, a_t). Features are flattened per example.
"""
import jax
import jax.numpy as jnp
import ml_collections

from rsd_jax.distillers.base import Method


def default_config():
    return ml_collections.ConfigDict(dict(loss_weight=1.0, distance_weight=25.0, angle_weight=50.0, eps=1e-12,
                                          squared=False, feature="pre_logits"))


def pairwise_distances(e, *, squared=False, eps=1e-12):
    # From the differences, not the reference's |a|^2 + |b|^2 - 2 a.b: equal in exact arithmetic, but the expansion
    # cancels catastrophically in float32 when the features sit close together (a fresh student's), and the two
    # frameworks then round to different gradients.
    diff = e[:, None, :] - e[None, :, :]
    d = jnp.maximum(jnp.sum(diff * diff, axis=-1), eps)
    if not squared:
        d = jnp.sqrt(d)
    return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, d)


def _normalised_distances(e, squared, eps):
    d = pairwise_distances(e, squared=squared, eps=eps)
    positive = d > 0
    return d / (jnp.sum(jnp.where(positive, d, 0.0)) / jnp.sum(positive))


def _angles(e):
    diff = e[None, :, :] - e[:, None, :]                      # [i, j] = e_j - e_i
    sq = jnp.sum(diff * diff, axis=-1, keepdims=True)
    # Coincident embeddings (the diagonal; two examples the student maps to one point) have no direction: 0, and
    # no gradient. The reference's F.normalize divides them by its eps 1e-12 instead, and their gradient, 1e12
    # times the angle error, blows the step up (a fresh smoke student sends two blank crops to one point).
    safe = sq > 0
    diff = jnp.where(safe, diff / jnp.sqrt(jnp.where(safe, sq, 1.0)), 0.0)
    return jnp.einsum("ijd,ikd->ijk", diff, diff).reshape(-1)


def smooth_l1(a, b):
    x = jnp.abs(a - b)
    return jnp.mean(jnp.where(x < 1.0, 0.5 * x * x, x - 0.5))


def rkd_loss(student_features, teacher_features, *, distance_weight=25.0, angle_weight=50.0, eps=1e-12,
             squared=False):
    s = student_features.reshape(student_features.shape[0], -1).astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_features.reshape(teacher_features.shape[0], -1).astype(jnp.float32))
    loss_d = smooth_l1(_normalised_distances(s, squared, eps), _normalised_distances(t, squared, eps))
    loss_a = smooth_l1(_angles(s), _angles(t))
    return distance_weight * loss_d + angle_weight * loss_a


class RKD(Method):
    config: ml_collections.ConfigDict
    context: object

    def __call__(self, student_out, teacher_out, batch, train: bool):
        c = self.config
        loss = rkd_loss(student_out[1][c.feature], teacher_out[1][c.feature], distance_weight=c.distance_weight,
                        angle_weight=c.angle_weight, eps=c.eps, squared=c.squared)
        return {"rkd": c.loss_weight * loss}
