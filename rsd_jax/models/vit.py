"""Vision Transformer (Dosovitskiy et al. 2021) and DeiT, with timm's `VisionTransformer` names and numerics.

Patch embedding (`patch_embed.proj`, a stride-`patch_size` conv), a class token and a learned position embedding
over CLS + patches, `depth` pre-norm blocks (`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`),
a final LayerNorm (eps 1e-6 throughout) and a linear `head` on the CLS token (timm's global_pool='token').

Features: `stage1..4` are the outputs of blocks `stage_blocks` (tokens (B, 1 + patches, D), CLS included, before
the final norm, as the reference's feature list); `pre_logits` is the CLS token after the final norm.
Dropout follows timm 1.x: `drop_rate` is the head dropout; position/projection/attention dropouts are separate.
"""
import functools
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rsd_jax.models import ModelSpec, layers

_SMOKE = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
_EVAL = dict(crop_pct=0.9, interpolation="bicubic")   # timm's ViT and DeiT cfg
MODELS = {
    "vit_small_patch16_224": ModelSpec(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
                                       stages=(1, 3, 9, 11), smoke=_SMOKE, **_EVAL),
    "vit_base_patch16_224": ModelSpec(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
                                      stages=(1, 3, 9, 11), **_EVAL),
    "deit_tiny_patch16_224": ModelSpec(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
                                       stages=(1, 3, 9, 11), smoke=_SMOKE, **_EVAL),
}

LayerNorm = functools.partial(layers.LayerNorm, 1e-6)   # timm ViT: eps 1e-6
Dense = lambda features, name, **kw: nn.Dense(features, kernel_init=layers.trunc_normal_02,  # noqa: E731
                                              bias_init=nn.initializers.zeros, name=name, **kw)


def default_stage_blocks(depth):
    """Blocks whose outputs are stage1..4: the reference's (1, 3, 9, 11) at depth 12; other depths scale these
    block counts (2, 4, 10, 12)/12 proportionally, keep the indices increasing where depth allows (depth >= 4) and
    always end at the last block. E.g. depth 4 -> (0, 1, 2, 3), depth 6 -> (0, 1, 4, 5), depth 24 -> (3, 7, 19, 23).
    """
    out, prev = [], -1
    for s, count in enumerate((2, 4, 10, 12)):
        i = depth - 1 if s == 3 else int(math.floor(count * depth / 12 + 0.5)) - 1
        i = min(max(i, prev + 1), depth - 1)
        out.append(i)
        prev = i
    return tuple(out)


class PatchEmbed(nn.Module):
    patch_size: int
    embed_dim: int

    @nn.compact
    def __call__(self, x):
        p, fan_in = self.patch_size, self.patch_size ** 2 * x.shape[-1]
        init = layers.torch_default_init(fan_in)
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", kernel_init=init, bias_init=init,
                    name="proj")(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])   # row-major patches, as torch's flatten(2).transpose(1, 2)


class Attention(nn.Module):
    num_heads: int
    qkv_bias: bool = True
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool):
        b, n, d = x.shape
        h = self.num_heads
        qkv = Dense(3 * d, "qkv", use_bias=self.qkv_bias)(x).reshape(b, n, 3, h, d // h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                 # (B, N, H, hd)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * (d // h) ** -0.5, k)
        weights = nn.Dropout(self.attn_drop_rate, deterministic=not train)(jax.nn.softmax(logits, axis=-1))
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, d)
        y = Dense(d, "proj")(y)
        return nn.Dropout(self.proj_drop_rate, deterministic=not train)(y)


class Block(nn.Module):
    num_heads: int
    mlp_hidden: int
    qkv_bias: bool = True
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path: float = 0.0
    norm_eps: float = 1e-6          # timm's ViT; a bare timm Block (OFA's branches) has torch's 1e-5

    @nn.compact
    def __call__(self, x, train: bool):
        y = Attention(self.num_heads, self.qkv_bias, self.attn_drop_rate, self.proj_drop_rate, name="attn")(
            layers.LayerNorm(self.norm_eps, name="norm1")(x), train)
        x = x + layers.DropPath(self.drop_path)(y, train)
        y = layers.Mlp(self.mlp_hidden, self.proj_drop_rate, name="mlp")(
            layers.LayerNorm(self.norm_eps, name="norm2")(x), train)
        return x + layers.DropPath(self.drop_path)(y, train)


class VisionTransformer(nn.Module):
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_classes: int = 1000
    drop_rate: float = 0.0          # head dropout (timm 1.x meaning)
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0     # after attn.proj and in the MLP
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0     # stochastic depth, linear from 0 at block 0 to this at the last block
    stage_blocks: Optional[Sequence[int]] = None   # None: default_stage_blocks(depth)

    def reference_stage_indices(self):
        # The reference's feature list is the block outputs then the normed CLS, so a block index is its index.
        return tuple(self.stage_blocks) if self.stage_blocks is not None else default_stage_blocks(self.depth)

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.img_size % self.patch_size or x.shape[1] != self.img_size or x.shape[2] != self.img_size:
            raise ValueError(f"ViT expects {self.img_size}x{self.img_size} inputs divisible by patch "
                             f"{self.patch_size}, got {x.shape[1]}x{x.shape[2]}")
        stage_blocks = self.reference_stage_indices()
        if len(stage_blocks) != 4 or not all(0 <= i < self.depth for i in stage_blocks):
            raise ValueError(f"stage_blocks must be 4 block indices in [0, {self.depth}), got {stage_blocks}")
        d = self.embed_dim
        x = PatchEmbed(self.patch_size, d, name="patch_embed")(x)
        cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d))
        pos = self.param("pos_embed", layers.trunc_normal_02, (1, x.shape[1] + 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, d)).astype(x.dtype), x], axis=1) + pos
        x = nn.Dropout(self.pos_drop_rate, deterministic=not train)(x)

        features = {}
        for i, rate in enumerate(layers.drop_path_rates(self.drop_path_rate, self.depth)):
            x = Block(self.num_heads, int(d * self.mlp_ratio), self.qkv_bias, self.attn_drop_rate,
                      self.proj_drop_rate, rate, name=f"blocks_{i}")(x, train)
            for s, b in enumerate(stage_blocks, start=1):
                if b == i:
                    features[f"stage{s}"] = x

        x = LayerNorm("norm")(x)
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x[:, 0])
        features["pre_logits"] = x
        return Dense(self.num_classes, "head")(x), features


def build(**kwargs):
    return VisionTransformer(**kwargs)
