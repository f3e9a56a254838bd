"""Language-model arms: compile time of the train step against depth (scanned vs unrolled layers), and decoding
speed with the KV cache against the uncached sampler (which recomputes the whole window for every token)."""

import time

from benchmarks.sizes import SIZES, Size

# The deep model of the compile-time comparison (the shallow one has 2 layers); the tiny size keeps tests quick.
DEEP = {"tiny": 4}
DEFAULT_DEEP = 24


def compile_seconds(size: Size, n_layer: int, scan: bool) -> float:
    import jax

    from benchmarks.arm import batch_of, mlsys_setup
    from mlsys.parallel import activation_sharding

    cfg, mesh, run, put = mlsys_setup(size, [f"model.n_layer={n_layer}", f"model.scan_layers={str(scan).lower()}"])
    batch = put(*batch_of(size))
    with jax.set_mesh(mesh), activation_sharding(mesh, cfg.mesh.act_rules):
        t0 = time.perf_counter()
        run.train_step.lower(run.state, batch).compile()
        return time.perf_counter() - t0


def name_of(size: Size) -> str:
    return next(k for k, v in SIZES.items() if v == size)


def arm_compile(size: Size, scan: bool) -> dict:
    """Seconds to trace, lower and compile the train step at 2 layers and at DEEP layers (no compilation cache)."""
    deep = DEEP.get(name_of(size), DEFAULT_DEEP)
    shallow_s = compile_seconds(size, 2, scan)
    deep_s = compile_seconds(size, deep, scan)
    return {"compile_s": deep_s, "compile_2_layers_s": shallow_s, f"compile_{deep}_layers_s": deep_s,
            "deep_layers": deep, "compile_ratio": deep_s / shallow_s, "ms_per_step": 1e3 * deep_s}


def decode_model(size: Size):
    from flax import nnx

    from mlsys.models import GPT, GPTConfig
    from mlsys.spec import DataSpec

    new, prompt = (16, 8) if name_of(size) == "tiny" else (256, 64)
    cfg = GPTConfig(n_layer=size.n_layer, n_head=size.n_head, d_model=size.d_model, block_size=new + prompt,
                    bias=size.bias)
    return GPT(cfg, DataSpec("lm", (size.seq_len,), "int32", size.vocab), rngs=nnx.Rngs(0)), new, prompt


def arm_decode_ort(size: Size) -> dict:
    """arm_decode's model and lengths through the export's decoder.onnx (ONNX Runtime, one thread, the KV cache
    as past/present inputs and outputs), greedy, from numpy: what the model server's generation runs."""
    import os
    import tempfile

    from mlsys.export.decoder_export import layout, to_onnx_decoder
    from mlsys.serve.decoder import Decoder

    model, new, prompt = decode_model(size)
    folder = tempfile.mkdtemp(prefix="mlsys-decode-")
    info = {**layout(model), **to_onnx_decoder(model, os.path.join(folder, "decoder.onnx"))}
    dec = Decoder(folder, manifest={"decoder": info})
    tokens = [list(range(prompt))]
    t0 = time.perf_counter()
    dec.greedy(tokens, new)
    compile_s = time.perf_counter() - t0
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        out, _ = dec.greedy(tokens, new)
        runs.append(time.perf_counter() - t0)
        assert len(out[0]) == new
    best = min(runs)
    return {"compile_s": compile_s, "ms_per_step": 1e3 * best / new, "tokens_per_s": new / best,
            "new_tokens": new, "prompt_tokens": prompt, "block_size": new + prompt}


def arm_decode(size: Size, cached: bool) -> dict:
    """Tokens per second generating NEW tokens after a PROMPT-token prompt, batch 1, with the cpu size's model and
    a block that holds prompt and continuation (no sliding): compilation excluded (one warm-up call)."""
    import jax

    from mlsys.generate import generate

    model, new, prompt = decode_model(size)
    tokens = [list(range(prompt))]

    def once():
        return generate(model, tokens, new, key=jax.random.key(0), temperature=1.0, cached=cached)

    t0 = time.perf_counter()
    once()
    compile_s = time.perf_counter() - t0
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = once()
        runs.append(time.perf_counter() - t0)
        assert len(out[0]) == new
    best = min(runs)
    return {"compile_s": compile_s, "ms_per_step": 1e3 * best / new, "tokens_per_s": new / best,
            "new_tokens": new, "prompt_tokens": prompt, "block_size": new + prompt}


def compile_table(suite: str, rows: dict, note: str) -> str:
    import statistics

    lines = [f"### {suite}", "", note, "", "| arm | repeats | median compile s, 2 layers | median compile s, deep | "
             "deep layers | median ratio deep / 2 |", "|---|---|---|---|---|---|"]
    for arm, reps in rows.items():
        med = {k: statistics.median(r[k] for r in reps) for k in ("compile_2_layers_s", "compile_s", "compile_ratio")}
        lines.append(f"| {arm} | {len(reps)} | {med['compile_2_layers_s']:.2f} | {med['compile_s']:.2f} | "
                     f"{reps[0]['deep_layers']} | {med['compile_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def decode_table(suite: str, rows: dict, ref: str, note: str) -> str:
    import statistics

    base = statistics.median(r["tokens_per_s"] for r in rows[ref])
    lines = [f"### {suite}", "", note, "", f"| arm | repeats | median tokens/s | median ms/token | tokens/s ratio to "
             f"{ref} |", "|---|---|---|---|---|"]
    for arm, reps in rows.items():
        tps = statistics.median(r["tokens_per_s"] for r in reps)
        ms = statistics.median(r["ms_per_step"] for r in reps)
        lines.append(f"| {arm} | {len(reps)} | {tps:.1f} | {ms:.2f} | {tps / base:.2f} |")
    return "\n".join(lines) + "\n"
