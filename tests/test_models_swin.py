"""Swin Transformer: parity with timm 1.x, the timm 0.6.x checkpoint layout, export, stochastic depth, stages."""
import jax
import numpy as np
import pytest
import timm
import torch
from flax import traverse_util
from timm.models.swin_transformer import SwinTransformer

from convert import core
from convert.tables import swin as table
from rsd_jax import models
from rsd_jax.models import layers, swin
from timm_parity import max_rel_err, numpy_state_dict, port

TOL = 1e-4
TINY = "swin_tiny_patch4_window7_224"
# Small variants (the name only supplies defaults; everything architectural is overridden).
SMALL = dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
# Odd sizes: attention padding (18 and 9 are not multiples of 4), odd-size patch merging (9 -> 5), shifted and
# padded stage 2 (5 > 4), window clamped to the resolution in stage 3 (3 < 4).
ODD = dict(SMALL, img_size=36)


def timm_swin(name, num_classes, seed, device=None, **overrides):
    """A random-init timm Swin (nano/pico built from the constructor, as the reference's students), eval mode.

    LayerNorm affine parameters, biases and the relative-position tables are perturbed so that parity
    exercises them (timm initialises them to 1, 0 and ~0.02)."""
    torch.manual_seed(seed)
    kwargs = dict(swin.MODELS[name].kwargs, num_classes=num_classes, **overrides)
    if name in timm.list_models("swin*") and not overrides:
        model = timm.create_model(name, num_classes=num_classes, device=device)
    else:
        model = SwinTransformer(device=device, **kwargs)
    if device != "meta":
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n or "relative_position_bias_table" in n or n.endswith(".bias"):
                    p.add_(0.5 * torch.randn_like(p))
    return model.eval()


def timm_outputs(model, x):
    """logits, pre_logits, final-norm tokens and the stage outputs (B, L, C) of a timm 1.x Swin."""
    stages = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, s=s: stages.__setitem__(s, o))
             for s, layer in enumerate(model.layers)]
    try:
        with torch.no_grad():
            feats = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
            logits = model.forward_head(feats)
            pre_logits = model.forward_head(feats, pre_logits=True)
    finally:
        for h in hooks:
            h.remove()
    tokens = lambda t: t.reshape(t.shape[0], -1, t.shape[-1]).numpy()  # noqa: E731  NHWC -> (B, L, C)
    out = {"logits": logits.numpy(), "pre_logits": pre_logits.numpy(), "final_tokens": tokens(feats)}
    out.update({f"stage{s + 1}": tokens(t) for s, t in stages.items()})
    return out


def check_parity(timm_model, flax_model, variables, batch, seed):
    x = np.random.RandomState(seed).randn(batch, flax_model.img_size, flax_model.img_size, 3).astype(np.float32)
    want = timm_outputs(timm_model, x)
    logits, feats = jax.jit(lambda v, x: flax_model.apply(v, x, train=False))(variables, x)
    errors = {k: max_rel_err(logits if k == "logits" else feats[k], v) for k, v in want.items()}
    print(errors)
    assert max(errors.values()) < TOL, errors
    return errors


@pytest.mark.parametrize("name", [TINY, "swin_pico_patch4_window7_224", "swin_nano_patch4_window7_224",
                                  "swin_base_patch4_window7_224"])
def test_parity_full_size(name):
    tm = timm_swin(name, 100, seed=0)
    check_parity(tm, *port(tm, name, 100), batch=1, seed=0)


@pytest.mark.parametrize("cfg,seed", [(SMALL, 1), (ODD, 2)], ids=["small", "odd"])
def test_parity_small(cfg, seed):
    tm = timm_swin(TINY, 10, seed=seed, **cfg)
    check_parity(tm, *port(tm, TINY, 10, **cfg), batch=2, seed=seed)


def to_timm06(state_dict, model):
    """The timm 0.6.x layout of a timm 1.x Swin state_dict: downsample at the end of the previous stage, a bare
    `head`, and the persistent relative_position_index / attn_mask buffers (taken from the 1.x modules)."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("layers.") and ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.downsample.", f"layers.{i - 1}.downsample.")
        out[k.replace("head.fc.", "head.")] = v
    for i, layer in enumerate(model.layers):
        for j, block in enumerate(layer.blocks):
            out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = block.attn.relative_position_index.numpy()
            if block.attn_mask is not None:
                out[f"layers.{i}.blocks.{j}.attn_mask"] = block.attn_mask.numpy()
    return out


def test_timm06_layout_swin_tiny_keys():
    """The reference's Swin-T teacher layout (docs/reference.md §6.2) normalises to exactly the timm 1.x state_dict."""
    tm = timm_swin(TINY, 100, seed=3)
    sd = numpy_state_dict(tm)
    old = to_timm06(sd, tm)
    assert len(old) == 190 and "layers.0.downsample.reduction.weight" in old and "layers.3.downsample.norm.weight" \
        not in old and old["head.weight"].shape == (100, 768)
    masks = {k: v.shape for k, v in old.items() if k.endswith("attn_mask")}
    assert masks == {"layers.0.blocks.1.attn_mask": (64, 49, 49), "layers.1.blocks.1.attn_mask": (16, 49, 49),
                     **{f"layers.2.blocks.{j}.attn_mask": (4, 49, 49) for j in (1, 3, 5)}}
    assert sum(k.endswith("relative_position_index") for k in old) == 12
    assert table.infer(old) == (TINY, 100)
    new, layout = table.normalize(old)
    assert layout == "timm-0.6" and sorted(new) == sorted(sd)
    assert all(np.array_equal(new[k], sd[k]) for k in sd)
    assert table.normalize(sd)[1] == "timm-1.x"


def test_timm06_layout_forward():
    tm = timm_swin(TINY, 10, seed=4, **SMALL)
    old = to_timm06(numpy_state_dict(tm), tm)
    assert any(k.endswith("attn_mask") for k in old)
    sd, layout = table.normalize(old)
    assert layout == "timm-0.6"
    flax_model = models.create_model(TINY, num_classes=10, **SMALL)
    variables = core.state_dict_to_variables(sd, models.init_shapes(flax_model), table)
    check_parity(tm, flax_model, variables, batch=2, seed=4)
    # The buffers are also accepted unnormalised (IGNORED), e.g. a 1.x checkpoint saved with them.
    with_buffers = dict(numpy_state_dict(tm), **{k: v for k, v in old.items() if "relative_position_index" in k})
    core.state_dict_to_variables(with_buffers, models.init_shapes(flax_model), table)


def test_export_round_trip_loads_strict_into_timm():
    tm = timm_swin(TINY, 10, seed=5, **SMALL)
    flax_model, variables = port(tm, TINY, 10, **SMALL)
    exported = core.variables_to_state_dict(variables, table)
    fresh = timm_swin(TINY, 10, seed=6, **SMALL)
    fresh.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in exported.items()}, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in tm.state_dict().items())


def test_train_mode_and_drop_path():
    x = np.random.RandomState(0).randn(4, 32, 32, 3).astype(np.float32)
    # Variables from timm: a jitted Flax init compiles ~20 s here (one threefry per parameter).
    plain, variables = port(timm_swin(TINY, 10, seed=0, **SMALL), TINY, 10, drop_path_rate=0.0, **SMALL)

    def run(model, train, seed=0):
        fn = jax.jit(lambda v, x, k: model.apply(v, x, train=train, rngs={"dropout": k})[0])
        return np.asarray(fn(variables, x, jax.random.key(seed)))

    eval_out = run(plain, False)
    np.testing.assert_allclose(run(plain, True), eval_out, rtol=1e-6)          # no BatchNorm, no dropout
    dropped = plain.clone(drop_path_rate=0.5)
    np.testing.assert_allclose(run(dropped, False), eval_out, rtol=1e-6)       # inactive in eval
    a, b = run(dropped, True, 0), run(dropped, True, 1)
    assert np.abs(a - eval_out).max() > 1e-3 and np.abs(a - b).max() > 1e-3

    # timm's per-block schedule (and its default rate 0.1 for every Swin).
    tm = timm_swin(TINY, 10, seed=0, device="meta")
    want = [[float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in layer.blocks] for layer in tm.layers]
    assert models.create_model(TINY).drop_path_rate == 0.1
    np.testing.assert_allclose(np.concatenate(layers.drop_path_rates(0.1, (2, 2, 6, 2))), np.concatenate(want),
                               atol=1e-7)


STAGES = {  # docs/reference.md §3: (reference indices, embed dim); tokens at 224 are (3136, C) ... (49, 8C)
    TINY: ((1, 3, 9, 11), 96),
    "swin_base_patch4_window7_224": ((1, 3, 21, 23), 128),
    "swin_nano_patch4_window7_224": ((1, 3, 5, 7), 64),
    "swin_pico_patch4_window7_224": ((1, 3, 5, 7), 48),
}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_table_and_param_count(name):
    indices, dim = STAGES[name]
    model = models.create_model(name, num_classes=1000)
    got = models.stage_table(model)
    assert [s.ref_index for s in got] == list(indices)
    assert [s.shape for s in got] == [(3136, dim), (784, 2 * dim), (196, 4 * dim), (49, 8 * dim)]
    assert all(s.kind == "tokens" for s in got)
    tm = timm_swin(name, 1000, seed=0, device="meta")
    ours = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(models.init_shapes(model)))
    assert ours == sum(p.numel() for p in tm.parameters())
    if name == "swin_base_patch4_window7_224":
        assert ours == 87_768_224
    # The converter recognises the architecture from shapes alone.
    assert table.infer(tm.state_dict()) == (name, 1000)


def test_names_follow_timm():
    model = models.create_model(TINY, num_classes=100)
    ours = {core.torch_name(k[0], k[1:]) for k in traverse_util.flatten_dict(dict(models.init_shapes(model)))}
    tm = timm_swin(TINY, 100, seed=0, device="meta")
    assert ours == set(tm.state_dict())   # no buffers in 1.x state_dicts: relative index and masks are computed


def test_infer_rejects():
    assert table.infer({"conv1.weight": np.zeros((64, 3, 7, 7))}) is None
    sd = timm_swin(TINY, 10, seed=0, device="meta", **SMALL).state_dict()
    with pytest.raises(core.ConversionError, match="no known model"):
        table.infer(sd)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("cfg", [SMALL, ODD], ids=["small", "odd"])
def test_fused_inference_attention_equals_the_einsum_path(cfg, dtype, tol):
    """The inference attention through jax.nn.dot_product_attention (one broadcast bias of the relative positions
    and the shift mask) against the einsum path training uses, on the same weights: shifted, padded and clamped
    windows; in bf16 within the 2% the bf16 step is held to against fp32 (tests/test_bench.py)."""
    import jax.numpy as jnp
    from rsd_jax import train
    tm = timm_swin(TINY, 10, seed=3, **cfg)
    fused, variables = port(tm, TINY, 10, **cfg)
    plain = models.create_model(TINY, num_classes=10, fused_attention=False, **cfg)
    variables = train.cast_floats(variables, jnp.dtype(dtype))
    x = jnp.asarray(np.random.RandomState(3).randn(2, cfg["img_size"], cfg["img_size"], 3), dtype)
    got = jax.jit(lambda v, x: fused.apply(v, x, train=False))(variables, x)
    want = jax.jit(lambda v, x: plain.apply(v, x, train=False))(variables, x)
    for key in ("stage1", "stage2", "final_tokens", "pre_logits"):
        assert max_rel_err(got[1][key], want[1][key]) < tol, key
    assert max_rel_err(got[0], want[0]) < tol
    if jax.default_backend() == "cpu":
        assert swin.attention_implementation(jnp.bfloat16) == "xla"
