"""Distillation methods. Each module `rsd_jax/distillers/<method>.py` has `default_config()` and a flax Module
class (a `base.Method`) with fields `config` (its config section) and `context` (a `Context`), whose
`__call__(student_out, teacher_out, batch, train)` returns a dict of weighted loss terms, and whose
`example_batch(n)` gives the batch entries it reads, for initialisation.

* `student_out`, `teacher_out`: the models' `(logits, features)`; the teacher's is constant.
* `batch`: `label` (int, or soft (B, C) targets under mixup), `label_mask`, `index` (dataset indices).
* It runs once per statistics group, under `jax.vmap(..., axis_name="group")`: batch statistics are per group
  (as per GPU in the reference); `jax.lax.all_gather(x, "group", tiled=True)` reaches the whole global batch.
* Its parameters (projectors, branches) are trained with the student. Its other collections (`batch_stats`,
  memory banks, ...) live in the train state: `batch_stats` is averaged over groups after each step; any other
  collection must be updated identically in every group (gather first), and group 0's value is kept.
`vanilla` has no module.
"""
import dataclasses
import importlib

from rsd_jax.errors import UserError

# method -> (module, class name); None for training from labels only.
_METHODS = {"vanilla": None, "kd": ("kd", "KD"), "dkd": ("dkd", "DKD"), "dist": ("dist", "DIST"),
            "ofa": ("ofa", "OFA"), "fitnet": ("fitnet", "FitNet"), "crd": ("crd", "CRD"), "rkd": ("rkd", "RKD"),
            "correlation": ("correlation", "Correlation"), "rsd": ("rsd", "RSD")}


def list_methods():
    return sorted(_METHODS)


def check_method(method):
    if method not in _METHODS:
        raise UserError(f"unknown distillation method {method!r}; known: {', '.join(list_methods())}")


def needs_teacher(method):
    check_method(method)
    return _METHODS[method] is not None


def default_configs():
    """{method: its default config} for every method that has one (a config's `distill.<method>` section)."""
    return {m: importlib.import_module(f"rsd_jax.distillers.{spec[0]}").default_config()
            for m, spec in _METHODS.items() if spec}


@dataclasses.dataclass(frozen=True)
class Context:
    """What a method may need to know about the run when it builds its modules."""
    num_classes: int
    num_train_examples: int
    teacher_dim: int            # width of the teacher's pre-logits (0 without a teacher)


def build(method, config, context):
    """The method's extra module (or None for vanilla)."""
    check_method(method)
    if _METHODS[method] is None:
        return None
    module_name, class_name = _METHODS[method]
    cls = getattr(importlib.import_module(f"rsd_jax.distillers.{module_name}"), class_name)
    return cls(config=config, context=context)
