"""The reference's recipes (docs/reference.md §4.2) and the pieces every pair config shares.

Defaults reproduce the reference's setting on 2 GPUs: a global batch of 256 in 2 statistics groups of 128 (RSD's
standardisation and BatchNorm statistics per group, as per GPU), no learning-rate scaling with the batch.
Where the reference has a bug (docs/reference.md §7) the configs follow the intended behaviour; see rsd_jax/distillers.
"""
import types

import ml_collections

from rsd_jax import models
from rsd_jax.config import base_config

CIFAR_CNN_STUDENTS = ("resnet18", "mobilenetv2_100")

# {model: overrides} of a tiny member of its family for `:smoke` runs (32x32 inputs, a few steps, CPU): a read-only
# view of the models' declared smoke overrides.
SMOKE_OVERRIDES = types.MappingProxyType({name: dict(s.smoke) for name, s in models.specs().items() if s.smoke})


def cifar_cnn(c):
    """configs/cifar/cnn.yaml: SGD-Nesterov lr 0.05, wd 2e-3, cosine to 1e-3, warmup 3 epochs from 1e-4, 300 epochs,
    label smoothing 0.1, random resized crop + flip, no mixup."""
    c.optim.update(dict(name="sgd", lr=0.05, momentum=0.9, weight_decay=2e-3, schedule="cosine", epochs=300,
                        warmup_epochs=3, warmup_lr=1e-4, min_lr=1e-3, clip_grad=0.0))
    c.distill.label_smoothing = 0.1
    c.data.augment.update(dict(random_resized_crop=True, hflip=0.5, rand_augment="", mixup=0.0, cutmix=0.0,
                               random_erasing=0.0))
    return c


def cifar_vit_mlp(c):
    """configs/cifar/vit_mlp.yaml: AdamW lr 5e-4, wd 0.05, cosine to 1e-5, warmup 20 epochs from 5e-7, 300 epochs,
    clip 5, RandAugment rand-m9-mstd0.5-inc1, mixup 0.8 / cutmix 1.0 (smoothing 0.1 in the targets), erasing 0.25."""
    c.optim.update(dict(name="adamw", lr=5e-4, weight_decay=0.05, schedule="cosine", epochs=300, warmup_epochs=20,
                        warmup_lr=5e-7, min_lr=1e-5, clip_grad=5.0))
    c.distill.label_smoothing = 0.1
    c.data.augment.update(dict(random_resized_crop=True, hflip=0.5, rand_augment="rand-m9-mstd0.5-inc1",
                               mixup=0.8, cutmix=1.0, random_erasing=0.25))
    return c


def imagenet_cnn(c):
    """configs/imagenet/cnn.yaml: SGD-Nesterov lr 0.1, wd 1e-4, step decay x0.1 every 30 epochs, warmup 3 from 1e-4,
    100 epochs, 64 images per GPU, smoothing 0.1, crop + flip."""
    c.optim.update(dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="step", decay_epochs=30,
                        decay_rate=0.1, epochs=100, warmup_epochs=3, warmup_lr=1e-4, min_lr=1e-6, clip_grad=0.0))
    c.distill.label_smoothing = 0.1
    c.distill.group_size = 64
    return c


def imagenet_vit_mlp(c):
    """configs/imagenet/vit_mlp.yaml (RSD's lr 1e-3): AdamW, wd 0.05, cosine to 1e-6, warmup 20 from 5e-7, 300
    epochs, 128 per GPU, clip 5, RandAugment, mixup 0.8 / cutmix 1.0, erasing 0.25, drop_path 0, EMA 0.99996."""
    c.optim.update(dict(name="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine", epochs=300, warmup_epochs=20,
                        warmup_lr=5e-7, min_lr=1e-6, clip_grad=5.0))
    c.distill.label_smoothing = 0.1
    c.distill.group_size = 128
    c.data.augment.update(dict(rand_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, random_erasing=0.25))
    c.student.overrides = dict(c.student.overrides, drop_path_rate=0.0)
    c.ema.decay = 0.99996
    return c


def imagenet_stronger(c):
    """configs/imagenet/stronger.yaml: LAMB lr 5e-3, wd 0.02, cosine to 1e-6, warmup 5 from 1e-6, 300 epochs, 256
    per GPU, rand-m7-mstd0.5, mixup 0.1 / cutmix 1.0, drop_path 0.05, EMA 0.9998, eval crop_pct 0.95. Not
    reproduced: its BCE loss (here: soft-target CE without smoothing) and repeated augmentation (aug_repeats 3)."""
    # timm's Lamb defaults (the yaml sets neither): eps 1e-6, and the global gradient norm clipped at 1.
    c.optim.update(dict(name="lamb", lr=5e-3, weight_decay=0.02, schedule="cosine", epochs=300, warmup_epochs=5,
                        warmup_lr=1e-6, min_lr=1e-6, clip_grad=1.0, eps=1e-6))
    c.distill.label_smoothing = 0.0
    c.distill.group_size = 256
    c.data.augment.update(dict(rand_augment="rand-m7-mstd0.5", mixup=0.1, cutmix=1.0, random_erasing=0.0,
                               crop_pct=0.95))
    c.student.overrides = dict(c.student.overrides, drop_path_rate=0.05)
    c.ema.decay = 0.9998
    return c


IMAGENET_RECIPES = {"cnn": imagenet_cnn, "vit_mlp": imagenet_vit_mlp, "stronger": imagenet_stronger}


def imagenet_pair(teacher, student, recipe, gpus=8):
    """An ImageNet-1k pair: `recipe` (cnn, vit_mlp, stronger) with the reference's per-GPU batch on `gpus` GPUs as
    statistics groups (the OFA README trains ImageNet on 8 GPUs), 224 px, RSD with its defaults."""
    c = base_config()
    c.data.update(dict(name="imagenet2012", data_dir="", image_size=224))
    c.distill.method = "rsd"
    c.student.model = student
    c.teacher.model = teacher
    IMAGENET_RECIPES[recipe](c)
    c.data.batch_size = c.distill.group_size * gpus
    c.data.eval_batch_size = c.data.batch_size
    c.log_every_steps = 100
    return c


def cifar_pair(teacher, student, arg=None):
    """A CIFAR-100 pair of the reference's train.sh: RSD with its defaults, the student's recipe, 224 px."""
    c = base_config()
    c.data.update(dict(name="cifar100", data_dir="", image_size=224, batch_size=256, eval_batch_size=256))
    c.distill.group_size = 128
    c.distill.method = "rsd"
    c.student.model = student
    c.teacher.model = teacher
    c.teacher.path = ""      # a converted teacher: python -m convert.from_torch <teacher>_cifar100.pth --out DIR
    (cifar_cnn if student in CIFAR_CNN_STUDENTS else cifar_vit_mlp)(c)
    # The reference's train.py sets the interpolation to bilinear for CIFAR-100 (with its mean and std), and its
    # eval loader uses it; crop_pct stays the student's. Training still draws bilinear or bicubic at random.
    c.data.augment.eval_interpolation = "bilinear"
    c.log_every_steps = 50
    if arg == "smoke":
        smoke(c)
    elif arg == "check":
        check_size(c)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; known: smoke, check")
    return c


def check_size(c):
    """The pair's real models at 224 px on the bundled digits, a random teacher, batch 16 in 2 statistics groups
    of 8: what `python -m rsd_jax.step_check` runs on a CPU to check the full-size architectures."""
    return _on_digits(c, batch_size=16, eval_batch_size=16, group_size=8)


def _on_digits(c, batch_size, eval_batch_size, group_size, **data):
    """The bundled digits (all labels), a random teacher and 2 short epochs, keeping the pair's recipe."""
    c.data.update(dict(name="digits", data_dir="", batch_size=batch_size, eval_batch_size=eval_batch_size,
                       labelled_fraction=1.0, **data))
    c.distill.group_size = group_size
    c.teacher.path = "random"
    c.optim.update(dict(epochs=2, warmup_epochs=1))
    return c


def smoke(c):
    """Tiny members of the same families on the bundled digits, a random teacher, 2 short epochs: for CI and laptops."""
    _on_digits(c, batch_size=32, eval_batch_size=40, group_size=16, image_size=32)
    c.student.overrides = SMOKE_OVERRIDES[c.student.model]
    c.teacher.overrides = SMOKE_OVERRIDES[c.teacher.model]
    c.log_every_steps = 5
    return c


def pair_config_module(teacher, student):
    """`get_config` for a pair file."""
    return lambda arg=None: cifar_pair(teacher, student, arg)


__all__ = ["cifar_pair", "pair_config_module", "SMOKE_OVERRIDES", "ml_collections"]
