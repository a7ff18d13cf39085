"""The library never imports torch or timm: every module under rsd_jax/, imported in a fresh interpreter, leaves
neither in sys.modules (the PyTorch side lives in bench/ and convert/)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANNED = ("torch", "timm")

# Imports the modules named in argv, in order, in this interpreter, and stops at the first one after which a banned
# module is in sys.modules (torch cannot be unloaded, so later ones could not be judged here). The CLIs define absl
# flags at import and two share a name (--workdir in main and evaluate): the flags a module defined are deleted
# after its import, so that the next one imports whole.
IMPORT = f"""
import importlib, json, sys, traceback
from absl import flags

checked, errors, offender = [], {{}}, None
for name in sys.argv[1:]:
    defined = set(flags.FLAGS)
    try:
        importlib.import_module(name)
    except Exception:
        errors[name] = traceback.format_exc(limit=-1).strip().splitlines()[-1]
    for flag in set(flags.FLAGS) - defined:
        delattr(flags.FLAGS, flag)
    checked.append(name)
    banned = [m for m in {BANNED!r} if m in sys.modules]
    if banned:
        offender = dict(module=name, imports=banned)
        break
print(json.dumps(dict(checked=checked, errors=errors, offender=offender)))
"""


def import_in_fresh_interpreter(modules):
    out = subprocess.run([sys.executable, "-c", IMPORT, *modules], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def library_modules():
    """Every module under rsd_jax/, found by walking the package (as pkgutil sees it, in a fresh interpreter)."""
    out = subprocess.run([sys.executable, "-c", "import pkgutil, rsd_jax; print(' '.join(m.name for m in "
                          "pkgutil.walk_packages(rsd_jax.__path__, 'rsd_jax.')))"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def test_no_module_of_the_library_imports_torch_or_timm():
    modules = library_modules()
    assert len(modules) > 30 and "rsd_jax.step_check" in modules, modules
    offenders, errors, rest = {}, {}, modules
    while rest:   # one interpreter when none offends; after an offender, a fresh one for the modules after it
        result = import_in_fresh_interpreter(rest)
        errors.update(result["errors"])
        if result["offender"]:
            offenders[result["offender"]["module"]] = result["offender"]["imports"]
        rest = rest[len(result["checked"]):]
    assert not errors, errors
    assert not offenders, f"library modules that import torch or timm: {offenders}"
