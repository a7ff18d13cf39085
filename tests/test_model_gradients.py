"""Train-mode gradients of every student family against torch autograd through timm (same weights).

The loss is sum(logits * w) for a random w; BatchNorm uses batch statistics, dropout and drop path are off (rate
0). ResNet-18 has the same check in test_models_resnet.py::test_train_mode_gradients_match_torch; this file does
MobileNetV2, DeiT, Swin (the reference's pico student) and ResMLP at tiny sizes, with the parameters timm
initialises to trivial values (unit norms, zero heads and biases, tiny layer scales) randomised.

A float64 copy of the timm model gives the exact gradients, so that a failure says which side is off.
"""
import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert import core
from rsd_jax import models
from test_models_mixer import TINY as MIXER_TINY, _timm_tiny as timm_mixer
from test_models_mobilenetv2 import TINY as MOBILENET_TINY, _timm as timm_mobilenet
from test_models_swin import SMALL as SWIN_SMALL, timm_swin
from test_models_vit import TINY as VIT_TINY, timm_vit
from timm_parity import max_rel_err, port

NUM_CLASSES = 10
OFF = dict(drop_rate=0.0, drop_path_rate=0.0)   # timm's classifier dropout and Swin's default drop path 0.1 off
SWIN = "swin_pico_patch4_window7_224"


def _mobilenetv2():
    # 64 px, batch 4: 16 values per channel for the BatchNorms of the 2x2 stages (at 32 px, 1x1 maps, float32
    # noise swamps the gradients). The input seed puts no ReLU6 input within float32 noise of 0 or 6: a value
    # on the other side of a kink changes its gradient by O(1), and with ~850k activations some seeds do.
    t = timm_mobilenet("mobilenetv2_035", 5, NUM_CLASSES, **OFF)
    return t, "mobilenetv2_100", dict(MOBILENET_TINY, img_size=64), 3


def _deit():
    t = timm_vit("deit_tiny_patch16_224", 6, num_classes=NUM_CLASSES, **OFF, **VIT_TINY)
    return t, "deit_tiny_patch16_224", VIT_TINY, 0


def _swin():
    cfg = dict(SWIN_SMALL, depths=(2, 2, 1, 1))   # shifted windows in stages 1-2, window clamped in 3-4
    return timm_swin(SWIN, NUM_CLASSES, seed=7, drop_path_rate=0.0, **cfg), SWIN, cfg, 0


def _resmlp():
    return timm_mixer("resmlp_12_224", 8, NUM_CLASSES), "resmlp_12_224", MIXER_TINY, 0


FAMILIES = {"mobilenetv2": _mobilenetv2, "deit": _deit, "swin": _swin, "resmlp": _resmlp}
# Float32 noise through 18 train-mode BatchNorms over few values per channel: torch's own float32 gradients are
# ~8e-5 from the float64 ones there, so the two float32 results may differ by twice that.
TOL = {"mobilenetv2": 3e-4}
# Biases whose gradient is exactly 0 in train mode (the BatchNorm ending each MobileNetV2 block feeds a bias-free
# conv and then a batch-statistics BatchNorm, which removes any per-channel shift): both sides must give float
# noise, measured against the gradient of the same BatchNorm's weight.
ZERO_GRAD = {"mobilenetv2": (r"^blocks\.0\.0\.bn2\.bias$|\.bn3\.bias$", 17)}


def _torch_grads(model, x, w):
    model.zero_grad()
    dtype = next(model.parameters()).dtype
    (model(torch.from_numpy(x.transpose(0, 3, 1, 2)).to(dtype)) * torch.from_numpy(w).to(dtype)).sum().backward()
    return {k: p.grad.numpy() for k, p in model.named_parameters()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_mode_gradients_match_torch(family):
    tm, name, overrides, seed = FAMILIES[family]()
    fm, variables = port(tm, name, NUM_CLASSES, drop_path_rate=0.0, **overrides)
    variables = jax.tree_util.tree_map(np.array, variables)   # copies: port's arrays may alias torch's buffers
    rng = np.random.RandomState(seed)
    x = rng.randn(4, fm.img_size, fm.img_size, 3).astype(np.float32)
    w = rng.randn(4, NUM_CLASSES).astype(np.float32)
    exact = _torch_grads(copy.deepcopy(tm).double().train(), x, w)
    want = _torch_grads(tm.train(), x, w)

    @jax.jit
    def grad(params):
        def loss(params):
            (logits, _), _ = fm.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(logits * w)
        return jax.grad(loss)(params)

    got = core.variables_to_state_dict({"params": grad(variables["params"])}, core.family_table(models.family_of(name)))
    assert set(got) == set(want)
    pattern, count = ZERO_GRAD.get(family, ("^$", 0))
    zero = {k for k in want if re.search(pattern, k)}
    assert len(zero) == count
    errs = {}
    for k in want:
        if k in zero:   # noise against the scale of the same BatchNorm's weight gradient, on both sides
            scale = np.abs(exact[k[:-len("bias")] + "weight"]).max()
            assert np.abs(exact[k]).max() < 1e-9 * scale, k
            errs[k] = max(np.abs(got[k]).max(), np.abs(want[k]).max()) / scale
        else:
            errs[k] = max_rel_err(got[k], want[k])
    worst = sorted(errs, key=errs.get, reverse=True)[:3]
    report = [(k, "%.1e" % errs[k], "jax-exact %.1e" % max_rel_err(got[k], exact[k]),
               "torch-exact %.1e" % max_rel_err(want[k], exact[k])) for k in worst]
    print(family, len(errs), "parameters, worst:", report)
    assert errs[worst[0]] < TOL.get(family, 1e-4), report
