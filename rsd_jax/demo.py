"""The bundled demo: train a small ViT teacher on the digits, then distil a small ResNet student from it three
ways (from scratch, KD, RSD), each as one run of `config.students` students (model seeds 0, 1, ...: the same
batches, and one teacher pass per step for all of them), and print a table of held-out top-1, mean +- std over the
students: the report's (`rsd_jax.report`, also written to `<workdir>/report/`).

Every run lives in its own sub-directory of the workdir and resumes like any other run, so running the demo
again only does what is missing. The numbers also go to `<workdir>/results.json`.
"""
import copy
import json
import os

import ml_collections
import numpy as np

from rsd_jax import report, rundir, train

METHOD_KEYS = {"vanilla": "scratch_top1", "kd": "kd_top1", "rsd": "rsd_top1"}


def teacher_config(config):
    """The teacher run: the teacher architecture trained from every label, no distillation."""
    c = copy.deepcopy(config)
    with c.unlocked():
        c.program = "train"
        c.students, c.sweep = 1, ()
        c.student = ml_collections.ConfigDict(dict(model=config.teacher.model,
                                                    overrides=config.teacher.overrides.to_dict(), init=""))
        c.teacher.path = ""
        c.distill.method = "vanilla"
        c.data.labelled_fraction = 1.0
        c.optim = copy.deepcopy(config.teacher_optim)
    return c


def student_config(config, method, teacher_dir):
    c = copy.deepcopy(config)
    with c.unlocked():
        c.program = "train"
        c.distill.method = method
        c.teacher.path = teacher_dir if method != "vanilla" else ""
    return c


def run(config, workdir):
    """The demo's table as a dict (also in `workdir/results.json`), or None when a run stopped early (a signal or
    stop_after_epoch) with a checkpoint: the same command resumes it and goes on."""
    rundir.check_workdir(workdir)
    with rundir.WorkdirLock(workdir):     # the whole demo; each run locks its own sub-directory as well
        return _run(config, workdir)


def _run(config, workdir):
    print(f"demo: teacher {config.teacher.model} on {config.data.name} (all labels)")
    teacher = train.train_and_evaluate(teacher_config(config), os.path.join(workdir, "teacher"))
    if teacher is None:
        return None
    teacher_dir = os.path.join(workdir, "teacher", "student")
    top1 = {}
    for method in config.methods:
        print(f"demo: {config.students} x student {config.student.model}, {method} "
              f"({config.data.labelled_fraction:.0%} of the labels)")
        result = train.train_and_evaluate(student_config(config, method, teacher_dir), os.path.join(workdir, method))
        if result is None:
            return None
        top1[method] = [r["top1"] for r in result["students"]] if "students" in result else [result["top1"]]

    results = {"teacher_top1": teacher["top1"], "students": config.students,
               "labelled_fraction": config.data.labelled_fraction}
    for method in config.methods:
        values = np.asarray(top1[method])
        key = METHOD_KEYS.get(method, f"{method}_top1")
        results[key] = float(values.mean())
        results[key[:-len("top1")] + "top1_runs"] = [float(v) for v in values]
    rundir.write_atomic(os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
    # The table is the report's (rsd_jax.report): one group per method, mean +- std over the seeds.
    plots = report.have_matplotlib()
    _, table = report.write_report([workdir], os.path.join(workdir, "report"), plots=plots)
    print(f"\nheld-out top-1 (%) on {config.data.name}, {config.students} seed(s) "
          f"({config.data.labelled_fraction:.0%} of the labels for the students):")
    print(table)
    print(f"report: {os.path.join(workdir, 'report')}" + ("" if plots else
          " (tables only; the plots need matplotlib: pip install 'rsd_jax[report]')"))
    return results
