"""KD (Hinton et al.): KL(p_t || p_s) at temperature T, times T^2, mean over the batch (docs/reference.md §2)."""
import jax
import jax.numpy as jnp
import ml_collections

from rsd_jax.distillers.base import Method


def default_config():
    return ml_collections.ConfigDict(dict(loss_weight=1.0, temperature=1.0))


def kd_loss(student_logits, teacher_logits, *, temperature=1.0):
    t = temperature
    log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    log_p_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return jnp.mean(kl) * t * t


class KD(Method):
    config: ml_collections.ConfigDict
    context: object

    def __call__(self, student_out, teacher_out, batch, train: bool):
        loss = kd_loss(student_out[0], teacher_out[0], temperature=self.config.temperature)
        return {"kd": self.config.loss_weight * loss}
