"""The data spec: what a model needs to know about its data. Neutral ground between mlsys.data, which builds it,
and mlsys.models, which are built for it; neither package imports the other."""

from dataclasses import dataclass


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its data. Built by the data source, never by hand.

    task: "classify" (targets: one class per example) or "lm" (targets: next token per position).
    num_classes: output width (classes, or vocabulary size for "lm").
    """

    task: str
    input_shape: tuple[int, ...]  # one example, without the batch dimension
    input_dtype: str
    num_classes: int
