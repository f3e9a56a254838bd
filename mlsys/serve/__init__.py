"""Serving an export: FastAPI + ONNX Runtime with dynamic batching, API keys, strict input validation, drift
monitoring and Prometheus metrics. Stateless: it reads the export folder and writes nothing.

    python -m experiments.serve model=<export dir> [serve.port=8000 serve.max_batch=64 serve.max_delay_ms=10]
"""

from mlsys.serve.config import ServeConfig, from_args

__all__ = ["ServeConfig", "from_args", "create_app", "serve"]


def create_app(cfg: ServeConfig):
    from mlsys.serve.app import create_app as create

    return create(cfg)


def serve(cfg: ServeConfig) -> None:
    from mlsys.serve.server import serve as run

    run(cfg)
