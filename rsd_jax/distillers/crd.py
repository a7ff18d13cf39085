"""CRD (Tian et al., 2020): contrastive representation distillation with memory banks (docs/reference.md §2).

Both pre-logit features get a trainable linear embedding to feat_dim, L2-normalised: v_s, v_t. Two memory banks
(N x feat_dim, N = training examples, uniform in +-1/sqrt(feat_dim/3) at init) hold past embeddings: `student`
(of v_s) and `teacher` (of v_t). For each example, index 0 is its own row and K negatives are drawn; with rows w,
    out_s = exp(<w_teacher, v_s> / T) / Z_s,   out_t = exp(<w_student, v_t> / T) / Z_t,
Z_* = mean(exp(...)) * N fixed on the first training batch. NCE loss of each (ContrastLoss, eps 1e-7, Pn = 1/N):
    -(sum_b log(x_b0 / (x_b0 + K Pn + eps)) + sum_{b,k>0} log(K Pn / (x_bk + K Pn + eps))) / B,
and L = loss_weight * (NCE(out_s) + NCE(out_t)). After the step, each batch row moves to
normalise(momentum * row + (1 - momentum) * v) (the banks and Z are not trained; collection "memory").

Differences from the reference: negatives are drawn uniformly from all N rows with the 'dropout' rng (the
reference's `*InstanceSample` datasets draw them from other classes only, which needs per-class index lists); Z
is fixed from the whole global batch and the banks are updated with the whole global batch (all_gather over the
statistics groups), so every group holds the same memory; under DDP each reference rank updates its own copy
with its own batch and DDP's buffer broadcast keeps rank 0's. Embeddings have torch's default Linear init.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from rsd_jax.distillers.base import Method
from rsd_jax.models import layers

NCE_EPS = 1e-7


def default_config():
    return ml_collections.ConfigDict(dict(loss_weight=1.0, feat_dim=128, k=16384, momentum=0.5, temperature=0.07,
                                          feature="pre_logits"))


def contrast_loss(x, num_data):
    """NCE loss of (B, K+1) positive-first scores (the reference's ContrastLoss)."""
    x = x.astype(jnp.float32)
    m = x.shape[1] - 1
    noise = m / num_data
    log_d1 = jnp.log(x[:, 0] / (x[:, 0] + noise + NCE_EPS))
    log_d0 = jnp.log(noise / (x[:, 1:] + noise + NCE_EPS))
    return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / x.shape[0]


def l2_normalize(x):
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


def momentum_update(memory, index, value, momentum):
    """Rows `index` of `memory` -> normalise(momentum * row + (1 - momentum) * value); other rows unchanged."""
    rows = l2_normalize(memory[index] * momentum + value * (1.0 - momentum))
    return memory.at[index].set(rows)


def crd_scores(memory_rows, embedding, temperature):
    """exp(<row, embedding> / T) for (B, K+1, D) rows and (B, D) embeddings -> (B, K+1)."""
    return jnp.exp(jnp.einsum("bkd,bd->bk", memory_rows, embedding) / temperature)


class CRD(Method):
    config: ml_collections.ConfigDict
    context: object

    def example_batch(self, n):
        return dict(super().example_batch(n), index=jnp.zeros((n,), jnp.int32))

    @nn.compact
    def __call__(self, student_out, teacher_out, batch, train: bool):
        c = self.config
        n, d = self.context.num_train_examples, c.feat_dim
        fs, ft = student_out[1][c.feature], teacher_out[1][c.feature]
        fs, ft = fs.reshape(fs.shape[0], -1), ft.reshape(ft.shape[0], -1)

        def embed(x, name):
            init = layers.torch_default_init(x.shape[-1])
            return l2_normalize(nn.Dense(d, kernel_init=init, bias_init=init, name=name)(x.astype(jnp.float32)))

        vs, vt = embed(fs, "embed_s"), embed(ft, "embed_t")
        stdv = 1.0 / (d / 3) ** 0.5
        bank = lambda: jax.random.uniform(self.make_rng("params"), (n, d), jnp.float32, -stdv, stdv)  # noqa: E731
        mem_s = self.variable("memory", "student", bank)
        mem_t = self.variable("memory", "teacher", bank)
        z = self.variable("memory", "z", lambda: jnp.zeros((2,), jnp.float32))
        z_set = self.variable("memory", "z_set", lambda: jnp.zeros((), jnp.bool_))

        index = batch["index"].astype(jnp.int32)
        rng = self.make_rng("dropout") if self.has_rng("dropout") else jax.random.key(0)
        negatives = jax.random.randint(rng, (index.shape[0], c.k), 0, n)
        self.sow("intermediates", "negatives", negatives)     # for the fidelity check; a no-op in training
        idx = jnp.concatenate([index[:, None], negatives], axis=1)
        out_s = crd_scores(jax.lax.stop_gradient(mem_t.value[idx]), vs, c.temperature)
        out_t = crd_scores(jax.lax.stop_gradient(mem_s.value[idx]), vt, c.temperature)
        # Z from the first batch: the mean over the global batch, so every group fixes the same constant.
        z_now = jax.lax.stop_gradient(jnp.stack([jax.lax.pmean(jnp.mean(out_s), "group"),
                                                 jax.lax.pmean(jnp.mean(out_t), "group")]) * n)
        z_used = jnp.where(z_set.value, z.value, z_now)
        loss = contrast_loss(out_s / z_used[0], n) + contrast_loss(out_t / z_used[1], n)

        if train and not self.is_initializing():
            z.value, z_set.value = z_used, jnp.ones((), jnp.bool_)
            gather = lambda x: jax.lax.all_gather(jax.lax.stop_gradient(x), "group", tiled=True)  # noqa: E731
            all_index = gather(index)
            mem_s.value = momentum_update(mem_s.value, all_index, gather(vs), c.momentum)
            mem_t.value = momentum_update(mem_t.value, all_index, gather(vt), c.momentum)
        return {"crd": c.loss_weight * loss}
