"""What every command-line entry point shares (`run_main`): absl flags, ml_collections' --config with --config.x=y
overrides, quiet logging, and user errors as one line, exit status 2."""
import contextlib
import difflib
import logging
import os
import re
import sys
import tempfile
import time

from rsd_jax.errors import UserError


@contextlib.contextmanager
def quiet_logging():
    """Our own messages at INFO on stderr; orbax's and absl's per-save chatter only from WARNING up. Undone on exit,
    for a main called inside another program (the tests)."""
    from absl import logging as absl_logging
    ours = logging.getLogger("rsd_jax")
    saved = ours.handlers[:], ours.level, ours.propagate, absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.WARNING)
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    try:
        yield
    finally:
        ours.handlers[:], ours.level, ours.propagate = saved[0], saved[1], saved[2]
        absl_logging.set_verbosity(saved[3])


@contextlib.contextmanager
def log_file(workdir, primary=True):
    """Our messages also into `<workdir>/log.txt` (appended across resumes, each line with its UTC time) while the
    block runs, and the user error that ends it; only `primary` (process 0) writes. The progress bar is not a log
    message, so the file never gets its carriage returns."""
    if not primary:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(workdir, "log.txt"), mode="a", encoding="utf-8")
    formatter = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    ours = logging.getLogger("rsd_jax")
    ours.addHandler(handler)
    try:
        yield
    except UserError as e:
        ours.removeHandler(handler)
        handler.handle(logging.makeLogRecord({"msg": f"error: {one_line(e)}", "levelno": logging.ERROR}))
        raise
    finally:
        ours.removeHandler(handler)
        handler.close()


def one_line(e):
    return " ".join(str(e).split()) or type(e).__name__


def check_writable(path, what):
    """Fail before any work unless `path` (existing or to be created, parents included) lies under a directory this
    process can write in: the nearest existing one of `path` and its parents decides. `what` names the path in the
    error, e.g. "workdir X"."""
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{what}: {probe} is not a directory")
    try:   # a real write: os.access says yes to root even on /proc
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UserError(f"{what}: cannot write in {probe} ({e.strerror})") from None


def config_file(spec):
    """The file of a --config FILE.py[:arg]; a UserError if there is no such file."""
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found")
    return path


def _config_spec(argv):
    """The FILE.py[:arg] given to --config, or None."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if re.match(r"--?config=", arg):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _overrides(argv):
    """The dotted paths of the --config.x.y=v overrides in argv (ml_collections' pattern, `--noconfig.x` included)."""
    return [arg.split("=", 1)[0].split(".", 1)[1] for arg in argv if re.match(r"--?(no)?config\.", arg)]


def _exceptions(e):
    """`e` and the exceptions it was raised while handling, outermost first."""
    while e is not None:
        yield e
        e = e.__context__


def _raised_in(e, function):
    """Whether `function` was running where `e` was raised."""
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is function.__code__:
            return True
        tb = tb.tb_next
    return False


def _unknown_config_key(spec, argv):
    """What is wrong with the first override in argv that names no field of the config, or None: the config as the
    file makes it (without the overrides) is walked the way ml_collections walks it, with its suggestion rule."""
    from ml_collections.config_flags import config_flags
    config = config_flags.ConfigFileFlagParser("config", lock_config=False).parse(spec)
    for path in _overrides(argv):
        node, done = config, []
        for part in path.split("."):
            if not hasattr(node, "keys"):
                return f"config key '{'.'.join(done)}' is a {type(node).__name__}, it has no field '{part}'"
            if part not in node:
                near = difflib.get_close_matches(part, [str(k) for k in node.keys()], 1, 0.75)
                hint = f" (did you mean '{'.'.join(done + near)}'?)" if near else ""
                return f"unknown config key '{'.'.join(done + [part])}'{hint}"
            node, done = node[part], done + [part]
    return None


def _command_line_error(e, spec, argv, flag_values):
    """The one-line message for an exception absl or ml_collections raised while parsing argv, or None where the
    exception is not about the command line (a bug, which keeps its traceback)."""
    from absl import flags
    from ml_collections.config_flags import config_flags
    path = spec.partition(":")[0] if spec else None
    # The config file's own failure (raised in its code, or its load): ml_collections re-raises a TypeError or
    # ValueError as a new one holding the traceback text, inside absl's IllegalFlagValueError; the innermost one
    # raised under the file parser is the file's.
    own = [x for x in _exceptions(e) if _raised_in(x, config_flags.ConfigFileFlagParser.parse)]
    if own:
        cause = own[-1]
        if isinstance(cause, AttributeError) and cause.name == "get_config" and \
                getattr(cause.obj, "__name__", None) == "config_config":
            return f"config file {path} has no get_config()"
        return f"--config {spec}: {one_line(cause)}"
    if isinstance(e, OSError) and isinstance(e.__cause__, OSError):   # a file ml_collections could not read
        return f"config file {path}: {e.__cause__.strerror or one_line(e.__cause__)}"
    if isinstance(e, flags.UnrecognizedFlagError):
        if e.flagname.startswith("config.") and "config" in flag_values:
            return f"--{e.flagname} needs --config FILE.py[:arg]"
        names = [name for name in flag_values if "." not in name]
        near = difflib.get_close_matches(e.flagname, names, 1, 0.75)
        return f"unknown flag --{e.flagname}" + (f" (did you mean --{near[0]}?)" if near else "")
    if isinstance(e, (KeyError, AttributeError, IndexError)) and spec:   # an override naming no field
        return _unknown_config_key(spec, argv) or f"bad --config override: {one_line(e)}"
    if isinstance(e, (flags.Error, ValueError, TypeError)):   # a bad value, a missing one, an override too early
        return f"bad command line: {one_line(e)}"
    return None


def define_config(flag_values, argv):
    """--config FILE.py[:arg] with its --config.x=y overrides (ml_collections.config_flags, the config locked), the
    overrides read from argv (program name first) rather than sys.argv."""
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Python config file, optionally FILE.py:arg.",
                                    flag_values=flag_values, lock_config=True, sys_argv=argv)


def parse_flags(argv, flag_values=None):
    """absl flag parsing of argv (program name first) into `flag_values` (default: absl's global FLAGS), a --config
    file and its overrides included, with errors as UserError; returns the positional arguments."""
    from absl import flags
    fv = flags.FLAGS if flag_values is None else flag_values
    spec = _config_spec(argv[1:]) if "config" in fv else None
    path = config_file(spec) if spec else None
    # ml_collections loads every config file as the module "config_config", into the previous one if it exists:
    # a file without get_config() would get the last file's.
    sys.modules.pop("config_config", None)
    try:
        rest = fv(argv)
        if spec:
            fv.config.keys   # a config file that failed to load raises only when read
    except Exception as e:  # noqa: BLE001  sorted by _command_line_error; what it does not know is re-raised
        message = _command_line_error(e, spec, argv, fv)
        if message is None:
            raise
        raise UserError(message) from None
    if spec and fv.config is None:
        raise UserError(f"config file {path}: get_config() returned None")
    if not flags.FLAGS.is_parsed():   # absl's log handler prints a warning before the global flags are parsed
        flags.FLAGS.mark_as_parsed()
    return rest[1:]


def enable_compilation_cache():
    """XLA's persistent compilation cache (unless JAX_COMPILATION_CACHE_DIR already chooses one): a second run of the
    same program, e.g. another seed, starts without compiling."""
    import jax
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/rsd_jax/jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def init_distributed(coordinator=None, num_processes=None, process_id=None, from_environment=False):
    """`jax.distributed.initialize` for a run over several processes: explicit (all three given) or detected from the
    environment (SLURM, JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID); nothing for one process."""
    import jax
    if coordinator is None and num_processes is None and process_id is None and "JAX_NUM_PROCESSES" in os.environ:
        try:    # JAX itself reads only JAX_COORDINATOR_ADDRESS; the count and index come from here
            coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
            num_processes, process_id = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise UserError("JAX_NUM_PROCESSES needs JAX_COORDINATOR_ADDRESS and an integer JAX_PROCESS_ID") from None
    explicit = (coordinator, num_processes, process_id)
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise UserError("--coordinator, --num_processes and --process_id go together")
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process_id {process_id} is not in 0..{num_processes - 1}")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif from_environment or "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize()


def _quiet_closed_event_loops(unraisable, default=sys.unraisablehook):
    """orbax's asyncio helpers, after a failed restore of a damaged checkpoint (which we report ourselves), print an
    ignored 'Event loop is closed' traceback; only that one is silenced."""
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
        return
    default(unraisable)


def _print_help(usage, flag_values):
    """The usage line and the command's flags (absl's help text without its per-module headings)."""
    lines = [line for line in flag_values.get_help(include_special_flags=False).splitlines() if line[:1] == " "]
    print("\n".join([f"usage: {usage}", "", *lines]))


def _check_arguments(positional, args, usage):
    """The positional arguments against their names (`run_main`'s `args`)."""
    variadic = bool(args) and args[-1].endswith("...")
    fixed = list(args[:-1] if variadic else args)
    if len(positional) < len(fixed):
        raise UserError(f"missing {' '.join(fixed[len(positional):])}" + (f"; usage: {usage}" if usage else ""))
    if len(positional) > len(fixed) and not variadic:
        raise UserError(f"unexpected argument {positional[len(fixed)]!r} (options are written --name=value)")


def run_main(fn, argv=None, *, define=None, config=False, args=(), required=(), usage=None, compile_cache=True,
             status=False):
    """The main of every command line: absl flags parsed from `argv` (the arguments after the program name; default
    sys.argv[1:]), then `fn`; a UserError, raised by `fn` or made from a bad command line, becomes one line `error: ...`
    on stderr and exit status 2.

    `define(FLAGS)` defines the command's flags on a fresh absl FlagValues (so a main called twice in one process starts
    from the defaults each time), then `fn(FLAGS, positional)` runs. config=True adds --config FILE.py[:arg] and its
    --config.x=y overrides. `args` names the positional arguments, a last name ending in "..." taking any number;
    `required` names flags that must be given; `usage`, one line, is shown with those errors and by --help.
    Without `define` the flags are absl's global FLAGS, defined by the caller, and `fn(argv)` gets the program name
    and the positional arguments (absl's app.run convention).
    compile_cache=False leaves XLA's persistent compilation cache off (the benchmarks time real compiles).
    status=True returns the exit status (0, or 2 after the message) for `sys.exit(main())`; otherwise `fn`'s result
    is returned and an error exits."""
    from absl import flags
    sys.unraisablehook = _quiet_closed_event_loops   # for the whole process: orbax's loops close at its exit
    if compile_cache:
        enable_compilation_cache()
    argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    fv = flags.FlagValues() if define else flags.FLAGS
    if define:
        define(fv)
        if config:
            define_config(fv, argv)
        if usage and any(a in ("-h", "-help", "--help", "--helpfull") for a in argv[1:]):
            _print_help(usage, fv)
            return 0 if status else None
    with quiet_logging():
        try:
            positional = parse_flags(argv, fv)
            _check_arguments(positional, args, usage)
            missing = [name for name in required if fv[name].value in (None, "")]
            if missing:
                raise UserError(f"missing --{missing[0]}" + (f"; usage: {usage}" if usage else ""))
            result = fn(fv, positional) if define else fn(argv[:1] + positional)
        except UserError as e:
            message = re.sub(r"\s*\n\s*", " ", str(e).strip())   # one line, whatever the message holds
            print(f"error: {message}", file=sys.stderr)
            if status:
                return 2
            sys.exit(2)
    return 0 if status else result
