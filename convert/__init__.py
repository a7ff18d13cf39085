"""torch/timm <-> Flax conversion. Imports torch only in the CLIs and the parity check; core.py is numpy."""
import sys


def run_cli(parser, run, argv=None):
    """The converter CLIs' main: run(parsed args); a user error (rsd_jax's UserError, a ConversionError) is one line
    on stderr and exit status 2."""
    from convert import core
    from rsd_jax.errors import UserError
    args = parser().parse_args(argv)
    try:
        run(args)
    except (UserError, core.ConversionError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0
