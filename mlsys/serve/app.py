"""The HTTP side: FastAPI routes, API-key checks, the body limit, error bodies, and uvicorn with a graceful drain.

Every error is JSON `{"error": <what>, "detail": <the problem and the fix>}` (and `"field"` for invalid input)."""

import asyncio
import contextlib
import gc
import json
import logging

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.routing import Route

from mlsys.serve.auth import KeyChecker, load_digests
from mlsys.serve.batcher import Batcher, Draining
from mlsys.serve.completion_request import Limits, prompt_pattern
from mlsys.serve.completion_request import schema as completion_schema
from mlsys.serve.completions import CompletionEndpoint
from mlsys.serve.config import ServeConfig
from mlsys.serve.drift import DriftMonitor
from mlsys.serve.metrics import CountRequests, Metrics
from mlsys.serve.model import ServedModel
from mlsys.serve.scheduler import Scheduler
from mlsys.serve.openapi import (PREDICTED, PROMETHEUS, STATUS, completion_responses, document, errors, json_body,
                                 predict_request)
from mlsys.serve.validate import Invalid, validate

log = logging.getLogger("mlsys.serve")
ROUTES = {"/v1/predict", "/v1/completions", "/v1/model", "/healthz", "/readyz", "/metrics"}


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: dict | None = None, **extra):
        self.status, self.body, self.headers = status, {"error": error, "detail": detail, **extra}, headers


def example_schema(model: ServedModel) -> dict:
    """JSON schema of one example, for the OpenAPI spec."""
    inp = model.input
    if inp.kind == "tokens":
        return {"type": "array", "minItems": 1, "maxItems": inp.max_length,
                "items": {"type": "integer", "minimum": 0, "maximum": inp.vocab_size - 1}}
    schema = {"type": "number", "minimum": inp.lo, "maximum": inp.hi}
    for d in reversed(inp.shape):
        schema = {"type": "array", "minItems": d, "maxItems": d, "items": schema}
    return schema


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) past `limit` bytes without reading the rest."""
    too_large = ApiError(413, "payload too large", f"the request body is over {limit} bytes (serve.max_body_bytes); "
                         "send fewer examples per request")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def create_app(cfg: ServeConfig) -> "HotPath":
    """Everything that can be wrong with the keys or the export fails here, before the server listens."""
    keys = KeyChecker(load_digests(cfg.api_keys_file))
    model = ServedModel(cfg)
    metrics = Metrics()
    drift = DriftMonitor(model.reference, cfg.drift_window, cfg.drift_min_rows, cfg.drift_threshold)
    batcher = Batcher(model, cfg, metrics, drift)
    metrics.bind(batcher, drift)
    lm = language_model(model, cfg, metrics)  # (scheduler, limits) when the export can generate text, else None
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        warm_up(model, cfg.max_batch)
        if lm:
            warm_up_decoder(lm[0].decoder)
        # Everything loaded so far (FastAPI, ONNX Runtime, the model) lives as long as the process: keep it out of
        # the garbage collector's full passes, which otherwise walk it all and stall requests for tens of ms.
        gc.collect()
        gc.freeze()
        batcher.start()
        loop = asyncio.get_running_loop()

        def drain():  # called from the SIGTERM handler
            loop.call_soon_threadsafe(batcher.flush)
            if lm:  # no new completions; those accepted (streams included) run to their end
                loop.call_soon_threadsafe(lm[0].drain)

        if lm:
            lm[0].start()
        state["drain"] = drain
        state["ready"] = True
        metrics.ready.set(1)
        log.info("serving %s (%s) with max_batch=%d max_delay_ms=%g", model.version, cfg.precision, cfg.max_batch,
                 cfg.max_delay_ms)
        yield
        state["ready"] = False
        metrics.ready.set(0)
        await batcher.stop()  # runs every request still queued before the process ends
        if lm:
            await lm[0].stop()
        log.info("drained: every accepted request was answered")

    app = FastAPI(title="mlsys model server", version=model.version, lifespan=lifespan,
                  description=f"{model.manifest['family']} exported by mlsys; `Authorization: Bearer <key>` on /v1.")
    app.state.serve = state  # read by the server's SIGTERM hook (mark not ready at once)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    async def require_key(request: Request) -> None:  # async: a plain def would cost a thread hop per request
        if not keys.check(request.headers.get("authorization")):
            # the same answer for a missing, malformed or wrong key: nothing to learn from it
            raise ApiError(401, "unauthorized", "send a valid API key as 'Authorization: Bearer <key>'; the "
                           "server's operator issues keys", headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    async def predict(request: Request):
        """`{"inputs": [example, ...]}` → `{"outputs": [...], "model_version": ...}`; or `{"input": example}` →
        `{"output": ..., "model_version": ...}`."""
        try:  # answers its own errors: the hot path bypasses FastAPI's exception handlers (see HotPath)
            return await answer(request)
        except ApiError as e:
            return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    async def answer(request: Request):
        await require_key(request)
        batcher.pending += 1  # on its way to the queue: the batcher may wait for it
        try:
            raw = await read_body(request, cfg.max_body_bytes)
            try:
                body = parse_json(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise ApiError(400, "malformed JSON", f"the body is not JSON ({e}); send Content-Type: "
                               "application/json and a body like {\"inputs\": [example, ...]}") from None
            try:
                inputs, single = validate(body, raw, model.input, cfg.max_rows)
            except Invalid as e:
                raise ApiError(422, "invalid input", e.detail, field=e.field) from None
        finally:
            batcher.pending -= 1
        try:
            outputs = await batcher.submit(inputs)
        except Draining:
            raise ApiError(503, "shutting down", "this replica is draining; retry (another replica will answer)",
                           headers={"Retry-After": "1"}) from None
        except Exception:
            raise ApiError(500, "inference failed", "the model could not run this batch; the server logged why")
        metrics.rows.inc(len(outputs))
        result = ({"output": outputs[0].tolist()} if single else {"outputs": [np.asarray(o).tolist() for o in outputs]})
        result["model_version"] = model.version
        return Response(orjson.dumps(result), media_type="application/json")

    @v1.get("/model", responses=errors(401))
    async def manifest():
        """The export's manifest (without the training machine's paths), the model version, what inputs are
        accepted, and the serving limits."""
        return {**model.public_manifest(), "serving": {
            "max_batch": cfg.max_batch, "max_delay_ms": cfg.max_delay_ms, "max_rows": cfg.max_rows,
            "max_body_bytes": cfg.max_body_bytes, "precision": cfg.precision, "drift_threshold": cfg.drift_threshold,
            "completions": {"context": lm[1].context, "max_tokens": lm[1].most_new, "max_queue": cfg.max_queue}
            if lm else None}}

    # The hot path is a plain Starlette route, reached without FastAPI's middleware stack (HotPath below): FastAPI's
    # per-request dependency machinery cost ~100 µs of the ~260 µs a request took, its middleware layers ~10% of the
    # rest (cProfile and py-spy at concurrency 64). The FastAPI route below, with the same function, is never
    # reached: it documents /v1/predict (body schema, key) in the OpenAPI spec.
    hot = CountRequests(Route("/v1/predict", predict, methods=["POST"]).app, metrics=metrics, routes=ROUTES)
    v1.post("/predict", responses={200: json_body(PREDICTED), **errors(400, 401, 413, 422, 500, 503)},
            openapi_extra={"requestBody": predict_request(example_schema(model), cfg.max_rows)})(predict)
    paths = {"/v1/predict": hot}
    if lm:
        scheduler, limits = lm
        endpoint = CompletionEndpoint(scheduler, model.tokenizer, limits, model.version, cfg, require_key, read_body,
                                      parse_json, ApiError)
        paths["/v1/completions"] = CountRequests(endpoint, metrics=metrics, routes=ROUTES)

        async def completions(request: Request):
            """OpenAI-style completion of `prompt` (text, through the export's tokenizer): `max_tokens`,
            `temperature`, `top_p`, `top_k`, `stop`, `seed`; `"stream": true` answers Server-Sent Events, one per
            token, then `data: [DONE]`. Continuous batching: a request joins the running decode batch at the next
            token."""

        v1.post("/completions", responses=completion_responses(), openapi_extra={"requestBody": {
            "required": True, "content": {"application/json": {"schema": completion_schema(limits)}}}})(completions)
    else:  # a 404 that says why this server cannot generate text, rather than a bare "Not Found"
        async def no_completions():
            raise ApiError(404, "no_completions", why_no_completions(model, cfg))

        v1.post("/completions", include_in_schema=False)(no_completions)
    app.include_router(v1)

    @app.get("/healthz", responses={200: json_body(STATUS)})
    async def healthz():
        """Alive (the process answers)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={200: json_body(STATUS), 503: json_body(STATUS, "Not ready: loading or draining.")})
    async def readyz():
        """Ready: the model is loaded and warmed up, and the server is not draining."""
        if not state["ready"]:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return {"status": "ready", "model_version": model.version}

    @app.get("/metrics", response_class=Response, responses={200: PROMETHEUS})
    async def prometheus():
        """Requests, latency, batch sizes, queue depth, errors by status, drift (Prometheus text format)."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def openapi() -> dict:  # generated once, on the first request for /openapi.json
        if app.openapi_schema is None:
            app.openapi_schema = document(app)
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(CountRequests, metrics=metrics, routes=ROUTES)
    return HotPath(app, paths)


class HotPath:
    """ASGI: `POST <path>` straight to its handler (which checks the key, limits the body and answers its own
    errors), everything else — other routes, other methods, lifespan — to the FastAPI app."""

    def __init__(self, app: FastAPI, paths: dict):
        self.app, self.paths = app, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            return await self.paths[scope["path"]](scope, receive, send)
        return await self.app(scope, receive, send)

    def __getattr__(self, name: str):  # .state, .openapi(), ... of the FastAPI app
        return getattr(self.app, name)


def parse_json(raw: bytes):
    """orjson: ~5x faster than the standard library on arrays of numbers, which were 15% of the server's CPU under
    load. What orjson refuses goes to the standard library's parser, so that a NaN or Infinity literal still gets
    a 422 naming its field, and only truly malformed JSON a 400."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def language_model(model: ServedModel, cfg: ServeConfig, metrics: Metrics):
    """(scheduler, limits) for an export with a decoder graph and a tokenizer (served at /v1/completions)."""
    decoder = getattr(model, "decoder", None)
    if decoder is None or not cfg.completions:
        return None
    scheduler = Scheduler(decoder, cfg, metrics)
    metrics.bind_scheduler(scheduler)
    return scheduler, Limits(context=decoder.max_len, max_tokens=cfg.max_tokens, vocab_size=decoder.vocab,
                             prompt_pattern=prompt_pattern(model.tokenizer))


def why_no_completions(model: ServedModel, cfg: ServeConfig) -> str:
    """Why /v1/completions is not served, and what to do instead."""
    family = model.manifest["family"]
    if model.input.kind != "tokens":
        return f"{family} is not a language model: POST its examples to /v1/predict"
    if not cfg.completions:
        return ("this server runs with serve.completions=false (logits only): restart it without that setting to "
                "generate text, or POST token ids to /v1/predict for logits")
    return (f"the {family} export has no KV-cache decoder graph (decoder.onnx), so this server cannot generate "
            f"text: POST token ids to /v1/predict for logits")


def warm_up_decoder(decoder) -> None:
    """A prefill and a decode step at two batch sizes, so the first completion does not pay for ORT's first call."""
    for n in (1, 2):
        mask = np.ones((n, 4), np.int32)
        _, past = decoder.step(np.zeros((n, 4), np.int32), mask, np.tile(np.arange(4, dtype=np.int32), (n, 1)),
                               decoder.empty_past(n))
        decoder.step(np.zeros((n, 1), np.int32), np.ones((n, 5), np.int32), np.full((n, 1), 4, np.int32), past)


def warm_up(model: ServedModel, max_batch: int) -> None:
    """Run the shapes the server will see once, so the first real request does not pay for ORT's first call."""
    inp = model.input
    for n in sorted({1, max_batch}):
        shape = (n, min(inp.max_length, 16) or 1) if inp.kind == "tokens" else (n, *inp.shape)
        model.run(np.zeros(shape, np.int32 if inp.kind == "tokens" else np.float32))
