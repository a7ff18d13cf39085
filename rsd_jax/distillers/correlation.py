"""Correlation congruence (CC, Peng et al., 2019) as the reference implements it (docs/reference.md §2).

Both pre-logit features get a trainable linear embedding (feat_dim, with bias; the teacher's too), and with
delta = |e_s - e_t| the loss couples consecutive examples of the batch:
    L = scale * mean_i sum_k delta[i,k] delta[i+1,k].
Embeddings have torch's default Linear init (uniform +-1/sqrt(fan_in)), as the reference's plain nn.Linear.
"""
import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from rsd_jax.distillers.base import Method
from rsd_jax.models import layers


def default_config():
    return ml_collections.ConfigDict(dict(loss_weight=1.0, scale=0.02, feat_dim=128, feature="pre_logits"))


def correlation_loss(student_embed, teacher_embed, *, scale=0.02):
    delta = jnp.abs(student_embed.astype(jnp.float32) - teacher_embed.astype(jnp.float32))
    return scale * jnp.mean(jnp.sum(delta[:-1] * delta[1:], axis=1))


class Correlation(Method):
    config: ml_collections.ConfigDict
    context: object

    @nn.compact
    def __call__(self, student_out, teacher_out, batch, train: bool):
        c = self.config
        fs, ft = student_out[1][c.feature], teacher_out[1][c.feature]
        def embed(x, name):
            init = layers.torch_default_init(x.shape[-1])
            return nn.Dense(c.feat_dim, kernel_init=init, bias_init=init, name=name)(x.astype(jnp.float32))

        es = embed(fs.reshape(fs.shape[0], -1), "embed_s")
        et = embed(ft.reshape(ft.shape[0], -1), "embed_t")
        return {"correlation": c.loss_weight * correlation_loss(es, et, scale=c.scale)}
