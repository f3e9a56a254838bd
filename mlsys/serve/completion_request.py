"""The body of `POST /v1/completions`, checked strictly (OpenAI's completion fields, nothing else): a failure names
the field, what was wrong and what is accepted. `schema` is the same rules as JSON Schema, for the OpenAPI document."""

import math
from dataclasses import dataclass

import numpy as np

from mlsys.serve.sampling import Sampling
from mlsys.serve.validate import Invalid

MAX_STOP = 4  # stop strings per request, as in OpenAI's API
MAX_SEED = 2**63 - 1
DEFAULT_MAX_TOKENS = 16  # OpenAI's default


@dataclass
class CompletionRequest:
    prompt: np.ndarray  # int32 token ids
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    seed: int | None
    stream: bool


@dataclass(frozen=True)
class Limits:
    context: int  # the model's context length (positions)
    max_tokens: int  # serve.max_tokens
    vocab_size: int
    prompt_pattern: str = ""  # a regex a prompt must contain a match of to have any token ("" = any text)

    @property
    def most_new(self) -> int:
        """The largest `max_tokens` any request can have: a prompt needs at least one position."""
        return max(1, min(self.max_tokens, self.context - 1))


def _integer(body: dict, key: str, default, lo: int, hi: int, what: str):
    v = body.get(key, default)
    if v is None and default is None:
        return None
    # JSON has one number type: 3.0 is the integer 3 (as JSON Schema says); 3.5, true and "3" are not
    if not (type(v) is int or (type(v) is float and math.isfinite(v) and v.is_integer())):
        raise Invalid(key, f"expected an integer, got {v!r}; {what}")
    if not lo <= v <= hi:
        raise Invalid(key, f"{v!r} is out of range; {what}")
    return int(v)


def _number(body: dict, key: str, default: float, ok, what: str) -> float:
    v = body.get(key, default)
    if type(v) not in (int, float) or not math.isfinite(v) or not ok(v):
        raise Invalid(key, f"{v!r}: {what}")
    return float(v)


def _stop(v) -> tuple[str, ...]:
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_STOP:
        raise Invalid("stop", f"expected a string or a list of 1 to {MAX_STOP} strings")
    for i, s in enumerate(items):
        if not isinstance(s, str) or not s:
            where = "stop" if isinstance(v, str) else f"stop[{i}]"
            raise Invalid(where, f"expected a non-empty string, got {s!r}")
    return tuple(items)


def parse(body, limits: Limits, encode) -> CompletionRequest:
    """A CompletionRequest from the decoded JSON body; `encode` turns the prompt into token ids."""
    if not isinstance(body, dict):
        raise Invalid("body", 'expected a JSON object like {"prompt": "To be", "max_tokens": 16}')
    unknown = sorted(set(body) - set(SCHEMA_KEYS))
    if unknown:
        raise Invalid(unknown[0], f"unknown field; the accepted fields are {', '.join(SCHEMA_KEYS)}")
    if "model" in body and not isinstance(body["model"], str):
        raise Invalid("model", "expected a string (ignored: this server serves one model)")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise Invalid("prompt", f"expected a non-empty string, got {prompt!r}")
    max_tokens = _integer(body, "max_tokens", min(DEFAULT_MAX_TOKENS, limits.most_new), 1, limits.most_new,
                          f"1 to {limits.most_new} (serve.max_tokens={limits.max_tokens}, context "
                          f"{limits.context})")
    sampling = Sampling(
        temperature=_number(body, "temperature", 1.0, lambda t: 0 <= t <= 2, "expected a number in [0, 2] "
                            "(0 = greedy)"),
        top_p=_number(body, "top_p", 1.0, lambda p: 0 < p <= 1, "expected a number in (0, 1]"),
        top_k=_integer(body, "top_k", 0, 0, limits.vocab_size, f"0 (all) to {limits.vocab_size} (the vocabulary)"))
    stop = _stop(body.get("stop"))
    seed = _integer(body, "seed", None, 0, MAX_SEED, f"0 to {MAX_SEED}, or null for a random one")
    stream = body.get("stream", False)
    if type(stream) is not bool:
        raise Invalid("stream", f"expected true or false, got {stream!r}")
    ids = np.asarray(encode(prompt), np.int32)
    if len(ids) == 0:
        raise Invalid("prompt", "empty after tokenization (none of its characters is in the model's vocabulary)")
    room = limits.context - max_tokens
    if len(ids) > room:
        raise Invalid("prompt", f"{len(ids)} tokens; with max_tokens={max_tokens} the model's context of "
                      f"{limits.context} leaves room for {room}: shorten the prompt or lower max_tokens")
    return CompletionRequest(ids, max_tokens, sampling, stop, seed, stream)


SCHEMA_KEYS = ("prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "model")


def schema(limits: Limits) -> dict:
    """The request body as JSON Schema: what `parse` accepts (the prompt's length in tokens aside: 422)."""
    text = {"type": "string", "minLength": 1}
    prompt = {**text, "pattern": limits.prompt_pattern} if limits.prompt_pattern else text
    return {"type": "object", "required": ["prompt"], "additionalProperties": False, "properties": {
        "prompt": {**prompt, "description": "the text to continue; its tokens plus max_tokens must fit the "
                   "context"},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": limits.most_new, "default": min(
            DEFAULT_MAX_TOKENS, limits.most_new), "description": "new tokens at most"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 1, "description": "0 = greedy"},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
        "top_k": {"type": "integer", "minimum": 0, "maximum": limits.vocab_size, "default": 0,
                  "description": "0 = all tokens"},
        "stop": {"anyOf": [text, {"type": "array", "minItems": 1, "maxItems": MAX_STOP, "items": text},
                           {"type": "null"}], "description": "generation stops before the first of these strings"},
        "seed": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": MAX_SEED}, {"type": "null"}],
                 "description": "the same seed, prompt and batch companions give the same completion"},
        "stream": {"type": "boolean", "default": False, "description": "true: Server-Sent Events, one per token"},
        "model": {"type": "string", "description": "ignored: this server serves one model"}}}


def prompt_pattern(tokenizer) -> str:
    """For a character vocabulary: a prompt has tokens iff it contains one of its characters (others are dropped),
    as a JSON Schema pattern (unanchored: "contains"). Other tokenizers turn any text into tokens: ""."""
    chars = getattr(tokenizer, "chars", None)
    if tokenizer.kind != "char" or not chars or any(ord(c) > 0xFFFF for c in chars):
        return ""
    return "[" + "".join(f"\\u{ord(c):04x}" for c in chars) + "]"
