"""Completions, for real: the session's tiny char GPT export (its decoder.onnx and vocab.json) behind the real
uvicorn server on 127.0.0.1, one server for the module, talked to with httpx. Text matches the decoder's own greedy
loop, alone or in a batch with companions of other lengths (joining and leaving the running batch); streaming sends
one event per token; seeded sampling is reproducible; stop strings; a client that goes away frees its slot; a full
queue answers 429; SIGTERM lets streams in flight finish; every bad input gets 422 naming the field."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from mlsys.serve.decoder import Decoder
from mlsys.tokenizer import from_run_dir
from tests.conftest import ROOT, SERVE_KEY
from tests.test_serve import ThreadServer, free_port, wait_ready

AUTH = {"Authorization": f"Bearer {SERVE_KEY}"}
MAX_BATCH, MAX_QUEUE = 4, 2


@pytest.fixture(scope="module")
def lm(serve_exports):
    s = ThreadServer(model=serve_exports["gpt"], api_keys_file=serve_exports["keys"], max_batch=MAX_BATCH,
                     max_queue=MAX_QUEUE, max_tokens=24)
    s.folder = serve_exports["gpt"]
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(serve_exports):
    """The decoder's own greedy loop, one prompt alone: what the server must produce at temperature 0."""
    dec, tok = Decoder(serve_exports["gpt"]), from_run_dir(serve_exports["gpt"])

    def greedy(prompt: str, n: int) -> str:
        tokens, _ = dec.greedy([tok.encode(prompt).tolist()], n)
        return tok.decode(tokens[0])

    greedy.tokenizer = tok
    return greedy


def complete(url: str, body, headers=AUTH) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", content=json.dumps(body), headers=headers, timeout=60)


def events(url: str, body) -> tuple[list[dict], httpx.Response]:
    """A streamed completion's chunks (data: [DONE] checked and dropped)."""
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines), lines
    return [json.loads(x[6:]) for x in lines[:-1]], r


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(name + " ") or
               x.startswith(name + "{"))


def settle(url: str) -> None:
    """Wait until no completion is queued or running (bounded; no fixed sleep)."""
    deadline = time.time() + 30
    while metric(url, "mlsys_completions_waiting") or metric(url, "mlsys_completions_running"):
        assert time.time() < deadline, "slots or queue never emptied"
        time.sleep(0.02)


# -- what comes back -------------------------------------------------------------------------------------------------


def test_greedy_completion_and_its_stream_match_the_decoder(lm, reference):
    body = {"prompt": "ROMEO:\nWhat", "max_tokens": 12, "temperature": 0}
    r = complete(lm.url, body)
    assert r.status_code == 200, r.text
    out = r.json()
    want = reference("ROMEO:\nWhat", 12)
    assert out["choices"][0]["text"] == want and out["choices"][0]["finish_reason"] == "length"
    n_prompt = len(reference.tokenizer.encode("ROMEO:\nWhat"))
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 12, "total_tokens": n_prompt + 12}
    assert out["object"] == "text_completion" and out["model"].startswith("gpt-")
    chunks, resp = events(lm.url, body)
    assert resp.headers["content-type"] == "text/event-stream"
    assert len(chunks) == 12  # one event per generated token
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 11 + ["length"]
    assert chunks[-1]["usage"] == out["usage"] and "usage" not in chunks[0]


def test_seeded_sampling_is_reproducible(lm):
    body = {"prompt": "First:", "max_tokens": 20, "temperature": 1.0, "top_k": 20, "top_p": 0.9}
    a, b, c = (complete(lm.url, {**body, "seed": s}).json()["choices"][0]["text"] for s in (7, 7, 8))
    assert a == b and a != c
    streamed, _ = events(lm.url, {**body, "seed": 7})
    assert "".join(x["choices"][0]["text"] for x in streamed) == a


def test_stop_string_ends_the_text_before_it(lm, reference):
    full = reference("KING", 20)
    stop = full[6:8]
    r = complete(lm.url, {"prompt": "KING", "max_tokens": 20, "temperature": 0, "stop": ["\x00zz", stop]}).json()
    assert r["choices"][0] == {"index": 0, "text": full[:full.index(stop)], "logprobs": None, "finish_reason": "stop"}
    chunks, _ = events(lm.url, {"prompt": "KING", "max_tokens": 20, "temperature": 0, "stop": stop})
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:full.index(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# -- continuous batching ---------------------------------------------------------------------------------------------


def test_requests_join_the_running_batch_and_companions_keep_greedy_text(lm, reference):
    """Six prompts of different lengths and lengths of answer at once, four slots and two places in the queue:
    rows join and leave the decode batch while others decode (seen in /metrics), and every answer is the one it
    gets alone."""
    prompts = [("ROMEO:", 20), ("O", 5), ("Good morrow, cousin", 9), ("A", 24), ("To be or", 3), ("What, ho!", 14)]

    async def burst():
        async with httpx.AsyncClient(base_url=lm.url, headers=AUTH, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json={
                "prompt": p, "max_tokens": n, "temperature": 0}) for p, n in prompts))

    joined = 0
    for _ in range(5):  # the first request alone in the batch when others arrive: almost always at once
        before = metric(lm.url, "mlsys_prefills_joining_running_batch_total")
        results = asyncio.run(burst())
        for (p, n), r in zip(prompts, results):
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == reference(p, n), p
        joined = metric(lm.url, "mlsys_prefills_joining_running_batch_total") - before
        if joined:
            break
    assert joined > 0
    rows = metric(lm.url, "mlsys_decode_batch_size_sum") / metric(lm.url, "mlsys_decode_batch_size_count")
    assert 1 < rows <= MAX_BATCH
    settle(lm.url)


def test_a_client_that_disconnects_frees_its_slot(lm):
    cancelled = 0
    for _ in range(10):  # the client must be gone before the completion ends by itself
        before = metric(lm.url, 'mlsys_completions_total{finish_reason="cancelled"}')
        with httpx.stream("POST", f"{lm.url}/v1/completions", headers=AUTH, timeout=60,
                          json={"prompt": "A", "max_tokens": 24, "stream": True, "temperature": 0}) as r:
            next(r.iter_lines())  # the first token arrived: it is decoding
        settle(lm.url)  # slots and queue back to zero
        cancelled = metric(lm.url, 'mlsys_completions_total{finish_reason="cancelled"}') - before
        if cancelled:
            break
    assert cancelled == 1


def test_a_full_queue_answers_429_with_retry_after(lm):
    async def burst():
        async with httpx.AsyncClient(base_url=lm.url, headers=AUTH, timeout=60,
                                     limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json={"prompt": "A", "max_tokens": 24})
                                          for _ in range(32)))

    for _ in range(5):  # 32 at once against 4 slots + 2 places in the queue
        results = asyncio.run(burst())
        assert {r.status_code for r in results} <= {200, 429}
        full = [r for r in results if r.status_code == 429]
        if full:
            break
    assert full and full[0].headers["retry-after"] == "1"
    assert "serve.max_queue" in full[0].json()["detail"]
    assert sum(r.status_code == 200 for r in results) >= MAX_BATCH + MAX_QUEUE
    settle(lm.url)


# -- bad input ---------------------------------------------------------------------------------------------------------

BAD = [
    ({"prompt": ""}, "prompt", "non-empty string"),
    ({}, "prompt", "non-empty string"),
    ({"prompt": 3}, "prompt", "non-empty string"),
    ({"prompt": "日本"}, "prompt", "empty after tokenization"),
    ({"prompt": "a" * 20, "max_tokens": 20}, "prompt", "context of 32 leaves room for 12"),
    ({"prompt": "a", "n": 2}, "n", "unknown field"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "1 to 24"),
    ({"prompt": "a", "max_tokens": 25}, "max_tokens", "serve.max_tokens=24"),
    ({"prompt": "a", "max_tokens": 2.5}, "max_tokens", "expected an integer"),
    ({"prompt": "a", "temperature": 2.5}, "temperature", "[0, 2]"),
    ({"prompt": "a", "temperature": "hot"}, "temperature", "[0, 2]"),
    ({"prompt": "a", "top_p": 0}, "top_p", "(0, 1]"),
    ({"prompt": "a", "top_k": -1}, "top_k", "0 (all) to 65"),
    ({"prompt": "a", "top_k": True}, "top_k", "expected an integer"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop", "1 to 4 strings"),
    ({"prompt": "a", "stop": ["ok", ""]}, "stop[1]", "non-empty string"),
    ({"prompt": "a", "seed": -1}, "seed", "out of range"),
    ({"prompt": "a", "stream": "yes"}, "stream", "true or false"),
    ([1], "body", "JSON object"),
]


@pytest.mark.parametrize("body,field,detail", BAD)
def test_bad_input_gets_422_naming_the_field(lm, body, field, detail):
    r = complete(lm.url, body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and detail in r.json()["detail"], r.json()


def test_malformed_json_no_key_and_the_documented_route(lm):
    r = httpx.post(f"{lm.url}/v1/completions", content=b'{"prompt": ', headers=AUTH)
    assert r.status_code == 400 and r.json()["error"] == "malformed JSON"
    r = complete(lm.url, {"prompt": "a"}, headers={})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    serving = httpx.get(f"{lm.url}/v1/model", headers=AUTH).json()["serving"]
    assert serving["completions"] == {"context": 32, "max_tokens": 24, "max_queue": MAX_QUEUE}
    op = httpx.get(f"{lm.url}/openapi.json").json()["paths"]["/v1/completions"]["post"]
    assert sorted(op["responses"]) == ["200", "400", "401", "413", "422", "429", "500", "503"]
    assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert op["requestBody"]["content"]["application/json"]["schema"]["properties"]["max_tokens"]["maximum"] == 24


# -- SIGTERM with streams in flight (a real process) -------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_lets_streams_in_flight_finish(serve_exports, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT, "MLSYS_API_KEYS": SERVE_KEY}
    # one slot: the other streams wait in the queue, so generation is surely under way when SIGTERM arrives
    proc = subprocess.Popen([sys.executable, "-m", "experiments.serve", f"model={serve_exports['gpt']}",
                             f"serve.port={port}", "serve.max_batch=1", "serve.max_queue=32"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    n = 12
    results: list = [None] * n

    def read(i):
        try:
            with httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, timeout=60, json={
                    "prompt": "A", "max_tokens": 24, "temperature": 0, "stream": True}) as r:
                results[i] = (r.status_code, [x for x in r.iter_lines() if x])
        except httpx.ConnectError:  # not connected before SIGTERM: refused, as it should be
            results[i] = ("refused", [])

    try:
        wait_ready(url, proc)
        threads = [threading.Thread(target=read, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while metric(url, "mlsys_completions_waiting") < 2:
            assert time.time() < deadline, "the streams never queued"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    finished = 0
    for status, lines in results:
        if status == 200:  # accepted before SIGTERM (running or queued): streamed to its end
            assert len(lines) == 25 and lines[-1] == "data: [DONE]", lines
            assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
            finished += 1
        else:  # arrived after it: refused
            assert status in (503, "refused"), (status, lines)
    assert finished >= 3  # the one decoding and the two (or more) queued when SIGTERM came
    assert "drained: every accepted request was answered" in out


# -- text while it is generated (no server) ----------------------------------------------------------------------------


def test_streamed_text_never_sends_half_characters_or_a_stop_strings_start():
    """A byte-level BPE splits a character's UTF-8 bytes over tokens: no piece of the stream shows U+FFFD, and
    text that could still become a stop string is held back until it is clear."""
    from mlsys.serve.text import TextStream
    from mlsys.tokenizer import train_bpe

    text = "Ça va? Très bien! 日本語のテキスト, naïve café. " * 20
    tok = train_bpe([text], vocab_size=300)
    ids = tok.encode("naïve 日本語 café: the end. Très bien").tolist()
    stream = TextStream(tok.decode)
    pieces = [stream.push(t)[0] for t in ids]
    pieces.append(stream.finish())
    assert "".join(pieces) == tok.decode(ids) and not any("\ufffd" in p for p in pieces)
    stream, sent = TextStream(tok.decode, ("café:", "zz")), []
    for t in ids:
        delta, stopped = stream.push(t)
        sent.append(delta)
        if stopped:
            break
    assert stopped and "".join(sent) == "naïve 日本語 " == stream.text


def test_rows_join_and_leave_the_shared_cache_without_changing_a_rows_logits(serve_exports):
    """The running batch directly: rows of different lengths join (the shorter past padded on the left), one
    leaves (the slots nobody uses are cut: the past is as long as the longest row), and each remaining row's next
    logits equal those of the same tokens run alone."""
    from mlsys.serve.running import RunningBatch

    dec = Decoder(serve_exports["gpt"])
    batch = RunningBatch(dec)
    rows = {"long": np.arange(1, 21, dtype=np.int32), "short": np.array([5, 6, 7], np.int32),
            "mid": np.arange(30, 39, dtype=np.int32)}
    for names in (["long"], ["short", "mid"]):  # two prefills: the second joins a batch that already decodes
        _, past, mask = batch.prefill([rows[n] for n in names])
        batch.join(names, past, mask, np.array([rows[n][-1] for n in names], np.int32))
        for n in names:
            rows[n] = np.append(rows[n], rows[n][-1])  # the token each row feeds next
    assert batch.slots == 20 and len(batch) == 3
    batch.leave([False, True, True])  # "long" goes: its 20 slots were the widest
    assert batch.rows == ["short", "mid"] and batch.slots == 9
    logits = batch.step()
    for i, n in enumerate(batch.rows):
        alone, _ = dec.step(rows[n][None], np.ones((1, len(rows[n])), np.int32),
                            np.arange(len(rows[n]), dtype=np.int32)[None], dec.empty_past(1))
        assert np.allclose(logits[i], alone[0, -1], atol=1e-5), n
