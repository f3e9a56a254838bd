"""Dynamic batching. Requests wait in a queue on the event loop until `max_batch` rows are there or the oldest has
waited `max_delay_ms` (with `adaptive`, also until no other accepted request is still on its way to the queue);
then they run as ONE ONNX Runtime call in a worker thread, off the event loop, and each caller gets back exactly its
own rows. While a batch runs, the next one gathers, so under load batches fill by themselves.

Token sequences of different lengths are right-padded to the longest in the batch: the models are causal, so padding
after a sequence cannot change its outputs, and each caller gets its rows cut back to its own lengths."""

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from mlsys.serve.config import ServeConfig
from mlsys.serve.drift import DriftMonitor
from mlsys.serve.metrics import Metrics
from mlsys.serve.model import ServedModel

log = logging.getLogger("mlsys.serve")


class Draining(Exception):
    """The server is shutting down and takes no new work."""


@dataclass
class Item:
    inputs: object  # (n, *shape) array, or a list of n token arrays
    rows: int
    future: asyncio.Future
    arrived: float


class Batcher:
    def __init__(self, model: ServedModel, cfg: ServeConfig, metrics: Metrics, drift: DriftMonitor):
        self.model, self.cfg, self.metrics, self.drift = model, cfg, metrics, drift
        self.tokens = model.input.kind == "tokens"
        self.pending = 0  # accepted requests still being read or validated (they will join the queue soon)
        self.queued_rows = 0
        self._items: collections.deque[Item] = collections.deque()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="mlsys-ort")  # one session, one caller at a time
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._flush = False  # set on SIGTERM: stop waiting for company, run what is queued

    # -- the request side --------------------------------------------------------------------------------------

    async def submit(self, inputs) -> list:
        """Queue one request's rows; returns its own outputs (one per row)."""
        if self._closing:
            raise Draining()
        rows = len(inputs)
        future = asyncio.get_running_loop().create_future()
        self._items.append(Item(inputs, rows, future, time.perf_counter()))
        self.queued_rows += rows
        self._wake.set()
        return await future

    # -- the worker --------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="mlsys-batcher")

    def flush(self) -> None:
        """Draining: from now on every batch runs as soon as the worker is free."""
        self._flush = True
        if self._wake is not None:
            self._wake.set()

    async def stop(self) -> None:
        """Take no new work, run everything already queued, then stop."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.cfg.max_delay_ms / 1e3
        while True:
            if not self._items:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = self._items[0].arrived + delay
            while self.queued_rows < self.cfg.max_batch and not (self._closing or self._flush):
                if self.cfg.adaptive and self.pending == 0:
                    break  # every accepted request is queued: waiting longer only adds latency
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
            batch = self._take()
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, [i.inputs for i in batch])
            except Exception as e:  # every caller of this batch hears of it; the server goes on
                log.exception("inference failed for a batch of %d requests", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            start = 0
            for item in batch:
                if not item.future.done():  # a caller that went away has a cancelled future
                    item.future.set_result(outputs[start:start + item.rows])
                start += item.rows

    def _take(self) -> list[Item]:
        """The oldest requests, up to max_batch rows (a larger request alone)."""
        batch = [self._items.popleft()]
        rows = batch[0].rows
        while self._items and rows + self._items[0].rows <= self.cfg.max_batch:
            rows += self._items[0].rows
            batch.append(self._items.popleft())
        self.queued_rows -= rows
        self.metrics.batch_rows.observe(rows)
        return batch

    def _run(self, parts: list) -> list:
        """In the worker thread: one ONNX Runtime call for the whole batch; returns one output per row."""
        if self.tokens:
            seqs = [t for part in parts for t in part]
            x = np.zeros((len(seqs), max(len(t) for t in seqs)), np.int32)  # right padding, see the module doc
            for i, t in enumerate(seqs):
                x[i, :len(t)] = t
            y = self.model.run(x)
            self.drift.observe(seqs)
            return [y[i, :len(t)] for i, t in enumerate(seqs)]
        x = parts[0] if len(parts) == 1 else np.concatenate(parts)
        y = self.model.run(x)
        self.drift.observe(x)
        return list(y)
