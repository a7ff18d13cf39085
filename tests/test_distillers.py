"""The baseline distillers (docs/reference.md §2): each loss against an independent torch implementation of its formula
(values and gradients), OFA/FitNet branch shapes over CNN and token pairs, the CRD memory update, and a few
training steps of every method."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rsd_jax import distillers, models
from rsd_jax.distillers import correlation, crd, dist, dkd, fitnet, kd, ofa, rkd
from tiny import tiny_config

B, C = 12, 7


def inputs(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) * 2 for s in shapes]


def check(jax_fn, torch_fn, arrays, argnums, rtol=1e-5):
    """Value and gradients (w.r.t. `argnums`) of a JAX loss and a torch loss on the same float32 inputs."""
    got, grads = jax.value_and_grad(jax_fn, argnums=argnums)(*[jnp.asarray(a) for a in arrays])
    tensors = [torch.tensor(a, requires_grad=i in argnums) for i, a in enumerate(arrays)]
    want = torch_fn(*tensors)
    want.backward()
    np.testing.assert_allclose(float(got), want.item(), rtol=rtol, atol=1e-6)
    for i, g in zip(argnums, grads):
        w = tensors[i].grad.numpy()
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-5 * max(np.abs(w).max(), 1e-3))


def soft_or_hard(seed, soft):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, size=B)
    if not soft:
        return labels.astype(np.int32), torch.tensor(labels)
    mixed = 0.6 * np.eye(C)[labels] + 0.4 * np.eye(C)[labels[::-1]] * 0.9
    return mixed.astype(np.float32), torch.tensor(mixed.argmax(1))


# ------------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kd(t):
    def ref(zs, zt):
        return F.kl_div(F.log_softmax(zs / t, 1), F.softmax(zt / t, 1), reduction="batchmean") * t * t
    check(lambda a, b: kd.kd_loss(a, b, temperature=t), ref, inputs(0, (B, C), (B, C)), (0,))


@pytest.mark.parametrize("soft,alpha,beta,t", [(False, 1.0, 2.0, 1.0), (True, 0.5, 8.0, 4.0)])
def test_dkd(soft, alpha, beta, t):
    labels, target = soft_or_hard(1, soft)

    def ref(zs, zt):
        gt = F.one_hot(target, C).float()
        ps, pt = F.softmax(zs / t, 1), F.softmax(zt / t, 1)
        bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
        bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
        tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * t ** 2 / B
        nckd = F.kl_div(F.log_softmax(zs / t - 1000 * gt, 1), F.softmax(zt / t - 1000 * gt, 1),
                        reduction="sum") * t ** 2 / B
        return alpha * tckd + beta * nckd
    zs, zt = inputs(2, (B, C), (B, C))
    check(lambda a, b: dkd.dkd_loss(a, b, jnp.asarray(labels), alpha=alpha, beta=beta, temperature=t), ref,
          [zs, zt], (0,))


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist(beta, gamma, tau):
    def pearson(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)

    def ref(zs, zt):
        ps, pt = F.softmax(zs / tau, 1), F.softmax(zt / tau, 1)
        inter = 1 - pearson(ps, pt).mean()
        intra = 1 - pearson(ps.t(), pt.t()).mean()
        return tau ** 2 * (beta * inter + gamma * intra)
    check(lambda a, b: dist.dist_loss(a, b, beta=beta, gamma=gamma, tau=tau), ref, inputs(3, (B, C), (B, C)), (0,))


@pytest.mark.parametrize("squared", [False, True])
def test_rkd(squared):
    def pdist(e):
        sq = (e ** 2).sum(1)
        d = (sq[:, None] + sq[None] - 2 * e @ e.t()).clamp(min=1e-12)
        d = d if squared else d.sqrt()
        d = d.clone()
        d[range(len(e)), range(len(e))] = 0
        return d

    def angles(e):
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(diff, diff.transpose(1, 2)).view(-1)

    def ref(s, t):
        s, t = s.view(B, -1), t.view(B, -1)
        td = pdist(t)
        td = td / td[td > 0].mean()
        sd = pdist(s)
        sd = sd / sd[sd > 0].mean()
        return 25 * F.smooth_l1_loss(sd, td) + 50 * F.smooth_l1_loss(angles(s), angles(t))
    s, t = inputs(4, (B, 2, 5), (B, 9))
    check(lambda a, b: rkd.rkd_loss(a, b, distance_weight=25, angle_weight=50, squared=squared), ref, [s, t], (0,))


def test_rkd_coincident_embeddings_pass_no_angle_gradient():
    # Two examples the student maps to one point: their difference has no direction. F.normalize(eps=1e-12) (the
    # reference) turns the angle error there into a gradient of ~1e12; rsd_jax passes none (the value is the same).
    s, t = inputs(5, (B, 9), (B, 9))
    s[1] = s[0]

    def reference_angles(e):
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(diff, diff.transpose(1, 2)).view(-1)
    st = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    F.smooth_l1_loss(reference_angles(st), reference_angles(torch.tensor(t, dtype=torch.float64))).backward()
    assert st.grad.abs().max() > 1e6
    value, grad = jax.value_and_grad(lambda a: rkd.rkd_loss(a, t, distance_weight=0.0, angle_weight=1.0))(s)
    want = F.smooth_l1_loss(reference_angles(torch.tensor(s)), reference_angles(torch.tensor(t))).item()
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() < 10


@pytest.mark.parametrize("eps,t", [(1.0, 1.0), (1.5, 2.0)])
@pytest.mark.parametrize("soft", [False, True])
def test_ofa(eps, t, soft):
    labels, target = soft_or_hard(5, soft)

    def ref(zs, zt):
        m = F.one_hot(target, C).float()
        w = (F.softmax(zt / t, 1) + m) ** eps - m
        return torch.sum(-w * torch.log(F.softmax(zs / t, 1)), -1).mean()
    check(lambda a, b: ofa.ofa_loss(a, b, jnp.asarray(labels), eps=eps, temperature=t), ref,
          inputs(6, (B, C), (B, C)), (0,))


def test_ofa_eps_one_is_soft_cross_entropy():
    zs, zt = inputs(7, (B, C), (B, C))
    labels = np.arange(B) % C
    want = -np.sum(np.asarray(jax.nn.softmax(zt)) * np.asarray(jax.nn.log_softmax(zs)), -1).mean()
    np.testing.assert_allclose(float(ofa.ofa_loss(zs, zt, labels, eps=1.0)), want, rtol=1e-5)


def test_fitnet_loss():
    a1, t1, a2, t2 = inputs(8, (B, 3, 3, 4), (B, 3, 3, 4), (B, 5, 6), (B, 5, 6))
    check(lambda x, y, u, v: fitnet.fitnet_loss([x, u], [y, v], scale=0.1),
          lambda x, y, u, v: 0.1 * (F.mse_loss(x, y) + F.mse_loss(u, v)), [a1, t1, a2, t2], (0, 2))


def test_correlation_loss():
    def ref(es, et):
        delta = torch.abs(es - et)
        return 0.02 * torch.mean((delta[:-1] * delta[1:]).sum(1))
    check(lambda a, b: correlation.correlation_loss(a, b, scale=0.02), ref, inputs(9, (B, 16), (B, 16)), (0, 1))


def test_crd_contrast_loss():
    n_data, k = 50, 6

    def ref(x):
        m, pn = x.size(1) - 1, 1 / float(n_data)
        log_d1 = torch.div(x[:, 0], x[:, 0] + m * pn + 1e-7).log()
        log_d0 = torch.div(torch.full_like(x[:, 1:], m * pn), x[:, 1:] + m * pn + 1e-7).log()
        return -(log_d1.sum(0) + log_d0.reshape(-1, 1).sum(0))[0] / x.shape[0]
    x = np.exp(inputs(10, (B, k + 1))[0] / 4) / 10
    check(lambda a: crd.contrast_loss(a, n_data), ref, [x], (0,))


# ------------------------------------------------------------------------------------------------ modules
TINY = {
    "cnn": ("resnet18", dict(img_size=16, widths=(4, 8, 8, 16), layers=(1, 1, 1, 1))),
    "vit": ("vit_small_patch16_224", dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2)),
    "mlp": ("resmlp_12_224", dict(img_size=16, patch_size=2, embed_dim=12, depth=1)),
    "convnext": ("convnext_tiny", dict(img_size=32, depths=(1, 1, 1, 1), dims=(4, 8, 8, 16))),
}


def fake_outputs(kind, batch=4, seed=0):
    """Random arrays shaped like a tiny model's `(logits, features)` (shapes from jax.eval_shape)."""
    name, overrides = TINY[kind]
    model = models.create_model(name, num_classes=10, **overrides)
    x = jax.ShapeDtypeStruct(models.input_shape(model, batch), jnp.float32)
    shapes = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), models.init_shapes(model), x)
    keys = iter(jax.random.split(jax.random.key(seed), 16))
    return jax.tree_util.tree_map(lambda s: jax.random.normal(next(keys), s.shape, s.dtype), shapes)


def context(teacher_out, n=40):
    return distillers.Context(num_classes=10, num_train_examples=n, teacher_dim=teacher_out[1]["pre_logits"].shape[-1])


BATCH = {"label": jnp.arange(4) % 10, "label_mask": jnp.ones(4), "index": jnp.arange(4)}


def apply_grouped(module, student_out, teacher_out, batch=BATCH, variables=None, train=False, rng=0):
    """init (variables=None) or apply under the one-group vmap that train.py uses."""
    def f():
        if variables is None:
            return module.init(jax.random.key(rng), student_out, teacher_out, batch, train=False)
        return module.apply(variables, student_out, teacher_out, batch, train=train,
                            mutable=[k for k in variables if k != "params"],
                            rngs={"dropout": jax.random.key(rng)})
    return jax.tree_util.tree_map(lambda x: x[0], jax.vmap(f, axis_size=1, axis_name="group")())


@pytest.mark.parametrize("student,teacher", [("cnn", "vit"), ("cnn", "convnext"), ("vit", "cnn"), ("mlp", "vit")])
def test_ofa_and_fitnet_modules(student, teacher):
    s_out, t_out = fake_outputs(student, seed=1), fake_outputs(teacher, seed=2)
    ctx = context(t_out)
    d_s, d_t = s_out[1]["pre_logits"].shape[-1], ctx.teacher_dim
    for stage in (1, 2, 3, 4):
        feature = s_out[1][f"stage{stage}"]
        branch = (ofa.CNNBranch(stage, max(d_s, d_t), 10) if feature.ndim == 4 else ofa.TokenBranch(stage, d_s, 10))
        logits, _ = jax.eval_shape(lambda f: branch.init_with_output(jax.random.key(0), f, train=False), feature)
        assert logits.shape == (4, 10)
        pred, target = jax.eval_shape(
            lambda f, t: fitnet.Aligner().init_with_output(jax.random.key(0), f, t)[0], feature,
            t_out[1][f"stage{stage}"])
        assert pred.shape == target.shape and pred.shape[0] == 4

    for method in ("ofa", "fitnet"):
        module = distillers.build(method, distillers.default_configs()[method], ctx)
        variables = apply_grouped(module, s_out, t_out)
        terms, _ = apply_grouped(module, s_out, t_out, variables=variables, train=True)
        assert set(terms) == ({"kd", "ofa"} if method == "ofa" else {"fitnet"})
        assert all(np.isfinite(float(v)) and float(v) > 0 for v in terms.values())


def test_ofa_token_branch_merges_to_seven_and_keeps_cls():
    tokens = jnp.zeros((2, 1 + 28 * 28, 8))     # a CLS token and a 28 x 28 grid: two merges, 28 -> 14 -> 7
    branch = ofa.TokenBranch(stage=1, dim=8, num_classes=5)
    variables = jax.eval_shape(lambda: branch.init(jax.random.key(0), tokens, train=False))["params"]
    assert {"merge0", "merge1", "blocks_0", "blocks_1", "blocks_2", "head"} == set(variables)
    assert variables["merge0"]["reduction"]["kernel"].shape == (32, 8)
    # no prefix tokens (Swin, ResMLP): the merges may change the width; the head pools the mean
    swin_like = jax.eval_shape(lambda t: ofa.TokenBranch(1, 16, 5).init_with_output(jax.random.key(0), t,
                                                                                     train=False)[0],
                               jnp.zeros((2, 28 * 28, 6)))
    assert swin_like.shape == (2, 5)
    # the last of several merges has no activation: with a zero-init LayerNorm shift, its output is linear in x
    merge = ofa.PatchMerge(8, act=False)
    x = jax.random.normal(jax.random.key(1), (1, 4, 4, 8))
    v = merge.init(jax.random.key(0), x)
    np.testing.assert_allclose(merge.apply(v, -x), -merge.apply(v, x), atol=1e-5)


def test_ofa_token_block_is_timms_bare_block():
    """The reference builds its token branches from timm 0.6.5's Block(dim, num_heads=4): no qkv bias, torch's
    LayerNorm (eps 1e-5; timm 1.x's Block defaults to its own LayerNorm, eps 1e-6). Same weights, same output; and
    the same parameter count."""
    from timm.models.vision_transformer import Block as TimmBlock
    dim = 16
    torch.manual_seed(0)
    tb = TimmBlock(dim, num_heads=4, norm_layer=torch.nn.LayerNorm).eval()
    for norm in (tb.norm1, tb.norm2):      # non-trivial norms, so that their eps and affine are exercised
        norm.weight.data.uniform_(0.5, 1.5), norm.bias.data.normal_(0, 0.1)
    x = np.random.default_rng(0).normal(size=(2, 5, dim)).astype(np.float32) * 3e-3   # small: eps matters
    block = ofa.TokenBranch(stage=1, dim=dim, num_classes=3)
    tokens = jnp.zeros((2, 1 + 7 * 7, dim))
    ours = jax.eval_shape(lambda: block.init(jax.random.key(0), tokens, train=False))["params"]["blocks_0"]
    want_count = sum(p.numel() for p in tb.parameters())
    assert sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(ours)) == want_count

    t = {k: v.detach().numpy() for k, v in tb.state_dict().items()}
    params = {"norm1": {"scale": t["norm1.weight"], "bias": t["norm1.bias"]},
              "norm2": {"scale": t["norm2.weight"], "bias": t["norm2.bias"]},
              "attn": {"qkv": {"kernel": t["attn.qkv.weight"].T},
                       "proj": {"kernel": t["attn.proj.weight"].T, "bias": t["attn.proj.bias"]}},
              "mlp": {"fc1": {"kernel": t["mlp.fc1.weight"].T, "bias": t["mlp.fc1.bias"]},
                      "fc2": {"kernel": t["mlp.fc2.weight"].T, "bias": t["mlp.fc2.bias"]}}}
    module = ofa.Block(num_heads=4, mlp_hidden=4 * dim, qkv_bias=False, norm_eps=1e-5)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        jax.tree_util.tree_map(np.asarray, ours))
    got = module.apply({"params": params}, jnp.asarray(x), train=False)
    with torch.no_grad():
        want = tb(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_branch_conv_biases_keep_torchs_default_init():
    """init_weights sets conv kernels only: biases stay U(+-1/sqrt(fan_in)), not zero (OFA stage 4, FitNet)."""
    x = jnp.zeros((2, 7, 7, 64))
    v = ofa.CNNBranch(4, 256, 10).init(jax.random.key(0), x, train=False)["params"]["conv"]["bias"]
    bound = 64 ** -0.5
    assert v.shape == (256,) and float(jnp.max(jnp.abs(v))) <= bound and float(jnp.std(v)) > 0.4 * bound
    aligner = fitnet.Aligner().init(jax.random.key(0), jnp.zeros((2, 14, 14, 32)), jnp.zeros((2, 49, 48)))
    b = aligner["params"]["proj"]["bias"]
    assert float(jnp.max(jnp.abs(b))) <= (32 * 2 * 2) ** -0.5 and float(jnp.std(b)) > 0


def test_space_to_depth_is_the_reference_patch_merge():
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
    t = torch.tensor(x).reshape(2, 2, 2, 2, 2, 3).permute(0, 1, 3, 2, 4, 5).reshape(2, 2, 2, 12)
    np.testing.assert_array_equal(np.asarray(ofa.space_to_depth(jnp.asarray(x), 2)), t.numpy())


def test_crd_memory_update_and_fixed_normaliser():
    s_out, t_out = fake_outputs("cnn", batch=4, seed=3), fake_outputs("vit", batch=4, seed=4)
    n = 40
    config = distillers.default_configs()["crd"]
    config.k = 8
    module = distillers.build("crd", config, context(t_out, n))
    variables = apply_grouped(module, s_out, t_out)
    assert variables["memory"]["student"].shape == (n, 128) and not bool(variables["memory"]["z_set"])
    index = jnp.asarray([3, 17, 5, 30])
    batch = dict(BATCH, index=index)

    def two_groups(variables, rng):
        # 2 statistics groups of 2 examples, as train.py runs them: every group must end with the same memory.
        def f(s, t, b, r):
            return module.apply(variables, s, t, b, train=True, mutable=["memory"], rngs={"dropout": r})
        split = lambda x: x.reshape((2, -1) + x.shape[1:])  # noqa: E731
        return jax.vmap(f, axis_name="group")(*jax.tree_util.tree_map(split, (s_out, t_out, batch)),
                                              jax.random.split(jax.random.key(rng), 2))

    terms, new = two_groups(variables, 0)
    for name in ("student", "teacher", "z", "z_set"):
        np.testing.assert_array_equal(np.asarray(new["memory"][name][0]), np.asarray(new["memory"][name][1]))
    new = jax.tree_util.tree_map(lambda x: x[0], new)

    p = variables["params"]
    def embed(f, name):
        e = f.reshape(4, -1) @ p[name]["kernel"] + p[name]["bias"]
        return e / np.linalg.norm(e, axis=1, keepdims=True)
    for bank, f, name in (("student", s_out, "embed_s"), ("teacher", t_out, "embed_t")):
        old, got = np.asarray(variables["memory"][bank]), np.asarray(new["memory"][bank])
        changed = np.flatnonzero(np.any(old != got, axis=1))
        np.testing.assert_array_equal(changed, np.sort(np.asarray(index)))
        want = old[np.asarray(index)] * 0.5 + np.asarray(embed(f[1]["pre_logits"], name)) * 0.5
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(got[np.asarray(index)], want, rtol=1e-5, atol=1e-6)
    assert bool(new["memory"]["z_set"]) and np.all(np.asarray(new["memory"]["z"]) > 0)
    # Z is fixed from the first batch: a second step keeps it.
    _, newer = two_groups(dict(variables, memory=new["memory"]), 1)
    np.testing.assert_array_equal(np.asarray(newer["memory"]["z"][0]), np.asarray(new["memory"]["z"]))
    assert np.isfinite(float(terms["crd"][0])) and float(terms["crd"][0]) > 0


# ------------------------------------------------------------------------------------------------ training
METHODS = ["kd", "dkd", "dist", "ofa", "fitnet", "crd", "rkd", "correlation"]


@pytest.mark.parametrize("method", METHODS)
def test_training_steps_reduce_the_loss(method):
    from jax.sharding import Mesh

    from rsd_jax import train       # here, not at the top: the loss tests need no data pipeline
    config = tiny_config(method, "random")
    config.data.augment.translate = 0      # the same images every step,
    config.optim.warmup_epochs = 0         # and the full learning rate from the first
    if method == "crd":
        config.distill.crd.k = 64
    run = train.build_run(config, Mesh(np.asarray(jax.devices()[:1]), ("data",)))   # one device: compiles faster
    state = run.init(jax.random.key(0))
    batch = run.train_batch(0)
    extra_before = [np.asarray(x) for x in jax.tree_util.tree_leaves(state.params["extra"])]
    losses = []
    for _ in range(4):
        state, metrics = run.train_step(state, run.teacher_vars, batch)
        jax.block_until_ready(state)
        losses.append(float(metrics["loss"]))
    terms = set(metrics) - {"loss", "lr", "grad_norm", "ce"}
    assert terms and all(np.isfinite(float(metrics[t])) for t in terms), metrics
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    # the method's own parameters (branches, aligners, embeddings) are trained with the student
    assert bool(extra_before) == (method in ("ofa", "fitnet", "crd", "correlation"))
    extra_after = jax.tree_util.tree_leaves(state.params["extra"])
    assert all(not np.array_equal(a, np.asarray(b)) for a, b in zip(extra_before, extra_after))
