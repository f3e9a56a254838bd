"""Run an entry point as `python -m <module> <args>` does, but in this process: (exit code, stdout, stderr).

A new Python process costs seconds of CPU before the entry point's first line (importing jax, flax, orbax, grain,
hydra); a bad-input check needs none of it. runpy runs the module's `__main__` block itself, so what a user's
command runs (the pre-compose checks, Hydra, friendly_errors and its exit codes) is what runs here. A few tests per
entry point still start a real process, to keep the interpreter-level path (imports, sys.exit) covered.
"""

import contextlib
import io
import logging
import os
import runpy
import sys


def exit_code(e: SystemExit) -> int:
    """The status a process would exit with: sys.exit(None) is 0, sys.exit("text") prints the text and is 1."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def run_main(module: str, args: list[str], cwd) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    argv, here = sys.argv, os.getcwd()
    # Hydra's job logging (logging.config.dictConfig) closes every handler that exists and replaces the root
    # logger's: pytest's own handlers must outlive the run, so they are out of dictConfig's sight and come back.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    known = logging._handlerList[:]
    del logging._handlerList[:]
    quieted = {name: logging.getLogger(name).level for name in ("absl", "jax")}  # friendly_errors quiets them
    code = 0
    sys.argv = [module, *args]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = exit_code(e)
    finally:
        sys.argv = argv
        os.chdir(here)
        for h in root.handlers:
            if h not in handlers:
                h.close()  # the job's log file
        root.handlers[:] = handlers
        root.setLevel(level)
        logging._handlerList[:] = known
        for name, lvl in quieted.items():
            logging.getLogger(name).setLevel(lvl)
    return code, out.getvalue(), err.getvalue()
