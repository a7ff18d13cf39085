"""ConvNeXt against timm 1.x: logits, pre_logits and the four stage outputs; drop path; stage table; infer."""
import jax
import numpy as np
import pytest
import timm
import torch

from convert import core
from convert.tables import convnext as table
from rsd_jax import models
from rsd_jax.models import layers
from timm_parity import max_rel_err, numpy_state_dict, port, randomize_params

TINY = dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64))


def _timm(seed, num_classes, **kw):
    torch.manual_seed(seed)
    t = timm.create_model("convnext_tiny", num_classes=num_classes, **kw).eval()
    # layer scales start at 1e-6, which would hide every block from the comparison
    randomize_params(t, seed, r"\.gamma$", 0.0, 0.5)
    randomize_params(t, seed + 1, r"bias$", 0.0, 0.1)
    randomize_params(t, seed + 2, r"norm.*weight$|stem\.1\.weight|downsample\.0\.weight", 1.0, 0.2)
    return t


def _check_parity(t, num_classes, batch, size, seed, **overrides):
    model, variables = port(t, "convnext_tiny", num_classes, img_size=size, **overrides)
    x = np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)
    logits, feats = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    with torch.no_grad():
        want_logits = t(xt)
        want_pre = t.forward_head(t.forward_features(xt), pre_logits=True)
        want_stages = t.forward_intermediates(xt, indices=list(model.reference_stage_indices()),
                                              intermediates_only=True)
    errs = {"logits": max_rel_err(logits, want_logits), "pre_logits": max_rel_err(feats["pre_logits"], want_pre)}
    for s, w in enumerate(want_stages, start=1):
        errs[f"stage{s}"] = max_rel_err(feats[f"stage{s}"], w.permute(0, 2, 3, 1))
    print(errs)
    assert max(errs.values()) < 1e-4, errs
    return model, variables


@pytest.fixture(scope="module")
def full_timm():
    return _timm(0, 100)


def test_parity_full_size(full_timm):
    _check_parity(full_timm, 100, batch=1, size=224, seed=0)


def test_parity_tiny_second_seed():
    # patch 2 (timm then downsamples in stage 0 too) and 5x5 depthwise kernels: the paths full size does not take
    ours = dict(TINY, patch_size=2, kernel_size=5)
    _check_parity(_timm(1, 10, **table.timm_kwargs(ours)), 10, batch=2, size=32, seed=1, **ours)


def test_stage_table_at_224(full_timm):
    table_ = models.stage_table(models.create_model("convnext_tiny", num_classes=100))
    assert [(s.ref_index, s.shape, s.kind) for s in table_] == [
        (0, (56, 56, 96), "map"), (1, (28, 28, 192), "map"), (2, (14, 14, 384), "map"), (3, (7, 7, 768), "map")]
    shapes = models.init_shapes(models.create_model("convnext_tiny", num_classes=100))
    n = sum(np.prod(a.shape) for a in jax.tree.leaves(shapes))
    assert n == sum(p.numel() for p in full_timm.parameters())   # 27.90M (docs/reference.md §3)


def test_drop_path_schedule_matches_timm():
    t = timm.create_model("convnext_tiny", drop_path_rate=0.3, **TINY)
    want = [getattr(b.drop_path, "drop_prob", 0.0) for s in t.stages for b in s.blocks]
    np.testing.assert_allclose(layers.drop_path_rates(0.3, sum(TINY["depths"])), want, rtol=1e-6)


def test_train_mode_drop_path():
    x = np.random.RandomState(2).randn(4, 32, 32, 3).astype(np.float32)
    off = models.create_model("convnext_tiny", num_classes=10, img_size=32, **TINY)
    on = models.create_model("convnext_tiny", num_classes=10, img_size=32, drop_path_rate=0.5, **TINY)
    variables = jax.jit(off.init)(jax.random.key(0), x)
    # make the residual branches matter (gamma starts at 1e-6)
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 1.0 if p[-1].key == "gamma" else v, variables)

    def run(model, train):
        fn = jax.jit(lambda v, k: model.apply(v, x, train=train, rngs={"dropout": k})[0])
        return lambda seed: fn(variables, jax.random.key(seed))

    eval_out = run(off, False)(0)
    np.testing.assert_array_equal(run(off, True)(0), eval_out)
    np.testing.assert_array_equal(run(on, False)(0), eval_out)
    on_train = run(on, True)
    a, b = on_train(0), on_train(1)
    assert np.abs(a - eval_out).max() > 1e-3 and np.abs(a - b).max() > 1e-3


def test_infer_and_strict_round_trip(full_timm):
    sd = numpy_state_dict(full_timm)
    assert table.infer(sd) == ("convnext_tiny", 100, {})
    assert table.infer({"conv_stem.weight": np.zeros((32, 3, 3, 3))}) is None
    # the Flax tree maps back to exactly timm's keys
    model = models.create_model("convnext_tiny", num_classes=100)
    back = core.variables_to_state_dict(core.state_dict_to_variables(sd, models.init_shapes(model), table), table)
    assert set(back) == set(sd)


def test_infer_tiny_variant_through_timm_kwargs():
    tiny = dict(TINY, patch_size=2, kernel_size=5)
    sd = numpy_state_dict(timm.create_model("convnext_tiny", num_classes=3, **table.timm_kwargs(tiny)))
    assert table.infer(sd) == ("convnext_tiny", 3, tiny)
    core.state_dict_to_variables(sd, models.init_shapes(models.create_model("convnext_tiny", 3, **tiny)), table)
    with pytest.raises(ValueError, match="mlp_ratio"):
        table.timm_kwargs({"mlp_ratio": 2.0})
