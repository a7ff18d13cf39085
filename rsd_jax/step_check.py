"""Fidelity check: training steps of rsd_jax against a PyTorch + timm re-statement of the reference's step.

  python -m rsd_jax.step_check --config configs/swin_resnet18.py:smoke [--steps 3] [--seed 0] [--epoch E] [--json]
      [--student S.pth] [--teacher T.pth] [--config.distill.method=kd] [--torch_set distill.rsd.kappa=0.02]
      [--nonoise_floor] [--jitter N]

Both sides start from the same weights (timm's, ported with the converter; the method's modules from rsd_jax's
initialisation); each step, the losses of both sides, the LR and the max relative difference of every parameter,
update and statistic are printed, against rsd_jax's float32 vs PyTorch float64 and PyTorch float32's own error
(the floor). The check itself, its tolerances and what it changes in the config, is bench/step_check.py: the
PyTorch side, which this command imports only when it runs (the library never imports torch).
Exit status 1 when a loss, parameter or state differs by more than max(TOLERANCE, FLOOR_FACTOR x floor), or the
LR by more than its tolerance; 2 for a bad command line.
"""
import json
import sys

from rsd_jax import cli
from rsd_jax.errors import UserError

USAGE = "python -m rsd_jax.step_check --config configs/FILE.py[:arg] [--steps N] [--json]"


def _define(flags):
    from absl import flags as absl_flags
    absl_flags.DEFINE_integer("steps", 3, "Optimizer steps on each side.", flag_values=flags)
    absl_flags.DEFINE_integer("seed", 0, "Seed of the timm initialisation (and the run's rng).", flag_values=flags)
    absl_flags.DEFINE_integer("epoch", None, "Epoch of the checked steps (default: optim.warmup_epochs).",
                              flag_values=flags)
    absl_flags.DEFINE_bool("json", False, "Print one JSON object at the end instead of the summary line.",
                           flag_values=flags)
    absl_flags.DEFINE_string("student", None, "A torch state_dict / checkpoint file for the student (default: "
                             "random).", flag_values=flags)
    absl_flags.DEFINE_string("teacher", None, "A torch state_dict / checkpoint file for the teacher (default: "
                             "random).", flag_values=flags)
    absl_flags.DEFINE_multi_string("torch_set", [], "KEY=VALUE applied to the PyTorch side's config only.",
                                   flag_values=flags)
    absl_flags.DEFINE_bool("noise_floor", True, "Also run the PyTorch step in float64, compare rsd_jax with it and "
                           "allow FLOOR_FACTOR x the PyTorch float32 error (bench/step_check.py).", flag_values=flags)
    absl_flags.DEFINE_integer("jitter", None, "Also run this many float64 steps with the student's conv and linear "
                              "outputs rounded to a grid of 2 x JITTER x their channel's RMS, and allow FLOOR_FACTOR x "
                              "their difference too: for steps that sit on a ReLU kink (default JITTER_STEPS; "
                              "bench/step_check.py).", flag_values=flags)


def _run(flags, positional):
    del positional
    try:
        from bench import step_check as check   # the PyTorch side: torch and timm
    except ImportError as e:
        raise UserError(f"the step check needs torch and timm ({e}): pip install -e '.[convert]'") from None
    jitter = check.JITTER_STEPS if flags.jitter is None else flags.jitter
    result = check.check(flags.config, flags.steps, flags.seed, flags.epoch, flags.torch_set, flags.student,
                         flags.teacher, out=(lambda s: None) if flags.json else print, noise_floor=flags.noise_floor,
                         jitter=jitter)
    print(json.dumps(result) if flags.json else "\n".join(check.summary(result)))
    return result["ok"]


def main(argv=None):
    ok = cli.run_main(_run, argv, define=_define, config=True, required=("config",), usage=USAGE)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
