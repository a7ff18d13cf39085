"""Model registry: `create_model(name, num_classes=..., **overrides)`.

Every model is a flax.linen Module taking NHWC float images and returning `(logits, features)`, where
`features["pre_logits"]` is the classifier's input and `features["stage1"]`..`["stage4"]` are the stage outputs
the reference's feature distillers use (docs/reference.md §3). Parameter names mirror timm's module names (`layer1.0` is
`layer1_0`), so the converter's tables are lists of renames.

A model's facts live beside it: each family module (`FAMILIES`) has `MODELS = {name: ModelSpec(...)}` and
`build(**kwargs) -> nn.Module`; the names here, the eval transform's crop and the `:smoke` presets are read from
those tables.
"""
import dataclasses
import functools
import importlib
from typing import Optional

import jax
import jax.numpy as jnp

from rsd_jax.errors import UserError

FAMILIES = ("resnet", "mobilenetv2", "vit", "swin", "convnext", "mixer")   # modules rsd_jax.models.<family>


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model's facts, declared in its family's `MODELS` table. Every field but `smoke` is required."""
    kwargs: dict            # constructor arguments besides num_classes: timm's architecture
    crop_pct: float         # eval resize: floor(size / crop_pct), then a centre crop, with `interpolation`,
    interpolation: str      # "bilinear" or "bicubic"; both from timm 0.6.5's default cfg, the reference's timm
    stages: tuple           # the reference's feature-list index of stage1..4 at these kwargs (docs/reference.md §3); the
                            # module's reference_stage_indices() must derive the same (it also serves other sizes)
    smoke: Optional[dict] = None   # overrides giving a tiny member (32x32 inputs) for `:smoke` runs


class UnknownModelError(UserError, ValueError):
    pass


@functools.cache
def _registry():
    """{name: (family module, ModelSpec)} from every family's table, checked once: a model without its facts, or
    whose module's `reference_stage_indices()` disagrees with its declared stages, is an error here."""
    registry = {}
    for family_name in FAMILIES:
        family = importlib.import_module(f"rsd_jax.models.{family_name}")
        for name, spec in family.MODELS.items():
            problem = f"is also in {registry[name][0].__name__}" if name in registry else _spec_problem(family, spec)
            if problem:
                raise TypeError(f"rsd_jax/models/{family_name}.py: MODELS[{name!r}] {problem}")
            registry[name] = (family, spec)
    return registry


def _spec_problem(family, spec):
    if not isinstance(spec, ModelSpec):
        return f"is a {type(spec).__name__}, not a ModelSpec"
    if not isinstance(spec.crop_pct, float) or not 0 < spec.crop_pct <= 1:
        return f"has crop_pct {spec.crop_pct!r}, not a float in (0, 1]"
    if spec.interpolation not in ("bilinear", "bicubic"):
        return f"has interpolation {spec.interpolation!r}, not 'bilinear' or 'bicubic'"
    derived = family.build(**spec.kwargs).reference_stage_indices()
    if derived != tuple(spec.stages):
        return f"declares stages {tuple(spec.stages)} where its module derives {derived}"
    return None


def list_models():
    return sorted(_registry())


def _entry(name):
    if name not in _registry():
        raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _registry()[name]


def family_of(name):
    return _entry(name)[0].__name__.rsplit(".", 1)[-1]


def model_spec(name):
    """The `ModelSpec` of `name`: its constructor kwargs, eval crop and interpolation, stages, smoke overrides."""
    return _entry(name)[1]


def specs():
    """{name: ModelSpec} of every model, by name."""
    return {name: _registry()[name][1] for name in list_models()}


def model_kwargs(name, num_classes=1000, **overrides):
    """The constructor kwargs of `name` with `num_classes` and `overrides` applied (unknown keys rejected). Lists
    in the overrides (a JSON round trip turns tuples into lists) become tuples, so every module is hashable."""
    family, spec = _entry(name)
    kwargs = dict(spec.kwargs, num_classes=num_classes)
    module = family.build(**kwargs)
    fields = {f.name for f in dataclasses.fields(module)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UnknownModelError(f"{name}: unknown model option(s) {unknown}")
    overrides = {key: _tuples(value) for key, value in overrides.items()}
    for key, value in overrides.items():
        current = getattr(module, key)
        if not _same_kind(value, current):
            raise UnknownModelError(f"{name}: model option {key}={value!r} is not of the kind of its default "
                                    f"{current!r}")
    kwargs.update(overrides)
    return kwargs


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _same_kind(value, like):
    """Whether an override has the type of the option's default: bool, int, number, str, or a tuple whose items
    each have the kind of one of the default's items; anything goes where the default is None."""
    if like is None:
        return True
    if isinstance(like, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(like, bool)
    if isinstance(like, int):
        return isinstance(value, int)
    if isinstance(like, float):
        return isinstance(value, (int, float))
    if isinstance(like, str):
        return isinstance(value, str)
    if isinstance(like, tuple):
        return isinstance(value, tuple) and (not like or all(any(_same_kind(v, u) for u in like) for v in value))
    return True


def create_model(name, num_classes=1000, **overrides):
    return _entry(name)[0].build(**model_kwargs(name, num_classes, **overrides))


def input_shape(model, batch=1):
    """NHWC input shape the model expects."""
    size = model.img_size
    return (batch, size, size, 3)


def init_shapes(model, batch=1):
    """Abstract variables (ShapeDtypeStructs) of `model`, without computing anything."""
    x = jax.ShapeDtypeStruct(input_shape(model, batch), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype), train=False))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage output usable by feature distillers (FitNet, OFA)."""
    name: str          # "stage1".."stage4", the key in the features dict
    ref_index: int     # index of the same tensor in the reference's feature list (docs/reference.md §3)
    shape: tuple       # per-example shape: (H, W, C) for maps, (L, C) for tokens (prefix tokens included)
    kind: str          # "map" or "tokens"


def stage_table(model):
    """The declared stages of `model`, with shapes at its own input size."""
    x = jnp.zeros(input_shape(model), jnp.float32)
    variables = init_shapes(model)
    _, feats = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    out = []
    for s, ref_index in enumerate(model.reference_stage_indices(), start=1):
        shape = tuple(feats[f"stage{s}"].shape[1:])
        out.append(Stage(f"stage{s}", ref_index, shape, "map" if len(shape) == 3 else "tokens"))
    return tuple(out)


def load_model(directory):
    """`(model, variables)` from a model directory (written by the converter or by training)."""
    from rsd_jax import model_dir
    meta = model_dir.read_model_metadata(directory)
    try:
        model = create_model(meta["model"], num_classes=meta["num_classes"], **meta.get("overrides", {}))
    except UnknownModelError as e:
        raise model_dir.CheckpointError(f"{directory}: {e}") from None
    return model, model_dir.load_model_variables(directory, init_shapes(model))


load_converted = load_model   # the name the converter's documentation uses


def save_model(directory, model_name, num_classes, variables, overrides=None, **extra_metadata):
    from rsd_jax import model_dir
    meta = dict(extra_metadata, model=model_name, num_classes=num_classes, overrides=dict(overrides or {}))
    model_dir.save_model(directory, variables, meta)
