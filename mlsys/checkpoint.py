"""Checkpoints with orbax: the whole train state (params, optimizer state, step, RNG streams, batch statistics)
and the data position, saved asynchronously; restored onto any mesh, by any number of processes, from abstract
sharded targets.

A step holds `state/` (orbax's arrays, written by every process) and `data_position/` (one small JSON: the index
of the next global batch, which means the same on any process count; see mlsys/data/pipeline.py). Steps written
by mlsys before that JSON existed hold grain's per-process iterator files `data/process_<i>-of-<n>.json`; they
are read too, whatever the process count now.

Restore tells a damaged step (empty, partly written, bad bytes: skipped with a warning in favour of the one
before it) from a healthy one written under other conditions (another model config, a newer mlsys): those stop
with an error naming the difference, never a quiet fall back to an older step.
"""

import contextlib
import glob
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from mlsys.errors import CheckpointError

log = logging.getLogger(__name__)

# The layout mlsys writes beside orbax's arrays (today: the data_position item). A step of a newer format is
# refused with an upgrade hint, not skipped as damaged. 0 = grain's per-process iterator files (older mlsys).
FORMAT = 1


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
        # One process on CPU: orbax's save itself (its per-leaf Python work held the loop ~80 ms per save, 5% of
        # the steps between saves at a save every 25) runs on a worker thread, from a copy of the state (the next
        # step donates the state's buffers). On accelerators that copy would cost device memory, and with several
        # processes orbax's barriers belong to the main thread: there orbax's own asynchronous save is used as is.
        on_cpu = jax.devices()[0].platform == "cpu" and jax.process_count() == 1
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="mlsys-checkpoint") if on_cpu else None
        self.pending = None

    def save(self, step: int, state, data_iter) -> None:
        """Save `state` and `data_iter`'s position (mlsys.data.TrainIterator) as step `step`."""
        position = {"format": FORMAT, **data_iter.get_state(), "process_count": jax.process_count()}
        if self.worker is None:
            return self._save(step, state, position)
        self._collect()  # an earlier save that failed surfaces here
        self.pending = self.worker.submit(self._save, step, _snapshot(state), position)

    def _save(self, step: int, state, position: dict) -> None:
        try:  # an earlier asynchronous write that failed surfaces here
            if step in self.manager.all_steps():
                return
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            data_position=ocp.args.JsonSave(position)))
            self.writing = step
        except Exception as e:
            raise self._error(step, e) from None

    def _collect(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self._collect()
        finally:
            if self.worker is not None:
                self.worker.shutdown(wait=True)
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


# A copy of the train state made on its device, in one dispatch: what the worker thread saves while the loop's next
# step donates (reuses) the original buffers.
_snapshot = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


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


class _Damaged(Exception):
    """A step that cannot be read (empty, partly written, bad bytes): skipped for the one before it."""


def _key(path) -> tuple:
    """A pytree path as plain strings, the same for a TrainState, a dict and orbax's metadata tree."""
    return tuple(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def _check_structure(step_dir: str, abstract, partial: bool, what: str) -> None:
    """Compare the saved arrays' paths and shapes with what this config builds, before reading any array: a
    mismatch is a healthy checkpoint of another model (an error naming the paths), not a damaged one."""
    try:
        meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(step_dir, "state"))
        saved = {_key(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(meta.tree)[0]}
    except Exception as e:  # missing or unreadable metadata: a damaged (or unfinished) step
        raise _Damaged(f"its array metadata cannot be read ({type(e).__name__})") from None
    # A PRNG key is stored as its raw uint32 data (one more dimension): compare that shape.
    want = {_key(p): tuple(jax.eval_shape(jax.random.key_data, x).shape
                           if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    problems = [f"{'.'.join(k)}: not in the checkpoint" for k in want if k not in saved]
    if not partial:
        problems += [f"{'.'.join(k)}: in the checkpoint, not in this {what}" for k in saved if k not in want]
    problems += [f"{'.'.join(k)}: shape {saved[k]} there, {shape} here" for k, shape in want.items()
                 if k in saved and saved[k] != shape]
    if problems:
        raise CheckpointError(
            f"{step_dir} was saved from another {what} config than this one ({'; '.join(problems[:4])}"
            f"{f'; and {len(problems) - 4} more' if len(problems) > 4 else ''}). Use the run's own config "
            f"({os.path.join(os.path.dirname(os.path.dirname(step_dir)), 'config.yaml')})")


def _read_position(manager, step_dir: str, step: int) -> dict:
    """The saved data position: mlsys's JSON, or the index in grain's per-process files of an older mlsys (every
    process's file holds the same index, so any one serves any process count)."""
    try:
        if os.path.isdir(os.path.join(step_dir, "data_position")):
            position = dict(manager.restore(step, args=ocp.args.Composite(
                data_position=ocp.args.JsonRestore()))["data_position"])
        else:
            files = sorted(glob.glob(os.path.join(step_dir, "data", "process_*-of-*.json")))
            if not files:
                raise _Damaged("it has no data position (no data_position/ or data/process_*.json)")
            with open(files[0]) as f:
                position = {"format": 0, "next_batch": int(json.load(f)["next_index"])}
        int(position["next_batch"])
    except _Damaged:
        raise
    except Exception as e:
        raise _Damaged(f"its data position cannot be read ({type(e).__name__}: {str(e)[:120]})") from None
    if int(position.get("format", 0)) > FORMAT:
        raise CheckpointError(f"{step_dir} was written by a newer mlsys (checkpoint format {position['format']}, "
                              f"this one reads up to {FORMAT}); upgrade mlsys (pip install -U mlsys) to read it")
    return position


def _set_position(data_iter, position: dict, step_dir: str) -> None:
    """Put the iterator at the saved global batch; the order of examples must be the one the run trained with."""
    mine = data_iter.get_state()
    differ = [f"{k}={position[k]} there, {mine[k]} here" for k in ("batch_size", "seed")
              if k in position and position[k] != mine.get(k)]
    if differ:
        raise CheckpointError(f"{step_dir}: the data order differs from the run's ({'; '.join(differ)}), so its "
                              f"data position does not carry over; resume with the run's data.batch_size and seed")
    data_iter.set_state(position)


def _restore_steps(run_dir: str, step: int | None, read):
    """`read(manager, step_dir, step)` on the newest step (or exactly `step`), falling back past damaged ones."""
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
        for s in steps:
            try:
                return read(manager, os.path.join(directory, str(s)), s), s
            except _Damaged as e:
                errors.append(f"step {s}: {e}")
            except CheckpointError:
                raise
            except Exception as e:  # orbax raises many types for bad bytes in a step; report and fall back
                errors.append(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            log.warning("checkpoint in %s is damaged, %s; trying the one before", directory, errors[-1])
    finally:
        manager.close()
    detail = "; ".join(errors) if errors else "no steps found"
    raise CheckpointError(f"no readable checkpoint in {directory} ({detail}). If the model config differs from the "
                          f"run's, use the run's config (see {os.path.join(run_dir, '.hydra/overrides.yaml')})")


def restore(run_dir: str, abstract_state, data_iter=None, step: int | None = None):
    """Restore the newest readable checkpoint of `run_dir` (or exactly `step`) into shardings given by
    `abstract_state` (a tree of jax.ShapeDtypeStruct with .sharding), on whatever mesh and process count those
    describe, and set `data_iter` (if given) to its saved position. Returns (state, step)."""

    def read(manager, step_dir, s):
        _check_structure(step_dir, abstract_state, partial=False, what="model or optimizer")
        position = _read_position(manager, step_dir, s) if data_iter is not None else None
        state = manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]
        if position is not None:
            _set_position(data_iter, position, step_dir)
        return state

    return _restore_steps(run_dir, step, read)


def restore_weights(run_dir: str, abstract: dict, step: int | None = None):
    """Only the parts of the train state named in `abstract` (e.g. {"params": ..., "rest": ...}: what export,
    fine-tuning and sampling need), never the optimizer state or the data position: a run saved by any number of
    processes on any mesh loads in one process on one device. Returns (dict like `abstract`, step)."""

    def read(manager, step_dir, s):
        _check_structure(step_dir, abstract, partial=True, what="model")
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        return manager.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract, restore_args=restore_args, partial_restore=True)))["state"]

    return _restore_steps(run_dir, step, read)


def abstract_like(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
