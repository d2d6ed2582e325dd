"""The checkpoint policy of one run, and the background writer it saves through.

CheckpointManager decides when to save and what to keep, as Lightning's ModelCheckpoint and torchtitan's
CheckpointManager do: the best validation, the top k by a monitored metric, every N epochs, every N minutes and
on request; retention per run. It keeps its own state (the best score, the top-k list, the last autosave) in
memory and in every record it saves, and never lists the folder to rediscover it. The Trainer calls it at four
hooks (after_step, after_validation, on_request, close) and hands it a snapshot(kind, name) callable.

CheckpointWriter copies each snapshot while the next step computes and has the run's store (store.py) write it
in the background, in order;
whatever a job raises becomes a checkpoint_error event, and the writer goes on serving. At shutdown, close() can
be given a deadline: the saves not written by then are abandoned (nothing partial stays, the previous checkpoint
of the name is kept) and each gets a checkpoint_error saying so.
"""
import dataclasses
import errno
import logging
import math
import os
import queue
import threading
import time

import catalogue
import checkpoint as ckpt
from store import SingleFileStore

logger = logging.getLogger(__name__)

ABANDON_GRACE = 10.0  # seconds an abandoned save gets to stop and clean up (it stops within one 8 MB piece)


@dataclasses.dataclass(frozen=True)
class CheckpointPolicy:
    best_name: str = "best_model"  # the checkpoint replaced whenever best_metric improves
    best_kind: str = "best"
    best_metric: str = "loss"  # a key of the validation metrics
    best_mode: str = "min"
    every_epochs: int = 0  # checkpoint_epoch_N every N completed epochs (0: off)
    autosave_minutes: float = 0.0  # autosave_step_N every N minutes (0: off)
    keep_last: int = 0  # periodic and autosave checkpoints of this run kept (0: all)
    keep_best_k: int = 0  # best_k_step_N checkpoints kept by monitor (0: off)
    monitor: str = "val_loss"
    monitor_mode: str = "min"
    verify_after_save: bool = False

    @classmethod
    def for_training(cls, config):
        return cls(every_epochs=config.checkpoint_every_epochs, autosave_minutes=config.autosave_minutes,
                   keep_last=config.keep_last, keep_best_k=config.keep_best_k, monitor=config.monitor,
                   monitor_mode=config.monitor_mode, verify_after_save=config.verify_after_save)

    @classmethod
    def for_pretraining(cls, config, mode):
        return cls(best_name=f"pretrained_encoder_{mode}", best_kind="pretrained", best_metric="acc",
                   best_mode="max", verify_after_save=config.verify_after_save)


def _better(score, than, mode):
    return than is None or (score < than if mode == "min" else score > than)


class CheckpointManager:
    """When one run saves and what it keeps; writes into the run's own folder under root, nowhere else."""

    def __init__(self, root, run_id, policy, publish, snapshot, store_type=SingleFileStore):
        self.root, self.run_id, self.policy = root, run_id, policy
        self.publish, self.snapshot = publish, snapshot  # snapshot(kind, name) -> the fields store.write takes
        self.folder = catalogue.checkpoint_folder(root, run_id)
        self.store = store_type(self.folder)
        self.best = None  # {"score", "run_id", "name", "global_step"}: the best validation so far
        self.top_k = []  # the same, best first: this run's best_k_step_N and those of the runs it continues
        self.recent = []  # this run's periodic and autosave checkpoints, oldest first: {"name", "global_step"}
        self.last_autosave_step = None
        self.final_checkpoint = None  # once save_final's checkpoint is durable: id, name, kind, path, resume_command
        self._autosave_clock = time.monotonic()
        self._lock = threading.Lock()  # the lists change in the training thread and after writes in the writer's
        self.writer = None

    # ---- lifecycle

    def start(self, description):
        """Make the run's folder and run.json (once), and start the writer."""
        if not os.path.exists(os.path.join(catalogue.run_folder(self.root, self.run_id), catalogue.RUN_FILE)):
            catalogue.create_run(self.root, self.run_id, description)
        self.writer = CheckpointWriter(self.publish)
        self._autosave_clock = time.monotonic()

    def close(self, deadline=None, timeout=None):
        """Write what is pending, then stop the writer's threads; with a deadline, see CheckpointWriter.close."""
        if self.writer is not None:
            self.writer.close(deadline=deadline, timeout=timeout)
            self.writer = None

    def wait_for_copies(self):
        """Before the parameters change: every submitted snapshot must be copied."""
        self.writer.wait_for_copies()

    # ---- state saved in every record

    def state_dict(self):
        with self._lock:
            return {"best": dict(self.best) if self.best else None, "top_k": [dict(e) for e in self.top_k],
                    "last_autosave_step": self.last_autosave_step}

    def load_state_dict(self, state):
        """Continue the policy of the run a checkpoint came from: its best score and top-k list (whose files stay
        that run's: ranked, never deleted)."""
        state = state if isinstance(state, dict) else {}
        self.best = _score_entry(state.get("best"))
        self.top_k = [e for e in map(_score_entry, state.get("top_k") or []) if e is not None]
        step = state.get("last_autosave_step")
        self.last_autosave_step = step if isinstance(step, int) else None

    @property
    def best_score(self):
        return self.best["score"] if self.best else None

    # ---- hooks

    def after_step(self, global_step):
        minutes = self.policy.autosave_minutes
        if minutes and time.monotonic() - self._autosave_clock >= minutes * 60:
            self._autosave_clock = time.monotonic()
            self.last_autosave_step = global_step
            self._save_recent("autosave", f"autosave_step_{global_step}", global_step)

    def after_validation(self, metrics, epoch, epoch_done, global_step):
        """metrics: the validation's figures without the val_ prefix. epoch_done: a whole epoch just ended (not a
        validation cut short by max_steps)."""
        p = self.policy
        score = metrics.get(p.best_metric)
        if score is not None and math.isfinite(score) and _better(score, self.best_score, p.best_mode):
            with self._lock:
                self.best = {"score": score, "run_id": self.run_id, "name": p.best_name, "global_step": global_step}
            self._submit(p.best_kind, p.best_name)
        if p.keep_best_k:
            self._consider_top_k(metrics.get(p.monitor[len("val_"):]), global_step)
        if epoch_done and p.every_epochs and epoch % p.every_epochs == 0:
            self._save_recent("periodic", f"checkpoint_epoch_{epoch}", global_step)

    def on_request(self, name, request_id=None, overwrite=False, contents="full", compression="none"):
        """A manual save into this run, of the contents and compression asked for (ckpt.CONTENTS, COMPRESSIONS)."""
        self._submit("manual", name, request_id=request_id, overwrite=overwrite,
                     options={"contents": contents, "compression": compression})

    def save_final(self, kind, global_step):
        """The last checkpoint of a run that was stopped (kind interrupted) or failed (kind error), as Lightning's
        OnExceptionCheckpoint saves one: final_checkpoint says where it is once it is durable."""
        name = f"{kind}_step_{global_step}"
        entry = catalogue.entry_for(self.root, self.run_id, name)

        def on_saved(sidecar):
            self.final_checkpoint = {"id": entry.id, "name": name, "kind": kind, "path": self.store.path(name),
                                     "global_step": global_step,
                                     "resume_command": catalogue.resume_command(self.root, entry.id, kind)}
        self._submit(kind, name, after=(on_saved, None))

    def unique_name(self, base):
        """base, or base_2, base_3...: the first name no checkpoint of this run has or is being saved under."""
        name, n = base, 2
        while self.writer.has_job(name) or self.store.exists(name):
            name, n = f"{base}_{n}", n + 1
        return name

    # ---- decisions

    def _save_recent(self, kind, name, global_step):
        keep = self.policy.keep_last
        with self._lock:
            self.recent = [r for r in self.recent if r["name"] != name] + [{"name": name, "global_step": global_step}]
            doomed = self.recent[:-keep] if keep else []
            self.recent = self.recent[-keep:] if keep else self.recent
        reason = f"retention: keep_last={keep} periodic/autosave checkpoints of run {self.run_id} (newest is {name})"
        self._submit(kind, name, after=self._retention(doomed, reason, "recent"))

    def _consider_top_k(self, value, global_step):
        if value is None or not math.isfinite(value):
            return
        k, sign = self.policy.keep_best_k, 1 if self.policy.monitor_mode == "min" else -1
        entry = {"score": value, "run_id": self.run_id, "name": f"best_k_step_{global_step}",
                 "global_step": global_step}
        with self._lock:
            ranked = sorted(self.top_k + [entry], key=lambda e: sign * e["score"])  # stable: ties keep the older
            if entry not in ranked[:k]:
                return
            self.top_k, dropped = ranked[:k], ranked[k:]
        doomed = [e for e in dropped if e["run_id"] == self.run_id]  # another run's file is never ours to delete
        reason = f"retention: not among the {k} best by {self.policy.monitor} ({self.policy.monitor_mode})"
        self._submit("top_k", entry["name"], after=self._retention(doomed, reason, "top_k"))

    def _retention(self, doomed, reason, listing):
        """(on_saved, on_failed) for a save that pushed `doomed` out: delete them once it is durable, or keep them
        listed if it failed."""
        def on_saved(sidecar):
            for entry in doomed:
                self._delete(entry["name"], reason)

        def on_failed():
            with self._lock:
                kept = getattr(self, listing)
                setattr(self, listing, sorted(doomed + kept, key=lambda e: e["global_step"]) if listing == "recent"
                        else kept + doomed)
        return on_saved, on_failed

    def _delete(self, name, reason):
        entry = catalogue.entry_for(self.root, self.run_id, name)
        try:
            self.store.delete(name)
        except FileNotFoundError:
            return
        except (OSError, ckpt.CheckpointError) as e:
            logger.warning("retention could not delete %s: %s", entry.id, e)
            return
        self.publish({"type": "checkpoint_deleted", "id": entry.id, "run_id": self.run_id, "name": name,
                      "reason": reason})

    def _submit(self, kind, name, request_id=None, overwrite=True, after=(None, None), options=None):
        on_saved, on_failed = after
        options = {"contents": "full", "compression": "none", **(options or {})}
        fields = self.snapshot(kind, name)  # after the decision: the record holds the state that includes it
        if options["contents"] != "full":  # not resumable: the copy thread need not clone the optimizer's state
            fields = ckpt.without_training_state(fields)
        fields = {**fields, **options}
        self.writer.submit(SaveJob(fields, self.folder, self.run_id, request_id=request_id, overwrite=overwrite,
                                   verify_after_save=self.policy.verify_after_save, on_saved=on_saved,
                                   on_failed=on_failed, store=self.store))


def _score_entry(value):
    """A best or top-k entry from a record, if it has the shape one has (a file may lie)."""
    if not isinstance(value, dict):
        return None
    score, run_id, name, step = (value.get(k) for k in ("score", "run_id", "name", "global_step"))
    if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score) \
            and isinstance(run_id, str) and isinstance(name, str) and isinstance(step, int):
        return {"score": score, "run_id": run_id, "name": name, "global_step": step}
    return None


# ---------------------------------------------------------------------------------------------- the writer

def clone_tensors(value):
    """Deep copy of nested dicts/lists, cloning tensors; storages shared before stay shared after."""
    import torch
    clones = {}

    def walk(v):
        if isinstance(v, torch.Tensor):
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
            if key not in clones:
                clones[key] = v.detach().to("cpu", copy=True)
            return clones[key]
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(walk(x) for x in v)
        return v

    return walk(value)


class SaveJob:
    """One save: what to write (tensors still live until copied), into which run's folder (through its store, a
    SingleFileStore of the folder unless given), and who asked."""

    def __init__(self, fields, folder, run_id, request_id=None, overwrite=False, verify_after_save=False,
                 on_saved=None, on_failed=None, store=None):
        self.fields = fields  # keyword arguments of save_full_checkpoint, tensors not yet copied
        self.name, self.kind = fields["name"], fields["kind"]
        self.folder, self.run_id = folder, run_id
        self.store = store if store is not None else SingleFileStore(folder)
        self.request_id = request_id
        self.overwrite, self.verify_after_save = overwrite, verify_after_save
        self.on_saved = on_saved  # called in the writer thread with the sidecar after a durable write
        self.on_failed = on_failed  # called in the writer thread when the save failed
        self.copy_error = None
        self.copied = threading.Event()
        self.cancel = threading.Event()  # set when the save is abandoned: its write stops and cleans up
        self.abandoned = None  # why, once abandoned

    def abandon(self, reason):
        """Give this save up: its write stops at the next piece, or it is never written."""
        self.abandoned = reason  # before the event: whoever sees it set finds the reason
        self.cancel.set()


class CheckpointWriter:
    """Copies snapshots and writes them in the background, in order.

    The training thread submits a job right after optimizer.step(); the copy thread clones its tensors while the
    next forward/backward runs; the training thread calls wait_for_copies() before its next optimizer.step().
    The write thread serializes, fsyncs and publishes checkpoint_saved / checkpoint_error.
    """

    def __init__(self, publish):
        self.publish = publish
        self._to_copy, self._to_write = queue.Queue(), queue.Queue()
        self._pending = []  # jobs submitted and not yet copied, oldest first
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._unfinished = []  # jobs submitted and not yet written or failed, oldest first
        self._abandon_reason = None  # once set, every job, running, waiting or submitted later, is abandoned
        self._threads = [
            threading.Thread(target=self._copy_loop, name="checkpoint-copy", daemon=True),
            threading.Thread(target=self._write_loop, name="checkpoint-write", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def submit(self, job):
        with self._lock:
            if self._abandon_reason is not None:
                job.abandon(self._abandon_reason)
            self._pending.append(job)
            self._unfinished.append(job)
        self._progress(job, "copying")
        self._to_copy.put(job)

    def wait_for_copies(self):
        """Block until every submitted snapshot is copied: only then may the parameters change."""
        with self._lock:
            pending = list(self._pending)
        for job in pending:
            job.copied.wait()

    def busy(self):
        with self._lock:
            return bool(self._unfinished)

    def has_job(self, name):
        """Whether a save under this name is submitted and not yet written or failed."""
        with self._lock:
            return any(job.name == name for job in self._unfinished)

    def flush(self, timeout=None):
        """Wait until every submitted job is written (or failed)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._unfinished, timeout)

    def abandon(self, reason):
        """Give up every save not yet written, and those submitted later: a write in progress stops at its next
        piece and removes its temporary file (the previous checkpoint of the name stays whole), one not started is
        never written; each gets a checkpoint_error with reason. The names of those given up."""
        with self._lock:
            self._abandon_reason = reason
            jobs = list(self._unfinished)
        for job in jobs:
            job.abandon(reason)
        return [job.name for job in jobs]

    def close(self, deadline=None, timeout=None):
        """Write what is pending, then end both threads. They must be gone before the interpreter exits: a daemon
        thread still freeing a snapshot's tensors then is killed inside torch, which aborts the process.

        deadline (a time.monotonic() value): what is not written by then is abandoned; timeout, the seconds the
        deadline allowed, goes into the reason each abandoned save is given."""
        grace = None
        if not self.flush(None if deadline is None else max(0.0, deadline - time.monotonic())):
            allowed = f"within {timeout:g} s" if timeout is not None else "by the deadline"
            names = self.abandon(f"abandoned at shutdown: did not finish {allowed}")
            # Said now, not only once each has stopped: one may be waiting on a slow disk or store meanwhile.
            logger.warning("checkpoint writer: abandoning %s (not written %s); each stops at its next piece",
                           ", ".join(names), allowed)
            grace = ABANDON_GRACE
            if not self.flush(grace):
                logger.error("checkpoint writer: abandoned saves did not stop within %g s", grace)
        self._to_copy.put(None)
        for thread in self._threads:
            thread.join(grace)

    def _copy_loop(self):
        while (job := self._to_copy.get()) is not None:
            try:
                if not job.cancel.is_set():  # an abandoned save is never written: no need to copy it
                    job.fields = clone_tensors(job.fields)
            except Exception as e:  # out of memory, say: this save fails, the next ones are still served
                job.copy_error = e
            finally:
                job.copied.set()
                with self._lock:
                    self._pending.remove(job)
            self._to_write.put(job)
        self._to_write.put(None)

    def _write_loop(self):
        while (job := self._to_write.get()) is not None:
            try:
                self._serve(job)
            except Exception:  # the writer outlives any job: a dead writer would leave saves and stop unanswered
                logger.exception("checkpoint writer: unexpected failure serving %s", job.name)
            finally:
                job.fields = None  # the snapshot's copies are written: free them now, not when the next job comes
                with self._idle:
                    self._unfinished.remove(job)
                    self._idle.notify_all()

    def _progress(self, job, state):
        """A requested save's progress, for whoever waits on it (GET /save_requests/ID)."""
        if job.request_id is not None:
            self.publish({"type": "checkpoint_progress", "request_id": job.request_id, "state": state,
                          "id": catalogue.checkpoint_id(job.run_id, job.name), "run_id": job.run_id,
                          "name": job.name})

    def _serve(self, job):
        self._progress(job, "writing")
        try:
            if job.cancel.is_set() or job.copy_error is not None:
                job.store.discard(job.fields)
                raise job.copy_error or ckpt.CheckpointError(job.abandoned or "abandoned")
            sidecar, path = job.store.write(job.fields, overwrite=job.overwrite,
                                            verify_after_save=job.verify_after_save, cancel=job.cancel)
        except Exception as e:  # every failure becomes this request's checkpoint_error
            self._failed(job, ckpt.CheckpointError(job.abandoned or "abandoned") if job.cancel.is_set() else e)
            return
        self.publish({"type": "checkpoint_saved", "request_id": job.request_id, "id": catalogue.checkpoint_id(
                          job.run_id, job.name), "run_id": job.run_id, "name": job.name, "kind": sidecar["kind"],
                      "path": path, "epoch": sidecar["epoch"], "batch": sidecar["batch"],
                      "global_step": sidecar["global_step"], "size": sidecar["size"], "sha256": sidecar["sha256"],
                      "verified": sidecar["verified_at"] is not None, "contents": ckpt.contents_of(sidecar),
                      "compression": sidecar.get("compression") or "none"})
        if job.on_saved is not None:
            try:
                job.on_saved(sidecar)
            except Exception as e:
                logger.exception("checkpoint %s was saved; what follows a save failed", job.name)
                self._publish_error(job, f"saved, but retention after it failed: {type(e).__name__}: {e}")

    def _failed(self, job, error):
        if isinstance(error, (ckpt.CheckpointError, ValueError)):
            logger.warning("checkpoint %s failed: %s", job.name, error)
            message = str(error)
        else:
            logger.error("checkpoint %s failed", job.name, exc_info=error)
            message = f"{type(error).__name__}: {error}"
        self._publish_error(job, message, _failure_reason(job, error))
        if job.on_failed is not None:
            try:
                job.on_failed()
            except Exception:
                logger.exception("checkpoint %s: undoing its retention decision failed", job.name)

    def _publish_error(self, job, message, reason="failed"):
        self.publish({"type": "checkpoint_error", "request_id": job.request_id, "id": catalogue.checkpoint_id(
                          job.run_id, job.name), "run_id": job.run_id, "name": job.name, "kind": job.kind,
                      "error": message, "reason": reason})


def _failure_reason(job, error):
    """What kind of failure, for an HTTP status: abandoned, exists, busy, an errno name (ENOSPC...) or failed."""
    if job.cancel.is_set():
        return "abandoned"
    if isinstance(error, ckpt.CheckpointExists):
        return "exists"
    if isinstance(error, ckpt.CheckpointBusy):
        return "busy"
    for _ in range(16):  # the chain of causes, bounded: it is short, but nothing forbids a cycle
        if isinstance(error, OSError) and error.errno in errno.errorcode:
            return errno.errorcode[error.errno]
        error = error.__cause__ or error.__context__ if error is not None else None
    return "failed"
