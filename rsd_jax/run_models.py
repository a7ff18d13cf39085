"""A run's two models from its config: the student it trains (fresh, or starting from `student.init`) and the frozen
teacher (`teacher.path`, or `random` for smoke tests and benchmarks), each checked against the dataset."""
import logging
import os

import flax
import jax
import jax.numpy as jnp

from rsd_jax import model_dir, models, trees
from rsd_jax.errors import UserError

log = logging.getLogger("rsd_jax")


def build_student(config, num_classes):
    return models.create_model(config.student.model, num_classes=num_classes, **config.student.overrides)


def load_teacher(config, num_classes):
    """(teacher module, variables), checked against the config's architecture and the dataset's class count."""
    path = config.teacher.path
    if not path:
        raise UserError(f"method {config.distill.method!r} needs a teacher: set --config.teacher.path "
                        "(a model directory from convert.from_torch or a finished run's <workdir>/student)")
    if path == "random":
        log.warning("teacher.path=random: the teacher is randomly initialised (smoke tests and benchmarks only)")
        teacher = models.create_model(config.teacher.model, num_classes=num_classes, **config.teacher.overrides)
        # jitted: op-by-op initialisation of a full-size teacher is far slower on CPU
        init = jax.jit(lambda rng: teacher.init(rng, jnp.zeros(models.input_shape(teacher)), train=False))
        variables = jax.block_until_ready(init(jax.random.key(config.seed + 1)))
        return teacher, variables
    if os.path.isfile(path):
        raise UserError(f"teacher {path} is a file, not a model directory; convert a PyTorch checkpoint with "
                        f"python -m convert.from_torch {path} --out DIR and set teacher.path=DIR")
    if not os.path.isdir(path):
        raise UserError(f"teacher directory {path} does not exist")
    meta = model_dir.read_model_metadata(path)
    if config.teacher.model and meta["model"] != config.teacher.model:
        raise UserError(f"teacher {path} is a {meta['model']}, but the config names {config.teacher.model}")
    if meta["num_classes"] != num_classes:
        raise UserError(f"teacher {path} has {meta['num_classes']} classes, the dataset {num_classes}")
    return models.load_model(path)


def student_initializer(config, student, num_classes):
    """variables -> variables: `student.init`'s weights (and BatchNorm statistics) where they fit, the fresh ones
    elsewhere (a classifier for another class count). Another architecture, or any other mismatch, is an error."""
    if not config.student.init:
        return lambda variables: variables
    path = config.student.init
    if not os.path.isdir(path):
        raise UserError(f"student.init directory {path} does not exist")
    meta = model_dir.read_model_metadata(path)
    if meta["model"] != config.student.model:
        raise UserError(f"student.init {path} is a {meta['model']}, but the student is a {config.student.model}")
    source = models.create_model(meta["model"], num_classes=meta["num_classes"], **meta.get("overrides", {}))
    loaded = trees.flat_leaves(model_dir.load_model_variables(path, models.init_shapes(source)))
    differences = trees.diff(models.init_shapes(student), loaded)
    heads = [name for name, _, want in differences.shapes
             if meta["num_classes"] != num_classes and want[-1] == num_classes]
    if len(differences) > len(heads):
        differences.shapes = [s for s in differences.shapes if s[0] not in heads]
        raise UserError(f"student.init {path} does not fit the student: "
                        f"{differences.describe(path, config.student.model)}")
    if heads:
        log.info("student.init: %s re-initialised (%d classes in %s, %d here)", ", ".join(heads),
                 meta["num_classes"], path, num_classes)

    def init(variables):
        flat = flax.traverse_util.flatten_dict(variables)
        flat.update({k: jnp.asarray(loaded["/".join(k)]) for k in flat if "/".join(k) not in heads})
        return flax.traverse_util.unflatten_dict(flat)
    return init
