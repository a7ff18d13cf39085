"""ResNet (He et al. 2016) with timm's `resnet18/34/50` structure, names and numerics.

Stem: 7x7/2 conv, BatchNorm, ReLU, 3x3/2 max pool; then four stages `layer1..layer4` of BasicBlocks (resnet18/34)
or Bottlenecks (resnet50); the first block of stages 2-4 downsamples with stride 2 on its 3x3 conv and a 1x1/2
projection shortcut (`downsample.0` conv, `downsample.1` BatchNorm). Head: global average pool, dropout, `fc`.

Features: `stage1..4` are the layer1..4 outputs (NHWC), `pre_logits` their global average pool (the reference's
feature list is exactly these five tensors, docs/reference.md §3).
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax
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


def default_gemm_kernel_grad():
    """Whether convolutions take their kernel gradient as one matrix product (`layers.conv2d`) when the model
    does not say: on CPU, where XLA's own form measured slower (README, Speed); off elsewhere (cuDNN)."""
    return jax.default_backend() == "cpu"


class Conv(nn.Module):
    """Square convolution without bias, padding kernel // 2 on each side as torch (XLA's 'SAME' pads asymmetrically
    at stride 2); variable `kernel` (k, k, in, features), nn.Conv's, timm's layout through the converter."""
    features: int
    kernel: int
    stride: int
    gemm_kernel_grad: bool = False

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", conv_init, (self.kernel, self.kernel, x.shape[-1], self.features))
        x, kernel = nn.dtypes.promote_dtype(x, kernel)
        return layers.conv2d(x, kernel, self.stride, self.kernel // 2, self.gemm_kernel_grad)


def space_to_depth_conv(x, kernel, gemm_kernel_grad=False):
    """The 7x7 stride-2 convolution with padding 3 (timm's stem, HWIO `kernel`) as a 4x4 stride-1 convolution of
    the 2x2 space-to-depth input (4x the input channels), the reformulation of MLPerf's JAX ResNet: the kernel is
    padded to 8x8 with zeros at the end, so each output's 8x8 window of the padded input is 4x4 blocks of 2x2, and
    block (a, b) of the kernel holds taps (2a + dy, 2b + dx). The same sums of products (in another order), from a
    convolution with 4x the input channels and 1/4 of the taps, which fills a GPU's tensor cores better than 3."""
    b, h, w, c = x.shape
    kh, kw, _, out = kernel.shape
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    pad = kh // 2
    # padded input: `pad` before, and after it up to 2 * (o + 3), the 8x8 windows of all outputs
    x = jnp.pad(x, ((0, 0), (pad, 2 * oh + 2 * pad - h - pad), (pad, 2 * ow + 2 * pad - w - pad), (0, 0)))
    x = x.reshape(b, oh + pad, 2, ow + pad, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, oh + pad, ow + pad, 4 * c)
    k = jnp.pad(kernel, ((0, 8 - kh), (0, 8 - kw), (0, 0), (0, 0)))
    k = k.reshape(4, 2, 4, 2, c, out).transpose(0, 2, 1, 3, 4, 5).reshape(4, 4, 4 * c, out)
    return layers.conv2d(x, k, 1, 0, gemm_kernel_grad)


def default_stem_space_to_depth():
    """Whether the stem runs as `space_to_depth_conv` when the model does not say: off on CPU, where it measured
    no faster (README, Speed), on elsewhere (the known GPU win of MLPerf's ResNets; not measured here on a GPU)."""
    return jax.default_backend() != "cpu"


class Stem(nn.Module):
    """timm's `conv1`: 7x7 stride-2 convolution, padding 3, no bias; variable `kernel` (7, 7, in, features) as
    nn.Conv's, so conversion and export see the same tree whichever way it is computed."""
    features: int
    space_to_depth: bool
    gemm_kernel_grad: bool = False

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", conv_init, (7, 7, x.shape[-1], self.features))
        x, kernel = nn.dtypes.promote_dtype(x, kernel)
        if self.space_to_depth:
            return space_to_depth_conv(x, kernel, self.gemm_kernel_grad)
        return layers.conv2d(x, kernel, 2, 3, self.gemm_kernel_grad)


class Block(nn.Module):
    """BasicBlock (3x3, 3x3) or Bottleneck (1x1, 3x3, 1x1, 4x expansion); stride on the 3x3 conv."""
    planes: int
    stride: int
    kind: str
    project: bool          # 1x1 conv + BN shortcut (first block of a stage whose shape changes)
    drop_path: float = 0.0
    gemm_kernel_grad: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        def conv(features, kernel, stride, name):
            return Conv(features, kernel, stride, self.gemm_kernel_grad, name=name)

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
    stem_space_to_depth: Optional[bool] = None    # stem conv as `space_to_depth_conv`; None: per platform
    gemm_kernel_grad: Optional[bool] = None       # kernel gradients as matrix products (layers.conv2d); None: CPU

    def reference_stage_indices(self):
        return (0, 1, 2, 3)

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.block not in EXPANSION:
            raise ValueError(f"ResNet block must be one of {sorted(EXPANSION)}, got {self.block!r}")
        stem = self.stem_width
        s2d = default_stem_space_to_depth() if self.stem_space_to_depth is None else self.stem_space_to_depth
        gemm = default_gemm_kernel_grad() if self.gemm_kernel_grad is None else self.gemm_kernel_grad
        x = nn.relu(layers.batch_norm(train, name="bn1")(Stem(stem, s2d, gemm, name="conv1")(x)))
        x = layers.max_pool(x, 3, 2, (1, 1))

        features, channels = {}, stem
        rates = layers.drop_path_rates(self.drop_path_rate, self.layers)
        for s, (depth, planes) in enumerate(zip(self.layers, self.widths)):
            for b in range(depth):
                stride = 2 if (s > 0 and b == 0) else 1
                out = planes * EXPANSION[self.block]
                x = Block(planes, stride, self.block, project=(stride != 1 or channels != out), drop_path=rates[s][b],
                          gemm_kernel_grad=gemm, name=f"layer{s + 1}_{b}")(x, train)
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

