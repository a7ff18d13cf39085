"""Train a distillation run: `python -m rsd_jax.main --config configs/FILE.py[:arg] --workdir DIR [--config.x=y]`.

Running the same command again resumes from the latest checkpoint in DIR. SIGTERM/SIGINT stop after the current
step with a checkpoint. Several processes (one per host): add `--coordinator=HOST:PORT --num_processes=N
--process_id=I`, or `--distributed` to let JAX find them (SLURM, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID in the environment).
"""
import jax
from absl import flags

from rsd_jax import cli
from rsd_jax.errors import UserError

USAGE = "python -m rsd_jax.main --config configs/FILE.py[:arg] --workdir DIR [--config.x=y]"


def define_flags(FLAGS):
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.", flag_values=FLAGS)
    flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0, for a run over several processes.",
                        flag_values=FLAGS)
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).", flag_values=FLAGS)
    flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1 (with --coordinator).",
                         flag_values=FLAGS)
    flags.DEFINE_bool("distributed", False, "Initialise several processes from the environment (SLURM, JAX_* vars).",
                      flag_values=FLAGS)


def run(FLAGS, args):
    del args
    config, workdir = FLAGS.config, FLAGS.workdir
    if config.program == "demo":
        from rsd_jax import demo
        if demo.run(config, workdir) is None:
            print(f"stopped early with a checkpoint; resume with the same command (workdir {workdir})")
        return
    if config.program != "train":
        raise UserError(f"unknown program {config.program!r}; known: train, demo")
    cli.init_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id, FLAGS.distributed)
    from rsd_jax import train
    results = train.train_and_evaluate(config, workdir)
    if results is None:
        print(f"stopped early with a checkpoint; resume with the same command (workdir {workdir})")
    elif jax.process_index() == 0 and "settings" in results:     # several students
        for row in results["settings"]:
            print(f"{row['sweep'] or 'students'} {row['students']}: top1 {row['top1_mean']:.2f} +- "
                  f"{row['top1_std']:.2f} | best top1 {row['best_top1_mean']:.2f} +- {row['best_top1_std']:.2f}")
    elif jax.process_index() == 0:
        print(f"top1 {results['top1']:.2f} | top5 {results['top5']:.2f} | loss {results['loss']:.4f} "
              f"| best top1 {results['best_top1']:.2f}")


def main(argv=None):
    cli.run_main(run, argv, define=define_flags, config=True, required=("config", "workdir"), usage=USAGE)


if __name__ == "__main__":
    main()
