"""Optimizers and schedules against torch.optim and the reference's measured LR values (docs/reference.md §4.3, §4.4)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from rsd_jax import optim
from rsd_jax.config import base_config


def optim_config(**kw):
    c = base_config().optim
    c.update(kw)
    return c


def test_cosine_schedules_match_reference_values():
    cnn = optim_config()   # cifar/cnn.yaml: lr .05, warmup 3 from 1e-4, min_lr 1e-3, 300 epochs
    for epoch, want in [(0, 1e-4), (1, 0.016733), (2, 0.033367), (3, 0.049988), (150, 0.0255), (299, 0.0010013)]:
        np.testing.assert_allclose(float(optim.epoch_lr(cnn, epoch)), want, rtol=2e-4)
    vit = optim_config(name="adamw", lr=5e-4, warmup_epochs=20, warmup_lr=5e-7, min_lr=1e-5)
    for epoch, want in [(0, 5e-7), (1, 2.55e-5), (19, 4.75e-4), (20, 4.946e-4), (150, 2.55e-4), (299, 1e-5)]:
        np.testing.assert_allclose(float(optim.epoch_lr(vit, epoch)), want, rtol=2e-3)
    # constant within an epoch, stepped per epoch
    sched = optim.schedule(cnn, steps_per_epoch=10)
    assert float(sched(10)) == float(sched(19)) != float(sched(20))


def test_weight_decay_mask_is_the_reference_rule():
    params = {"cls_token": jnp.zeros((1, 1, 8)), "rel_table": jnp.zeros((9, 2)), "kernel": jnp.zeros((3, 3, 2, 4)),
              "bias": jnp.zeros((4,)), "scale": jnp.zeros((4,)), "gamma": jnp.zeros((4,))}
    assert optim.decay_mask(params) == {"cls_token": True, "rel_table": True, "kernel": True, "bias": False,
                                        "scale": False, "gamma": False}


@pytest.mark.parametrize("name", ["sgd", "adamw", "lamb"])
def test_optimizer_steps_match_torch(name):
    """Against torch.optim.SGD / AdamW and timm's Lamb (whose trust ratio skips the undecayed bias, and which
    clips the global gradient norm at 1 itself)."""
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)
    grads = [(rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32))
             for _ in range(4)]
    kw = {"sgd": dict(lr=0.1, weight_decay=0.01),
          "adamw": dict(name="adamw", lr=1e-2, weight_decay=0.05),
          "lamb": dict(name="lamb", lr=5e-3, weight_decay=0.02, eps=1e-6)}[name]
    config = optim_config(warmup_epochs=0, schedule="constant", clip_grad=1.0, **kw)

    tw, tb = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    groups = [{"params": [tw], "weight_decay": config.weight_decay}, {"params": [tb], "weight_decay": 0.0}]
    if name == "sgd":
        opt = torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    elif name == "adamw":
        opt = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
    else:
        from timm.optim import Lamb
        opt = Lamb(groups, lr=config.lr)     # timm's defaults: betas (0.9, 0.999), eps 1e-6, max_grad_norm 1
    for gw, gb in grads:
        tw.grad, tb.grad = torch.tensor(gw), torch.tensor(gb)
        torch.nn.utils.clip_grad_norm_([tw, tb], config.clip_grad)
        opt.step()

    tx = optim.create(config, steps_per_epoch=1)
    params = {"w": jnp.asarray(w0), "b": jnp.asarray(b0)}
    state = tx.init(params)
    for gw, gb in grads:
        updates, state = tx.update({"w": jnp.asarray(gw), "b": jnp.asarray(gb)}, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params["w"]), tw.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["b"]), tb.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_imagenet_presets_follow_the_reference_yamls():
    from configs import presets
    cnn = presets.imagenet_pair("swin_tiny_patch4_window7_224", "resnet18", "cnn")
    assert (cnn.optim.name, cnn.optim.schedule, cnn.optim.lr, cnn.data.batch_size) == ("sgd", "step", 0.1, 512)
    np.testing.assert_allclose(float(optim.epoch_lr(cnn.optim, 45)), 0.01, rtol=1e-6)
    vit = presets.imagenet_pair("convnext_tiny", "deit_tiny_patch16_224", "vit_mlp")
    assert (vit.optim.lr, vit.ema.decay, vit.data.augment.mixup) == (1e-3, 0.99996, 0.8)
    strong = presets.imagenet_pair("convnext_tiny", "resnet50", "stronger")
    assert (strong.optim.name, strong.data.batch_size, strong.data.augment.crop_pct) == ("lamb", 2048, 0.95)
    assert (strong.optim.eps, strong.optim.clip_grad) == (1e-6, 1.0)     # timm Lamb's defaults
