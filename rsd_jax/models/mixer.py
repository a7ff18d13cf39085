"""MLP-Mixer and ResMLP (timm `mlp_mixer.py`, class MlpMixer with MixerBlock or ResBlock).

Both share the stem (`stem.proj`, a patch conv), a stack of `blocks.j`, a final `norm`, mean pooling over tokens
and a linear `head`. Mixer blocks use LayerNorm (eps 1e-6) and two-layer MLPs over tokens and channels; ResMLP
blocks use `Affine` "norms" (alpha, beta of shape (1, 1, D)), one token Linear and per-channel layer scales.
"""
import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from rsd_jax.models import ModelSpec, layers
from rsd_jax.models.vit import default_stage_blocks   # the same block-output feature list as ViT

_SMOKE = dict(img_size=32, patch_size=8, embed_dim=32, depth=2)
MODELS = {
    "mixer_b16_224": ModelSpec(dict(block="mixer", patch_size=16, embed_dim=768, depth=12, mlp_ratio_tokens=0.5,
                                    mlp_ratio_channels=4.0),
                               crop_pct=0.875, interpolation="bicubic", stages=(1, 3, 9, 11), smoke=_SMOKE),
    "resmlp_12_224": ModelSpec(dict(block="resmlp", patch_size=16, embed_dim=384, depth=12, mlp_ratio_channels=4.0,
                                    init_values=1e-4),
                               crop_pct=0.875, interpolation="bicubic", stages=(1, 3, 9, 11), smoke=_SMOKE),
}

# timm's Mixer init: xavier-uniform Linear weights, near-zero MLP biases, lecun-normal patch conv, zero head.
_dense = dict(kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros)
Mlp = functools.partial(layers.Mlp, kernel_init=nn.initializers.xavier_uniform(),
                        bias_init=nn.initializers.normal(1e-6))


def drop_path_rates(drop_path_rate, depth):
    """timm's MlpMixer gives every block the same rate (no linear decay)."""
    return [float(drop_path_rate)] * depth


class Affine(nn.Module):
    """ResMLP's norm: beta + alpha * x, per channel."""
    dim: int

    @nn.compact
    def __call__(self, x):
        alpha = self.param("alpha", nn.initializers.ones, (1, 1, self.dim))
        beta = self.param("beta", nn.initializers.zeros, (1, 1, self.dim))
        return beta + alpha * x


def _over_tokens(fn, x):
    """Apply `fn` along the token axis of (B, L, D) tokens."""
    return jnp.swapaxes(fn(jnp.swapaxes(x, 1, 2)), 1, 2)


class MixerBlock(nn.Module):
    dim: int
    seq_len: int
    mlp_ratio_tokens: float
    mlp_ratio_channels: float
    norm_eps: float
    drop: float
    drop_path: float

    @nn.compact
    def __call__(self, x, train: bool):
        drop_path = layers.DropPath(self.drop_path)
        tokens = Mlp(int(self.mlp_ratio_tokens * self.dim), self.drop, name="mlp_tokens")
        y = layers.LayerNorm(self.norm_eps, name="norm1")(x)
        x = x + drop_path(_over_tokens(lambda t: tokens(t, train), y), train)
        y = layers.LayerNorm(self.norm_eps, name="norm2")(x)
        y = Mlp(int(self.mlp_ratio_channels * self.dim), self.drop, name="mlp_channels")(y, train)
        return x + drop_path(y, train)


class ResBlock(nn.Module):
    dim: int
    seq_len: int
    mlp_ratio_channels: float
    init_values: float
    drop: float
    drop_path: float

    @nn.compact
    def __call__(self, x, train: bool):
        drop_path = layers.DropPath(self.drop_path)
        ls1 = self.param("ls1", nn.initializers.constant(self.init_values), (self.dim,))
        ls2 = self.param("ls2", nn.initializers.constant(self.init_values), (self.dim,))
        linear_tokens = nn.Dense(self.seq_len, name="linear_tokens", **_dense)
        y = _over_tokens(linear_tokens, Affine(self.dim, name="norm1")(x))
        x = x + drop_path(ls1 * y, train)
        y = Mlp(int(self.mlp_ratio_channels * self.dim), self.drop, name="mlp_channels")(
            Affine(self.dim, name="norm2")(x), train)
        return x + drop_path(ls2 * y, train)


class Stem(nn.Module):
    """timm PatchEmbed: a patch-size, stride-patch-size conv, flattened to (B, L, D) in row-major order."""
    embed_dim: int
    patch_size: int

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", name="proj",
                    kernel_init=nn.initializers.lecun_normal(), bias_init=nn.initializers.zeros)(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class MlpMixer(nn.Module):
    block: str = "mixer"                 # "mixer" (MixerBlock, LayerNorm) or "resmlp" (ResBlock, Affine)
    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    mlp_ratio_tokens: float = 0.5        # mixer only
    mlp_ratio_channels: float = 4.0
    init_values: float = 1e-4            # resmlp layer-scale init
    norm_eps: float = 1e-6               # mixer LayerNorm
    drop_rate: float = 0.0               # before the head
    proj_drop_rate: float = 0.0          # inside the MLPs
    drop_path_rate: float = 0.0          # timm default for both
    stage_blocks: Optional[Sequence[int]] = None   # None: (1, 3, 9, 11) at depth 12 (docs/reference.md §3), scaled else

    def reference_stage_indices(self):
        # feats = [block outputs..., pre_logits], so a block index is its index
        return tuple(self.stage_blocks) if self.stage_blocks is not None else default_stage_blocks(self.depth)

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.block not in ("mixer", "resmlp"):
            raise ValueError(f"block must be 'mixer' or 'resmlp', got {self.block!r}")
        stage_blocks = self.reference_stage_indices()
        if len(stage_blocks) != 4 or not all(0 <= b < self.depth for b in stage_blocks):
            raise ValueError(f"stage_blocks must be 4 block indices in [0, {self.depth}), got {stage_blocks}")
        x = Stem(self.embed_dim, self.patch_size, name="stem")(x)
        seq_len = x.shape[1]
        feats = {}
        for j, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
            if self.block == "mixer":
                x = MixerBlock(self.embed_dim, seq_len, self.mlp_ratio_tokens, self.mlp_ratio_channels,
                               self.norm_eps, self.proj_drop_rate, rate, name=f"blocks_{j}")(x, train)
            else:
                x = ResBlock(self.embed_dim, seq_len, self.mlp_ratio_channels, self.init_values,
                             self.proj_drop_rate, rate, name=f"blocks_{j}")(x, train)
            for s, b in enumerate(stage_blocks):
                if b == j:
                    feats[f"stage{s + 1}"] = x
        if self.block == "mixer":
            x = layers.LayerNorm(self.norm_eps, name="norm")(x)
        else:
            x = Affine(self.embed_dim, name="norm")(x)
        x = nn.Dropout(self.drop_rate, deterministic=not train)(jnp.mean(x, axis=1))
        feats["pre_logits"] = x
        logits = nn.Dense(self.num_classes, name="head", kernel_init=nn.initializers.zeros,
                          bias_init=nn.initializers.zeros)(x)
        return logits, feats


def build(**kwargs):
    return MlpMixer(**kwargs)
