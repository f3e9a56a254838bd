"""The OpenAPI document is the server's contract: every status and content type each route answers, and request
schemas exactly as strict as the validation in mlsys/serve/validate.py (what the schema admits is served, what it
rejects is refused). tests/test_serve.py fuzzes a live server against it with schemathesis, every check on."""

ERROR = {"type": "object", "required": ["error", "detail"], "additionalProperties": False, "properties": {
    "error": {"type": "string", "description": "what went wrong, in a few words"},
    "detail": {"type": "string", "description": "the problem and the fix"},
    "field": {"type": "string", "description": "the invalid field, e.g. inputs[3][2][5][0] (422 only)"}}}

WHY = {
    400: "The body is not JSON.",
    401: "No valid API key: send `Authorization: Bearer <key>`.",
    413: "The body is over serve.max_body_bytes.",
    422: "The body is JSON but not a valid request; `field` names the first invalid field.",
    429: "serve.max_queue completions are already waiting: retry after Retry-After seconds.",
    500: "The model could not run the batch (the server logged why).",
    503: "The server is draining (SIGTERM): retry, another replica answers.",
}
HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
    503: {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}},
}
HEADERS[429] = HEADERS[503]


def json_body(schema: dict, description: str = "OK", headers: dict | None = None) -> dict:
    out = {"description": description, "content": {"application/json": {"schema": schema}}}
    return {**out, "headers": headers} if headers else out


def errors(*codes: int) -> dict:
    """Response documentation of these error statuses, all with the one error body."""
    return {code: json_body(ERROR, WHY[code], HEADERS.get(code)) for code in codes}


def predict_request(example: dict, max_rows: int) -> dict:
    """Exactly one of `inputs` (1..max_rows examples) or `input` (one example), nothing else."""
    return {"required": True, "content": {"application/json": {"schema": {"oneOf": [
        {"type": "object", "required": ["inputs"], "additionalProperties": False, "properties": {
            "inputs": {"type": "array", "minItems": 1, "maxItems": max_rows, "items": example}}},
        {"type": "object", "required": ["input"], "additionalProperties": False, "properties": {
            "input": example}}]}}}}


PREDICTED = {"oneOf": [
    {"type": "object", "required": ["outputs", "model_version"], "properties": {
        "outputs": {"type": "array", "description": "one model output per example (logits)"},
        "model_version": {"type": "string"}}},
    {"type": "object", "required": ["output", "model_version"], "properties": {
        "output": {"type": "array"}, "model_version": {"type": "string"}}}]}
_CHOICE = {"type": "object", "required": ["index", "text", "logprobs", "finish_reason"], "properties": {
    "index": {"type": "integer"}, "text": {"type": "string"}, "logprobs": {"type": "null"},
    "finish_reason": {"enum": ["stop", "length", None], "description": "stop: EOS or a stop string; length: "
                      "max_tokens; null in a stream's chunks before the last"}}}
USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"], "properties": {
    k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
COMPLETION = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
    "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
    "model": {"type": "string", "description": "the served model's version"},
    "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": _CHOICE}, "usage": USAGE}}
CHUNK = {**COMPLETION, "required": ["id", "object", "created", "model", "choices"],
         "description": "one generated token's new text (possibly empty while held back for a stop string); the "
                        "last chunk carries finish_reason and usage"}
# OpenAPI 3.1: an event stream's `schema` describes each event (data, event type), as schemathesis reads it
EVENT_STREAM = {"schema": {"type": "object", "required": ["data"], "properties": {
    "event": {"const": "message"},
    "data": {"anyOf": [{"type": "string", "contentMediaType": "application/json", "contentSchema": CHUNK},
                       {"const": "[DONE]", "description": "the end of the stream"}]}}},
    "description": 'with `"stream": true`: Server-Sent Events, `data: {chunk}` per generated token, then '
                   "`data: [DONE]`"}


def completion_responses() -> dict:
    ok = json_body(COMPLETION, "The completion (JSON), or with `stream` its Server-Sent Events")
    ok["content"]["text/event-stream"] = EVENT_STREAM
    return {200: ok, **errors(400, 401, 413, 422, 429, 500, 503)}


STATUS = {"type": "object", "required": ["status"], "properties": {
    "status": {"type": "string"}, "model_version": {"type": "string"}}}
PROMETHEUS = {"description": "Prometheus text exposition format", "content": {
    "text/plain; version=0.0.4; charset=utf-8": {"schema": {"type": "string"}}}}
BEARER = {"bearer": {"type": "http", "scheme": "bearer", "description": "an API key issued by the operator "
                                                                        "(`python -m experiments.serve keygen`)"}}


def document(app) -> dict:
    """FastAPI's generated document plus the bearer scheme on every /v1 route."""
    from fastapi.openapi.utils import get_openapi

    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    spec.setdefault("components", {})["securitySchemes"] = BEARER
    for path, ops in spec["paths"].items():
        if path.startswith("/v1/"):
            for op in ops.values():
                op["security"] = [{"bearer": []}]
    return spec
