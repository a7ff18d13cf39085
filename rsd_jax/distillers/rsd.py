"""RSD: Redundancy Suppression Distillation (ICCV 2025), docs/reference.md §1.

The student's pre-logit feature goes through a small projector to the teacher's width; the loss pushes the
batch-standardised cross-correlation of projected student and teacher features towards the identity:
    L = sum_i (C_ii - 1)^2 + kappa * sum_{i != j} C_ij^2,   C = T_hat^T S_hat / B.
Deliberate differences from the reference (docs/reference.md §7): only the pre-logit stage exists (the reference's other
stages index the wrong tensor), and the ground-truth term honours `gt_loss_weight` (the reference ignores it for
RSD; the default 1 makes them equal).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from rsd_jax.distillers.base import Method
from rsd_jax.models import layers


def default_config():
    return ml_collections.ConfigDict(dict(loss_weight=0.1, kappa=0.01, gamma=2, feature="pre_logits"))


def standardize(x, eps=1e-5):
    """Per-column standardisation over the batch: biased std, eps added to the std (not the variance)."""
    mean = jnp.mean(x, axis=0, keepdims=True)
    std = jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=0, keepdims=True))
    return (x - mean) / (std + eps)


def _rsd_loss_one_group(student, teacher, kappa):
    s, t = standardize(student), standardize(teacher)
    c = t.T @ s / student.shape[0]
    eye = jnp.eye(c.shape[0], dtype=c.dtype)
    cost = jnp.square(c - eye)
    return jnp.sum(cost * (kappa + (1.0 - kappa) * eye))


def rsd_loss(student, teacher, *, kappa=0.01, group_size=None):
    """RSD loss of (B, D) features. Statistics over the whole batch, or over consecutive groups of `group_size`
    examples with the mean over groups (the reference under DDP: each GPU's 128 images form one group).

    Computed in float32 whatever the input dtype: the statistics are sums over the batch.
    """
    if student.shape != teacher.shape or student.ndim != 2:
        raise ValueError(f"rsd_loss wants two (B, D) arrays of one shape, got {student.shape} and {teacher.shape}")
    student, teacher = student.astype(jnp.float32), teacher.astype(jnp.float32)
    b, d = student.shape
    if group_size is None or group_size == b:
        return _rsd_loss_one_group(student, teacher, kappa)
    if b % group_size:
        raise ValueError(f"batch {b} is not a multiple of group_size {group_size}")
    groups = (b // group_size, group_size, d)
    per_group = jax.vmap(_rsd_loss_one_group, in_axes=(0, 0, None))(
        student.reshape(groups), teacher.reshape(groups), kappa)
    return jnp.mean(per_group)


class Projector(nn.Module):
    """h(x) = W2 GELU(BN(W1 x)): Linear (no bias) to gamma*d_s, BatchNorm1d, exact GELU, Linear (no bias) to d_t."""
    out_dim: int
    gamma: int = 2

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(self.gamma * x.shape[-1], use_bias=False, kernel_init=layers.trunc_normal_02, name="fc1")(x)
        x = layers.batch_norm(train, name="bn")(x)
        x = layers.gelu(x)
        return nn.Dense(self.out_dim, use_bias=False, kernel_init=layers.trunc_normal_02, name="fc2")(x)


class RSD(Method):
    """The distiller's extra module and loss: projector + RSD loss on one feature of both models."""
    config: ml_collections.ConfigDict
    context: object

    @nn.compact
    def __call__(self, student_out, teacher_out, batch, train: bool):
        feature = self.config.feature
        projected = Projector(self.context.teacher_dim, self.config.gamma, name="projector")(
            student_out[1][feature], train)
        loss = rsd_loss(projected, teacher_out[1][feature], kappa=self.config.kappa)
        return {"rsd": self.config.loss_weight * loss}
