"""Tiny run configs for tests: the real families at toy widths on 16x16 digits."""
from rsd_jax.config import base_config

TINY_STUDENT = dict(model="resnet18", overrides=dict(img_size=16, widths=(4, 8, 8, 16), layers=(1, 1, 1, 1)))
TINY_TEACHER = dict(model="vit_small_patch16_224",
                    overrides=dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2))


def tiny_config(method="rsd", teacher_path="random", epochs=2, **data):
    c = base_config()
    c.data.update(dict(name="digits", image_size=16, batch_size=32, eval_batch_size=40, **data))
    c.data.augment.update(dict(translate=1, random_resized_crop=False, hflip=0.0, crop_pct=1.0))
    c.student.update(TINY_STUDENT)
    c.teacher.update(dict(TINY_TEACHER, path=teacher_path if method != "vanilla" else ""))
    c.distill.method = method
    c.optim.update(dict(epochs=epochs, warmup_epochs=1, lr=0.05))
    c.progress_bar = False
    return c
