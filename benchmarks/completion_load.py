"""Load test of /v1/completions on loopback: the `shakespeare_bpe_llama` preset's model (its architecture and BPE
tokenizer, briefly trained and exported once, then reused) behind `python -m experiments.serve` in its own process,
driven from this process at concurrency 1, 16 and 64 for a fixed time each: every caller streams one completion
after another (Server-Sent Events, a lean HTTP/1.1 client on one keep-alive connection per caller, parsing the
chunked stream itself), recording the time to its first token and the tokens it received. One arm per setting:

    lm-continuous   continuous batching (serve.max_batch=64: up to 64 sequences in the decode batch)
    lm-sequential   serve.max_batch=1: one completion at a time, the others wait in the queue

Prints one JSON line: aggregate tokens/s, TTFT p50/p99, completions and errors per concurrency, and the machine's
load average (this is a shared machine). Run through benchmarks.run:

    python -m benchmarks.run --suite serve_lm
    python -m benchmarks.completion_load --arm lm-continuous --steps 5     # seconds per concurrency level
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.serve_load import KEY, TINY_SECONDS, closed_loop, start_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = {"lm-continuous": ["serve.max_batch=64", "serve.max_queue=256"],
        "lm-sequential": ["serve.max_batch=1", "serve.max_queue=256"]}
CONCURRENCY = (1, 16, 64)


def export_dir() -> str:
    """The shakespeare_bpe_llama export, made once per machine (briefly trained: speed does not depend on the
    weights) and reused; MLSYS_BENCH_LM_MODEL names an existing LM export instead (the tests pass a tiny one)."""
    if os.environ.get("MLSYS_BENCH_LM_MODEL"):
        return os.environ["MLSYS_BENCH_LM_MODEL"]
    folder = os.path.join(tempfile.gettempdir(), "mlsys-bench-lm")
    out = os.path.join(folder, "export")
    if os.path.isfile(os.path.join(out, "decoder.onnx")):
        return out
    env = {**os.environ, "PYTHONPATH": ROOT, "XDG_CONFIG_HOME": os.path.join(folder, "config"), "WANDB_MODE": "offline"}
    for cmd in (["experiments.run", "+exp=shakespeare_bpe_llama", "logger=jsonl", "trainer.progress=false",
                 "trainer.steps=100", "trainer.eval_every=0", "trainer.ckpt_every=0", "data.eval_batches=2",
                 f"hydra.run.dir={folder}/run"],
                ["experiments.export", f"run={folder}/run", "format=onnx", f"out={out}"]):
        subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, env=env, check=True, capture_output=True, timeout=1800)
    return out


def prompts(context: int) -> tuple[list[str], int]:
    """Lines of tiny Shakespeare as prompts (context // 4 characters: at most that many tokens), and max_tokens."""
    from mlsys.data.sources import resolve_path

    text = open(resolve_path("tinyshakespeare.txt"), encoding="utf-8").read()[:200_000]
    n = max(1, context // 4)
    lines = [x.strip()[:n] for x in text.splitlines() if len(x.strip()) >= n]
    return lines[::37][:200], context // 2


class Stream:
    """A lean streaming client on one keep-alive connection: POST, then the chunked body's SSE events counted as
    they arrive (each event is one chunk: the server sends one per token)."""

    def __init__(self, url: str):
        self.host, self.port = url.removeprefix("http://").split(":")
        self.reader = self.writer = None

    async def complete(self, body: bytes) -> tuple[int, float | None, int]:
        """(status, seconds to the first token or None, tokens received)."""
        if self.writer is not None and self.reader.at_eof():  # the server closed it while idle (keep-alive timeout)
            await self.aclose()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, int(self.port))
        t0 = time.perf_counter()
        self.writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nContent-Type: "
                          b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                          % (self.host.encode(), KEY.encode(), len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        if b"chunked" not in head.lower():  # an error: a plain body with Content-Length
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await self.reader.readexactly(length)
            return status, None, 0
        first, tokens = None, 0
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return status, first, tokens
            events = data.count(b"data: ") - data.count(b"data: [DONE]")
            if events and first is None:
                first = time.perf_counter() - t0
            tokens += events

    async def aclose(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def load(url: str, concurrency: int, seconds: float, bodies: list[bytes]) -> dict:
    """`concurrency` callers, each starting its next completion when the last one ends, for `seconds`; those
    started in time run to their end and count (so the one-at-a-time arm's queue wait shows in its TTFT)."""
    ttft, tokens, errors = [], [0], {}
    clients = [Stream(url) for _ in range(concurrency)]

    async def one(k: int, i: int, record: bool):
        try:
            status, first, n = await clients[k].complete(bodies[i % len(bodies)])
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:  # counted; the next one reconnects
            status, first, n = type(e).__name__, None, 0
            await clients[k].aclose()
        if record:
            if status == 200 and first is not None:
                ttft.append(first)
                tokens[0] += n
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1

    try:  # the calls started before the window closes run to their end and count
        elapsed = await closed_loop(concurrency, seconds, one)
    finally:
        for c in clients:
            await c.aclose()
    t = np.asarray(ttft) * 1e3
    return {"completions": len(t), "tokens": tokens[0], "errors": sum(errors.values()), "error_kinds": errors,
            "tokens_per_s": tokens[0] / elapsed, "ttft_p50_ms": float(np.percentile(t, 50)) if len(t) else None,
            "ttft_p99_ms": float(np.percentile(t, 99)) if len(t) else None}


def run_arm(arm: str, seconds: float, concurrency=CONCURRENCY) -> dict:
    model = export_dir()
    context = json.load(open(os.path.join(model, "manifest.json")))["decoder"]["max_len"]
    lines, max_tokens = prompts(context)
    bodies = [json.dumps({"prompt": p, "max_tokens": max_tokens, "temperature": 1.0, "seed": i,
                          "stream": True}).encode() for i, p in enumerate(lines)]
    load_before = os.getloadavg()[0]
    proc, url = start_server(model, ARMS[arm])
    try:
        out = {f"c{c}": asyncio.run(load(url, c, seconds, bodies)) for c in concurrency}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    top = out[f"c{max(concurrency)}"]
    # ms_per_step: what benchmarks.run prints per repeat (here ms per generated token at the highest concurrency)
    return {"arm": arm, "lm_load": out, "max_tokens": max_tokens, "prompt_chars": len(lines[0]),
            "load_average": [load_before, os.getloadavg()[0]],
            "ms_per_step": 1e3 / top["tokens_per_s"] if top["tokens_per_s"] else 0.0, "compile_s": 0.0}


def lm_table(suite: str, rows: dict, ref: str, note: str) -> str:
    """Medians over repeats, per concurrency: tokens/s, TTFT p50/p99, errors; tokens/s ratio to `ref`."""
    import statistics

    arms = list(rows)
    levels = list(rows[arms[0]][0]["lm_load"])
    loads = [x for reps in rows.values() for r in reps for x in r["load_average"]]
    lines = [f"### {suite}", "", note, f"(1-minute load average during the runs: {min(loads):.1f} to "
             f"{max(loads):.1f} on {os.cpu_count()} cores)", "",
             "| concurrency | " + " | ".join(f"{a} tokens/s | {a} TTFT p50 ms | {a} TTFT p99 ms | {a} errors"
                                          for a in arms)
             + " | " + " | ".join(f"{a} / {ref} tokens/s" for a in arms if a != ref) + " |",
             "|---" * (1 + 4 * len(arms) + len(arms) - 1) + "|"]
    for level in levels:
        med = {a: {k: statistics.median(r["lm_load"][level][k] or 0 for r in reps)
                   for k in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms")} for a, reps in rows.items()}
        errs = {a: sum(r["lm_load"][level]["errors"] for r in reps) for a, reps in rows.items()}
        cells = " | ".join(f"{med[a]['tokens_per_s']:.0f} | {med[a]['ttft_p50_ms']:.1f} | {med[a]['ttft_p99_ms']:.1f}"
                           f" | {errs[a]}" for a in arms)
        ratios = " | ".join(f"{med[a]['tokens_per_s'] / med[ref]['tokens_per_s']:.2f}" for a in arms if a != ref)
        lines.append(f"| {level[1:]} | {cells} | {ratios} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", choices=sorted(ARMS), required=True)
    p.add_argument("--steps", type=float, default=0, help="measured seconds per concurrency level (0: 5; at the "
                   "tiny size 0.25)")
    p.add_argument("--size", default="cpu", help="tiny: 0.25 s per concurrency level unless --steps says otherwise "
                   "(the tests); the model is the preset's either way (MLSYS_BENCH_LM_MODEL names another export)")
    a = p.parse_args()
    print(json.dumps(run_arm(a.arm, a.steps or (TINY_SECONDS if a.size == "tiny" else 5.0))), flush=True)
