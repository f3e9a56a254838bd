"""What the entry points share: turning user errors into one clear line, and the end-of-run summary."""

import functools
import logging
import os
import sys

try:
    from omegaconf.errors import OmegaConfBaseException
except ImportError:  # the model-server image installs only what serving needs

    class OmegaConfBaseException(Exception):
        pass

from mlsys.errors import EXIT_PREEMPTED, MlsysError, Preempted


def friendly_errors(fn):
    """Run `fn`; an error the user can fix prints as `error: <message>` and exits 2, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # orbax logs every save step by step at INFO through absl; keep warnings and errors only.
        logging.getLogger("absl").setLevel(logging.WARNING)
        logging.getLogger("jax").setLevel(logging.WARNING)
        try:
            return fn(*args, **kwargs)
        except Preempted as e:
            print(f"preempted: {e}", file=sys.stderr)
            sys.exit(EXIT_PREEMPTED)
        except MlsysError as e:
            logging.getLogger("mlsys").debug("user error", exc_info=True)
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except OmegaConfBaseException as e:
            print(f"error: config: {str(e).splitlines()[0]}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def summary(name: str, steps: int, seconds: float, results: dict, run_dir: str) -> str:
    lines = [f"{name}: {steps} steps in {seconds:.1f} s (step compiled in {results.get('compile_seconds', 0):.1f} s)"]
    for split in ("train", "val", "test"):
        if split in results:
            m = results[split]
            bpb = f"  bits/byte {m['bits_per_byte']:.4f}" if "bits_per_byte" in m else ""
            lines.append(f"  {split:<5}  loss {m['loss']:.4f}  accuracy {m['accuracy']:.4f}{bpb}")
    if "cost" in results:
        from mlsys.cost import describe

        lines.append(f"  cost   {describe(results['cost'])}")
    if "sample" in results:
        lines += ["  sample:", *("    " + s for s in results["sample"].splitlines())]
    lines.append(f"run dir: {os.path.relpath(run_dir)}")
    return "\n".join(lines)


def key_values(argv: list[str], allowed: dict) -> dict:
    """`key=value` arguments for the small entry points (export, verify); `allowed` maps key -> description."""
    from mlsys.errors import ConfigError

    out = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in allowed:
            raise ConfigError(f"{arg!r}: expected key=value with key in {sorted(allowed)} "
                              f"({'; '.join(f'{k}: {v}' for k, v in allowed.items())})")
        out[key] = value
    return out
