"""Correlation congruence (CC, Peng et al., 2019) as the reference implements it (RSD_SPEC §2).

Both pre-logit features get a trainable linear embedding (feat_dim, with bias; the teacher's too), and with
delta = |e_s - e_t| the loss couples consecutive examples of the batch: L = scale * mean_i sum_k delta[i,k] delta[i+1,k].
"""
import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from rsd_jax.models import layers


def default_config():
    return ml_collections.ConfigDict(dict(loss_weight=1.0, scale=0.02, feat_dim=128, feature="pre_logits"))


def correlation_loss(student_embed, teacher_embed, *, scale=0.02):
    delta = jnp.abs(student_embed.astype(jnp.float32) - teacher_embed.astype(jnp.float32))
    return scale * jnp.mean(jnp.sum(delta[:-1] * delta[1:], axis=1))


class Correlation(nn.Module):
    config: ml_collections.ConfigDict
    context: object

    @nn.compact
    def __call__(self, student_out, teacher_out, batch, train: bool):
        c = self.config
        fs, ft = student_out[1][c.feature], teacher_out[1][c.feature]
        dense = lambda name: nn.Dense(c.feat_dim, kernel_init=layers.trunc_normal_02, name=name)  # noqa: E731
        es = dense("embed_s")(fs.reshape(fs.shape[0], -1))
        et = dense("embed_t")(ft.reshape(ft.shape[0], -1))
        return {"correlation": c.loss_weight * correlation_loss(es, et, scale=c.scale)}
