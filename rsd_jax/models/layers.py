"""Building blocks with torch/timm numerics (see shared/STYLE.md, 'Numerics that silently break parity')."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def gelu(x):
    """Exact (erf) GELU, as torch.nn.GELU(); Flax's default is the tanh approximation."""
    return nn.gelu(x, approximate=False)


# timm's trunc_normal_(std=.02) truncates at +-2 absolute, i.e. effectively untruncated at std .02.
trunc_normal_02 = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)


def BatchNorm(train, name=None, momentum=0.9, epsilon=1e-5, **kwargs):
    """torch.nn.BatchNorm2d/1d: Flax momentum 0.9 is torch's 0.1; eps 1e-5."""
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon, name=name, **kwargs)


LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-5)   # torch default; ViT passes 1e-6


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
