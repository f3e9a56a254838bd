"""Reports over runs: a table of runs sorted by an objective, with what differs between their configs, as Markdown
and CSV, and PNG plots (training curves overlaid; the objective against each swept hyperparameter). Reads only each
run's metrics.jsonl and config.yaml, so it works offline, on one run or on a whole sweep."""

import csv
import json
import os
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from mlsys.errors import MlsysError  # noqa: E402


@dataclass
class Run:
    path: str
    rows: list
    config: dict  # flattened: "optim.lr" -> value
    overrides: list  # the command line's overrides (Hydra's .hydra/overrides.yaml), if Hydra launched the run


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def find_runs(root: str) -> list[Run]:
    if not os.path.isdir(root):
        raise MlsysError(f"{root!r}: no such directory; give a run dir or a sweep dir")
    runs = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "wandb", "export", "profile"))
        if "metrics.jsonl" in files:
            cfg_path = next((p for p in (os.path.join(here, "config.yaml"), os.path.join(here, ".hydra", "config.yaml"))
                             if os.path.isfile(p)), None)
            config = flatten(yaml.safe_load(open(cfg_path))) if cfg_path else {}
            rows = [json.loads(line) for line in open(os.path.join(here, "metrics.jsonl")) if line.strip()]
            overrides_path = os.path.join(here, ".hydra", "overrides.yaml")
            overrides = yaml.safe_load(open(overrides_path)) or [] if os.path.isfile(overrides_path) else []
            runs.append(Run(here, rows, config, [str(o) for o in overrides]))
    if not runs:
        raise MlsysError(f"{root!r} holds no runs (no metrics.jsonl below it); train one with experiments.run")
    return runs


MODES = ("min", "max", "last")


def objective(run: Run, metric: str, mode: str) -> float | None:
    """metric is "<split>.<name>", e.g. val.accuracy; mode picks the lowest, highest or last value the run logged."""
    split, _, name = metric.partition(".")
    values = [r[name] for r in run.rows if r.get("split") == split and name in r]
    if not values:
        return None
    return {"min": min, "max": max, "last": lambda v: v[-1]}[mode](values)


def run_objective(run_dir: str, metric: str, mode: str) -> float:
    """The objective of one finished run, from its metrics.jsonl."""
    run = next(r for r in find_runs(run_dir) if os.path.samefile(r.path, run_dir))
    value = objective(run, metric, mode)
    if value is None:
        raise MlsysError(f"sweep.objective={metric!r}: the run did not log it (it logged {logged_metrics(run.rows)}); "
                         f"pick one of those")
    return value


def logged_metrics(rows: list) -> list[str]:
    return sorted({f"{r['split']}.{k}" for r in rows for k in r if k not in ("step", "split")})


def write_report(root: str, metric: str | None = None, mode: str | None = None, out: str | None = None) -> str:
    """Write report.md, report.csv, curves.png and objective_<key>.png into `out` (default: `root`). The objective
    defaults to the one the runs were trained for (their sweep.objective and sweep.mode)."""
    runs = find_runs(root)
    metric = metric or runs[0].config.get("sweep.objective", "val.loss")
    mode = mode or runs[0].config.get("sweep.mode", "min")
    if mode not in MODES:
        raise MlsysError(f"mode={mode!r}: must be one of {list(MODES)}")
    scores = {r.path: objective(r, metric, mode) for r in runs}
    if all(v is None for v in scores.values()):
        logged = logged_metrics([r for run in runs for r in run.rows])
        raise MlsysError(f"metric={metric!r}: no run logged it; the runs logged {logged}")
    keys = sorted({k for r in runs for k in r.config})
    swept = [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]
    order = sorted(runs, key=lambda r: (scores[r.path] is None,
                                        (scores[r.path] or 0) * (-1 if mode == "max" else 1)))
    out = out or root
    os.makedirs(out, exist_ok=True)
    header = ["rank", "run", metric, *swept, "overrides"]
    table = [[i + 1, os.path.relpath(r.path, root) if r.path != root else ".",
              scores[r.path], *[r.config.get(k) for k in swept], _other_overrides(r, swept)] for i, r in enumerate(order)]
    with open(os.path.join(out, "report.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header, *table])
    lines = [f"# Report: {len(runs)} run(s) in {root}", "", f"Objective: the {mode} of {metric} over each run.", "",
             "| " + " | ".join(map(str, header)) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join("-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in row)
              + " |" for row in table]
    plots = [_curves(runs, root, out)] + [_against(runs, scores, k, metric, out) for k in swept]
    lines += ["", *[f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots if p]]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return os.path.join(out, "report.md")


def _other_overrides(run: Run, swept: list) -> str:
    """The command line's overrides, less those already shown as swept columns."""
    return " ".join(o for o in run.overrides if o.lstrip("+~").partition("=")[0] not in swept)


def _curves(runs: list, root: str, out: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        pts = [(row["step"], row["loss"]) for row in r.rows if row.get("split") == "train" and "loss" in row]
        if pts:
            ax.plot(*zip(*pts), label=os.path.relpath(r.path, root) if r.path != root else "run")
    ax.set(xlabel="step", ylabel="train loss", yscale="log", title="training curves")
    if len(runs) <= 12:
        ax.legend(fontsize=7)
    path = os.path.join(out, "curves.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _against(runs: list, scores: dict, key: str, metric: str, out: str) -> str | None:
    pts = [(r.config.get(key), scores[r.path]) for r in runs if scores[r.path] is not None]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in pts):
        return None  # a categorical or list-valued key: in the table only
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter(*zip(*pts))
    ax.set(xlabel=key, ylabel=metric, title=f"{metric} against {key}")
    if all(x > 0 for x, _ in pts) and max(x for x, _ in pts) / min(x for x, _ in pts) >= 10:
        ax.set_xscale("log")
    path = os.path.join(out, f"objective_{key.replace('.', '_')}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
