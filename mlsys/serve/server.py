"""Run the app under uvicorn. SIGTERM (or Ctrl-C): stop accepting connections, mark /readyz not ready, run what is
queued at once (no more waiting for company), let every accepted request finish (up to serve.drain_timeout_s), stop
the batcher and exit 0."""

import logging

import uvicorn

from mlsys.serve.app import create_app
from mlsys.serve.config import ServeConfig


class DrainingServer(uvicorn.Server):
    def handle_exit(self, sig, frame):
        state = getattr(getattr(self.config.app, "state", None), "serve", None)
        if state is not None:
            state["ready"] = False
            if "drain" in state:
                state["drain"]()  # queued requests run now instead of waiting out max_delay_ms
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal once shut down (exit status 143); a drained shutdown is a clean exit (0)
        getattr(self, "_captured_signals", []).clear()


def serve(cfg: ServeConfig) -> None:
    app = create_app(cfg)  # a bad key file or export fails here, before anything listens
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=cfg.access_log,
                            timeout_graceful_shutdown=cfg.drain_timeout_s, server_header=False, lifespan="on")
    # after uvicorn.Config: it reconfigures logging and would drop a handler set up before it
    logging.basicConfig(level=cfg.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s", force=True)
    DrainingServer(config).run()
