"""Shared parity check: a random-init timm model, ported through the converter, against the Flax model."""
import re

import numpy as np
import torch

from convert import core
from rsd_jax import models


def randomize_batchnorm_stats(module, seed):
    """Give every BatchNorm non-trivial running statistics so that eval-mode parity tests them."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def numpy_state_dict(module):
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def port(timm_model, name, num_classes, **overrides):
    """(flax_model, variables) holding exactly `timm_model`'s weights."""
    flax_model = models.create_model(name, num_classes=num_classes, **overrides)
    table = core.family_table(models.family_of(name))
    sd = numpy_state_dict(timm_model)
    if hasattr(table, "normalize"):
        sd, _ = table.normalize(sd)
    return flax_model, core.state_dict_to_variables(sd, models.init_shapes(flax_model), table)


def max_rel_err(got, want):
    """max |got - want| / max |want|: the parity measure used throughout (tolerance 1e-4)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))


def randomize_params(module, seed, pattern, mean=0.0, std=0.1):
    """Overwrite parameters whose name matches `pattern` (regex) with mean + std * N(0, 1).

    timm initialises some parameters to values that hide bugs from a parity test (layer scales at 1e-6, zero
    classifier heads, unit affine norms): give them random values so every branch contributes to the output.
    """
    g = torch.Generator().manual_seed(seed)
    hit = 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            if re.search(pattern, name):
                p.copy_(mean + std * torch.randn(p.shape, generator=g))
                hit += 1
    assert hit, f"no parameter matches {pattern!r}"
