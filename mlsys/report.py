"""Reports over runs: a table of runs sorted by an objective, with what differs between their configs, as Markdown
and CSV, and PNG plots (training curves overlaid; the objective against each swept hyperparameter). Reads only each
run's metrics.jsonl and config.yaml, so it works offline, on one run or on a whole sweep."""

import csv
import json
import os
from dataclasses import dataclass

import yaml

from mlsys.errors import MlsysError


@dataclass
class Run:
    path: str
    rows: list
    config: dict  # flattened: "optim.lr" -> value
    overrides: list  # the command line's overrides (Hydra's .hydra/overrides.yaml), if Hydra launched the run
    env: dict  # env.json (versions, devices, the data fingerprint, the cost), if the run wrote one


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
            env_path = os.path.join(here, "env.json")
            env = json.load(open(env_path)) if os.path.isfile(env_path) else {}
            runs.append(Run(here, rows, config, [str(o) for o in overrides], env))
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
    # Language models: bits per byte beside the objective, so that runs with different tokenizers compare.
    bpb = {r.path: objective(r, "val.bits_per_byte", "last") for r in runs}
    extra = ["val.bits_per_byte"] if metric != "val.bits_per_byte" and any(v is not None for v in bpb.values()) else []
    header = ["rank", "run", metric, *extra, *swept, "data", "usd", "device_hours", "overrides"]
    table = [[i + 1, os.path.relpath(r.path, root) if r.path != root else ".", scores[r.path],
              *[bpb[r.path] for _ in extra], *[r.config.get(k) for k in swept], (r.env.get("data") or {}).get("digest", "-")[:12],
              _cost(r).get("total_usd"), _cost(r).get("total_device_hours"), _other_overrides(r, swept)]
             for i, r in enumerate(order)]
    with open(os.path.join(out, "report.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header, *table])
    lines = [f"# Report: {len(runs)} run(s) in {root}", "", f"Objective: the {mode} of {metric} over each run. "
             f"`data`: the first 12 hex digits of each run's data fingerprint; `usd`, `device_hours`: what the run "
             f"cost, restarts included (env.json; prices from trainer.cost_per_device_hour or trainer.cost_table).",
             "",
             "| " + " | ".join(map(str, header)) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join("-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in row)
              + " |" for row in table]
    lines += ["", total_cost(runs)]
    plots = [_curves(runs, root, out, swept)] + [_against(runs, scores, k, metric, out) for k in swept]
    lines += ["", *[f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots if p]]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return os.path.join(out, "report.md")


def _other_overrides(run: Run, swept: list) -> str:
    """The command line's overrides, less those already shown as swept columns."""
    return " ".join(o for o in run.overrides if o.lstrip("+~").partition("=")[0] not in swept)


def _cost(run: Run) -> dict:
    return run.env.get("cost") or {}


def total_cost(runs: list) -> str:
    """The runs' total: dollars and device-hours, each earlier segment of a resumed run counted once (a run that
    continues another run of the report adds its own segment only), preemptions counted."""
    here = {os.path.abspath(r.path) for r in runs}
    usd, hours, unknown, preempted = 0.0, 0.0, 0, 0
    for r in runs:
        c = _cost(r)
        prev = r.env.get("resumed_from")
        whole = not prev or os.path.abspath(prev) not in here - {os.path.abspath(r.path)}
        price = c.get("total_usd" if whole else "usd")
        hours += c.get("total_device_hours" if whole else "device_hours") or 0.0
        preempted += c.get("preemptions") or 0 if whole else int(bool(_cost_of(runs, prev).get("preempted")))
        if price is None:
            unknown += 1
        else:
            usd += price
    text = f"Total: ${usd:.4g}" if unknown < len(runs) else "Total: cost unknown"
    if unknown and unknown < len(runs):
        text += f" ({unknown} run(s) without a price)"
    return f"{text}, {hours:.4g} device-hours over {len(runs)} run(s), {preempted} preemption(s)."


def _cost_of(runs: list, path: str | None) -> dict:
    return next((_cost(r) for r in runs if path and os.path.abspath(r.path) == os.path.abspath(path)), {})


def label(run: Run, root: str, swept: list) -> str:
    """A run's name in a legend: its swept values (optim.lr=0.003), else its dir."""
    if not swept:
        return os.path.relpath(run.path, root) if run.path != root else "run"
    tails = [k.rpartition(".")[2] for k in swept]  # "lr" for optim.lr, unless another swept key ends the same
    names = [tail if tails.count(tail) == 1 else k for k, tail in zip(swept, tails)]
    return ", ".join(f"{n}={_short(run.config.get(k))}" for n, k in zip(names, swept))


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _pyplot():
    """matplotlib, imported when a report draws: every training run imports this module for its objective, and
    pyplot alone costs each process ~0.5 s of start-up."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _curves(runs: list, root: str, out: str, swept: list) -> str:
    plt = _pyplot()
    fig = curves_figure(runs, root, swept)
    path = os.path.join(out, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curves_figure(runs: list, root: str, swept: list):
    """Training loss (solid) and validation loss (dashed, same colour) of every run against the step, each run
    named by its swept values; a split with a single logged point is drawn as a marker (a line needs two)."""
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for i, r in enumerate(runs):
        colour = f"C{i % 10}"
        for split, style, marker in (("train", "-", "o"), ("val", "--", "s")):
            pts = [(row["step"], row["loss"]) for row in r.rows if row.get("split") == split and "loss" in row]
            if not pts:
                continue
            name = label(r, root, swept) + ("" if split == "train" else " (val)")
            ax.plot(*zip(*pts), linestyle=style, color=colour, label=name,
                    marker=marker if len(pts) == 1 else None, markersize=6)
    ax.set(xlabel="step", ylabel="loss (solid: train, dashed: val)", yscale="log", title="training curves")
    if len(runs) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _against(runs: list, scores: dict, key: str, metric: str, out: str) -> str | None:
    pts = [(r.config.get(key), scores[r.path]) for r in runs if scores[r.path] is not None]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in pts):
        return None  # a categorical or list-valued key: in the table only
    plt = _pyplot()
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
