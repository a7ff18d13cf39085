"""ConvNeXt (timm `convnext.py`, `conv_mlp=False`): NHWC throughout, so timm's channels-last Linear MLP is a Dense.

Module names mirror timm: `stem.0` (4x4/4 conv) and `stem.1` (LayerNorm2d), `stages.s.downsample.{0,1}` (LN, 2x2/2
conv) for s >= 1, `stages.s.blocks.j.{conv_dw, norm, mlp.fc1, mlp.fc2, gamma}`, `head.{norm, fc}`.
"""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from rsd_jax.models import ModelSpec, layers

MODELS = {
    # timm 1.x evaluates convnext_tiny at 0.95; the reference's timm 0.6.5 at 0.875
    "convnext_tiny": ModelSpec(dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)), crop_pct=0.875,
                               interpolation="bicubic", stages=(0, 1, 2, 3),
                               smoke=dict(img_size=32, patch_size=2, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))),
}

_init = dict(kernel_init=layers.trunc_normal_02, bias_init=nn.initializers.zeros)


def _norm(eps, name):
    # Two-pass variance as torch computes it; the fast E[x^2]-E[x]^2 form loses precision on the residual stream.
    return layers.LayerNorm(eps, name=name)


class Block(nn.Module):
    dim: int
    kernel_size: int = 7
    mlp_ratio: float = 4.0
    ls_init_value: float = 1e-6
    norm_eps: float = 1e-6
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool):
        k = self.kernel_size
        y = nn.Conv(self.dim, (k, k), padding=[(k // 2, k // 2)] * 2, feature_group_count=self.dim,
                    name="conv_dw", **_init)(x)
        y = _norm(self.norm_eps, "norm")(y)
        y = layers.Mlp(int(self.mlp_ratio * self.dim), name="mlp")(y, train)
        gamma = self.param("gamma", nn.initializers.constant(self.ls_init_value), (self.dim,))
        return x + layers.DropPath(self.drop_path)(y * gamma, train)


class Stage(nn.Module):
    dim: int
    depth: int
    downsample: bool
    kernel_size: int
    mlp_ratio: float
    ls_init_value: float
    norm_eps: float
    drop_paths: Sequence[float]

    @nn.compact
    def __call__(self, x, train: bool):
        if self.downsample:
            x = _norm(self.norm_eps, "downsample_0")(x)
            x = nn.Conv(self.dim, (2, 2), strides=(2, 2), padding="VALID", name="downsample_1", **_init)(x)
        for j in range(self.depth):
            x = Block(self.dim, self.kernel_size, self.mlp_ratio, self.ls_init_value, self.norm_eps,
                      self.drop_paths[j], name=f"blocks_{j}")(x, train)
        return x


class Head(nn.Module):
    """timm NormMlpClassifierHead without hidden layer: GAP -> LayerNorm -> dropout -> fc."""
    num_classes: int
    norm_eps: float
    drop_rate: float

    @nn.compact
    def __call__(self, x, train: bool):
        x = _norm(self.norm_eps, "norm")(jnp.mean(x, axis=(1, 2)))
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="fc", **_init)(x), x


class ConvNeXt(nn.Module):
    depths: Sequence[int] = (3, 3, 9, 3)
    dims: Sequence[int] = (96, 192, 384, 768)
    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 4
    kernel_size: int = 7
    mlp_ratio: float = 4.0
    ls_init_value: float = 1e-6
    norm_eps: float = 1e-6        # timm's LayerNorm/LayerNorm2d default
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0   # timm default for convnext_tiny

    def reference_stage_indices(self):
        return (0, 1, 2, 3)       # feats = [stage0..stage3 outputs, pre_logits] (docs/reference.md §3)

    @nn.compact
    def __call__(self, x, train: bool = False):
        p = self.patch_size
        if p not in (1, 2, 4):
            # timm turns strides past 32 into dilation, which we do not implement
            raise ValueError(f"patch_size must be 1, 2 or 4, got {p}")
        x = nn.Conv(self.dims[0], (p, p), strides=(p, p), padding="VALID", name="stem_0", **_init)(x)
        x = _norm(self.norm_eps, "stem_1")(x)
        rates = layers.drop_path_rates(self.drop_path_rate, self.depths)
        feats = {}
        for s, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            # timm: stages after the first downsample by 2, and so does the first one after a stride-2 stem
            x = Stage(dim, depth, s > 0 or p == 2, self.kernel_size, self.mlp_ratio, self.ls_init_value, self.norm_eps,
                      tuple(rates[s]), name=f"stages_{s}")(x, train)
            feats[f"stage{s + 1}"] = x
        logits, feats["pre_logits"] = Head(self.num_classes, self.norm_eps, self.drop_rate, name="head")(x, train)
        return logits, feats


def build(**kwargs):
    return ConvNeXt(**kwargs)
