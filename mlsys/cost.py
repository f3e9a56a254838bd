"""What a run cost: device-hours × a price per device-hour (trainer.cost_per_device_hour, else the table in
trainer.cost_table for the device kind, on-demand or spot), examples (tokens) per dollar, and the restarts it took.
Nothing is fetched: the prices are config. A resumed run adds the cost of the runs it continues (their env.json),
so a spot run shows what its preemptions cost."""

import json
import os


def price(trainer, device_kind: str) -> tuple[float | None, str]:
    """(USD per device-hour, where it came from); None when the table has no price for this kind of device."""
    if trainer.cost_per_device_hour is not None:
        return float(trainer.cost_per_device_hour), "trainer.cost_per_device_hour"
    row = trainer.cost_table.get(device_kind) or trainer.cost_table.get(device_kind.lower())
    if row is None:
        return None, f"no price for device kind {device_kind!r} in trainer.cost_table; set trainer.cost_per_device_hour"
    return float(row[1] if trainer.spot else row[0]), f"trainer.cost_table[{device_kind!r}] ({pricing(trainer)})"


def pricing(trainer) -> str:
    return "spot" if trainer.spot else "on-demand"


def billed_devices(devices: list) -> int:
    """Devices that are billed: GPUs/TPUs each; on CPU one per process (simulated devices share one host)."""
    if devices and devices[0].platform == "cpu":
        return len({d.process_index for d in devices})
    return len(devices)


def previous(resume_dir: str | None) -> dict:
    """The cost record of the run this one resumes (empty for a fresh run)."""
    if not resume_dir:
        return {}
    try:
        return json.load(open(os.path.join(resume_dir, "env.json"))).get("cost") or {}
    except (OSError, ValueError):
        return {}


def run_cost(trainer, device_kind: str, n_devices: int, seconds: float, examples: int, tokens: int,
             before: dict, preempted: bool) -> dict:
    """This run's cost record (this segment, and in total_* everything since the first run it continues)."""
    rate, source = price(trainer, device_kind)
    hours = n_devices * seconds / 3600
    cost = None if rate is None else hours * rate
    rec = {"device_kind": device_kind, "devices": n_devices, "pricing": pricing(trainer), "usd_per_device_hour": rate,
           "price_source": source, "wall_seconds": seconds, "device_hours": hours, "usd": cost,
           "examples": examples, "preempted": preempted,
           "restarts": before.get("restarts", 0) + 1 if before else 0,
           "preemptions": before.get("preemptions", 0) + int(bool(before.get("preempted")))}
    rec["total_device_hours"] = before.get("total_device_hours", 0.0) + hours
    rec["total_usd"] = None if cost is None else (before.get("total_usd") or 0.0) + cost
    rec["examples_per_usd"] = examples / cost if cost else None
    if tokens:
        rec["tokens"] = tokens
        rec["tokens_per_usd"] = tokens / cost if cost else None
    return rec


def metrics(rec: dict) -> dict:
    """The numeric part, for metrics.jsonl (split "cost")."""
    keys = ("device_hours", "usd", "usd_per_device_hour", "examples_per_usd", "tokens_per_usd", "total_device_hours",
            "total_usd", "restarts", "preemptions")
    return {k: rec[k] for k in keys if isinstance(rec.get(k), (int, float)) and not isinstance(rec.get(k), bool)}


def describe(rec: dict) -> str:
    """One line for the end-of-run summary."""
    line = f"{rec['device_hours']:.4g} device-hours ({rec['devices']} x {rec['device_kind']})"
    if rec["usd"] is None:
        return f"{line}; cost unknown: {rec['price_source']}"
    line += f", ${rec['usd']:.4g} at ${rec['usd_per_device_hour']:g}/device-hour {rec['pricing']}"
    per = f"{rec['tokens_per_usd']:.3g} tokens" if rec.get("tokens_per_usd") else \
        f"{rec['examples_per_usd']:.3g} examples" if rec.get("examples_per_usd") else None
    if per:
        line += f", {per} per $"
    if rec["restarts"]:
        line += (f"; {rec['restarts']} restart(s), {rec['preemptions']} after preemption: "
                 f"${rec['total_usd']:.4g} in total")
    return line


# Rough public cloud list prices, USD per device-hour, on-demand and spot (2025). A guide for comparing runs, not a
# quote: set trainer.cost_per_device_hour, or override rows with trainer.cost_table, for your own rates.
DEFAULT_TABLE = {
    "NVIDIA H200": [3.80, 1.90],
    "NVIDIA H100 80GB HBM3": [3.00, 1.50],
    "NVIDIA H100": [3.00, 1.50],
    "NVIDIA A100-SXM4-80GB": [1.80, 0.90],
    "NVIDIA A100-SXM4-40GB": [1.50, 0.75],
    "NVIDIA L4": [0.70, 0.30],
    "NVIDIA A10G": [1.00, 0.40],
    "NVIDIA T4": [0.50, 0.20],
    "TPU v4": [3.22, 0.97],
    "TPU v5 lite": [1.20, 0.50],
    "TPU v5p": [4.20, 1.89],
    "TPU v6 lite": [2.70, 1.20],
    "cpu": [0.10, 0.03],  # one host of a few cores
}
