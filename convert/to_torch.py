"""Export a Flax model directory as a timm state_dict.

    python -m convert.to_torch DIR --out model.pth [--verify]

DIR is a model directory (converter output, or a trained model) or a training workdir holding `student/`. The
.pth file is a plain state_dict in the timm 1.x layout for `timm.create_model(name, num_classes=N, **kwargs)`,
where kwargs translate the model's non-default options (printed; a model timm cannot build is refused).
"""
import os
import sys
import tempfile

import numpy as np
from absl import flags

from convert import check_out, cli_main, core, verify
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
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
    os.close(fd)
    try:
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}, tmp)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def _call(name, num_classes, kwargs):
    def show(v):
        return f"{v.__module__}.{v.__qualname__}" if isinstance(v, type) else repr(v)
    args = "".join(f", {k}={show(v)}" for k, v in kwargs.items())
    return f"timm.create_model({name!r}, num_classes={num_classes}{args})"


def run(FLAGS, positional):
    check_out(FLAGS.out)
    directory = model_directory(positional[0])
    state_dict, meta, kwargs, variables = export(directory)
    name, num_classes, overrides = meta["model"], meta["num_classes"], meta.get("overrides") or {}
    try:
        import timm
        have_timm = True
    except ImportError:
        have_timm = False
    if have_timm:   # refuse a state_dict that timm would not load
        verify.timm_model(name, num_classes, overrides, state_dict)
    elif FLAGS.verify:
        raise ExportError("--verify needs timm (pip install -e '.[convert]')")
    if FLAGS.verify:
        verify.check(name, num_classes, overrides, variables)
    save_state_dict(state_dict, FLAGS.out)
    registered = not hasattr(core.family_table(models.family_of(name)), "create_timm") or (
        have_timm and name in timm.list_models() and not kwargs)
    build = _call(name, num_classes, kwargs) if registered else \
        f"convert.verify.create_timm({name!r}, {num_classes}, {overrides!r})   # not a registered timm entry point"
    print(f"wrote {FLAGS.out} ({len(state_dict)} tensors) from {directory}; load it with\n"
          f"  model = {build}\n"
          f"  model.load_state_dict(torch.load({FLAGS.out!r}), strict=True)"
          + ("" if have_timm else "\n(timm is not installed here, so the load was not checked)"))


USAGE = "python -m convert.to_torch DIR --out model.pth [--verify]"


def define_flags(FLAGS):
    flags.DEFINE_string("out", None, "output .pth file (must not exist)", flag_values=FLAGS)
    flags.DEFINE_bool("verify", False, "compare logits and pre-logits with timm", flag_values=FLAGS)


def main(argv=None):
    return cli_main(run, argv, define=define_flags, args=("DIR",), required=("out",), usage=USAGE)


if __name__ == "__main__":
    sys.exit(main())
