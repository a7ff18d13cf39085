"""Distillation methods. Each module `rsd_jax/distillers/<method>.py` has `default_config()` and a flax Module
class taking `(config, teacher_dim)` whose `__call__(student_out, teacher_out, labels, train)` returns a dict of
weighted loss terms; its parameters (projectors, branches) are trained with the student. `vanilla` has none.
"""
import importlib

from rsd_jax.errors import UserError

# method -> (module, class name); None for training from labels only.
_METHODS = {"vanilla": None, "kd": ("kd", "KD"), "rsd": ("rsd", "RSD")}


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


def build(method, config, teacher_dim):
    """The method's extra module (or None for vanilla)."""
    check_method(method)
    if _METHODS[method] is None:
        return None
    module_name, class_name = _METHODS[method]
    cls = getattr(importlib.import_module(f"rsd_jax.distillers.{module_name}"), class_name)
    return cls(config=config, teacher_dim=teacher_dim)
