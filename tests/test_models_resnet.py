"""ResNet parity with timm 1.x (random weights, randomised BatchNorm statistics), train mode and stochastic depth."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch

from rsd_jax import models
from timm_parity import max_rel_err, port, randomize_batchnorm_stats

TINY = dict(widths=(16, 32, 64, 128), layers=(1, 1, 1, 1), img_size=32)   # the lead's demo student
TINY_BOTTLENECK = dict(widths=(8, 16, 32, 64), layers=(1, 2, 1, 1), img_size=32)


def timm_resnet(name, seed, **timm_kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, **timm_kwargs).eval()
    randomize_batchnorm_stats(model, seed)
    return model


def timm_outputs(model, x):
    """logits, pre_logits and layer1..4 outputs (NHWC) of a timm ResNet."""
    stages = []
    hooks = [getattr(model, f"layer{s}").register_forward_hook(lambda m, i, o: stages.append(o)) for s in (1, 2, 3, 4)]
    with torch.no_grad():
        feats = model.forward_features(torch.from_numpy(x))
        pre, logits = model.forward_head(feats, pre_logits=True), model.forward_head(feats)
    for h in hooks:
        h.remove()
    return logits.numpy(), pre.numpy(), [s.numpy().transpose(0, 2, 3, 1) for s in stages]


def check_parity(tm, name, num_classes, size, batch, seed, **overrides):
    fm, variables = port(tm, name, num_classes, **overrides)
    x = np.random.RandomState(seed).randn(batch, 3, size, size).astype(np.float32)
    logits, pre, stages = timm_outputs(tm, x)
    got_logits, feats = jax.jit(lambda v, x: fm.apply(v, x))(variables, x.transpose(0, 2, 3, 1))
    errs = [max_rel_err(got_logits, logits), max_rel_err(feats["pre_logits"], pre)]
    errs += [max_rel_err(feats[f"stage{s + 1}"], stages[s]) for s in range(4)]
    print(name, overrides, "max rel err logits/pre_logits/stage1-4:", ["%.1e" % e for e in errs])
    assert max(errs) < 1e-4, errs
    return fm, variables


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_parity_full_size(name):
    check_parity(timm_resnet(name, 0, num_classes=100), name, 100, 224, 1, seed=0)


@pytest.mark.parametrize("stem_space_to_depth", [False, True])
def test_parity_resnet18_at_224_either_stem(stem_space_to_depth):
    check_parity(timm_resnet("resnet18", 0, num_classes=10), "resnet18", 10, 224, 1, seed=5,
                 stem_space_to_depth=stem_space_to_depth)


@pytest.mark.parametrize("size", [(9, 9), (10, 13), (32, 32)])
def test_space_to_depth_stem_is_the_strided_7x7_convolution(size):
    """resnet.space_to_depth_conv against torch's Conv2d(3, C, 7, stride 2, padding 3): outputs and the gradients
    of the input and of the kernel, odd and even sizes."""
    from rsd_jax.models import resnet
    rng = np.random.RandomState(sum(size))
    x = rng.randn(2, 3, *size).astype(np.float32)
    w = rng.randn(8, 3, 7, 7).astype(np.float32)
    xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    want = torch.nn.functional.conv2d(xt, wt, stride=2, padding=3)
    g = rng.randn(*want.shape).astype(np.float32)
    want.backward(torch.from_numpy(g))
    got, vjp = jax.vjp(resnet.space_to_depth_conv, jnp.asarray(x.transpose(0, 2, 3, 1)),
                       jnp.asarray(w.transpose(2, 3, 1, 0)))
    gx, gw = vjp(jnp.asarray(g.transpose(0, 2, 3, 1)))
    assert max_rel_err(got, want.detach().numpy().transpose(0, 2, 3, 1)) < 1e-6
    assert max_rel_err(gx, xt.grad.numpy().transpose(0, 2, 3, 1)) < 1e-6
    assert max_rel_err(gw, wt.grad.numpy().transpose(2, 3, 1, 0)) < 1e-6


@pytest.mark.parametrize("block,overrides,timm_kwargs", [
    ("basic", TINY, dict(channels=(16, 32, 64, 128), layers=(1, 1, 1, 1))),
    ("bottleneck", TINY_BOTTLENECK, dict(channels=(8, 16, 32, 64), layers=(1, 2, 1, 1))),
])
def test_parity_tiny(block, overrides, timm_kwargs):
    name = "resnet18" if block == "basic" else "resnet50"
    check_parity(timm_resnet(name, 1, num_classes=10, **timm_kwargs), name, 10, 32, 2, seed=1, **overrides)


def test_stage_table_at_224():
    want = {"resnet18": [(56, 56, 64), (28, 28, 128), (14, 14, 256), (7, 7, 512)],
            "resnet50": [(56, 56, 256), (28, 28, 512), (14, 14, 1024), (7, 7, 2048)]}
    for name, shapes in want.items():
        table = models.stage_table(models.create_model(name, num_classes=100))
        assert [s.shape for s in table] == shapes
        assert [s.ref_index for s in table] == [0, 1, 2, 3] and {s.kind for s in table} == {"map"}


def test_train_mode_matches_torch_and_updates_batch_stats():
    """Train-mode BatchNorm: batch statistics in the forward, running averages updated like torch (momentum 0.1)."""
    tm = timm_resnet("resnet18", 2, num_classes=10, channels=(16, 32, 64, 128), layers=(1, 1, 1, 1))
    fm, variables = port(tm, "resnet18", 10, **TINY)
    variables = jax.tree_util.tree_map(np.array, variables)   # copies: port's arrays may alias torch's buffers
    x = np.random.RandomState(2).randn(4, 3, 32, 32).astype(np.float32)
    tm.train()
    with torch.no_grad():
        want = tm(torch.from_numpy(x)).numpy()
    (got, _), updates = fm.apply(variables, x.transpose(0, 2, 3, 1), train=True, mutable=["batch_stats"])
    assert max_rel_err(got, want) < 1e-4
    new_mean = np.asarray(updates["batch_stats"]["layer1_0"]["bn1"]["mean"])
    assert not np.allclose(new_mean, variables["batch_stats"]["layer1_0"]["bn1"]["mean"])
    assert max_rel_err(new_mean, tm.layer1[0].bn1.running_mean.numpy()) < 1e-4
    assert max_rel_err(updates["batch_stats"]["bn1"]["var"], tm.bn1.running_var.numpy()) < 1e-4


def test_drop_path_and_dropout_only_when_enabled():
    x = jnp.asarray(np.random.RandomState(3).randn(4, 32, 32, 3), jnp.float32)

    def run(model, seed, train=True):
        variables = model.init(jax.random.key(0), x)
        out, _ = model.apply(variables, x, train=train, mutable=["batch_stats"], rngs={"dropout": jax.random.key(seed)})
        return np.asarray(out[0])

    plain = models.create_model("resnet18", num_classes=10, **TINY)
    dropped = models.create_model("resnet18", num_classes=10, drop_path_rate=0.5, drop_rate=0.3, **TINY)
    np.testing.assert_array_equal(run(plain, 1), run(plain, 2))
    assert not np.allclose(run(dropped, 1), run(dropped, 2))
    np.testing.assert_array_equal(run(dropped, 1, train=False), run(plain, 1, train=False))


@pytest.mark.parametrize("size", [9, 10, 32])
def test_max_pool_matches_torch_forward_and_backward(size):
    """layers.max_pool (strided slices, no select-and-scatter) against torch's MaxPool2d(3, 2, 1), odd and even sizes."""
    from rsd_jax.models import layers
    rng = np.random.RandomState(size)
    x = rng.randn(2, 5, size, size).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_()
    want = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
    g = rng.randn(*want.shape).astype(np.float32)
    want.backward(torch.from_numpy(g))
    got, vjp = jax.vjp(lambda x: layers.max_pool(x, 3, 2, (1, 1)), jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(np.asarray(got), want.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g.transpose(0, 2, 3, 1)))[0]),
                               xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size,kernel,stride", [(9, 7, 2), (10, 3, 2), (9, 3, 1), (10, 1, 2)])
def test_gemm_kernel_gradient_is_the_convolutions_gradient(size, kernel, stride):
    """layers.conv2d with the kernel gradient as a matrix product of patches against torch's Conv2d autograd."""
    from rsd_jax.models import layers
    rng = np.random.RandomState(size + kernel)
    x, w = rng.randn(2, 5, size, size).astype(np.float32), rng.randn(6, 5, kernel, kernel).astype(np.float32)
    xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    want = torch.nn.functional.conv2d(xt, wt, stride=stride, padding=kernel // 2)
    g = rng.randn(*want.shape).astype(np.float32)
    want.backward(torch.from_numpy(g))
    got, vjp = jax.vjp(lambda x, w: layers.conv2d(x, w, stride, kernel // 2, gemm_kernel_grad=True),
                       jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(w.transpose(2, 3, 1, 0)))
    gx, gw = vjp(jnp.asarray(g.transpose(0, 2, 3, 1)))
    assert max_rel_err(got, want.detach().numpy().transpose(0, 2, 3, 1)) < 1e-6
    assert max_rel_err(gx, xt.grad.numpy().transpose(0, 2, 3, 1)) < 1e-6
    assert max_rel_err(gw, wt.grad.numpy().transpose(2, 3, 1, 0)) < 1e-6


@pytest.mark.parametrize("stem_space_to_depth,gemm_kernel_grad", [(False, False), (True, False), (False, True),
                                                                   (True, True)])
def test_train_mode_gradients_match_torch(stem_space_to_depth, gemm_kernel_grad):
    """Every parameter's gradient of a train-mode step against torch autograd through timm (stem max pool and its
    ReLU ties, BatchNorm with batch statistics, residuals, the head), with either form of the stem convolution and
    of the kernel gradients."""
    from convert import core
    tm = timm_resnet("resnet18", 4, num_classes=10, channels=(16, 32, 64, 128), layers=(1, 1, 1, 1))
    fm, variables = port(tm, "resnet18", 10, stem_space_to_depth=stem_space_to_depth,
                         gemm_kernel_grad=gemm_kernel_grad, **TINY)
    variables = jax.tree_util.tree_map(np.array, variables)
    rng = np.random.RandomState(4)
    x, w = rng.randn(4, 3, 32, 32).astype(np.float32), rng.randn(4, 10).astype(np.float32)
    tm.train()
    (tm(torch.from_numpy(x)) * torch.from_numpy(w)).sum().backward()

    def loss(params):
        (logits, _), _ = fm.apply({**variables, "params": params}, x.transpose(0, 2, 3, 1), train=True,
                                  mutable=["batch_stats"])
        return jnp.sum(logits * w)

    grads = jax.grad(loss)(variables["params"])
    got = core.variables_to_state_dict({"params": grads}, core.family_table(models.family_of("resnet18")))
    want = {k: p.grad.numpy() for k, p in tm.named_parameters()}
    assert set(got) == set(want)
    errs = {k: max_rel_err(got[k], want[k]) for k in want}
    assert max(errs.values()) < 1e-4, sorted(errs.items(), key=lambda kv: -kv[1])[:3]
