"""Strict request validation against the manifest: shape, dtype, finite values, the training value range, token ids
inside the vocabulary. A failure names the field (`inputs[3][2][5][0]`), what was wrong and what is accepted.

The body is `{"inputs": [example, ...]}` (one or many) or `{"input": example}` (exactly one). Well-formed bodies
take a numpy fast path; only a failing one is walked element by element to find the first bad field."""

import numpy as np

from mlsys.serve.model import InputSpec

NUMBER = (int, float)


class Invalid(Exception):
    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field, self.detail = field, detail


def _name(field: str, index) -> str:
    return field + "".join(f"[{int(i)}]" for i in index)


def parse_body(body, spec: InputSpec, max_rows: int) -> tuple[list, str, bool]:
    """(examples, field name, single) from the decoded JSON body."""
    example = ("[[...8 numbers...], ...]" if spec.kind == "array" else "[token ids]")
    if not isinstance(body, dict):
        raise Invalid("body", f"expected a JSON object {{\"inputs\": [example, ...]}} where an example is {example}")
    unknown = sorted(set(body) - {"inputs", "input"})
    if unknown or len(body) != 1:
        raise Invalid(unknown[0] if unknown else "body",
                      "give exactly one of \"inputs\" (a list of examples) or \"input\" (one example)")
    if "input" in body:
        return [body["input"]], "input", True
    items = body["inputs"]
    if not isinstance(items, list) or not items:
        raise Invalid("inputs", "expected a non-empty list of examples")
    if len(items) > max_rows:
        raise Invalid("inputs", f"{len(items)} examples; at most {max_rows} per request (serve.max_rows)")
    return items, "inputs", False


def arrays(items: list, field: str, single: bool, spec: InputSpec, has_bools: bool) -> np.ndarray:
    """(N, *shape) float32 from nested lists of numbers."""
    prefix = (lambda idx: idx[1:]) if single else (lambda idx: idx)
    x = None
    if not has_bools:
        try:
            x = np.asarray(items)
        except (ValueError, TypeError):  # ragged
            x = None
    if x is None or x.dtype.kind not in "iuf" or x.shape[1:] != spec.shape:
        _walk_array(items, field, single, spec)
        raise Invalid(field, f"each example must have shape {list(spec.shape)}")  # not reached in practice
    x = x.astype(np.float64, copy=False)
    finite = np.isfinite(x)
    if not finite.all():
        idx = tuple(np.argwhere(~finite)[0])
        raise Invalid(_name(field, prefix(idx)), f"{x[idx]} is not a finite number")
    outside = (x < spec.lo) | (x > spec.hi)
    if outside.any():
        idx = tuple(np.argwhere(outside)[0])
        raise Invalid(_name(field, prefix(idx)), f"{x[idx]:g} is outside the accepted range [{spec.lo:g}, "
                      f"{spec.hi:g}] (the training data's range; preprocess inputs as the manifest says)")
    return x.astype(np.float32)


def _walk_array(items: list, field: str, single: bool, spec: InputSpec) -> None:
    def walk(v, path, dims):
        if not dims:
            if type(v) not in NUMBER:
                raise Invalid(_name(field, path), f"expected a number ({spec.dtype}), got {type(v).__name__}")
            return
        if not isinstance(v, list) or len(v) != dims[0]:
            got = f"a list of {len(v)}" if isinstance(v, list) else type(v).__name__
            raise Invalid(_name(field, path), f"expected a list of {dims[0]} (an example has shape "
                          f"{list(spec.shape)}), got {got}")
        for i, e in enumerate(v):
            walk(e, (*path, i), dims[1:])

    for n, item in enumerate(items):
        walk(item, () if single else (n,), spec.shape)


def tokens(items: list, field: str, single: bool, spec: InputSpec) -> list[np.ndarray]:
    """One int32 array of token ids per example (lengths may differ)."""
    out = []
    for n, item in enumerate(items):
        here = field if single else f"{field}[{n}]"
        if not isinstance(item, list) or not item:
            raise Invalid(here, "expected a non-empty list of token ids")
        if len(item) > spec.max_length:
            raise Invalid(here, f"{len(item)} tokens; the model takes at most {spec.max_length}")
        # JSON has one number type: 3.0 is the integer 3 (as JSON Schema says); 3.5, true and "3" are not ids.
        bad = next((i for i, v in enumerate(item) if not (type(v) is int or (type(v) is float and v.is_integer()))),
                   None)
        if bad is not None:
            raise Invalid(f"{here}[{bad}]", f"expected an integer token id, got {item[bad]!r}")
        t = np.asarray(item)
        if t.dtype.kind not in "iuf":  # integers past int64
            raise Invalid(here, "token ids must be integers in the vocabulary")
        outside = (t < 0) | (t >= spec.vocab_size)
        if outside.any():
            i = int(np.argmax(outside))
            raise Invalid(f"{here}[{i}]", f"token id {item[i]} is outside the vocabulary [0, {spec.vocab_size})")
        out.append(t.astype(np.int32))
    return out


def validate(body, raw: bytes, spec: InputSpec, max_rows: int):
    """(inputs, single): an (N, *shape) float32 array, or a list of int32 token arrays."""
    items, field, single = parse_body(body, spec, max_rows)
    # JSON true/false would silently become 1/0 in numpy: walk those bodies element by element.
    has_bools = b"true" in raw or b"false" in raw
    if spec.kind == "tokens":
        return tokens(items, field, single, spec), single
    return arrays(items, field, single, spec, has_bools), single
