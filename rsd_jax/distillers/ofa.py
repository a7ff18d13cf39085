"""OFA-KD (Hao et al., NeurIPS 2023): exit branches on student stages, each trained to the teacher's logits with the
OFA loss, plus the same loss on the student's own logits (docs/reference.md §2.1).

Loss of one head: l(z, z_t) = mean_b sum_c -[(p_t + m)^eps - m]_c log softmax(z / tau)_c, p_t = softmax(z_t / tau),
m the one-hot target (argmax of soft labels). Total (train.py adds the CE): kd_loss_weight * l(student logits;
eps[-1]) + loss_weight * sum_s l(branch_s(stage s); eps[s]). One eps value is broadcast to every head.

Branches, on the stage shape found at call time:
* map (H, W, C): for s < 4, (4 - s) SepConv blocks (channels doubling, the last to max(d_s, d_t)); for s = 4, a 1x1
  conv (with bias) to max(d_s, d_t); then global average pooling and a Linear head.
* tokens (L, C): prefix tokens (L - floor(sqrt L)^2 of them, in front) pass through; the patch tokens are merged 2x2
  (LayerNorm(4C), Linear without bias to d_s, GELU; Identity after the last of several) max(floor(log2(g/7)), 0)
  times for a g x g grid; then max(4 - s, 1) ViT blocks (d_s, 4 heads); the first token if there are prefix tokens,
  else the token mean; a Linear head.
Init as the reference's init_weights: Linear trunc_normal(0.02) and zero bias, conv kaiming normal (fan_out, ReLU)
with torch's default bias (init_weights leaves conv biases alone), norms at ones/zeros. The ViT blocks are timm's
bare Block: no qkv bias, LayerNorm eps 1e-5.

Differences from the reference (docs/reference.md §7): log_softmax instead of log(softmax), which can underflow to -inf; the
prefix-token count is read from the token count (the reference reads a `num_tokens` attribute that timm 0.6.5 ViTs
lack, so it fails for DeiT students, §7.5).
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from rsd_jax.distillers.base import Method
from rsd_jax.distillers.dkd import hard_labels
from rsd_jax.models import layers
from rsd_jax.models.vit import Block

# torch kaiming_normal_(mode="fan_out", nonlinearity="relu"): "normal" is untruncated in jax; flax's fan_out of an
# HWIO kernel (grouped ones included) is torch's.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
Conv = functools.partial(nn.Conv, kernel_init=kaiming_fan_out, bias_init=nn.initializers.zeros)
Dense = functools.partial(nn.Dense, kernel_init=layers.trunc_normal_02, bias_init=nn.initializers.zeros)


def BiasedConv(features, kernel, in_channels, **kwargs):
    """A conv with a bias: the reference's init_weights sets only conv kernels, so the bias keeps torch's default
    U(+-1/sqrt(fan_in))."""
    fan_in = in_channels * kernel[0] * kernel[1]
    return Conv(features, kernel, bias_init=layers.torch_default_init(fan_in), **kwargs)


def default_config():
    return ml_collections.ConfigDict(dict(loss_weight=1.0, kd_loss_weight=1.0, eps=(1.0,), stages=(1, 2, 3, 4),
                                          temperature=1.0))


def ofa_loss(student_logits, teacher_logits, labels, *, eps=1.0, temperature=1.0):
    zs = student_logits.astype(jnp.float32) / temperature
    pt = jax.nn.softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    m = jax.nn.one_hot(hard_labels(labels, zs.shape[-1]), zs.shape[-1], dtype=jnp.float32)
    weight = (pt + m) ** eps - m
    return jnp.mean(jnp.sum(-weight * jax.nn.log_softmax(zs, axis=-1), axis=-1))


def split_prefix(tokens):
    """(B, L, C) tokens -> (prefix (B, P, C), patch grid (B, g, g, C)), g = floor(sqrt L), P = L - g^2."""
    b, length, c = tokens.shape
    g = math.isqrt(length)
    p = length - g * g
    return tokens[:, :p], tokens[:, p:].reshape(b, g, g, c)


def space_to_depth(x, r):
    """(B, H, W, C) -> (B, H/r, W/r, r*r*C): each r x r block concatenated (row, column, channel order)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // r, w // r, r * r * c)


class SepConv(nn.Module):
    """Depthwise 3x3 stride 2, pointwise, BN, ReLU, depthwise 3x3, pointwise to `out`, BN, ReLU; no biases."""
    out: int

    @nn.compact
    def __call__(self, x, train: bool):
        c, pad = x.shape[-1], ((1, 1), (1, 1))
        x = Conv(c, (3, 3), strides=2, padding=pad, feature_group_count=c, use_bias=False, name="dw1")(x)
        x = Conv(c, (1, 1), use_bias=False, name="pw1")(x)
        x = nn.relu(layers.batch_norm(train, name="bn1")(x))
        x = Conv(c, (3, 3), padding=pad, feature_group_count=c, use_bias=False, name="dw2")(x)
        x = Conv(self.out, (1, 1), use_bias=False, name="pw2")(x)
        return nn.relu(layers.batch_norm(train, name="bn2")(x))


class PatchMerge(nn.Module):
    """Swin-style 2x2 merge of a (B, g, g, C) grid: concat, LayerNorm(4C), Linear (no bias) to `out`, activation."""
    out: int
    act: bool = True

    @nn.compact
    def __call__(self, x):
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        x = Dense(self.out, use_bias=False, name="reduction")(layers.LayerNorm(name="norm")(x))
        return layers.gelu(x) if self.act else x


class CNNBranch(nn.Module):
    stage: int
    width: int           # max(d_s, d_t)
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool):
        if self.stage < 4:
            n, c = 4 - self.stage, x.shape[-1]
            for i in range(n):
                x = SepConv(self.width if i == n - 1 else 2 * c, name=f"sepconv{i}")(x, train)
                c *= 2
        else:
            x = BiasedConv(self.width, (1, 1), x.shape[-1], name="conv")(x)
        return Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


class TokenBranch(nn.Module):
    stage: int
    dim: int             # d_s
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool):
        prefix, grid = split_prefix(x)
        merges = max(math.floor(math.log2(grid.shape[1] / 7)), 0)
        for i in range(merges):
            grid = PatchMerge(self.dim, act=(i == 0 or i != merges - 1), name=f"merge{i}")(grid)
        tokens = grid.reshape(grid.shape[0], -1, grid.shape[-1])
        if prefix.shape[1]:
            tokens = jnp.concatenate([prefix, tokens], axis=1)
        if tokens.shape[-1] != self.dim:
            raise ValueError(f"OFA stage {self.stage}: token width {tokens.shape[-1]} after {merges} merges is not "
                             f"the student's pre-logit width {self.dim}")
        for i in range(max(4 - self.stage, 1)):
            # timm's Block(dim, num_heads=4) as the reference builds it: no qkv bias, LayerNorm eps 1e-5.
            tokens = Block(num_heads=4, mlp_hidden=4 * self.dim, qkv_bias=False, norm_eps=1e-5,
                           name=f"blocks_{i}")(tokens, train)
        feature = tokens[:, 0] if prefix.shape[1] else jnp.mean(tokens, axis=1)
        return Dense(self.num_classes, name="head")(feature)


class OFA(Method):
    config: ml_collections.ConfigDict
    context: object

    @nn.compact
    def __call__(self, student_out, teacher_out, batch, train: bool):
        c = self.config
        stages = tuple(c.stages)
        eps = tuple(c.eps)
        if len(eps) == 1:
            eps = eps * (len(stages) + 1)
        if len(eps) != len(stages) + 1:
            raise ValueError(f"ofa.eps needs 1 or {len(stages) + 1} values (stages + logits), got {len(eps)}")
        d_s = student_out[1]["pre_logits"].shape[-1]
        width = max(d_s, self.context.teacher_dim)
        logits_t, labels = teacher_out[0], batch["label"]
        branch_losses = []
        for stage, e in zip(stages, eps):
            feature = student_out[1][f"stage{stage}"]
            if feature.ndim == 4:
                branch = CNNBranch(stage, width, self.context.num_classes, name=f"stage{stage}")
            else:
                branch = TokenBranch(stage, d_s, self.context.num_classes, name=f"stage{stage}")
            branch_losses.append(ofa_loss(branch(feature, train), logits_t, labels, eps=e,
                                          temperature=c.temperature))
        return {"kd": c.kd_loss_weight * ofa_loss(student_out[0], logits_t, labels, eps=eps[-1],
                                                  temperature=c.temperature),
                "ofa": c.loss_weight * sum(branch_losses)}
