"""Fidelity check: training steps of rsd_jax against a PyTorch + timm re-statement of the reference's step.

  python -m rsd_jax.step_check --config configs/swin_resnet18.py:smoke [--steps 3] [--seed 0] [--epoch E] [--json]
      [--student S.pth] [--teacher T.pth] [--config.distill.method=kd] [--torch_set distill.rsd.kappa=0.02]
      [--nonoise_floor] [--jitter N]

Both sides start from the same weights (timm's, ported with the converter; the method's modules from rsd_jax's
initialisation); each step, the losses of both sides, the LR and the max relative difference of every parameter,
update and statistic are printed, against rsd_jax's float32 vs PyTorch float64 and PyTorch float32's own error
(the floor). The check itself, and what it changes in the config, is bench/step_check.py: the PyTorch side, which
this command imports only when it runs (the library never imports torch).
Exit status 1 when a loss, parameter or state differs by more than max(TOLERANCE, FLOOR_FACTOR x floor), or the
LR by more than its tolerance; 2 for a bad command line.
"""
import json
import sys


def _flags(check):
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Python config file, optionally FILE.py:arg.", lock_config=True)
    flags.DEFINE_integer("steps", 3, "Optimizer steps on each side.")
    flags.DEFINE_integer("seed", 0, "Seed of the timm initialisation (and the run's rng).")
    flags.DEFINE_integer("epoch", None, "Epoch of the checked steps (default: optim.warmup_epochs).")
    flags.DEFINE_bool("json", False, "Print one JSON object at the end instead of the summary line.")
    flags.DEFINE_string("student", None, "A torch state_dict / checkpoint file for the student (default: random).")
    flags.DEFINE_string("teacher", None, "A torch state_dict / checkpoint file for the teacher (default: random).")
    flags.DEFINE_multi_string("torch_set", [], "KEY=VALUE applied to the PyTorch side's config only.")
    flags.DEFINE_bool("noise_floor", True, "Also run the PyTorch step in float64, compare rsd_jax with it and allow "
                      f"{check.FLOOR_FACTOR}x the PyTorch float32 error.")
    flags.DEFINE_integer("jitter", check.JITTER_STEPS, "Also run this many float64 steps with the student's conv and "
                         f"linear outputs rounded to {2 * check.JITTER:g} x their channel's RMS, and allow "
                         f"{check.FLOOR_FACTOR}x their difference too: for steps that sit on a ReLU kink.")
    return flags.FLAGS


def main(argv=None):
    from bench import step_check as check   # the PyTorch side: torch and timm
    from rsd_jax import cli
    from rsd_jax.errors import UserError
    FLAGS = _flags(check)
    status = {}

    def run(argv):
        del argv
        if FLAGS.config is None:
            raise UserError("usage: python -m rsd_jax.step_check --config configs/FILE.py[:arg] [--steps N]")
        quiet = FLAGS.json
        result = check.check(FLAGS.config, FLAGS.steps, FLAGS.seed, FLAGS.epoch, FLAGS.torch_set, FLAGS.student,
                             FLAGS.teacher, out=(lambda s: None) if quiet else print, noise_floor=FLAGS.noise_floor,
                             jitter=FLAGS.jitter)
        print(json.dumps(result) if quiet else "\n".join(check.summary(result)))
        status["ok"] = result["ok"]

    cli.run_main(run, argv)
    sys.exit(0 if status.get("ok") else 1)


if __name__ == "__main__":
    main()
