"""Continuous batching for completions. Requests wait in a bounded queue; between any two decode steps the
scheduler (one asyncio task) lets finished and abandoned sequences leave the running batch, admits waiting ones
into the free slots (one prefill for all of them, their first token sampled at once: that is the time to first
token), then runs one decode step for every running row. So a new request joins at the next token, never after
the longest one in flight, and a prefill never waits for more than one decode step.

Model calls and sampling run in one worker thread (ONNX Runtime releases the GIL); text, stop strings and the
hand-over to each request's HTTP side happen on the event loop. Each sequence samples with its own generator,
seeded from the request, so a completion is reproducible given its seed and the same batch companions."""

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mlsys.serve.batcher import Draining
from mlsys.serve.completion_request import CompletionRequest
from mlsys.serve.running import RunningBatch
from mlsys.serve.sampling import pick
from mlsys.serve.text import TextStream

log = logging.getLogger("mlsys.serve")


class QueueFull(Exception):
    """serve.max_queue completions are already waiting."""


class Sequence:
    """One completion on its way: the HTTP side reads `events` ((text, finish_reason or None) per token) or
    awaits `done`."""

    def __init__(self, req: CompletionRequest, decode):
        self.req = req
        self.rng = np.random.default_rng(req.seed)
        self.text = TextStream(decode, req.stop)
        self.events: asyncio.Queue = asyncio.Queue()
        self.done = asyncio.get_running_loop().create_future()
        self.generated = 0  # completion tokens (a stop string's and EOS included, as they were generated)
        self.finish: str | None = None  # "stop", "length", "cancelled" or "error"
        self.slot = False  # holds a place in the decode batch
        self.arrived = time.perf_counter()

    @property
    def over(self) -> bool:
        return self.finish is not None

    def end(self, reason: str, delta: str = "") -> None:
        self.finish = reason
        self.events.put_nowait((delta, reason))
        if not self.done.done():
            self.done.set_result(reason)


class Scheduler:
    def __init__(self, decoder, cfg, metrics):
        self.decoder, self.cfg, self.metrics = decoder, cfg, metrics
        self.batch = RunningBatch(decoder)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="mlsys-decode")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        # slots taken: sequences admitted (out of the queue) that have not ended; counted on the event loop only,
        # so a request arriving mid-step sees exactly what is free
        self.slots = 0

    # -- the request side --------------------------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; raises Draining while shutting down, QueueFull past serve.max_queue."""
        if self._closing:
            raise Draining()
        # the queue proper starts past the free slots: those are taken at the next step
        free = self.cfg.max_batch - self.slots
        if len(self.waiting) >= self.cfg.max_queue + max(free, 0):
            raise QueueFull()
        self.waiting.append(seq)
        self._wake.set()

    def cancel(self, seq: Sequence) -> None:
        """The client is gone: a waiting sequence leaves the queue now, a running one before the next step."""
        if seq.over:
            return
        self._end(seq, "cancelled")
        try:
            self.waiting.remove(seq)
        except ValueError:
            self._wake.set()  # running: the loop drops it (and its cache rows) before its next step
        self.metrics.completions.labels("cancelled").inc()

    @property
    def running(self) -> int:
        """Slots in use (a finished row's cache leaves the batch before the next step)."""
        return self.slots

    # -- the loop ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="mlsys-scheduler")

    def drain(self) -> None:
        """SIGTERM: take no new completions; every accepted one still runs to its end."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()

    async def stop(self) -> None:
        self.drain()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_finished()
            while self.waiting and self.waiting[0].over:
                self.waiting.popleft()
            if not self.batch.rows and not self.waiting:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            free = self.cfg.max_batch - self.slots
            admitted = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
            for seq in admitted:
                seq.slot = True
            self.slots += len(admitted)
            try:
                if admitted:
                    decoding = len(self.batch) > 0
                    first = await loop.run_in_executor(self._executor, self._prefill, admitted)
                    self.metrics.prefills.inc()
                    if decoding:  # joined a batch that was decoding: continuous batching at work
                        self.metrics.joins.inc()
                    now = time.perf_counter()
                    for seq, token in zip(admitted, first):
                        self.metrics.ttft.observe(now - seq.arrived)
                        self._deliver(seq, token)
                    self._drop_finished()
                if self.batch.rows:
                    self.metrics.decode_rows.observe(len(self.batch))
                    tokens = await loop.run_in_executor(self._executor, self._decode)
                    for seq, token in zip(self.batch.rows, tokens):
                        self._deliver(seq, token)
            except Exception:  # every sequence involved hears of it (500, or the end of its stream); the server goes on
                log.exception("generation failed with %d sequences running", len(self.batch))
                for seq in self.batch.rows + admitted:
                    if not seq.over:
                        self._finish(seq, "error", "")
                self.batch = RunningBatch(self.decoder)

    def _drop_finished(self) -> None:
        keep = [not s.over for s in self.batch.rows]
        if not all(keep):
            self.batch.leave(keep)

    # -- in the worker thread ----------------------------------------------------------------------------------

    def _prefill(self, seqs: list[Sequence]) -> list[int]:
        logits, past, mask = self.batch.prefill([s.req.prompt for s in seqs])
        first = pick(logits, [s.req.sampling for s in seqs], [s.rng for s in seqs])
        self.batch.join(seqs, past, mask, first.astype(np.int32))
        return first.tolist()

    def _decode(self) -> list[int]:
        logits = self.batch.step()
        rows = self.batch.rows
        tokens = pick(logits, [s.req.sampling for s in rows], [s.rng for s in rows])
        self.batch.next_ids = tokens.astype(np.int32)
        return tokens.tolist()

    # -- back on the event loop --------------------------------------------------------------------------------

    def _deliver(self, seq: Sequence, token: int) -> None:
        """Hand one new token to its sequence: its text, or its end (EOS, a stop string, max_tokens)."""
        if seq.over:  # cancelled while the step ran
            return
        seq.generated += 1
        self.metrics.tokens.inc()
        if token == self.decoder.eos:
            return self._finish(seq, "stop", seq.text.finish())
        delta, stopped = seq.text.push(token)
        if stopped:
            return self._finish(seq, "stop", delta)
        if seq.generated >= seq.req.max_tokens:
            return self._finish(seq, "length", delta + seq.text.finish())
        seq.events.put_nowait((delta, None))

    def _finish(self, seq: Sequence, reason: str, delta: str) -> None:
        self._end(seq, reason, delta)
        self.metrics.completions.labels(reason).inc()

    def _end(self, seq: Sequence, reason: str, delta: str = "") -> None:
        if seq.slot:
            seq.slot = False
            self.slots -= 1
        seq.end(reason, delta)
