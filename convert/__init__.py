"""torch/timm <-> Flax conversion. Imports torch only in the CLIs' torch.save paths and the parity check; core.py and
formats.py (safetensors files, timm hub folders) are torch-free."""
import contextlib
import os
import signal
import sys


def check_out(out):
    """Refuse an --out that exists or cannot be created, before anything is loaded or converted."""
    from rsd_jax.cli import check_writable
    from rsd_jax.errors import UserError
    if os.path.lexists(out):
        raise UserError(f"{out} already exists; choose another --out or remove it")
    check_writable(out, f"--out {out}")   # the writes create missing parents, so the nearest existing one decides


@contextlib.contextmanager
def signals_exit():
    """SIGTERM and SIGINT raise SystemExit (status 128 + signal), so the writes' cleanup removes their temporary;
    the default SIGTERM handler ends the process without running any."""
    def stop(signum, frame):
        print(f"interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        raise SystemExit(128 + signum)
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def cli_main(run, argv, **kwargs):
    """The converter CLIs' main: `rsd_jax.cli.run_main(run, argv, **kwargs)` returning the exit status, with SIGTERM
    and SIGINT raising SystemExit while `run` runs, and core's ConversionError (a ValueError for library callers)
    the user's: a checkpoint that does not fit."""
    from convert import core
    from rsd_jax import cli
    from rsd_jax.errors import UserError

    def guarded(FLAGS, args):
        with signals_exit():
            try:
                return run(FLAGS, args)
            except core.ConversionError as e:
                raise UserError(str(e)) from None
    return cli.run_main(guarded, argv, status=True, **kwargs)
