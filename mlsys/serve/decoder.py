"""Runs an export's KV-cache decoder (decoder.onnx, written by mlsys.export.decoder_export) with ONNX Runtime:
numpy and onnxruntime only, so the server loads it without JAX.

A cache ("past") is a list of (key, value) numpy pairs, one per layer, each [B, n_kv_head, P, head_dim]. Rows of
one batch share P: a row with a shorter history is left-padded with zero slots that its attention_mask marks 0.
The helpers below build such batches and take rows in and out of them (continuous batching):

    dec = Decoder(export_dir)
    ids = [[5, 7, 9], [4]]
    mask, tokens = Decoder.left_pad(ids)                     # [[1,1,1],[0,0,1]], left-padded ids
    logits, past = dec.step(tokens, mask, Decoder.positions(mask, 3), dec.empty_past(2))
    nxt = logits[:, -1].argmax(-1)[:, None]; mask = np.concatenate([mask, np.ones((2, 1), mask.dtype)], 1)
    logits, past = dec.step(nxt, mask, Decoder.positions(mask, 1), past)
"""

import json
import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # onnxruntime writes telemetry files otherwise

import numpy as np  # noqa: E402

from mlsys.errors import ConfigError  # noqa: E402

EXPORT_COMMAND = "python -m experiments.export run=<run dir>"


class Decoder:
    """decoder.onnx (or decoder.int8.onnx) of an export folder, with the cache layout its manifest names.

    Attributes: n_layer, n_kv_head, head_dim, vocab, max_len (positions must stay below it), eos (id or None)."""

    def __init__(self, folder: str, precision: str = "fp32", threads: int = 1, manifest: dict | None = None):
        manifest = manifest or json.load(open(os.path.join(folder, "manifest.json")))
        info = manifest.get("decoder")
        if not info:
            raise ConfigError(f"model={folder!r}: this language-model export has no decoder.onnx (the KV-cache graph "
                              f"text generation needs; exported by an older mlsys); export the run again "
                              f"({rerun_command(manifest)}) or serve logits only with serve.completions=false")
        name = info["file"] if precision == "fp32" else info.get("int8_file")
        if not name or not os.path.isfile(os.path.join(folder, name)):
            raise ConfigError(f"serve.precision={precision}: {folder} has no "
                              f"{name or 'decoder.int8.onnx'}; export the run again with "
                              f"{'quantize=int8' if precision == 'int8' else 'format=onnx'}: {rerun_command(manifest)}")
        self.info = info
        self.n_layer, self.n_kv_head, self.head_dim = info["n_layer"], info["n_kv_head"], info["head_dim"]
        self.vocab, self.max_len, self.eos = info["vocab"], info["max_len"], info.get("eos")
        self.int_dtype = np.dtype(info.get("int_dtype", "int32"))
        self.session = session(os.path.join(folder, name), threads)
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.n_layer) for kv in ("key", "value")]

    def empty_past(self, batch: int) -> list:
        """A cache holding nothing (P = 0), for the first call (the prefill)."""
        return empty_past(self.info, batch)

    def step(self, input_ids, attention_mask, position_ids, past: list) -> tuple[np.ndarray, list]:
        """Logits [B, T, V] of the new tokens and the cache grown by them ([B, K, P+T, Dh] per layer).
        attention_mask covers past and new slots ([B, P+T], 1 = real); position_ids as `positions` gives them."""
        feed = {"input_ids": np.asarray(input_ids, self.int_dtype),
                "attention_mask": np.asarray(attention_mask, self.int_dtype),
                "position_ids": np.asarray(position_ids, self.int_dtype)}
        for i, (k, v) in enumerate(past):
            feed[self.past_names[2 * i]], feed[self.past_names[2 * i + 1]] = k, v
        out = self.session.run(None, feed)
        return out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.n_layer)]

    @staticmethod
    def positions(attention_mask, t: int) -> np.ndarray:
        """position_ids of the last t slots: how many real slots come before each (padding slots get 0)."""
        mask = np.asarray(attention_mask)
        return np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, mask.shape[1] - t:].astype(mask.dtype)

    @staticmethod
    def left_pad(rows: list, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(attention_mask, ids) for token lists of different lengths, right-aligned."""
        n = max(len(r) for r in rows)
        mask = np.zeros((len(rows), n), np.int32)
        ids = np.full((len(rows), n), pad, np.int32)
        for i, r in enumerate(rows):
            if len(r):
                mask[i, n - len(r):], ids[i, n - len(r):] = 1, r
        return mask, ids

    @staticmethod
    def pad_past(past: list, mask: np.ndarray, length: int) -> tuple[list, np.ndarray]:
        """Left-pad a cache and its mask [B, P] with empty slots to P = length."""
        extra = length - mask.shape[1]
        if extra <= 0:
            return past, mask
        grow = ((0, 0), (0, 0), (extra, 0), (0, 0))
        return ([(np.pad(k, grow), np.pad(v, grow)) for k, v in past],
                np.pad(mask, ((0, 0), (extra, 0))))

    @staticmethod
    def concat_rows(parts: list[tuple[list, np.ndarray]]) -> tuple[list, np.ndarray]:
        """One batch from several (past, mask) batches of different P: each left-padded to the longest."""
        length = max(m.shape[1] for _, m in parts)
        padded = [Decoder.pad_past(p, m, length) for p, m in parts]
        past = [(np.concatenate([p[i][0] for p, _ in padded]), np.concatenate([p[i][1] for p, _ in padded]))
                for i in range(len(padded[0][0]))]
        return past, np.concatenate([m for _, m in padded])

    @staticmethod
    def take_rows(past: list, mask: np.ndarray, rows) -> tuple[list, np.ndarray]:
        """The given rows of a batch; slots that are padding in every kept row are dropped (P shrinks). Copies,
        not views: a view would keep the whole old cache alive."""
        rows = np.asarray(rows)
        mask = mask[rows]
        used = np.flatnonzero(mask.any(0))
        start = int(used[0]) if len(used) else mask.shape[1]
        return ([(np.ascontiguousarray(k[rows, :, start:]), np.ascontiguousarray(v[rows, :, start:]))
                 for k, v in past], mask[:, start:])

    def greedy(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], np.ndarray]:
        """Greedy continuation of each prompt by n tokens, all prompts in one left-padded batch (no stop at EOS;
        positions must stay below max_len). Returns (tokens per prompt, logits [n, B, V] of every step)."""
        return greedy(self.step, self.empty_past(len(prompts)), prompts, n)


def empty_past(info: dict, batch: int) -> list:
    """A cache holding nothing for the layout `info` (the manifest's "decoder" entry)."""
    z = np.zeros((batch, info["n_kv_head"], 0, info["head_dim"]), np.float32)
    return [(z, z)] * info["n_layer"]


def greedy(step, past: list, prompts: list[list[int]], n: int) -> tuple[list[list[int]], np.ndarray]:
    """The greedy loop over any step function with Decoder.step's signature (ONNX Runtime, the torch program):
    one prefill of the left-padded prompts, then one token per call."""
    mask, ids = Decoder.left_pad(prompts)
    out, steps = [], []
    for _ in range(n):
        logits, past = step(ids, mask, Decoder.positions(mask, ids.shape[1]), past)
        steps.append(logits[:, -1])
        ids = logits[:, -1].argmax(-1).astype(np.int32)[:, None]
        out.append(ids[:, 0])
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
    return np.stack(out, 1).tolist(), np.stack(steps)


def session(path: str, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Idle ORT threads spin by default, burning the cores the HTTP side needs between calls.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def rerun_command(manifest: dict) -> str:
    """The export command for the run an export came from (its run dir, when the manifest records it)."""
    run_dir = (manifest.get("source") or {}).get("run_dir")
    return EXPORT_COMMAND.replace("<run dir>", run_dir) if run_dir else EXPORT_COMMAND
