"""Augmentation against torchvision/PIL and timm (resampling, eval resize, RandAugment ops) and exact mix algebra."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rsd_jax.data import augment as A

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402
import torchvision.transforms as T  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
from timm.data import auto_augment as timm_aa  # noqa: E402

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
FILL = (129, 124, 112)  # timm's img_mean for the CIFAR mean


def _image(seed=0, size=32):
    return np.random.RandomState(seed).randint(0, 256, (size, size, 3)).astype(np.uint8)


def _smooth_224(seed=0):
    """A 224 image with natural-ish local structure (RandAugment runs after the upsampling crop)."""
    return np.asarray(Image.fromarray(_image(seed)).resize((224, 224), Image.BICUBIC))


@pytest.mark.parametrize("cubic", [False, True])
def test_resized_crop_matches_torchvision_pil(cubic):
    img = _image()
    boxes = [(0, 0, 32, 32), (3, 5, 10, 17), (20, 1, 12, 9), (0, 0, 32, 20), (30, 30, 2, 2)]
    ours = np.asarray(A.resized_crop(jnp.asarray(img)[None].repeat(len(boxes), 0), jnp.array(boxes), (224, 224),
                                     jnp.full((len(boxes),), cubic)))
    mode = T.InterpolationMode.BICUBIC if cubic else T.InterpolationMode.BILINEAR
    for box, got in zip(boxes, ours):
        ref = np.asarray(TF.resized_crop(Image.fromarray(img), *box, [224, 224], mode)).astype(np.float64)
        diff = np.abs(ref - got)
        # PIL's fixed-point weights: an odd pixel off by one level.
        assert diff.max() <= 1 and diff.mean() < 0.01, (box, diff.max(), diff.mean())


def test_crop_boxes_fit_and_follow_the_ranges():
    boxes = np.asarray(A.sample_crop_boxes(jax.random.key(0), 4000, 32, 32))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    assert (h >= 1).all() and (w >= 1).all()
    area = h * w / 1024
    assert area.min() < 0.12 and area.max() == 1.0 and 0.45 < area.mean() < 0.6
    assert top.max() > 20 and left.max() > 20  # offsets spread over the free range
    # Ten tries that cannot fit -> timm's central fallback (here the whole image, a square within the ratios).
    fallback = np.asarray(A.sample_crop_boxes(jax.random.key(1), 8, 32, 32, scale=(1.5, 2.0)))
    assert (fallback == [0, 0, 32, 32]).all()
    wide = np.asarray(A.sample_crop_boxes(jax.random.key(1), 2, 20, 40, scale=(1.5, 2.0)))
    assert (wide == [0, (40 - 27) // 2, 20, 27]).all()  # in_ratio 2 > 4/3: w = round(20 * 4/3)


@pytest.mark.parametrize("model", ["resnet18", "deit_tiny_patch16_224"])
def test_eval_transform_matches_torchvision(model):
    crop_pct, interp = A.EVAL_CONFIGS[model]
    mode = T.InterpolationMode.BICUBIC if interp == "bicubic" else T.InterpolationMode.BILINEAR
    ref_tf = T.Compose([T.Resize(math.floor(224 / crop_pct), interpolation=mode), T.CenterCrop(224), T.ToTensor(),
                        T.Normalize(MEAN, STD)])
    imgs = np.stack([_image(1), _image(2)])
    ours = np.asarray(A.eval_transform(ml_collections.ConfigDict(), MEAN, STD, 224, model)(jnp.asarray(imgs)))
    for img, got in zip(imgs, ours):
        ref = ref_tf(Image.fromarray(img)).permute(1, 2, 0).numpy()
        levels = np.abs(ref - got) * np.asarray(STD) * 255
        assert levels.max() < 1.01 and levels.mean() < 0.01, (levels.max(), levels.mean())
    assert ours.shape == (2, 224, 224, 3)


def test_eval_transform_without_model_is_normalisation():
    imgs = jnp.asarray(np.stack([_image(3)]))
    got = A.eval_transform(ml_collections.ConfigDict(dict(translate=2)), MEAN, STD)(imgs)
    np.testing.assert_allclose(got, A.normalize(imgs, MEAN, STD), atol=1e-6)


def _timm_op(name, pil, arg, cubic):
    kw = dict(fillcolor=FILL, resample=Image.BICUBIC if cubic else Image.BILINEAR)
    fn = timm_aa.NAME_TO_OP[name]
    if _level_fn(name) is None:
        return fn(pil)
    if name.startswith(("Posterize", "Solarize")):
        arg = int(arg)
    if name.endswith("Rel"):
        arg = arg / 224  # our argument is in pixels, timm's a fraction of the size
    return fn(pil, arg, **kw)


def _level_fn(name):
    return A._OPS[name][1]


_TIMM_ONLY_OPS = sorted(set(A.RAND_INCREASING_TRANSFORMS) | set(A.RAND_TRANSFORMS))


@pytest.mark.parametrize("name", _TIMM_ONLY_OPS)
def test_rand_augment_op_matches_timm_pil(name):
    img = _smooth_224()
    x = jnp.asarray(img, jnp.float32)
    hp = dict(translate_pct=0.45, translate_const=100, width=224, height=224)
    is_affine = A._OPS[name][0] == "affine"
    for magnitude, sign in ((9.0, 1.0), (6.3, -1.0)):
        # Our level function against timm's (the same magnitude and sign).
        level_fn = _level_fn(name)
        arg = float(level_fn(jnp.float32(magnitude), sign, hp)) if level_fn else 0.0
        if level_fn:
            timm_level = timm_aa.LEVEL_TO_ARG[name]
            saved, timm_aa._randomly_negate = timm_aa._randomly_negate, (lambda v: -v if sign < 0 else v)
            try:
                expected = timm_level(magnitude, dict(translate_const=100))[0]
            finally:
                timm_aa._randomly_negate = saved
            if name.endswith("Rel"):
                expected *= 224
            assert arg == pytest.approx(expected, rel=1e-5, abs=1e-5), (name, arg, expected)
        for cubic in ((False, True) if is_affine else (False,)):
            ref = np.asarray(_timm_op(name, Image.fromarray(img), arg, cubic)).astype(np.float64)
            got = np.asarray(A.apply_op(name, x, arg, FILL, cubic))
            diff = np.abs(ref - got)
            # Pixel ops are exact; PIL's affine sampler differs in an odd pixel by one level (float rounding).
            if is_affine:
                assert diff.max() <= 1 and diff.mean() < 0.01, (name, cubic, diff.max(), diff.mean())
            else:
                assert diff.max() == 0, (name, diff.max())


def test_rand_augment_batch_changes_images_and_keeps_range():
    imgs = jnp.asarray(np.stack([_smooth_224(i) for i in range(4)]), jnp.float32)
    out = jax.jit(lambda x, k: A.rand_augment(x, k, "rand-m9-mstd0.5-inc1", FILL))(imgs, jax.random.key(0))
    out = np.asarray(out)
    assert out.shape == imgs.shape and out.min() >= 0 and out.max() <= 255 and (out == np.round(out)).all()
    assert (np.abs(out - np.asarray(imgs)).reshape(4, -1).max(1) > 0).sum() >= 2  # p=0.5 per op, 2 ops
    p = A.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert p == dict(magnitude=9.0, num_layers=2, std=0.5, prob=0.5, increasing=True, max=10.0)


def test_mixup_targets_exact():
    b, c = 8, 10
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(b, 6, 6, 3), jnp.float32)
    y = jnp.asarray(rng.randint(0, c, b))
    out, t = A.mix(x, y, jax.random.key(3), c, mixup_alpha=0.8, cutmix_alpha=0.0, smoothing=0.1)
    out, t = np.asarray(out), np.asarray(t)
    x, y = np.asarray(x), np.asarray(y)
    lam = ((out - x[::-1]) / (x - x[::-1]))[0, 0, 0, 0]
    np.testing.assert_allclose(out, lam * x + (1 - lam) * x[::-1], atol=1e-5)
    one = np.eye(c)[y] * 0.9 + 0.1 / c
    np.testing.assert_allclose(t, lam * one + (1 - lam) * one[::-1], atol=1e-6)
    assert np.allclose(t.sum(1), 1) and 0 < lam < 1
    from timm.data.mixup import mixup_target
    np.testing.assert_allclose(t, mixup_target(torch.as_tensor(y), c, float(lam), 0.1).numpy(), atol=1e-6)


def test_cutmix_targets_use_the_clipped_box_and_groups():
    b, c, g = 8, 5, 4
    x = jnp.arange(b, dtype=jnp.float32)[:, None, None, None] * jnp.ones((b, 16, 16, 3))
    y = jnp.arange(b) % c
    for seed in range(6):
        out, t = A.mix(x, y, jax.random.key(seed), c, mixup_alpha=0.0, cutmix_alpha=1.0, group_size=g)
        out, t = np.asarray(out), np.asarray(t)
        one = np.eye(c)[np.asarray(y)] * 0.9 + 0.1 / c
        for start in range(0, b, g):
            idx = np.arange(start, start + g)
            partner = idx[::-1]
            pasted = out[idx, :, :, 0] == partner[:, None, None]
            kept = out[idx, :, :, 0] == idx[:, None, None]
            assert (pasted | kept).all()
            lam = 1 - pasted[0].mean()  # one box per group, the same for every member
            assert (pasted.mean((1, 2)) == pasted[0].mean()).all()
            np.testing.assert_allclose(t[idx], lam * one[idx] + (1 - lam) * one[partner], atol=1e-6)
            if 0 < pasted[0].mean():
                rows, cols = np.nonzero(pasted[0])
                assert pasted[0][rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a rectangle


def test_mix_off_gives_smoothed_labels():
    x = jnp.ones((4, 4, 4, 3))
    y = jnp.array([0, 1, 2, 3])
    out, t = A.mix(x, y, jax.random.key(0), 100, prob=0.0)
    np.testing.assert_array_equal(out, x)
    assert np.isclose(t[0, 0], 0.9 + 0.001) and np.isclose(t[0, 1], 0.001)


def test_random_erase_boxes():
    x = jnp.full((64, 32, 32, 3), 7.0)
    out = np.asarray(A.random_erase(x, jax.random.key(0), prob=1.0))
    erased = (out != 7.0).all(-1)
    areas = erased.mean((1, 2))
    assert (areas > 0.01).all() and (areas < 0.36).all()
    for e in erased:
        rows, cols = np.nonzero(e)
        assert e[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert abs(out[out != 7.0].std() - 1) < 0.1  # per-pixel N(0,1)
    np.testing.assert_array_equal(A.random_erase(x, jax.random.key(0), prob=0.0), x)
    some = np.asarray(A.random_erase(x, jax.random.key(1), prob=0.25))
    assert 4 <= (some != 7.0).any((1, 2, 3)).sum() <= 28


def test_train_transforms_end_to_end():
    imgs = jnp.asarray(np.stack([_image(i) for i in range(4)]))
    labels = jnp.array([1, 2, 3, 4])
    cnn = A.default_config()
    fn = jax.jit(A.train_transform(cnn, MEAN, STD, size=64))
    out = fn(imgs, jax.random.key(0))
    assert out.shape == (4, 64, 64, 3) and out.dtype == jnp.float32
    assert not np.allclose(out, fn(imgs, jax.random.key(1)))
    vit = A.vit_recipe()
    with pytest.raises(ValueError, match="train_batch_transform"):
        A.train_transform(vit, MEAN, STD)
    fn = jax.jit(A.train_batch_transform(vit, MEAN, STD, num_classes=10, size=48, group_size=2))
    out, t = fn(imgs, labels, jax.random.key(0))
    assert out.shape == (4, 48, 48, 3) and t.shape == (4, 10) and np.allclose(t.sum(1), 1)
    # An old config with only `translate` keeps its meaning: shift + normalise, nothing else.
    legacy = A.train_transform(ml_collections.ConfigDict(dict(translate=0)), MEAN, STD)
    np.testing.assert_allclose(legacy(imgs, jax.random.key(0)), A.normalize(imgs, MEAN, STD), atol=1e-6)
