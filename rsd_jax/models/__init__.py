"""Model registry: `create_model(name, num_classes=..., **overrides)`.

Every model is a flax.linen Module taking NHWC float images and returning `(logits, features)`, where
`features["pre_logits"]` is the classifier's input and `features["stage1"]`..`["stage4"]` are the stage outputs
the reference's feature distillers use (RSD_SPEC §3). Parameter names mirror timm's module names (`layer1.0` is
`layer1_0`), so the converter's tables are lists of renames.
"""
import dataclasses
import importlib

import jax
import jax.numpy as jnp

from rsd_jax.errors import UserError

# name -> family module (rsd_jax.models.<family>). Each family module has `MODELS`: name -> constructor kwargs,
# and `build(**kwargs) -> nn.Module`.
_FAMILY_OF = {
    "resnet18": "resnet", "resnet34": "resnet", "resnet50": "resnet",
    "vit_small_patch16_224": "vit", "vit_base_patch16_224": "vit", "deit_tiny_patch16_224": "vit",
    "swin_tiny_patch4_window7_224": "swin", "swin_base_patch4_window7_224": "swin",
    "swin_nano_patch4_window7_224": "swin", "swin_pico_patch4_window7_224": "swin",
    "convnext_tiny": "convnext",
    "mixer_b16_224": "mixer", "resmlp_12_224": "mixer",
    "mobilenetv2_100": "mobilenetv2",
}


class UnknownModelError(UserError, ValueError):
    pass


def list_models():
    return sorted(_FAMILY_OF)


def family_of(name):
    if name not in _FAMILY_OF:
        raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _FAMILY_OF[name]


def _family_module(name):
    return importlib.import_module(f"rsd_jax.models.{family_of(name)}")


def model_kwargs(name, num_classes=1000, **overrides):
    """The constructor kwargs of `name` with `num_classes` and `overrides` applied (unknown keys rejected)."""
    family = _family_module(name)
    kwargs = dict(family.MODELS[name], num_classes=num_classes)
    module = family.build(**kwargs)
    fields = {f.name for f in dataclasses.fields(module)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UnknownModelError(f"{name}: unknown model option(s) {unknown}")
    for key, value in overrides.items():
        current = getattr(module, key)
        if not _same_kind(value, current):
            raise UnknownModelError(f"{name}: model option {key}={value!r} is not of the kind of its default "
                                    f"{current!r}")
    kwargs.update(overrides)
    return kwargs


def _same_kind(value, like):
    """Whether an override has the type of the option's default: bool, int, number, str, or a sequence whose items
    each have the kind of one of the default's items (JSON round trips turn tuples into lists); anything goes where
    the default is None."""
    if isinstance(like, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(like, bool)
    if isinstance(like, int):
        return isinstance(value, int)
    if isinstance(like, float):
        return isinstance(value, (int, float))
    if isinstance(like, str):
        return isinstance(value, str)
    if isinstance(like, (tuple, list)):
        return isinstance(value, (tuple, list)) and (not like or all(any(_same_kind(v, u) for u in like)
                                                                    for v in value))
    return True


def create_model(name, num_classes=1000, **overrides):
    return _family_module(name).build(**model_kwargs(name, num_classes, **overrides))


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
    ref_index: int     # index of the same tensor in the reference's feature list (RSD_SPEC §3)
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
