"""MobileNetV2 against timm 1.x: logits, pre_logits and the four stage maps (eval and train mode, BatchNorm
statistics included); drop path; stage table; infer."""
import jax
import numpy as np
import pytest
import timm
import torch

from convert import core
from convert.tables import mobilenetv2 as table
from rsd_jax import models
from rsd_jax.models import mobilenetv2
from timm_parity import max_rel_err, numpy_state_dict, port, randomize_batchnorm_stats

TINY = dict(channel_multiplier=0.35, img_size=32)   # timm's mobilenetv2_035


def _timm(name, seed, num_classes, **kw):
    torch.manual_seed(seed)
    t = timm.create_model(name, num_classes=num_classes, **kw).eval()
    randomize_batchnorm_stats(t, seed)
    return t


def _reference_feats(t, xt):
    """The reference's feature list: every block output, then bn2(conv_head(.)) (docs/reference.md §3)."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for stage in t.blocks for b in stage]
    hooks.append(t.bn2.register_forward_hook(lambda m, i, o: outs.append(o)))
    with torch.no_grad():
        logits = t(xt)
    for h in hooks:
        h.remove()
    return logits, [o.permute(0, 2, 3, 1) for o in outs]


def _check_parity(t, num_classes, batch, seed, **overrides):
    model, variables = port(t, "mobilenetv2_100", num_classes, **overrides)
    size = model.img_size
    x = np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)
    logits, feats = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    want_logits, want_feats = _reference_feats(t, xt)
    assert len(want_feats) == 18
    with torch.no_grad():
        want_pre = t.forward_head(t.forward_features(xt), pre_logits=True)
    errs = {"logits": max_rel_err(logits, want_logits), "pre_logits": max_rel_err(feats["pre_logits"], want_pre)}
    for s, idx in enumerate(model.reference_stage_indices(), start=1):
        errs[f"stage{s}"] = max_rel_err(feats[f"stage{s}"], want_feats[idx])
    print(errs)
    assert max(errs.values()) < 1e-4, errs
    return model, variables, x


@pytest.fixture(scope="module")
def full_timm():
    return _timm("mobilenetv2_100", 0, 100)


def test_parity_full_size(full_timm):
    _check_parity(full_timm, 100, batch=1, seed=0)


def test_parity_tiny_second_seed():
    _check_parity(_timm("mobilenetv2_035", 1, 10), 10, batch=2, seed=1, **TINY)


def test_train_mode_matches_timm_and_updates_batch_stats():
    t = _timm("mobilenetv2_035", 2, 10)
    # batch 16: with fewer values per channel (1x1 maps) batch statistics amplify float noise past 1e-4
    model, variables, x = _check_parity(t, 10, batch=16, seed=2, **TINY)
    (logits, feats), updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                           rngs={"dropout": jax.random.key(0)})
    t.train()
    with torch.no_grad():   # one forward: each one updates the running statistics
        want_map = t.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2)))
        want = t.forward_head(want_map)
    assert max_rel_err(logits, want) < 1e-4
    assert max_rel_err(feats["stage4"], want_map.permute(0, 2, 3, 1)) < 1e-4
    new_sd, torch_sd = core.variables_to_state_dict(dict(variables, **updates), table), numpy_state_dict(t)
    means = [k for k in torch_sd if k.endswith("running_mean")]
    assert len(means) == 52
    for k in means:
        np.testing.assert_allclose(new_sd[k], torch_sd[k], rtol=1e-4, atol=1e-5, err_msg=k)
        # torch moves the running variance towards the unbiased batch variance; so does layers.BatchNorm
        var = k.replace("running_mean", "running_var")
        want_var = torch_sd[var]
        np.testing.assert_allclose(new_sd[var], want_var, rtol=1e-4, atol=1e-5, err_msg=var)


def test_stage_table_at_224(full_timm):
    model = models.create_model("mobilenetv2_100", num_classes=100)
    assert [(s.ref_index, s.shape, s.kind) for s in models.stage_table(model)] == [
        (2, (56, 56, 24), "map"), (5, (28, 28, 32), "map"), (12, (14, 14, 96), "map"), (17, (7, 7, 1280), "map")]
    n = sum(np.prod(a.shape) for a in jax.tree.leaves(models.init_shapes(model)["params"]))
    assert n == sum(p.numel() for p in full_timm.parameters())   # 2.35M (docs/reference.md §3)


def test_drop_path_schedule_matches_timm():
    t = timm.create_model("mobilenetv2_035", drop_path_rate=0.3)
    want = [getattr(b.drop_path, "drop_prob", 0.0) for stage in t.blocks for b in stage]
    np.testing.assert_allclose(mobilenetv2.drop_path_rates(0.3), want, rtol=1e-6)


def test_train_mode_drop_path():
    x = np.random.RandomState(3).randn(4, 32, 32, 3).astype(np.float32)
    # two stages are enough (and compile fast): blocks 1_1 and 2_1 have residuals
    small = dict(TINY, arch=mobilenetv2.ARCH[:3], stage_blocks=(0, 2, 5, 6))
    off = models.create_model("mobilenetv2_100", num_classes=10, **small)
    on = models.create_model("mobilenetv2_100", num_classes=10, drop_path_rate=0.5, **small)
    variables = jax.jit(off.init)(jax.random.key(0), x)

    def run(model):
        fn = jax.jit(lambda v, k: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": k})[0][0])
        return lambda seed: fn(variables, jax.random.key(seed))

    run_off, run_on = run(off), run(on)
    np.testing.assert_array_equal(run_off(0), run_off(1))
    a, b = run_on(0), run_on(1)
    assert np.abs(a - b).max() > 1e-4 * np.abs(a).max()


def test_infer_and_timm_kwargs(full_timm):
    assert table.infer(numpy_state_dict(full_timm)) == ("mobilenetv2_100", 100, {})
    sd = numpy_state_dict(timm.create_model("mobilenetv2_035", num_classes=3))
    assert table.infer(sd) == ("mobilenetv2_100", 3, {"channel_multiplier": 0.35})
    assert table.infer({"stem.0.weight": np.zeros((96, 3, 4, 4))}) is None
    sd = numpy_state_dict(timm.create_model("mobilenetv2_110d"))   # deeper stages: not ours
    with pytest.raises(core.ConversionError, match="blocks per stage"):
        table.infer(sd)
    assert table.infer(dict(sd, **{"blocks.1.0.se.conv_reduce.weight": np.zeros(1)})) is None  # an EfficientNet
    assert table.timm_kwargs({"img_size": 32, "drop_path_rate": 0.1}) == {"drop_path_rate": 0.1}
    assert table.timm_kwargs({"channel_multiplier": 0.35}) == {"channel_multiplier": 0.35}
    with pytest.raises(ValueError, match="fixed architecture"):
        table.timm_kwargs({"stem_size": 16})


def test_relu6_gradient_at_its_kinks_is_torchs():
    # A BatchNorm output that is exactly 0 (a constant channel, bias 0) must get torch's gradient 0, not 1/2.
    x = np.array([-1.0, 0.0, 3.0, 6.0, 7.0], np.float32)
    t = torch.tensor(x, requires_grad=True)
    torch.nn.ReLU6()(t).sum().backward()
    np.testing.assert_array_equal(np.asarray(jax.grad(lambda v: mobilenetv2.relu6(v).sum())(x)), t.grad.numpy())
