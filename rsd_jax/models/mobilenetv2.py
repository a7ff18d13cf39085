"""MobileNetV2 as timm builds it (`efficientnet.py` `_gen_mobilenet_v2`, class EfficientNet).

`conv_stem` (3x3/2) + `bn1` (BatchNorm + ReLU6), `blocks.i.j` (stage 0: DepthwiseSeparable `conv_dw, bn1, conv_pw,
bn2`; then InvertedResidual `conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3`), `conv_head` (1x1) + `bn2` (+ ReLU6), global
average pool, `classifier`. Convs have no bias; the projecting BatchNorms (DS bn2, IR bn3) have no activation.
"""
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rsd_jax.models import ModelSpec, layers

# One row per stage: (block type, repeats, kernel, stride of the first block, expansion, output channels), as
# timm's 'ds_r1_k3_s1_c16', 'ir_r2_k3_s2_e6_c24', ...
ARCH = (("ds", 1, 3, 1, 1, 16), ("ir", 2, 3, 2, 6, 24), ("ir", 3, 3, 2, 6, 32), ("ir", 4, 3, 2, 6, 64),
        ("ir", 3, 3, 1, 6, 96), ("ir", 3, 3, 2, 6, 160), ("ir", 1, 3, 1, 6, 320))

MODELS = {
    "mobilenetv2_100": ModelSpec(dict(channel_multiplier=1.0), crop_pct=0.875, interpolation="bicubic",
                                 stages=(2, 5, 12, 17), smoke=dict(img_size=32, channel_multiplier=0.25)),
}


def make_divisible(v, divisor=8, round_limit=0.9):
    """timm's channel rounding: nearest multiple of `divisor`, never more than 10% below `v`."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


def drop_path_rates(drop_path_rate, arch=ARCH):
    """timm's EfficientNet schedule: block i of n (all stages) gets rate * i / n, so the first block gets 0."""
    n = sum(row[1] for row in arch)
    return [drop_path_rate * i / n for i in range(n)]


def default_stage_blocks(arch):
    """The reference's stage1..4 in its feature list [block outputs..., head map]: the last blocks of the stages
    with 24, 32 and 96 channels (arch rows 1, 2, 4), then the head map: (2, 5, 12, 17) for MobileNetV2."""
    if len(arch) < 5:
        raise ValueError(f"an arch with {len(arch)} stages needs explicit stage_blocks")
    ends = [sum(row[1] for row in arch[:i + 1]) - 1 for i in range(len(arch))]
    return ends[1], ends[2], ends[4], ends[-1] + 1


def _conv_init(groups):
    # timm's TF-style init: N(0, sqrt(2 / fan_out)) with fan_out = k*k*out/groups.
    def init(key, shape, dtype=jnp.float32):
        kh, kw, _, out = shape
        return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / (kh * kw * out // groups))
    return init


def _conv(features, k, stride=1, groups=1, name=None):
    pad = ((stride - 1) + (k - 1)) // 2   # timm's symmetric default padding (dilation 1)
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=[(pad, pad)] * 2,
                   feature_group_count=groups, use_bias=False, kernel_init=_conv_init(groups), name=name)


def _bn(train, name):
    # Two-pass batch variance, as torch computes it; the fast E[x^2]-E[x]^2 form drifts in train mode.
    return layers.batch_norm(train, name=name)


def relu6(x):
    # jax.nn.relu6, not jnp.clip: at exactly 0 or 6 (a constant channel after BatchNorm is exactly its bias, 0 at
    # init) clip's gradient is 1/2 and torch's ReLU6 is 0; found by rsd_jax.step_check.
    return jax.nn.relu6(x)


class DepthwiseSeparable(nn.Module):
    out_chs: int
    kernel: int
    stride: int
    drop_path: float

    @nn.compact
    def __call__(self, x, train: bool):
        in_chs = x.shape[-1]
        y = _conv(in_chs, self.kernel, self.stride, groups=in_chs, name="conv_dw")(x)
        y = relu6(_bn(train, "bn1")(y))
        y = _conv(self.out_chs, 1, name="conv_pw")(y)
        y = _bn(train, "bn2")(y)
        if self.stride == 1 and in_chs == self.out_chs:
            y = x + layers.DropPath(self.drop_path)(y, train)
        return y


class InvertedResidual(nn.Module):
    out_chs: int
    kernel: int
    stride: int
    exp_ratio: float
    drop_path: float

    @nn.compact
    def __call__(self, x, train: bool):
        in_chs = x.shape[-1]
        mid = make_divisible(in_chs * self.exp_ratio)
        y = relu6(_bn(train, "bn1")(_conv(mid, 1, name="conv_pw")(x)))
        y = _conv(mid, self.kernel, self.stride, groups=mid, name="conv_dw")(y)
        y = relu6(_bn(train, "bn2")(y))
        y = _bn(train, "bn3")(_conv(self.out_chs, 1, name="conv_pwl")(y))
        if self.stride == 1 and in_chs == self.out_chs:
            y = x + layers.DropPath(self.drop_path)(y, train)
        return y


class MobileNetV2(nn.Module):
    channel_multiplier: float = 1.0     # 0.25 or so for tiny test variants
    num_classes: int = 1000
    img_size: int = 224
    stem_size: int = 32
    num_features: int = 1280
    arch: Sequence[Sequence] = ARCH
    drop_rate: float = 0.0              # timm default for mobilenetv2_100
    drop_path_rate: float = 0.0         # timm default for mobilenetv2_100
    stage_blocks: Optional[Sequence[int]] = None   # indices into [block outputs..., head map]; None: default

    def reference_stage_indices(self):
        if self.stage_blocks is not None:
            return tuple(self.stage_blocks)
        return default_stage_blocks(self.arch)

    @nn.compact
    def __call__(self, x, train: bool = False):
        chs = lambda c: make_divisible(c * self.channel_multiplier)   # noqa: E731
        x = _conv(chs(self.stem_size), 3, 2, name="conv_stem")(x)
        x = relu6(_bn(train, "bn1")(x))
        rates = iter(drop_path_rates(self.drop_path_rate, self.arch))
        outs = []   # the reference's feature list: every block output, then the head map
        for i, (kind, repeats, k, stride, exp, out) in enumerate(self.arch):
            for j in range(repeats):
                s = stride if j == 0 else 1
                if kind == "ds":
                    block = DepthwiseSeparable(chs(out), k, s, next(rates), name=f"blocks_{i}_{j}")
                else:
                    block = InvertedResidual(chs(out), k, s, exp, next(rates), name=f"blocks_{i}_{j}")
                x = block(x, train)
                outs.append(x)
        num_features = max(self.num_features, chs(self.num_features))
        x = _conv(num_features, 1, name="conv_head")(x)
        x = relu6(_bn(train, "bn2")(x))
        outs.append(x)
        feats = {f"stage{s + 1}": outs[idx] for s, idx in enumerate(self.reference_stage_indices())}
        x = nn.Dropout(self.drop_rate, deterministic=not train)(jnp.mean(x, axis=(1, 2)))
        feats["pre_logits"] = x
        bound = 1.0 / math.sqrt(self.num_classes)   # timm: U(-1/sqrt(fan_out), 1/sqrt(fan_out))
        logits = nn.Dense(self.num_classes, name="classifier", bias_init=nn.initializers.zeros,
                          kernel_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(
                              key, shape, dtype, -bound, bound))(x)
        return logits, feats


def build(**kwargs):
    return MobileNetV2(**kwargs)
