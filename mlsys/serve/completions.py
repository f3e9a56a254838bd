"""`POST /v1/completions`, OpenAI-style: text in, text out through the export's tokenizer, with `usage` token counts
and a `finish_reason` ("stop": EOS or a stop string, "length": max_tokens). `"stream": true` answers Server-Sent
Events, one `data: {chunk}` per generated token (its new text; held back while it could still be part of a stop
string), the last with the finish reason and usage, then `data: [DONE]`.

A plain ASGI handler (like /v1/predict's hot path): it checks the key, limits the body, answers its own errors, and
listens for the client going away for as long as the completion runs — a client that disconnects, streaming or
not, is cancelled at once (out of the queue, or out of the decode batch before its next step)."""

import asyncio
import time
import uuid

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse

from mlsys.serve.batcher import Draining
from mlsys.serve.completion_request import Limits, parse
from mlsys.serve.scheduler import QueueFull, Scheduler, Sequence
from mlsys.serve.validate import Invalid

SSE = "text/event-stream"


class CompletionEndpoint:
    def __init__(self, scheduler: Scheduler, tokenizer, limits: Limits, version: str, cfg, check_key, read_body,
                 parse_json, api_error):
        self.scheduler, self.tokenizer, self.limits, self.version, self.cfg = scheduler, tokenizer, limits, version, cfg
        self.check_key, self.read_body, self.parse_json, self.ApiError = check_key, read_body, parse_json, api_error
        self.decode = tokenizer.decode

    async def __call__(self, scope, receive, send):
        try:
            seq = await self._accept(Request(scope, receive))
        except self.ApiError as e:
            return await JSONResponse(e.body, status_code=e.status, headers=e.headers)(scope, receive, send)
        watcher = asyncio.create_task(self._watch(receive, seq))
        try:
            if seq.req.stream:
                await self._stream(seq, send)
            else:
                await self._whole(seq, scope, receive, send)
        finally:
            watcher.cancel()
            self.scheduler.cancel(seq)  # no-op once it ended; frees the slot if this handler was cut short

    async def _accept(self, request: Request) -> Sequence:
        await self.check_key(request)
        raw = await self.read_body(request, self.cfg.max_body_bytes)
        try:
            body = self.parse_json(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise self.ApiError(400, "malformed JSON", f"the body is not JSON ({e}); send Content-Type: "
                                'application/json and a body like {"prompt": "To be", "max_tokens": 16}') from None
        try:
            req = parse(body, self.limits, self.tokenizer.encode)
        except Invalid as e:
            raise self.ApiError(422, "invalid input", e.detail, field=e.field) from None
        seq = Sequence(req, self.decode)
        try:
            self.scheduler.submit(seq)
        except QueueFull:
            raise self.ApiError(429, "too many requests", f"{self.cfg.max_queue} completions are already waiting "
                                "(serve.max_queue); retry after the Retry-After seconds",
                                headers={"Retry-After": "1"}) from None
        except Draining:
            raise self.ApiError(503, "shutting down", "this replica is draining; retry (another replica will "
                                "answer)", headers={"Retry-After": "1"}) from None
        return seq

    async def _watch(self, receive, seq: Sequence) -> None:
        """Until the client disconnects (the body is read already: the next message is the disconnect)."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.scheduler.cancel(seq)
                return

    def _chunk(self, seq: Sequence, cid: str, created: int, text: str, finish: str | None) -> dict:
        out = {"id": cid, "object": "text_completion", "created": created, "model": self.version,
               "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if finish is not None:
            n = len(seq.req.prompt)
            out["usage"] = {"prompt_tokens": n, "completion_tokens": seq.generated,
                            "total_tokens": n + seq.generated}
        return out

    async def _whole(self, seq: Sequence, scope, receive, send) -> None:
        reason = await seq.done
        if reason == "cancelled":
            return  # nobody is listening
        if reason == "error":
            raise_ = self.ApiError(500, "generation failed", "the model could not run this batch; the server "
                                   "logged why")
            return await JSONResponse(raise_.body, status_code=500)(scope, receive, send)
        cid = f"cmpl-{uuid.uuid4().hex}"
        body = self._chunk(seq, cid, int(time.time()), seq.text.text, reason)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": orjson.dumps(body)})

    async def _stream(self, seq: Sequence, send) -> None:
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", SSE.encode()), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        while True:
            # every token that arrived since the last write goes out in one write (one event each): a stream that
            # falls behind under load catches up without a write per token
            pending = [await seq.events.get()]
            while not seq.events.empty():
                pending.append(seq.events.get_nowait())
            body, last = bytearray(), False
            for text, finish in pending:
                if finish == "cancelled":
                    return
                data = self._chunk(seq, cid, created, text, None if finish == "error" else finish)
                if finish == "error":
                    data["error"] = {"error": "generation failed", "detail": "the server logged why"}
                body += b"data: " + orjson.dumps(data) + b"\n\n"
                if finish is not None:
                    body += b"data: [DONE]\n\n"
                    last = True
                    break
            await send({"type": "http.response.body", "body": bytes(body), "more_body": not last})
            if last:
                return
