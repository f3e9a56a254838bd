"""Load test of the model server on loopback: the digits MLP (the preset's architecture, briefly trained and
exported once, then reused) behind `python -m experiments.serve` in its own process, driven from this process at
concurrency 1, 16 and 64 for a fixed time each, one keep-alive connection per caller, by a lean HTTP/1.1 client
(`KeepAlive`; MLSYS_BENCH_CLIENT=httpx uses httpx instead, at ~0.6 ms of client CPU per request). One arm per
server setting:

    serve-batched    dynamic batching (serve.max_batch=64, serve.max_delay_ms=10)
    serve-unbatched  serve.max_batch=1: one ONNX Runtime call per request

Prints one JSON line (throughput, p50/p99 latency and errors per concurrency). Run through benchmarks.run:

    python -m benchmarks.run --suite serve
    python -m benchmarks.serve_load --arm serve-batched --steps 3     # seconds per concurrency level
"""

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = {"serve-batched": ["serve.max_batch=64", "serve.max_delay_ms=10"], "serve-unbatched": ["serve.max_batch=1"]}
CONCURRENCY = (1, 16, 64)
TINY_SECONDS = 0.25  # per concurrency level at the tiny size: the tests check that the harness works, not speed
KEY = "bench-key"


def export_dir(tiny: bool) -> str:
    """The digits MLP export, made once per machine and size (training and export take ~20 s) and reused."""
    if os.environ.get("MLSYS_BENCH_SERVE_MODEL"):  # an existing export (the tests pass theirs)
        return os.environ["MLSYS_BENCH_SERVE_MODEL"]
    folder = os.path.join(tempfile.gettempdir(), f"mlsys-bench-serve-{'tiny' if tiny else 'mlp'}")
    out = os.path.join(folder, "export")
    if os.path.isfile(os.path.join(out, "reference_stats.json")):
        return out
    env = {**os.environ, "PYTHONPATH": ROOT, "XDG_CONFIG_HOME": os.path.join(folder, "config"), "WANDB_MODE": "offline"}
    size = ["model.hidden=[16]", "trainer.steps=20"] if tiny else ["trainer.steps=300"]
    for cmd in (["experiments.run", "+exp=digits_mlp", "logger=jsonl", "trainer.progress=false", *size,
                 f"hydra.run.dir={folder}/run"],
                ["experiments.export", f"run={folder}/run", "format=onnx", f"out={out}"]):
        subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, settings: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT, "MLSYS_API_KEYS": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.serve", f"model={model}", f"serve.port={port}",
                             "serve.log_level=warning", *settings], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server failed to start:\n{proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit("the server did not become ready in 120 s")


class KeepAlive:
    """A lean HTTP/1.1 client on one keep-alive connection: pre-built request bytes, the status line and
    Content-Length parsed, the body read in full. About 20x less CPU per request than httpx, so that on a 2-core
    machine the load test measures the server rather than its client."""

    def __init__(self, url: str):
        self.host, self.port = url.removeprefix("http://").split(":")
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, int(self.port))
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nContent-Type: "
                          b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                          % (path.encode(), self.host.encode(), KEY.encode(), len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        await self.reader.readexactly(int(length.group(1)) if length else 0)
        return int(head[9:12])

    async def aclose(self):
        if self.writer is not None:
            self.writer.close()


async def closed_loop(concurrency: int, seconds: float, one) -> float:
    """`concurrency` callers, each awaiting `one(k, i, record)` again as soon as its last call returns: a warm-up
    window first (connections opened, caches warm; record=False), then `seconds` measured (record=True). Caller k
    takes inputs i = k, k + concurrency, ... Returns the measured window's length in seconds."""

    async def caller(k: int, until: float, record: bool):
        i = k
        while time.perf_counter() < until:
            await one(k, i, record)
            i += concurrency

    warm = time.perf_counter() + min(1.0, seconds / 3)
    await asyncio.gather(*(caller(k, warm, False) for k in range(concurrency)))
    t0 = time.perf_counter()
    await asyncio.gather(*(caller(k, t0 + seconds, True) for k in range(concurrency)))
    return time.perf_counter() - t0


async def load(url: str, concurrency: int, seconds: float, bodies: list[bytes], client: str = "lean") -> dict:
    """`concurrency` callers, each sending its next request as soon as the last one is answered, for `seconds`."""
    import httpx

    latencies, errors = [], {}
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    # One client (one keep-alive connection) per caller: httpx's shared pool costs O(connections) per request,
    # which at 64 connections would measure the client, not the server.
    clients = [KeepAlive(url) if client == "lean" else
               httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=httpx.Limits(max_connections=1))
               for _ in range(concurrency)]

    async def one(k: int, i: int, record: bool):
        t0 = time.perf_counter()
        try:
            if client == "lean":
                status = await clients[k].post("/v1/predict", bodies[i % len(bodies)])
            else:
                status = (await clients[k].post("/v1/predict", content=bodies[i % len(bodies)])).status_code
        except (httpx.HTTPError, OSError, asyncio.IncompleteReadError) as e:
            status = type(e).__name__
        if record:
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1

    try:
        elapsed = await closed_loop(concurrency, seconds, one)
    finally:
        for c in clients:
            await c.aclose()
    lat = np.asarray(latencies) * 1e3
    return {"requests": len(lat), "errors": sum(errors.values()), "error_kinds": errors,
            "rps": len(lat) / elapsed, "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None}


def run_arm(arm: str, seconds: float, tiny: bool, concurrency=CONCURRENCY) -> dict:
    from sklearn.datasets import load_digits

    model = export_dir(tiny)
    x = (load_digits().images / 16.0).astype(np.float32)[..., None]
    bodies = [json.dumps({"input": x[i].tolist()}).encode() for i in range(0, len(x), 7)]  # one example each
    proc, url = start_server(model, ARMS[arm])
    try:
        client = os.environ.get("MLSYS_BENCH_CLIENT", "lean")
        out = {f"c{c}": asyncio.run(load(url, c, seconds, bodies, client)) for c in concurrency}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    top = out[f"c{max(concurrency)}"]
    # ms_per_step: what benchmarks.run prints per repeat (here the p50 latency at the highest concurrency)
    return {"arm": arm, "load": out, "ms_per_step": top["p50_ms"] or 0.0, "compile_s": 0.0}


def load_table(suite: str, rows: dict, ref: str, note: str) -> str:
    """Medians over repeats, per concurrency: throughput, p50, p99, errors; throughput ratio to `ref`."""
    import statistics

    arms = list(rows)
    levels = list(rows[arms[0]][0]["load"])
    lines = [f"### {suite}", "", note, "",
             "| concurrency | " + " | ".join(f"{a} req/s | {a} p50 ms | {a} p99 ms | {a} errors" for a in arms)
             + " | " + " | ".join(f"{a} / {ref} req/s" for a in arms if a != ref) + " |",
             "|---" * (1 + 4 * len(arms) + len(arms) - 1) + "|"]
    for level in levels:
        med = {a: {k: statistics.median(r["load"][level][k] or 0 for r in reps) for k in ("rps", "p50_ms", "p99_ms")}
               for a, reps in rows.items()}
        errs = {a: sum(r["load"][level]["errors"] for r in reps) for a, reps in rows.items()}
        cells = " | ".join(f"{med[a]['rps']:.0f} | {med[a]['p50_ms']:.2f} | {med[a]['p99_ms']:.2f} | {errs[a]}"
                           for a in arms)
        ratios = " | ".join(f"{med[a]['rps'] / med[ref]['rps']:.2f}" for a in arms if a != ref)
        lines.append(f"| {level[1:]} | {cells} | {ratios} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", choices=sorted(ARMS), required=True)
    p.add_argument("--steps", type=float, default=0, help="measured seconds per concurrency level (0: 5; at the "
                   "tiny size 0.25)")
    p.add_argument("--size", default="cpu", help="tiny: a 16-unit MLP trained 20 steps, 0.25 s per concurrency "
                   "level unless --steps says otherwise (for the tests)")
    a = p.parse_args()
    tiny = a.size == "tiny"
    print(json.dumps(run_arm(a.arm, a.steps or (TINY_SECONDS if tiny else 5.0), tiny)), flush=True)
