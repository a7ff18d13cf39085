"""MLP-Mixer and ResMLP against timm 1.x: logits, pre_logits and the four stage tokens; drop path; stage table;
infer."""
import jax
import numpy as np
import pytest
import timm
import torch
from timm.models import mlp_mixer

from convert import core
from convert.tables import mixer as table
from rsd_jax import models
from rsd_jax.models import mixer
from timm_parity import max_rel_err, numpy_state_dict, port, randomize_params

NAMES = ("mixer_b16_224", "resmlp_12_224")
# ours -> timm MlpMixer kwargs for a tiny variant
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=4)   # stage blocks default to (0, 1, 2, 3)
TINY_TIMM = dict(img_size=32, patch_size=4, embed_dim=32, num_blocks=4)
RESMLP_TIMM = dict(block_layer=mlp_mixer.ResBlock, norm_layer=mlp_mixer.Affine, mlp_ratio=4)


def _randomize(t, name, seed):
    # timm's zero head, 1e-6 MLP biases, 1e-4 layer scales and unit Affines would hide bugs from the comparison
    randomize_params(t, seed, r"bias$|^head\.weight$", 0.0, 0.1)
    if name.startswith("mixer"):
        randomize_params(t, seed + 1, r"norm\d?\.weight$", 1.0, 0.2)
    else:
        randomize_params(t, seed + 1, r"\.alpha$", 1.0, 0.2)
        randomize_params(t, seed + 2, r"\.beta$", 0.0, 0.2)
        randomize_params(t, seed + 3, r"\.ls\d$", 0.0, 0.3)
    return t


def _timm_full(name, seed, num_classes):
    torch.manual_seed(seed)
    return _randomize(timm.create_model(name, num_classes=num_classes).eval(), name, seed)


def _timm_tiny(name, seed, num_classes):
    torch.manual_seed(seed)
    kw = dict(TINY_TIMM, **({} if name.startswith("mixer") else RESMLP_TIMM))
    return _randomize(mlp_mixer.MlpMixer(num_classes=num_classes, **kw).eval(), name, seed)


def _check_parity(t, name, num_classes, batch, seed, **overrides):
    model, variables = port(t, name, num_classes, **overrides)
    size = model.img_size
    x = np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)
    logits, feats = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    with torch.no_grad():
        want_logits = t(xt)
        want_pre = t.forward_head(t.forward_features(xt), pre_logits=True)
        want_stages = t.forward_intermediates(xt, indices=list(model.reference_stage_indices()),
                                              intermediates_only=True, output_fmt="NLC")
    errs = {"logits": max_rel_err(logits, want_logits), "pre_logits": max_rel_err(feats["pre_logits"], want_pre)}
    for s, w in enumerate(want_stages, start=1):
        errs[f"stage{s}"] = max_rel_err(feats[f"stage{s}"], w)
    print(name, errs)
    assert max(errs.values()) < 1e-4, errs


@pytest.mark.parametrize("name", NAMES)
def test_parity_full_size(name):
    t = _timm_full(name, 0, 100)
    _check_parity(t, name, 100, batch=1, seed=0)
    sd = numpy_state_dict(t)
    assert table.infer(sd) == (name, 100, {})
    n = sum(np.prod(a.shape) for a in jax.tree.leaves(models.init_shapes(models.create_model(name, 100))))
    assert n == sum(p.numel() for p in t.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_parity_tiny_second_seed(name):
    _check_parity(_timm_tiny(name, 1, 10), name, 10, batch=2, seed=1, **TINY)


@pytest.mark.parametrize("name,dim", [("mixer_b16_224", 768), ("resmlp_12_224", 384)])
def test_stage_table_at_224(name, dim):
    table_ = models.stage_table(models.create_model(name, num_classes=100))
    assert [(s.ref_index, s.shape, s.kind) for s in table_] == [(i, (196, dim), "tokens") for i in (1, 3, 9, 11)]


def test_drop_path_schedule_matches_timm():
    t = mlp_mixer.MlpMixer(drop_path_rate=0.3, **TINY_TIMM)
    np.testing.assert_allclose(mixer.drop_path_rates(0.3, 4), [b.drop_path.drop_prob for b in t.blocks])


@pytest.mark.parametrize("name", NAMES)
def test_train_mode_drop_path(name):
    x = np.random.RandomState(2).randn(4, 32, 32, 3).astype(np.float32)
    off = models.create_model(name, num_classes=10, **TINY)
    on = models.create_model(name, num_classes=10, drop_path_rate=0.5, **TINY)
    variables = jax.jit(off.init)(jax.random.key(0), x)
    # the zero head would hide everything; ResMLP's 1e-4 layer scales would hide the blocks
    noise = lambda v: jax.random.normal(jax.random.key(3), v.shape)   # noqa: E731
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: v + noise(v) if p[-2].key == "head" or p[-1].key in ("ls1", "ls2") else v, variables)

    def run(model, train):
        fn = jax.jit(lambda v, k: model.apply(v, x, train=train, rngs={"dropout": k})[0])
        return lambda seed: fn(variables, jax.random.key(seed))

    eval_out = run(off, False)(0)
    np.testing.assert_array_equal(run(off, True)(0), eval_out)
    np.testing.assert_array_equal(run(on, False)(0), eval_out)
    on_train = run(on, True)
    a, b = on_train(0), on_train(1)
    assert np.abs(a - eval_out).max() > 1e-3 and np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_infer_tiny_variant(name):
    sd = numpy_state_dict(_timm_tiny(name, 0, 7))
    assert table.infer(sd) == (name, 7, TINY)
    core.state_dict_to_variables(sd, models.init_shapes(models.create_model(name, 7, **TINY)), table)


def test_infer_other_families_and_timm_kwargs():
    assert table.infer({"conv_stem.weight": np.zeros((32, 3, 3, 3)), "head.weight": np.zeros((3, 8))}) is None
    assert table.infer({"stem.proj.weight": np.zeros((8, 3, 4, 4)), "head.weight": np.zeros((3, 8))}) is None
    assert table.timm_kwargs({"img_size": 64, "drop_path_rate": 0.1, "stage_blocks": (0, 1, 2, 3)}) == \
        {"img_size": 64, "drop_path_rate": 0.1}
    assert table.timm_kwargs({"embed_dim": 32, "depth": 4, "init_values": 0.1}) == {"embed_dim": 32, "depth": 4}
    assert models.create_model("mixer_b16_224", depth=6).reference_stage_indices() == (0, 1, 4, 5)
