"""Errors a user can fix. Entry points print them as one short message (no traceback) and exit 2."""


class MlsysError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(MlsysError):
    """A config key has a value that cannot work (caught before any compilation)."""


class DataError(MlsysError):
    """A data file is missing, unreadable, or has the wrong contents."""


class CheckpointError(MlsysError):
    """A checkpoint or run dir cannot be found, read or written."""


class NonFiniteError(MlsysError):
    """The loss or the gradients became NaN/Inf during training."""


class Preempted(MlsysError):
    """SIGTERM arrived; the run finished its step, saved a checkpoint and stopped (exit code EXIT_PREEMPTED)."""


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later (trainer.resume=auto continues)


def check(ok: bool, key: str, value, fix: str) -> None:
    """ConfigError "key=value: fix" unless `ok`: the form of every config check (mlsys.validate, model families)."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {fix}")


def one_of(key: str, value, options) -> None:
    check(value in options, key, value, f"must be one of {list(options)}")
