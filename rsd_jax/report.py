"""Compare runs: `python -m rsd_jax.report WORKDIR... [--out DIR]`.

Finds every run under the WORKDIRs (a directory holding config.json and metrics.jsonl: a single run, each run of the
demo, each `students/<i>/` of a multi-student run), groups them by their config minus the seeds (`seed`,
`model_seed`) and the settings of how a run is run (RUN_ONLY_KEYS), and writes into DIR (default
`<first WORKDIR>/report`):

* summary.md and summary.csv: per group the number of runs (seeds), mean +- std over them of the final, best and EMA
  top-1, the teacher's top-1, epochs, training wall time and images/s; then one row per run. The std is the
  population one (ddof 0), as the demo's table always was. A finished run's numbers are its results.json; a run in
  progress (no results.json yet) is reported from its metrics.jsonl so far, marked "running", and a group's means are
  over its finished runs when it has any.
* curves.png: per group (a row), the training loss terms, the eval top-1 and the lr against epoch, one colour per run.
* comparison.png: the final top-1 of each group: each run as a dot, the mean as a diamond with the std as error bar.

The plots need matplotlib (`pip install 'rsd_jax[report]'`); the tables do not.
"""
import csv
import dataclasses
import io
import json
import os
import statistics

from absl import flags

from rsd_jax import cli, rundir
from rsd_jax.errors import UserError

USAGE = "python -m rsd_jax.report WORKDIR... [--out DIR]"
SEED_KEYS = ("seed", "model_seed")
# How a run is run, logged and checkpointed, and where its inputs live: not what it trains (cf. rundir.RESUMABLE_KEYS).
RUN_ONLY_KEYS = ("stop_after_epoch", "progress_bar", "log_every_steps", "checkpoint_every_epochs",
                 "checkpoint_every_steps", "data.data_dir", "data.eval_batch_size")
NOT_LOSS_TERMS = ("train_lr", "train_grad_norm", "train_steps")
SKIPPED_DIRS = ("checkpoints", "student", "student_ema", "tb")
DPI = 100


# ------------------------------------------------------------------------------------------------ runs
@dataclasses.dataclass
class RunInfo:
    path: str
    name: str                 # the path relative to the WORKDIR it was found under
    config: dict              # flattened: {"optim.lr": 0.05, ...}
    records: list             # metrics.jsonl
    results: dict             # results.json, or None while the run is in progress

    @property
    def finished(self):
        return self.results is not None

    @property
    def seed(self):
        """"S" for data seed S (and model seed S, its default), "S/M" when the model seed M is another."""
        seeds = [self.config[k] for k in SEED_KEYS if self.config.get(k) is not None]
        return "/".join(str(s) for s in seeds) if len(set(seeds)) > 1 else str(seeds[0]) if seeds else ""

    def _evaluated(self, key):
        return [r[key] for r in self.records if key in r]

    def value(self, key):
        """final_top1, best_top1, ema_top1, teacher_top1: results.json's when finished, else from the metrics."""
        results_key = {"final_top1": "top1"}.get(key, key)
        if self.finished and results_key in self.results:
            return self.results[results_key]
        if key == "final_top1":
            return (self._evaluated("top1") or [None])[-1]
        if key == "best_top1":
            return max(self._evaluated("top1"), default=None)
        if key == "ema_top1":
            return (self._evaluated("ema_top1") or [None])[-1]
        return (self._evaluated(key) or [None])[0]     # teacher_top1: in the first record

    @property
    def epochs(self):
        return self.records[-1]["epoch"] if self.records else 0

    @property
    def total_epochs(self):
        return self.config.get("optim.epochs")

    @property
    def wall_s(self):
        return self.records[-1].get("elapsed_s") if self.records else None

    @property
    def images_per_s(self):
        """The median over epochs (the first epoch's includes compiling)."""
        rates = self._evaluated("images_per_s")
        return statistics.median(rates) if rates else None

    @property
    def status(self):
        return "done" if self.finished else f"running ({self.epochs}/{self.total_epochs} epochs)"


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def find_runs(roots):
    """The runs under `roots` (a UserError for a root that is no directory or holds no run), sorted by path."""
    runs = []
    for root in roots:
        if not os.path.isdir(root):
            raise UserError(f"{root} is not a directory")
        found = []
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_DIRS)
            if "config.json" in files and "metrics.jsonl" in files:
                config = rundir.read_run_config(os.path.join(directory, "config.json"))
                results = _read_json(os.path.join(directory, "results.json"))
                found.append(RunInfo(
                    path=directory, name=os.path.relpath(directory, root) if directory != root else
                    os.path.basename(os.path.abspath(root)), config=rundir.flat(config),
                    records=rundir.read_metrics(os.path.join(directory, "metrics.jsonl")),
                    results=results if isinstance(results, dict) and "top1" in results else None))
        if not found:
            raise UserError(f"{root} holds no run (no directory with config.json and metrics.jsonl under it)")
        runs += found
    return runs


# ------------------------------------------------------------------------------------------------ groups
@dataclasses.dataclass
class Group:
    label: str
    runs: list

    @property
    def counted(self):
        """The runs the group's statistics are over: the finished ones, or all while none has finished."""
        return [r for r in self.runs if r.finished] or self.runs

    def stats(self, value):
        """(mean, std, n) of `value(run)` over the counted runs that have it; (None, None, 0) if none has."""
        values = [v for v in (value(r) for r in self.counted) if v is not None]
        if not values:
            return None, None, 0
        return statistics.fmean(values), statistics.pstdev(values), len(values)

    @property
    def status(self):
        done = sum(r.finished for r in self.runs)
        running = len(self.runs) - done
        return ", ".join(s for s in (f"{done} done" if done else "", f"{running} running" if running else "") if s)


def _setting(run):
    return {k: v for k, v in run.config.items() if k not in SEED_KEYS + RUN_ONLY_KEYS}


def group_runs(runs):
    """Runs with the same settings but their seeds, labelled by method and student, plus the settings that tell
    apart groups of the same method and student."""
    by_key = {}
    for run in runs:
        by_key.setdefault(json.dumps(_setting(run), sort_keys=True, default=str), []).append(run)
    settings = {key: _setting(members[0]) for key, members in by_key.items()}
    names = {key: f"{s.get('distill.method', '?')} {s.get('student.model', '?')}" for key, s in settings.items()}
    groups = []
    for key, members in by_key.items():
        same_name = [settings[k] for k in by_key if names[k] == names[key]]
        differing = sorted(k for k in set().union(*same_name) if len({json.dumps(s.get(k), default=str)
                                                                      for s in same_name}) > 1)
        label = names[key] + "".join(f" {k}={settings[key].get(k)}" for k in differing[:3])
        groups.append(Group(label, members))
    return groups


# ------------------------------------------------------------------------------------------------ tables
COLUMNS = (("final_top1", "final top-1"), ("best_top1", "best top-1"), ("ema_top1", "EMA top-1"),
           ("teacher_top1", "teacher top-1"))
MEASURES = (("epochs", "epochs"), ("wall_s", "wall time (s)"), ("images_per_s", "images/s"))


def _measure(run, key):
    return getattr(run, key) if key in dict(MEASURES) else run.value(key)


def _pm(mean, std, n):
    if mean is None:
        return "-"
    return f"{mean:.2f} +- {std:.2f}" if n > 1 else f"{mean:.2f}"


def _number(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_tables(groups):
    """summary.md's text: the groups table, then the runs table."""
    head = ["group", "runs", "status"] + [title for _, title in COLUMNS + MEASURES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [g.label, str(len(g.runs)), g.status]
        cells += [_pm(*g.stats(lambda r, k=key: r.value(k))) for key, _ in COLUMNS]
        cells += [_number(g.stats(lambda r, k=key: _measure(r, k))[0], 0) for key, _ in MEASURES]
        lines.append("| " + " | ".join(cells) + " |")
    head = ["run", "group", "seed", "status"] + [title for _, title in COLUMNS + MEASURES]
    runs = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        for r in g.runs:
            cells = [r.name, g.label, r.seed, r.status] + [_number(r.value(key)) for key, _ in COLUMNS]
            cells += [_number(_measure(r, key), 0) for key, _ in MEASURES]
            runs.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), "\n".join(runs)


def csv_text(groups):
    """summary.csv: a row per group (kind=group: mean and std over its counted runs) then per run (kind=run), with
    full-precision numbers (results.json's values as they are)."""
    keys = [key for key, _ in COLUMNS + MEASURES]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["kind", "group", "run", "seed", "status", "runs"]
                    + [f"{k}_{s}" for k in keys for s in ("mean", "std")])
    for g in groups:
        row = ["group", g.label, "", "", g.status, len(g.runs)]
        for key in keys:
            mean, std, _ = g.stats(lambda r, k=key: _measure(r, k))
            row += ["" if mean is None else mean, "" if std is None else std]
        writer.writerow(row)
    for g in groups:
        for r in g.runs:
            row = ["run", g.label, r.name, r.seed, "done" if r.finished else "running", 1]
            for key in keys:
                value = _measure(r, key)
                row += ["" if value is None else value, ""]
            writer.writerow(row)
    return out.getvalue()


# ------------------------------------------------------------------------------------------------ plots
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("the report's plots need matplotlib: pip install 'rsd_jax[report]'") from None
    matplotlib.use("Agg")     # headless
    import matplotlib.pyplot as plt
    return plt


def curves_size(num_groups):
    """curves.png's size in pixels (width, height)."""
    return 1500, 60 + 300 * num_groups


def comparison_size(num_groups):
    return 900, 120 + 50 * num_groups


def _save(fig, path):
    temporary = path + ".tmp"
    fig.savefig(temporary, format="png", dpi=DPI)
    os.replace(temporary, path)


def _figure(plt, size):
    return plt.figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")


def plot_curves(plt, groups, path):
    fig = _figure(plt, curves_size(len(groups)))
    axes = fig.subplots(len(groups), 3, squeeze=False)
    styles = ("-", "--", ":", "-.")
    for row, g in zip(axes, groups):
        loss_ax, top1_ax, lr_ax = row
        terms = sorted({k for r in g.runs for rec in r.records for k in rec
                        if k.startswith("train_") and k not in NOT_LOSS_TERMS})
        terms = ["train_loss"] + [t for t in terms if t != "train_loss"]
        for i, r in enumerate(g.runs):
            colour = f"C{i % 10}"
            for term, style in zip(terms, styles * len(terms)):
                points = [(rec["epoch"], rec[term]) for rec in r.records if term in rec]
                if points:
                    loss_ax.plot(*zip(*points), style, color=colour,
                                 label=term[len("train_"):] if i == 0 else None)
            for key, style in (("top1", "-"), ("ema_top1", "--")):
                points = [(rec["epoch"], rec[key]) for rec in r.records if key in rec]
                if points:
                    top1_ax.plot(*zip(*points), style, color=colour, marker=".",
                                 label=f"seed {r.seed.replace('/', ', model seed ')}"
                                 + (" (EMA)" if key == "ema_top1" else ""))
            points = [(rec["epoch"], rec["train_lr"]) for rec in r.records if "train_lr" in rec]
            if points:
                lr_ax.plot(*zip(*points), color=colour)
        teacher = g.stats(lambda r: r.value("teacher_top1"))[0]
        if teacher is not None:
            top1_ax.axhline(teacher, color="grey", linestyle=":", label=f"teacher {teacher:.2f}")
        loss_ax.set_title(f"{g.label}: training loss terms", fontsize=9)
        top1_ax.set_title(f"{g.label}: eval top-1 (%)", fontsize=9)
        lr_ax.set_title(f"{g.label}: learning rate", fontsize=9)
        for ax in row:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        loss_ax.legend(fontsize=7, title="term (linestyle)", title_fontsize=7)
        top1_ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)


def plot_comparison(plt, groups, path):
    """A row per group: a dot per run, the mean as a diamond with the std as an error bar (no bars from 0, so that
    close numbers stay apart)."""
    fig = _figure(plt, comparison_size(len(groups)))
    ax = fig.subplots()
    for y, g in enumerate(groups):
        values = [v for v in (r.value("final_top1") for r in g.counted) if v is not None]
        if not values:
            continue
        mean, std = statistics.fmean(values), statistics.pstdev(values)
        ax.plot(values, [y] * len(values), "o", color="C3", markersize=5, alpha=0.8, zorder=3)
        ax.errorbar(mean, y, xerr=std, fmt="D", color="black", markersize=5, capsize=5)
        ax.annotate(f"{mean:.2f} +- {std:.2f} ({len(values)} run{'s' * (len(values) > 1)})", (mean, y),
                    xytext=(0, 7), textcoords="offset points", fontsize=8, ha="center", va="bottom")
    ax.set_yticks(range(len(groups)), [g.label + ("" if g.status.endswith("done") else " (running)")
                                       for g in groups], fontsize=8)
    ax.set_ylim(len(groups) - 0.5, -0.7)
    ax.margins(x=0.15)
    ax.set_xlabel("final top-1 (%): a dot per run, the mean (diamond) +- std")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ the report
def write_report(roots, out, plots=True):
    """Write summary.md, summary.csv (and with `plots` curves.png, comparison.png) into `out` for the runs under
    `roots`; returns (the groups, the groups table in markdown)."""
    plt = _pyplot() if plots else None      # a missing matplotlib is refused before anything is written
    cli.check_writable(out, f"--out {out}")
    groups = group_runs(find_runs(roots))
    os.makedirs(out, exist_ok=True)
    group_table, run_table = markdown_tables(groups)
    text = (f"# Runs under {', '.join(roots)}\n\nmean +- std (population) over each group's finished runs; "
            f"wall time is training time summed over a run's sessions.\n\n## Groups\n\n{group_table}\n\n"
            f"## Runs\n\n{run_table}\n")
    rundir.write_atomic(os.path.join(out, "summary.md"), text)
    rundir.write_atomic(os.path.join(out, "summary.csv"), csv_text(groups))
    if plots:
        plot_curves(plt, groups, os.path.join(out, "curves.png"))
        plot_comparison(plt, groups, os.path.join(out, "comparison.png"))
    return groups, group_table


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def define_flags(FLAGS):
    flags.DEFINE_string("out", None, "Directory for summary.md, summary.csv, curves.png and comparison.png "
                        "(default: <first WORKDIR>/report).", flag_values=FLAGS)


def run(FLAGS, roots):
    if not roots:
        raise UserError(f"missing WORKDIR; usage: {USAGE}")
    out = FLAGS.out or os.path.join(roots[0], "report")
    _, group_table = write_report(roots, out)
    print(group_table)
    print(f"\nwrote summary.md, summary.csv, curves.png and comparison.png to {out}")


def main(argv=None):
    cli.run_main(run, argv, define=define_flags, args=("WORKDIR...",), usage=USAGE, compile_cache=False)


if __name__ == "__main__":
    main()
