"""Checkpoints with orbax: the whole train state (params, optimizer state, step, RNG streams, batch statistics)
and the grain iterator's position, saved asynchronously; restored onto any mesh from abstract sharded targets."""

import contextlib
import logging
import os
import re

import grain
import jax
import orbax.checkpoint as ocp

from mlsys.errors import CheckpointError

log = logging.getLogger(__name__)


def _options(max_to_keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManagerOptions:
    # A kill mid-save leaves `<step>.orbax-checkpoint-tmp`: never listed as a step, so restore skips it, and the
    # writer removes such leftovers when it starts (finalized steps are only ever renamed into place, whole).
    return ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
                                        enable_async_checkpointing=not read_only,
                                        save_interval_steps=0 if read_only else 1,
                                        cleanup_tmp_directories=not read_only)


def check_writable(run_dir: str) -> None:
    """Fail before training, not at the first save, when the checkpoint dir cannot be created or written.
    Process 0 only: the others share its run dir, and two probing processes would race on creating it."""
    if jax.process_index() != 0:
        return
    directory = os.path.join(os.path.abspath(run_dir), "checkpoints")
    probe = os.path.join(directory, f".write_probe.{os.getpid()}")
    existed = os.path.isdir(directory)
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(4096))
        os.remove(probe)
        if not existed:  # leave nothing behind if a later check fails; the checkpointer creates it again
            os.rmdir(directory)
    except OSError as e:
        raise CheckpointError(f"checkpoint dir {directory} is not writable ({e.strerror}: {e.filename}); fix its "
                              f"permissions or free space, or set hydra.run.dir to a writable disk") from None


def _reason(e: BaseException) -> str:
    """One line for an OSError, or for tensorstore's errors, which carry the OS error code in their text."""
    if isinstance(e, OSError) and e.errno:
        return f"{os.strerror(e.errno)}: {e.filename}"
    text = str(e).splitlines()[0] if str(e) else ""
    code = re.search(r"os_error_code='?(\d+)", text)
    return f"{os.strerror(int(code.group(1))) + '; ' if code else ''}{type(e).__name__}: {text[:300]}"


def use_distributed_barriers() -> None:
    """orbax's default barrier between processes is a device collective (sync_global_devices). Some of orbax's
    barriers run in its background threads (e.g. deleting old steps), where such a collective can interleave with
    the training step's own collectives in a different order on each process and deadlock. The coordination
    service's barriers involve no device, so they cannot."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # absl flags outside absl.app: the defaults, as parsed
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True


class Checkpointer:
    """Saves into <run dir>/checkpoints. `save` returns once the arrays are copied; the write goes on behind.
    A failed write (disk full, permissions) raises CheckpointError at the next save or at close; orbax writes
    into a temporary dir and renames it only when complete, so every earlier step stays as it was."""

    def __init__(self, run_dir: str, max_to_keep: int):
        self.directory = os.path.join(os.path.abspath(run_dir), "checkpoints")
        self.writing, self.failed = None, False
        if jax.process_count() > 1:
            use_distributed_barriers()
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=_options(max_to_keep))
        except Exception as e:
            raise self._error(None, e) from None

    def save(self, step: int, state, data_iter) -> None:
        try:  # an earlier asynchronous write that failed surfaces here
            if step in self.manager.all_steps():
                return
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            data=grain.checkpoint.CheckpointSave(data_iter)))
            self.writing = step
        except Exception as e:
            raise self._error(step, e) from None

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception as e:
            if not self.failed:  # already reported by save
                raise self._error(None, e) from None

    def _error(self, step: int | None, e: BaseException) -> CheckpointError:
        self.failed = True
        good = sorted(int(n) for n in os.listdir(self.directory) if n.isdigit()) if os.path.isdir(self.directory) \
            else []
        if self.writing is not None and self.writing not in good:
            step = self.writing  # the asynchronous write that failed, not the save that found out
        last = f"the last good checkpoint, step {good[-1]}, is untouched" if good else "no checkpoint was completed"
        return CheckpointError(f"cannot write checkpoint{f' step {step}' if step is not None else ''} in "
                               f"{self.directory} ({_reason(e)}); {last}. Free space or fix permissions there, or "
                               f"set hydra.run.dir to a writable disk; trainer.resume=auto continues from the last "
                               f"good step")


def has_checkpoint(run_dir: str) -> bool:
    d = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def find_run(resume: str, current_run_dir: str) -> str | None:
    """The run dir `trainer.resume` names. "auto": the current run dir if it already holds a checkpoint (a job
    restarted into a fixed hydra.run.dir), else the newest sibling run that has one, else None (start fresh) —
    so the same command serves the first launch and every restart after a preemption."""
    if resume == "auto":
        here = os.path.abspath(current_run_dir)
        if has_checkpoint(here):
            return here
        parent = os.path.dirname(here)
        siblings = os.listdir(parent) if os.path.isdir(parent) else []
        runs = sorted(n for n in siblings if has_checkpoint(os.path.join(parent, n)))
        if not runs:
            log.warning("trainer.resume=auto: no run with a checkpoint in %s yet; starting from scratch", parent)
            return None
        return os.path.join(parent, runs[-1])
    if not os.path.isdir(resume):
        raise CheckpointError(f"trainer.resume={resume!r}: no such directory; give a run dir (runs/<exp>/<time>) "
                              f"or trainer.resume=auto")
    if not has_checkpoint(resume):
        raise CheckpointError(f"trainer.resume={resume!r}: this run dir has no checkpoint (nothing in "
                              f"{os.path.join(resume, 'checkpoints')}); resume a run that saved one")
    return resume


class _DropReadOnlyNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


@contextlib.contextmanager
def _quiet_read_only():
    """orbax warns "Given directory is read only" whenever a manager is opened to read, which restore does on
    purpose (export, init_from, resume): not worth a warning in the user's log."""
    quiet = _DropReadOnlyNotice()
    logger = logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def restore(run_dir: str, abstract_state, data_iter, step: int | None = None):
    """Restore the newest readable checkpoint of `run_dir` (or exactly `step`) into shardings given by
    `abstract_state` (a tree of jax.ShapeDtypeStruct with .sharding) and set `data_iter` to its saved position. An
    unreadable step (empty, partly written, corrupt) is skipped with a warning in favour of the one before it."""
    directory = os.path.join(os.path.abspath(run_dir), "checkpoints")
    with _quiet_read_only():
        manager = ocp.CheckpointManager(directory, options=_options(read_only=True))
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            manager.close()
            raise CheckpointError(f"step={step}: {directory} has no such checkpoint; it has steps {sorted(steps)}")
        steps = [step]
    errors = []
    try:
        for step in steps:
            try:
                out = manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(data_iter)))
            except Exception as e:  # orbax raises many types for a damaged step; report and fall back
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                errors.append(f"step {step}: {reason}")
                log.warning("checkpoint step %d in %s is unreadable (%s); trying the one before", step, directory,
                            reason)
                continue
            return out["state"], step
    finally:
        manager.close()
    detail = "; ".join(errors) if errors else "no steps found"
    raise CheckpointError(f"no readable checkpoint in {directory} ({detail}). If the model config differs from the "
                          f"run's, use the run's config (see {os.path.join(run_dir, '.hydra/overrides.yaml')})")


def abstract_like(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
