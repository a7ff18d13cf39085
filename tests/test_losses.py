"""RSD and KD losses against independent float64 numpy implementations of their formulas (docs/reference.md §1.1, §2)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsd_jax.distillers.kd import kd_loss
from rsd_jax.distillers.rsd import rsd_loss


def rsd_reference(s, t, kappa, group_size=None):
    """Spec §1.1 step by step: standardise columns over the batch (biased std, eps on the std), C = T^T S / B,
    (C - I)^2 with off-diagonal entries times kappa, summed; groups are reduced by their mean."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    group_size = group_size or len(s)
    losses = []
    for g in range(0, len(s), group_size):
        sg, tg = s[g:g + group_size], t[g:g + group_size]
        sn = (sg - sg.mean(0)) / (sg.std(0) + 1e-5)
        tn = (tg - tg.mean(0)) / (tg.std(0) + 1e-5)
        c = tn.T @ sn / len(sg)
        total = 0.0
        for i in range(c.shape[0]):
            for j in range(c.shape[1]):
                total += (c[i, j] - 1) ** 2 if i == j else kappa * c[i, j] ** 2
        losses.append(total)
    return float(np.mean(losses))


def numeric_grad(f, x, eps=1e-5):
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (f(xp) - f(xm)) / (2 * eps)
    return g


@pytest.mark.parametrize("b,d,kappa,group_size", [
    (16, 8, 0.01, None), (32, 12, 0.005, 8), (12, 20, 0.5, 6), (8, 4, 0.0, None), (24, 6, 1.0, 12)])
def test_rsd_loss_value_and_gradient(b, d, kappa, group_size):
    rng = np.random.default_rng(b * 100 + d)
    s = rng.normal(size=(b, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=d)
    t = 0.5 * s[:, ::-1] + rng.normal(size=(b, d))
    want = rsd_reference(s, t, kappa, group_size)
    got = float(rsd_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), kappa=kappa,
                         group_size=group_size))
    np.testing.assert_allclose(got, want, rtol=2e-5)

    grad_s, grad_t = jax.grad(lambda a, c: rsd_loss(a, c, kappa=kappa, group_size=group_size), argnums=(0, 1))(
        jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
    want_s = numeric_grad(lambda x: rsd_reference(x, t, kappa, group_size), s)
    want_t = numeric_grad(lambda x: rsd_reference(s, x, kappa, group_size), t)
    scale = max(np.abs(want_s).max(), np.abs(want_t).max())
    np.testing.assert_allclose(np.asarray(grad_s), want_s, atol=2e-4 * scale)
    np.testing.assert_allclose(np.asarray(grad_t), want_t, atol=2e-4 * scale)


def test_rsd_loss_floor_and_known_scale():
    # Spec §1.1: identical features cannot reach 0 when B < D (rank of C is at most B - 1) ...
    rng = np.random.default_rng(0)
    f = rng.normal(size=(16, 64)).astype(np.float32)
    floor = float(rsd_loss(f, f, kappa=0.01))
    assert floor > 0.01 * (64 ** 2 / 15 - 64) * 0.9
    # ... and independent Gaussian features sit near D + kappa * D (D - 1) / B.
    s, t = rng.normal(size=(2, 128, 96)).astype(np.float32)
    expected = 96 + 0.01 * 96 * 95 / 128
    assert abs(float(rsd_loss(s, t, kappa=0.01)) - expected) / expected < 0.05


def test_rsd_loss_groups_differ_from_whole_batch():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(2, 32, 8)).astype(np.float32)
    whole = float(rsd_loss(s, t))
    grouped = float(rsd_loss(s, t, group_size=16))
    np.testing.assert_allclose(grouped, rsd_reference(s, t, 0.01, 16), rtol=2e-5)
    assert abs(whole - grouped) > 1e-3


def test_rsd_loss_rejects_bad_shapes():
    with pytest.raises(ValueError):
        rsd_loss(jnp.zeros((8, 4)), jnp.zeros((8, 5)))
    with pytest.raises(ValueError):
        rsd_loss(jnp.zeros((10, 4)), jnp.zeros((10, 4)), group_size=4)


def kd_reference(zs, zt, temperature):
    zs, zt = np.asarray(zs, np.float64) / temperature, np.asarray(zt, np.float64) / temperature
    ps = np.exp(zs - zs.max(1, keepdims=True))
    ps /= ps.sum(1, keepdims=True)
    pt = np.exp(zt - zt.max(1, keepdims=True))
    pt /= pt.sum(1, keepdims=True)
    return float(np.sum(pt * (np.log(pt) - np.log(ps))) / len(zs) * temperature ** 2)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_value_and_gradient(temperature):
    rng = np.random.default_rng(int(temperature))
    zs, zt = rng.normal(size=(2, 6, 5)) * 3
    got = float(kd_loss(jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32), temperature=temperature))
    np.testing.assert_allclose(got, kd_reference(zs, zt, temperature), rtol=1e-5)
    grad = jax.grad(lambda z: kd_loss(z, jnp.asarray(zt, jnp.float32), temperature=temperature))(
        jnp.asarray(zs, jnp.float32))
    np.testing.assert_allclose(np.asarray(grad), numeric_grad(lambda x: kd_reference(x, zt, temperature), zs),
                               atol=1e-5)
