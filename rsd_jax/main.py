"""Train a distillation run: `python -m rsd_jax.main --config configs/FILE.py[:arg] --workdir DIR [--config.x=y]`.

Running the same command again resumes from the latest checkpoint in DIR.
"""
from absl import flags
from ml_collections import config_flags

from rsd_jax import cli
from rsd_jax.errors import UserError

config_flags.DEFINE_config_file("config", None, "Python config file, optionally FILE.py:arg.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")


def run(argv):
    del argv
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if config is None or not workdir:
        raise UserError("usage: python -m rsd_jax.main --config configs/FILE.py[:arg] --workdir DIR")
    if config.program == "demo":
        from rsd_jax import demo
        demo.run(config, workdir)
        return
    if config.program != "train":
        raise UserError(f"unknown program {config.program!r}; known: train, demo")
    from rsd_jax import train
    results = train.train_and_evaluate(config, workdir)
    if results is not None:
        print(f"top1 {results['top1']:.2f} | top5 {results['top5']:.2f} | loss {results['loss']:.4f} "
              f"| best top1 {results['best_top1']:.2f}")


def main():
    cli.run_main(run)


if __name__ == "__main__":
    main()
