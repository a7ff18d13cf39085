"""ResNet (He et al. 2016) with timm's `resnet18/34/50` structure, names and numerics.

Stem: 7x7/2 conv, BatchNorm, ReLU, 3x3/2 max pool; then four stages `layer1..layer4` of BasicBlocks (resnet18/34)
or Bottlenecks (resnet50); the first block of stages 2-4 downsamples with stride 2 on its 3x3 conv and a 1x1/2
projection shortcut (`downsample.0` conv, `downsample.1` BatchNorm). Head: global average pool, dropout, `fc`.

Features: `stage1..4` are the layer1..4 outputs (NHWC), `pre_logits` their global average pool (the reference's
feature list is exactly these five tensors, docs/reference.md §3).
"""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from rsd_jax.models import ModelSpec, layers

MODELS = {
    # resnet18: timm 1.x evaluates at 0.95 bicubic (its a1 weights); the reference's timm 0.6.5 at 0.875 bilinear
    "resnet18": ModelSpec(dict(layers=(2, 2, 2, 2), block="basic"), crop_pct=0.875, interpolation="bilinear",
                          stages=(0, 1, 2, 3), smoke=dict(img_size=32, widths=(8, 16, 16, 32), layers=(1, 1, 1, 1))),
    "resnet34": ModelSpec(dict(layers=(3, 4, 6, 3), block="basic"), crop_pct=0.875, interpolation="bilinear",
                          stages=(0, 1, 2, 3)),
    "resnet50": ModelSpec(dict(layers=(3, 4, 6, 3), block="bottleneck"), crop_pct=0.95, interpolation="bicubic",
                          stages=(0, 1, 2, 3)),
}

EXPANSION = {"basic": 1, "bottleneck": 4}

# timm: kaiming_normal_(mode='fan_out', nonlinearity='relu') for every conv.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features, kernel, stride, name):
    pad = kernel // 2   # explicit symmetric padding, as torch (XLA's 'SAME' pads asymmetrically at stride 2)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, kernel_init=conv_init, name=name)


class Block(nn.Module):
    """BasicBlock (3x3, 3x3) or Bottleneck (1x1, 3x3, 1x1, 4x expansion); stride on the 3x3 conv."""
    planes: int
    stride: int
    kind: str
    project: bool          # 1x1 conv + BN shortcut (first block of a stage whose shape changes)
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool):
        # timm zero-initialises the residual branch's last BN scale (zero_init_last=True).
        zero = dict(scale_init=nn.initializers.zeros)
        if self.kind == "basic":
            y = nn.relu(layers.batch_norm(train, name="bn1")(conv(self.planes, 3, self.stride, "conv1")(x)))
            y = layers.batch_norm(train, name="bn2", **zero)(conv(self.planes, 3, 1, "conv2")(y))
        else:
            y = nn.relu(layers.batch_norm(train, name="bn1")(conv(self.planes, 1, 1, "conv1")(x)))
            y = nn.relu(layers.batch_norm(train, name="bn2")(conv(self.planes, 3, self.stride, "conv2")(y)))
            y = layers.batch_norm(train, name="bn3", **zero)(conv(self.planes * 4, 1, 1, "conv3")(y))
        y = layers.DropPath(self.drop_path)(y, train)
        if self.project:
            x = layers.batch_norm(train, name="downsample_1")(
                conv(self.planes * EXPANSION[self.kind], 1, self.stride, "downsample_0")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    layers: Sequence[int] = (2, 2, 2, 2)        # blocks per stage
    widths: Sequence[int] = (64, 128, 256, 512)  # `planes` per stage (block output is planes * expansion)
    block: str = "basic"                          # "basic" or "bottleneck"
    stem_width: int = 64                          # stem conv channels (timm's 7x7 stem is always 64 wide)
    img_size: int = 224                           # nominal input size (any size works)
    num_classes: int = 1000
    drop_rate: float = 0.0                        # dropout before fc
    drop_path_rate: float = 0.0                   # stochastic depth, linear in the global block index

    def reference_stage_indices(self):
        return (0, 1, 2, 3)

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.block not in EXPANSION:
            raise ValueError(f"ResNet block must be one of {sorted(EXPANSION)}, got {self.block!r}")
        stem = self.stem_width
        x = nn.relu(layers.batch_norm(train, name="bn1")(conv(stem, 7, 2, "conv1")(x)))
        x = layers.max_pool(x, 3, 2, (1, 1))

        features, channels = {}, stem
        rates = layers.drop_path_rates(self.drop_path_rate, self.layers)
        for s, (depth, planes) in enumerate(zip(self.layers, self.widths)):
            for b in range(depth):
                stride = 2 if (s > 0 and b == 0) else 1
                out = planes * EXPANSION[self.block]
                x = Block(planes, stride, self.block, project=(stride != 1 or channels != out), drop_path=rates[s][b],
                          name=f"layer{s + 1}_{b}")(x, train)
                channels = out
            features[f"stage{s + 1}"] = x

        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        features["pre_logits"] = x
        logits = nn.Dense(self.num_classes, kernel_init=layers.torch_default_init(channels),
                          bias_init=layers.torch_default_init(channels), name="fc")(x)
        return logits, features


def build(**kwargs):
    return ResNet(**kwargs)

