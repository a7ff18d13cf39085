"""Building blocks with torch/timm numerics (docs/parity.md lists where they differ from Flax's defaults)."""
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def gelu(x):
    """Exact (erf) GELU, as torch.nn.GELU(); Flax's default is the tanh approximation."""
    return nn.gelu(x, approximate=False)


# timm's trunc_normal_(std=.02) truncates at +-2 absolute, i.e. effectively untruncated at std .02.
trunc_normal_02 = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm{1,2}d over the last axis, exactly: normalise with the biased batch variance, but move the
    running variance towards the unbiased one (n / (n - 1) larger), as torch does; Flax's own BatchNorm uses the
    biased one. `momentum` is Flax's (0.9 here is torch's 0.1). Variables: params scale/bias, batch_stats mean/var.
    """
    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = self.param("scale", self.scale_init, (c,), jnp.float32)
        bias = self.param("bias", self.bias_init, (c,), jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            xf = x.astype(jnp.float32)
            mean = jnp.mean(xf, axes)
            var = jnp.mean(jnp.square(xf - mean), axes)    # two-pass: no E[x^2] - E[x]^2 cancellation
            if not self.is_initializing():
                n = x.size // c
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var * (n / max(n - 1, 1))
        y = (x - mean.astype(x.dtype)) * (jax.lax.rsqrt(var + self.epsilon) * scale).astype(x.dtype)
        return y + bias.astype(x.dtype)


def max_pool(x, window, stride, padding):
    """torch.nn.MaxPool2d on NHWC (pads with -inf) as the maximum of window-offset strided slices.

    Same forward as `nn.max_pool`, but its gradient is elementwise selects and pads that XLA fuses, where
    reduce_window's is a select-and-scatter, which showed in the GPU profile of the Swin-T -> ResNet18 step (README,
    Speed, has the measurements). On an exact tie inside a
    window the gradient is shared between the tied inputs (torch gives it all to the first); after a ReLU, ties
    at zero get no gradient either way.
    """
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), padding, padding, (0, 0)), constant_values=-jnp.inf)
    out_h = (h + sum(padding) - window) // stride + 1
    out_w = (w + sum(padding) - window) // stride + 1
    out = None
    for i in range(window):
        for j in range(window):
            tap = jax.lax.slice(x, (0, i, j, 0), (b, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, c),
                                (1, stride, stride, 1))
            out = tap if out is None else jnp.maximum(out, tap)
    return out


def conv2d(x, kernel, stride, padding, gemm_kernel_grad=False):
    """NHWC x HWIO convolution, `stride` and symmetric `padding` per spatial axis (ints). With `gemm_kernel_grad`
    the kernel's gradient is one matrix product of the input's patches (im2col) with the output gradient, instead
    of XLA's own form, a convolution over the batch that XLA's CPU backend runs 2-4x slower than the forward one
    (and transposes both operands for); values and the input's gradient are the same."""
    if gemm_kernel_grad:
        return _conv_gemm_kernel_grad(x, kernel, stride, padding)
    return _conv(x, kernel, stride, padding)


def _conv(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_gemm_kernel_grad(x, kernel, stride, padding):
    return _conv(x, kernel, stride, padding)


def _conv_gemm_fwd(x, kernel, stride, padding):
    return _conv(x, kernel, stride, padding), (x, kernel)


def _conv_gemm_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    (dx,) = jax.vjp(lambda x: _conv(x, kernel, stride, padding), x)[1](g)
    kh, kw, ci, co = kernel.shape
    b, oh, ow, _ = g.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    taps = [jax.lax.slice(xp, (0, i, j, 0), (b, i + stride * (oh - 1) + 1, j + stride * (ow - 1) + 1, ci),
                          (1, stride, stride, 1)) for i in range(kh) for j in range(kw)]
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)        # (b, oh, ow, kh * kw * ci)
    dk = jax.lax.dot_general(patches, g, (((0, 1, 2), (0, 1, 2)), ((), ())))       # (kh * kw * ci, co)
    return dx, dk.reshape(kh, kw, ci, co).astype(kernel.dtype)


_conv_gemm_kernel_grad.defvjp(_conv_gemm_fwd, _conv_gemm_bwd)


def batch_norm(train, name=None, **kwargs):
    """The BatchNorm of a model in train or eval mode (train mode uses and updates batch statistics)."""
    return BatchNorm(use_running_average=not train, name=name, **kwargs)


def LayerNorm(epsilon=1e-5, name=None, **kwargs):
    """torch.nn.LayerNorm over the last axis: eps per model (1e-5 torch default, 1e-6 in ViT, Mixer and ConvNeXt),
    two-pass variance as torch computes it."""
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, name=name, **kwargs)


def torch_default_init(fan_in):
    """torch.nn.Linear's and Conv2d's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weights and biases that timm
    leaves at it (ResNet's fc, ViT's patch conv, plain Linear embeddings of CRD and CC)."""
    bound = fan_in ** -0.5
    return lambda key, shape, dtype=jnp.float32: nn.initializers.uniform(2 * bound)(key, shape, dtype) - bound


class DropPath(nn.Module):
    """Stochastic depth per example (timm DropPath): drop the residual branch with probability `rate`."""
    rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool):
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, 0.0)


def drop_path_rates(drop_path_rate, depths):
    """timm's stochastic depth (`calculate_drop_path_rates`), linear from 0 at the first block to `drop_path_rate`
    at the last: a list of rates for an int depth, one list per stage for a sequence of stage depths. (Mixer's
    constant rate and EfficientNet's rate * i / n are other schedules.)"""
    if isinstance(depths, int):
        return np.linspace(0.0, drop_path_rate, depths).tolist()
    rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
    return [rates[end - depth:end] for depth, end in zip(depths, np.cumsum(depths).tolist())]


class Mlp(nn.Module):
    """timm's Mlp: `fc1` -> exact GELU -> dropout -> `fc2` (back to the input width) -> dropout."""
    hidden: int
    drop_rate: float = 0.0
    kernel_init: Callable = trunc_normal_02
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x, train: bool):
        dense = functools.partial(nn.Dense, kernel_init=self.kernel_init, bias_init=self.bias_init)
        y = nn.Dropout(self.drop_rate, deterministic=not train)(gelu(dense(self.hidden, name="fc1")(x)))
        return nn.Dropout(self.drop_rate, deterministic=not train)(dense(x.shape[-1], name="fc2")(y))
