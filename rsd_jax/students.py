"""Several students per teacher pass (docs/students.md): `students=K` model seeds crossed with a `sweep` of S
settings make the N = K*S members of one run, trained in one jitted step against one teacher forward pass.

* `settings(config)`: the S configs of the sweep (the config itself without one), checked: a sweep may set only
  scalars that keep every shape and the method (`SWEEPABLE`, and the method's own float weights and temperatures).
* `member_configs(config)`: the N resolved configs, member i = j*K + k with setting j and model seed
  `model_seed(config) + k`: what a single run of that student would be given (`students=1`, no sweep).
* `stack` / `member`: the run's state of N members is one `TrainState` whose leaves have a leading member axis,
  except the shared step counter; a single-member run keeps the plain state.
* `summary`: the top-level results.json of a multi-student run.
"""
import ast
import copy
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from rsd_jax.errors import UserError

# Settings outside the method's own section that a sweep may vary: each is a scalar read at trace time, so the
# members' states keep the same shapes.
SWEEPABLE = ("optim.lr", "optim.weight_decay", "optim.min_lr", "optim.warmup_lr", "distill.label_smoothing",
             "distill.gt_loss_weight", "ema.decay")

DESIGNS = ("unroll", "vmap")


def model_seed(config):
    """The seed of the student's own randomness: `model_seed`, or `seed` where it is not set."""
    value = config.get("model_seed")
    return config.seed if value is None else value


def num_members(config):
    return config.get("students", 1) * max(len(config.get("sweep", ())), 1)


def _sweepable(config, key):
    if key in SWEEPABLE:
        return True
    method = config.distill.method
    prefix = f"distill.{method}."
    if not key.startswith(prefix) or method not in config.distill:
        return False
    value = config.distill[method].get(key[len(prefix):])
    return isinstance(value, float)


def parse_entry(entry):
    """'a.b=1,c.d=2' -> [('a.b', 1), ('c.d', 2)] (values read as Python literals, else kept as strings)."""
    if not isinstance(entry, str) or not entry.strip():
        raise UserError(f"sweep entry {entry!r} is not an override string such as 'distill.rsd.kappa=0.02'")
    overrides = []
    for part in re.split(r",\s*(?=[A-Za-z_][\w.]*\s*=)", entry.strip()):
        key, eq, text = part.partition("=")
        if not eq or not key.strip():
            raise UserError(f"sweep entry {entry!r}: {part!r} is not key=value")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        overrides.append((key.strip(), value))
    return overrides


def _apply(config, key, value, entry):
    section, _, name = key.rpartition(".")
    holder = config
    for part in section.split(".") if section else ():
        holder = holder[part]
    old = holder[name]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, type(old)):
        raise UserError(f"sweep entry {entry!r}: {key} must be a {type(old).__name__}, got {value!r}")
    with config.unlocked():
        holder[name] = value


def settings(config):
    """The configs of the sweep's entries, in order ([config] without a sweep)."""
    sweep = config.get("sweep", ())
    if isinstance(sweep, str) or not isinstance(sweep, (tuple, list)):
        raise UserError(f"sweep must be a tuple of override strings, e.g. \"('distill.rsd.kappa=0.005',)\"; "
                        f"got {sweep!r}")
    if not sweep:
        return [config]
    out = []
    for entry in sweep:
        c = copy.deepcopy(config)
        for key, value in parse_entry(entry):
            if not _sweepable(config, key):
                raise UserError(
                    f"sweep key {key} cannot vary between the students of one run (it would change a shape or the "
                    f"method, or is unknown); a sweep may set {', '.join(SWEEPABLE)} and the float settings of "
                    f"distill.{config.distill.method}")
            _apply(c, key, value, entry)
        out.append(c)
    if len({bool(c.ema.decay) for c in out}) > 1:
        raise UserError("sweep: ema.decay must be non-zero in every entry or in none (EMA on or off is a state "
                        "shape)")
    return out


def member_configs(config):
    """The run's N members as single-run configs (the config itself for a single-student run)."""
    if config.get("students", 1) < 1 or isinstance(config.get("students", 1), bool):
        raise UserError(f"students must be an integer >= 1, got {config.get('students')!r}")
    if num_members(config) == 1 and not config.get("sweep"):
        return [config]
    base = model_seed(config)
    members = []
    for setting in settings(config):
        for k in range(config.students):
            c = copy.deepcopy(setting)
            with c.unlocked():
                c.model_seed, c.students, c.sweep = base + k, 1, ()
            members.append(c)
    return members


def design(config, platform):
    """The multi-student step's form: `students_design`, or for "auto" the faster one measured on `platform`
    (README, Several students): "unroll" on CPU, where vmap's grouped convolutions made the step 2.7x slower at
    K=4; "unroll" elsewhere too until measured (the grouped convolution's backward pass is known to be slow on GPUs,
    jax issue 13800)."""
    del platform
    name = config.get("students_design", "auto")
    if name == "auto":
        return "unroll"
    if name not in DESIGNS:
        raise UserError(f"unknown students_design {name!r}; known: auto, {', '.join(DESIGNS)}")
    return name


# ------------------------------------------------------------------------------------------------ stacked states
def stack(states):
    """N TrainStates -> one with a leading member axis on every leaf but the (shared) step."""
    leaves = [s.replace(step=None) for s in states]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *leaves).replace(step=states[0].step)


def member(stacked, i):
    """Member `i` (an int or a slice) of a stacked state, with the shared step."""
    return jax.tree_util.tree_map(lambda x: x[i], stacked.replace(step=None)).replace(step=stacked.step)


def concat(states):
    """Stacked states (member slices) -> one, along the member axis."""
    leaves = [s.replace(step=None) for s in states]
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *leaves).replace(step=states[0].step)


# ------------------------------------------------------------------------------------------------ results
SUMMARISED = ("top1", "top5", "best_top1", "ema_top1", "ema_top5", "loss")


def summary(config, results):
    """The top-level results.json of a multi-student run: every member's results (with its sweep entry and model
    seed), and per sweep entry the mean and standard deviation (over seeds, numpy's population std) of each
    summarised metric."""
    k = config.students
    sweep = list(config.get("sweep", ())) or [""]
    members = [dict(index=i, sweep=sweep[i // k], model_seed=model_seed(config) + i % k, **r)
               for i, r in enumerate(results)]
    groups = []
    for j, entry in enumerate(sweep):
        group = members[j * k:(j + 1) * k]
        row = {"sweep": entry, "seeds": [m["model_seed"] for m in group], "students": [m["index"] for m in group]}
        for key in SUMMARISED:
            if all(key in m for m in group):
                values = np.asarray([m[key] for m in group], np.float64)
                row[f"{key}_mean"], row[f"{key}_std"] = float(values.mean()), float(values.std())
        groups.append(row)
    return {"students": members, "settings": groups}


# ------------------------------------------------------------------------------------------------ memory
def device_memory_limit():
    """Bytes one device may hold: the accelerator's allocator limit, or on CPU the host's memory shared by its
    (possibly fake) local devices."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()


def _nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def compile_if_fits(run):
    """The run's train step compiled ahead of time for its N members, after checking that the compiled program's
    memory estimate (arguments, outputs and temporaries per device) fits the device: otherwise a UserError with
    the estimate and the largest number of students that would fit (the estimate is linear in the members: the
    teacher and the batch shared, the rest per member)."""
    batch = run.train_batch(0)
    compiled = run.train_step.lower(run.abstract_state, run.teacher_vars, batch).compile()
    memory = compiled.memory_analysis()
    if memory is None:
        return compiled
    need = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes)
    limit = device_memory_limit()
    if need <= limit:
        return compiled
    n, per_setting = run.num_members, run.config.students
    shared = min(_nbytes(run.teacher_vars) + _nbytes(batch) // run.mesh.size, need)
    per_member = max((need - shared) / n, 1)
    fits = int((limit - shared) // per_member) // (n // per_setting)
    gib = 2 ** 30
    raise UserError(f"{n} students need about {need / gib:.1f} GiB per device (the compiled step's estimate), more "
                    f"than the device's {limit / gib:.1f} GiB; students={max(fits, 0)} would fit"
                    + (f" with the sweep's {n // per_setting} settings" if n != per_setting else "")
                    + ": lower --config.students (or the batch size)")
