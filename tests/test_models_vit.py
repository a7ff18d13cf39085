"""ViT/DeiT parity with timm 1.x (random weights), stage choice, train mode and stochastic depth."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch

from rsd_jax import models
from rsd_jax.models import vit
from timm_parity import max_rel_err, port

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)   # the lead's demo model


def timm_vit(name, seed, timm_init=False, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs).eval()
    if timm_init:   # small activations: LayerNorm's eps matters
        return model
    # timm's init (weights std .02, zero biases, CLS ~1e-6) keeps activations tiny and nearly linear, which would
    # hide e.g. a tanh-GELU or a wrong LayerNorm eps: use O(1) activations instead.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim >= 2 and n not in ("cls_token", "pos_embed"):
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif "norm" in n and n.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def timm_outputs(model, x, blocks):
    """logits, pre_logits and the outputs of `blocks` (tokens incl. CLS, before the final norm)."""
    out = {}
    hooks = [model.blocks[b].register_forward_hook(lambda m, i, o, b=b: out.__setitem__(b, o)) for b in blocks]
    with torch.no_grad():
        feats = model.forward_features(torch.from_numpy(x))
        pre, logits = model.forward_head(feats, pre_logits=True), model.forward_head(feats)
    for h in hooks:
        h.remove()
    return logits.numpy(), pre.numpy(), [out[b].numpy() for b in blocks]


def check_parity(tm, name, num_classes, size, batch, seed, **overrides):
    fm, variables = port(tm, name, num_classes, **overrides)
    blocks = fm.reference_stage_indices()
    x = np.random.RandomState(seed).randn(batch, 3, size, size).astype(np.float32)
    logits, pre, stages = timm_outputs(tm, x, blocks)
    got_logits, feats = jax.jit(lambda v, x: fm.apply(v, x))(variables, x.transpose(0, 2, 3, 1))
    errs = [max_rel_err(got_logits, logits), max_rel_err(feats["pre_logits"], pre)]
    errs += [max_rel_err(feats[f"stage{s + 1}"], stages[s]) for s in range(4)]
    print(name, overrides, "max rel err logits/pre_logits/stage1-4:", ["%.1e" % e for e in errs])
    assert max(errs) < 1e-4, errs


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"])
def test_parity_full_size(name):
    check_parity(timm_vit(name, 0, num_classes=100), name, 100, 224, 1, seed=0)


@pytest.mark.parametrize("overrides,timm_init", [
    (TINY, False), (TINY, True), (dict(TINY, depth=3, mlp_ratio=2.0, qkv_bias=False, patch_size=8), False)])
def test_parity_tiny(overrides, timm_init):
    check_parity(timm_vit("vit_small_patch16_224", 1, timm_init, num_classes=10, **overrides),
                 "vit_small_patch16_224", 10, 32, 2, seed=1, **overrides)


def test_stage_table_at_224():
    for name, dim in [("deit_tiny_patch16_224", 192), ("vit_small_patch16_224", 384)]:
        table = models.stage_table(models.create_model(name, num_classes=100))
        assert [s.ref_index for s in table] == [1, 3, 9, 11]
        assert [s.shape for s in table] == [(197, dim)] * 4 and {s.kind for s in table} == {"tokens"}
    tiny = models.stage_table(models.create_model("vit_small_patch16_224", num_classes=10, **TINY))
    assert [s.ref_index for s in tiny] == [0, 1, 2, 3] and tiny[0].shape == (65, 64)


def test_default_stage_blocks():
    assert vit.default_stage_blocks(12) == (1, 3, 9, 11)
    assert vit.default_stage_blocks(4) == (0, 1, 2, 3)
    assert vit.default_stage_blocks(6) == (0, 1, 4, 5)
    assert vit.default_stage_blocks(24) == (3, 7, 19, 23)
    assert vit.default_stage_blocks(2) == (0, 1, 1, 1)
    for depth in range(1, 40):
        blocks = vit.default_stage_blocks(depth)
        assert blocks[-1] == depth - 1 and list(blocks) == sorted(blocks) and 0 <= blocks[0]
    model = models.create_model("deit_tiny_patch16_224", stage_blocks=(0, 2, 4, 6))
    assert model.reference_stage_indices() == (0, 2, 4, 6)


def test_drop_path_and_dropout_only_when_enabled():
    x = jnp.asarray(np.random.RandomState(3).randn(2, 32, 32, 3), jnp.float32)

    def run(model, seed, train=True):
        variables = model.init(jax.random.key(0), x)
        return np.asarray(model.apply(variables, x, train=train, rngs={"dropout": jax.random.key(seed)})[0])

    plain = models.create_model("vit_small_patch16_224", num_classes=10, **TINY)
    np.testing.assert_array_equal(run(plain, 1), run(plain, 2))
    np.testing.assert_array_equal(run(plain, 1), run(plain, 1, train=False))
    for knob in ["drop_path_rate", "drop_rate", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate"]:
        dropped = models.create_model("vit_small_patch16_224", num_classes=10, **{knob: 0.5}, **TINY)
        assert not np.allclose(run(dropped, 1), run(dropped, 2)), knob
        np.testing.assert_array_equal(run(dropped, 1, train=False), run(plain, 1, train=False))


def test_wrong_input_size_is_an_error():
    model = models.create_model("vit_small_patch16_224", num_classes=10, **TINY)
    with pytest.raises(ValueError, match="32x32"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 48, 48, 3))))
