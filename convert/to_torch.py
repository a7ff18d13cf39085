"""Export a Flax model directory as a timm state_dict: a torch.save file, a safetensors file or a timm hub folder.

    python -m convert.to_torch DIR --out OUT [--format pth|safetensors|hf] [--verify]

DIR is a model directory (converter output, or a trained model) or a training workdir holding `student/`. The
weights are a plain state_dict in the timm 1.x layout for `timm.create_model(name, num_classes=N, **kwargs)`,
where kwargs translate the model's non-default options (printed; a model timm cannot build is refused).
  --format pth          OUT is a torch.save file (the default; needs torch)
  --format safetensors  OUT is a safetensors file (no torch needed); timm reads it with
                        `pretrained=True, pretrained_cfg_overlay=dict(file=OUT, num_classes=N)`
  --format hf           OUT is a timm hub folder (no torch needed): config.json (architecture, num_classes, kwargs
                        as model_args, pretrained_cfg: input size, crop, interpolation, and the source hub folder's
                        other entries such as mean/std) and model.safetensors, what timm's save_for_hf writes;
                        `timm.create_model("local-dir:OUT", pretrained=True)` builds and loads it
Where timm is installed the weights are loaded strictly into timm before anything is written (for hf, into the
model timm builds from config.json); otherwise a note says that the load was not checked.
"""
import json
import os
import sys

import jax
import numpy as np
from absl import flags

from convert import check_out, cli_main, core, formats, verify
from rsd_jax import model_dir, models
from rsd_jax.errors import UserError


class ExportError(UserError, ValueError):
    pass


def model_directory(path):
    """`path` itself if it is a model directory, else `path/student` (a training workdir)."""
    if os.path.isfile(os.path.join(path, model_dir.MODEL_JSON)):
        return path
    student = os.path.join(path, "student")
    if os.path.isfile(os.path.join(student, model_dir.MODEL_JSON)):
        return student
    if not os.path.isdir(path):
        raise ExportError(f"{path}: no such directory")
    raise ExportError(f"{path} is neither a model directory (no {model_dir.MODEL_JSON}) nor a training workdir "
                      "with a student/ model directory")


def export(directory):
    """(state_dict of numpy arrays, metadata, timm kwargs, Flax variables) of a model directory."""
    meta = model_dir.read_model_metadata(directory)
    _, variables = models.load_model(directory)
    name, overrides = meta["model"], meta.get("overrides") or {}
    kwargs = verify.timm_kwargs(name, overrides)   # refuses what timm cannot build, before anything is written
    table = core.family_table(models.family_of(name))
    return core.variables_to_state_dict(variables, table), meta, kwargs, variables


def save_state_dict(state_dict, out):
    """torch.save to `out` atomically (a temporary sibling renamed into place)."""
    import torch
    with formats.written_atomically(out) as tmp:
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}, tmp)


def hub_config(meta, kwargs, variables):
    """The config.json of the model directory's hub folder: timm's kwargs as model_args; in pretrained_cfg the
    model's eval crop and interpolation, updated by a converted hub folder's own pretrained_cfg (mean/std, labels,
    ...), with the input size of this model."""
    name, num_classes = meta["model"], meta["num_classes"]
    model = models.create_model(name, num_classes, **(meta.get("overrides") or {}))
    x = jax.ShapeDtypeStruct(models.input_shape(model), np.float32)
    _, features = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    spec = models.model_spec(name)
    pretrained_cfg = {"crop_pct": spec.crop_pct, "interpolation": spec.interpolation,
                      **(meta.get("timm_pretrained_cfg") or {}), "input_size": [3, model.img_size, model.img_size]}
    return formats.hub_config(name, num_classes, int(features["pre_logits"].shape[-1]), kwargs, pretrained_cfg)


def check_hub_config(config, state_dict):
    """timm builds the model config.json describes (its architecture and model_args, after a JSON round trip) and
    takes the weights strictly; ExportError otherwise."""
    import timm
    args = json.loads(formats.config_text(config))["model_args"]
    try:
        model = timm.create_model(config["architecture"], **args)
    except Exception as e:  # timm raises TypeError/ValueError/AssertionError for kwargs it cannot use
        raise ExportError(f"timm cannot build {config['architecture']} from config.json's model_args {args} "
                          f"({type(e).__name__}: {e}); use --format safetensors") from None
    verify.load_strict(model, state_dict, f"the model timm builds from config.json ({config['architecture']}, "
                                          f"{args}; use --format safetensors)")


def _importable(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def _call(name, num_classes, kwargs):
    def show(v):
        return f"{v.__module__}.{v.__qualname__}" if isinstance(v, type) else repr(v)
    args = "".join(f", {k}={show(v)}" for k, v in kwargs.items())
    return f"timm.create_model({name!r}, num_classes={num_classes}{args})"


def run(FLAGS, positional):
    check_out(FLAGS.out)
    if FLAGS.format == "pth" and not _importable("torch"):
        raise ExportError("--format pth needs torch (pip install -e '.[convert]'); --format safetensors and hf "
                          "do not")
    directory = model_directory(positional[0])
    state_dict, meta, kwargs, variables = export(directory)
    name, num_classes, overrides = meta["model"], meta["num_classes"], meta.get("overrides") or {}
    config = hub_config(meta, kwargs, variables) if FLAGS.format == "hf" else None
    have_timm = _importable("timm")
    if have_timm:   # refuse weights that timm would not load
        if config is not None:
            check_hub_config(config, state_dict)
        else:
            verify.timm_model(name, num_classes, overrides, state_dict)
    elif FLAGS.verify:
        raise ExportError("--verify needs timm (pip install -e '.[convert]')")
    if FLAGS.verify:
        verify.check(name, num_classes, overrides, variables)
    if FLAGS.format == "hf":
        formats.write_hub_folder(state_dict, config, FLAGS.out)
        load = f"model = timm.create_model({'local-dir:' + os.path.abspath(FLAGS.out)!r}, pretrained=True)"
    else:
        registered = not hasattr(core.family_table(models.family_of(name)), "create_timm") or (
            have_timm and name in timm_models() and not kwargs)
        build = _call(name, num_classes, kwargs) if registered else (
            f"convert.verify.create_timm({name!r}, {num_classes}, {overrides!r})   # not a registered timm entry point")
        if FLAGS.format == "pth":
            save_state_dict(state_dict, FLAGS.out)
            weights = f"torch.load({FLAGS.out!r})"
        else:
            formats.write_safetensors(state_dict, FLAGS.out)
            weights = f"safetensors.torch.load_file({FLAGS.out!r})"
        load = f"model = {build}\n  model.load_state_dict({weights}, strict=True)"
    print(f"wrote {FLAGS.out} ({len(state_dict)} tensors, {FLAGS.format}) from {directory}; load it with\n  {load}"
          + ("" if have_timm else "\n(timm is not installed here, so the load was not checked)"))


def timm_models():
    import timm
    return timm.list_models()


USAGE = "python -m convert.to_torch DIR --out OUT [--format pth|safetensors|hf] [--verify]"


def define_flags(FLAGS):
    flags.DEFINE_string("out", None, "output: a file for pth and safetensors, a folder for hf (must not exist)",
                        flag_values=FLAGS)
    flags.DEFINE_enum("format", "pth", ["pth", "safetensors", "hf"],
                      "pth: torch.save file; safetensors: safetensors file; hf: timm hub folder (config.json + "
                      "model.safetensors); the last two need no torch", flag_values=FLAGS)
    flags.DEFINE_bool("verify", False, "compare logits and pre-logits with timm", flag_values=FLAGS)


def main(argv=None):
    return cli_main(run, argv, define=define_flags, args=("DIR",), required=("out",), usage=USAGE)


if __name__ == "__main__":
    sys.exit(main())
