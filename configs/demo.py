"""The bundled demo: a small ViT teacher distilled into a small ResNet on scikit-learn's digits.

  python -m rsd_jax.main --config configs/demo.py --workdir workdirs/demo
  python -m rsd_jax.main --config configs/demo.py:smoke --workdir /tmp/demo_smoke   # tiny, for CI

The students' cross-entropy sees the labels of only `data.labelled_fraction` of the training images; KD and RSD
see every image through the teacher.
"""
import ml_collections

from rsd_jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.program = "demo"
    c.students = 3                  # model seeds 0, 1, 2 of each method, trained side by side in one run
    c.methods = ("vanilla", "kd", "rsd")
    c.data.update(dict(name="digits", image_size=32, batch_size=64, eval_batch_size=120,
                       labelled_fraction=0.1, test_fraction=0.2))
    # Digits are small, centred and not mirror-symmetric: shifts only, and no eval resize.
    c.data.augment.update(dict(translate=2, random_resized_crop=False, hflip=0.0, crop_pct=1.0))
    c.teacher.model = "vit_small_patch16_224"
    c.teacher.overrides = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)
    c.student.model = "resnet18"
    c.student.overrides = dict(img_size=32, widths=(16, 32, 64, 128), layers=(1, 1, 1, 1))
    c.distill.kd.temperature = 4.0
    # Students: SGD-Nesterov as the reference's CNN recipe, scaled to a 15-epoch run.
    c.optim.update(dict(name="sgd", lr=0.05, weight_decay=5e-4, epochs=15, warmup_epochs=1, warmup_lr=1e-3,
                        min_lr=1e-4))
    # Teacher: AdamW as the reference's ViT recipe.
    c.teacher_optim = ml_collections.ConfigDict(dict(c.optim.to_dict(), name="adamw", lr=3e-3,
                                                     weight_decay=0.05, epochs=30, warmup_epochs=2, min_lr=1e-5))
    c.log_every_steps = 5
    if arg == "smoke":
        c.students = 2
        c.teacher.overrides = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
        c.student.overrides = dict(img_size=32, widths=(8, 16, 16, 32), layers=(1, 1, 1, 1))
        c.optim.epochs = 2
        c.teacher_optim.epochs = 2
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; known: smoke")
    return c
