"""Numerical check of a Flax model against timm: same weights, same random input, logits and pre-logits compared.

Used by `convert.from_torch --verify` and `convert.to_torch --verify`; needs torch and timm.
"""
import jax
import numpy as np

from convert import core
from rsd_jax import models
from rsd_jax.errors import UserError

TOLERANCE = 1e-4   # max |flax - timm| / max |timm|


class VerifyError(UserError, ValueError):
    pass


def timm_kwargs(model_name, overrides):
    """kwargs for timm.create_model that build our `model_name` with `overrides` (the family table translates)."""
    if not overrides:
        return {}
    table = core.family_table(models.family_of(model_name))
    if not hasattr(table, "timm_kwargs"):
        return dict(overrides)
    try:
        return table.timm_kwargs(dict(overrides))
    except ValueError as e:
        raise VerifyError(f"timm cannot build {model_name} with {overrides}: {e}") from None


def create_timm(model_name, num_classes, overrides):
    """The timm model (fresh random init) equal to `models.create_model(model_name, num_classes, **overrides)`:
    the family table's `create_timm` hook builds it where timm's registered entry point cannot, else
    timm.create_model with the table's kwargs. VerifyError (one line) if timm cannot build it."""
    try:
        import timm
        import torch  # noqa: F401
    except ImportError:
        raise VerifyError("timm and torch are needed for this (pip install -e '.[convert]')") from None
    kwargs = timm_kwargs(model_name, overrides)
    hook = getattr(core.family_table(models.family_of(model_name)), "create_timm", None)
    try:
        if hook is not None:
            return hook(model_name, num_classes, kwargs)
        return timm.create_model(model_name, num_classes=num_classes, **kwargs)
    except Exception as e:  # timm raises TypeError/ValueError/AssertionError for kwargs it cannot use
        raise VerifyError(f"timm.create_model({model_name!r}, num_classes={num_classes}, **{kwargs}) failed: "
                          f"{type(e).__name__}: {e}") from None


def timm_model(model_name, num_classes, overrides, state_dict):
    """The timm model holding `state_dict` (strict load), in eval mode."""
    return load_strict(create_timm(model_name, num_classes, overrides), state_dict,
                       f"timm's {model_name} with {timm_kwargs(model_name, overrides)}")


def load_strict(model, state_dict, what):
    """The timm `model` holding the numpy `state_dict` (strict load), in eval mode; VerifyError naming `what`."""
    import torch
    try:
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()},
                              strict=True)
    except RuntimeError as e:
        raise VerifyError(f"{what} does not take these weights: {' '.join(str(e).split())}") from None
    return model.eval()


def compare(model_name, num_classes, overrides, variables, batch=2, seed=0):
    """{'logits': (max abs diff, max rel diff), 'pre_logits': (...)} between the Flax model and timm."""
    import torch
    model = models.create_model(model_name, num_classes=num_classes, **overrides)
    table = core.family_table(models.family_of(model_name))
    reference = timm_model(model_name, num_classes, overrides, core.variables_to_state_dict(variables, table))
    x = np.random.RandomState(seed).randn(batch, model.img_size, model.img_size, 3).astype(np.float32)
    with torch.no_grad():
        feats = reference.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        want = {"pre_logits": reference.forward_head(feats, pre_logits=True).numpy(),
                "logits": reference.forward_head(feats).numpy()}
    with jax.default_matmul_precision("highest"):
        logits, features = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
    got = {"logits": np.asarray(logits), "pre_logits": np.asarray(features["pre_logits"])}
    out = {}
    for k in ("logits", "pre_logits"):
        diff = float(np.max(np.abs(got[k].astype(np.float64) - want[k])))
        out[k] = (diff, diff / max(float(np.max(np.abs(want[k]))), 1e-12))
    return out


def check(model_name, num_classes, overrides, variables):
    """Print the differences; VerifyError above TOLERANCE."""
    diffs = compare(model_name, num_classes, overrides, variables)
    for k, (abs_diff, rel_diff) in diffs.items():
        print(f"verify {k}: max abs diff {abs_diff:.3g}, max rel diff {rel_diff:.3g} (timm vs Flax)")
    bad = [k for k, (_, rel) in diffs.items() if not rel <= TOLERANCE]
    if bad:
        raise VerifyError(f"verification failed: {', '.join(bad)} differ from timm by more than {TOLERANCE} "
                          "relative; nothing was written")
    return diffs
