"""The web app's training side: one worker thread running Trainer runs, a status snapshot, events out.

Request handlers call start/stop/pause/request_save and read status(); they never touch tensors. The worker
thread alone builds and drives the Trainer. Events from the trainer (and its checkpoint writer) pass through
publish(), which keeps the status snapshot, throttles chart points and appends the run's metric history to disk,
in the run's own folder (catalogue.py), beside its checkpoints.
"""
import collections
import logging
import os
import queue
import shutil
import threading
import time
import uuid

import catalogue
import checkpoint as ckpt
import store
from data import load_data
from group import GroupFailed, GroupRun
from events import parse_sse
from train import Trainer, TrainConfig, check_memory, resolve_device, stop_command

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 0.25  # chart points and status go out about 4 times a second
MAX_OUTSTANDING_SAVES = 16
ACTIVE_PHASES = ("pretraining", "training", "stopping")
SHUTDOWN_GRACE = 60.0  # seconds beyond the saves' timeout for the run to reach its next step boundary and stop
SAVE_REQUESTS_KEPT = 256  # finished save requests GET /save_requests/ID still answers for
MAX_PROCESSES = 64  # of one run on this machine
SAVE_STATES = ("queued", "copying", "writing", "saved", "failed")
MIRROR_EVENTS = ("checkpoint_mirrored", "mirror_deleted", "checkpoint_restored", "mirror_error")
SAVED_FIELDS = ("id", "name", "kind", "path", "size", "sha256", "epoch", "batch", "global_step", "verified",
                "contents", "compression")


class Conflict(Exception):
    """The request does not fit the current state (HTTP 409)."""


class Busy(Exception):
    """Too many requests waiting (HTTP 503)."""


class TrainingWorker:
    def __init__(self, checkpoint_dir, bus, device="auto", dataset="arcagi", data_dir="", train_defaults=None,
                 data=None, max_memory_gb=None, processes=1, mirror=None):
        self.checkpoint_dir, self.bus = checkpoint_dir, bus
        self.mirror = mirror  # a mirror.Mirror (not started): follows every run's saves and deletes
        self.processes = check_processes(processes)  # a run's default: 1 in this thread, more as a process group
        self.device, self.dataset, self.data_dir = device, dataset, data_dir
        self.max_memory_gb = max_memory_gb
        self.train_defaults = dict(train_defaults or {})
        self._data_cache = {} if data is None else {(dataset, data_dir): data}
        self.commands = queue.Queue()
        self._runs = queue.Queue()
        self._lock = threading.RLock()
        self._status = self._idle_status()
        self._samples = {}
        self._save_requests = collections.OrderedDict()  # request_id -> its state, oldest first; unfinished kept
        self._save_clocks = {}  # request_id -> time.monotonic() when it was accepted
        self._save_changed = threading.Condition(self._lock)
        self._chart_points, self._last_flush = [], 0.0
        self._history_file = None
        self._thread = None
        os.makedirs(checkpoint_dir, exist_ok=True)
        removed, problems = catalogue.recover(checkpoint_dir)
        for problem in problems:
            logger.warning("checkpoint folder: %s", problem)

    # ---- lifecycle

    def start_thread(self):
        assert self._thread is None, "the worker thread is already running"
        self._thread = threading.Thread(target=self._loop, name="training-worker", daemon=True)
        self._thread.start()
        if self.mirror is not None:
            self.mirror.publish = self.publish  # its events reach the page like a run's
            self.mirror.start()
            self.mirror.catch_up()

    def shutdown(self, timeout=30):
        """Stop the run at its next step, give the saves in flight `timeout` seconds to finish (those still unwritten
        then are abandoned, leaving nothing partial), and end the worker thread."""
        self.commands.put(stop_command(timeout))
        self._runs.put(None)
        if self._thread is not None:
            self._thread.join(timeout + SHUTDOWN_GRACE)
            if self._thread.is_alive():
                logger.error("the training worker did not stop within %g s", timeout + SHUTDOWN_GRACE)
        if self.mirror is not None and self._thread is not None:
            left = self.mirror.close(timeout=timeout)
            if left:
                logger.warning("mirror: %d upload(s) to %s left for the next start", left, self.mirror.url)

    def save_outcomes(self, after_event_id):
        """The checkpoint_saved and checkpoint_error events published after the event with that id, oldest first."""
        sub = self.bus.subscribe(last_event_id=after_event_id)
        self.bus.unsubscribe(sub)
        outcomes = []
        while True:
            try:
                _, kind, data = parse_sse(sub.messages.get_nowait())
            except queue.Empty:
                return outcomes
            if kind in ("checkpoint_saved", "checkpoint_error"):
                outcomes.append({**data, "type": kind})

    def _loop(self):
        while (run := self._runs.get()) is not None:
            self._execute(run)

    def _execute(self, run):
        if run["processes"] > 1:
            return self._execute_group(run)
        trainer = None
        try:
            trainer = Trainer(run["config"], self._data_for(run["config"]), resolve_device(run["config"].device),
                              self.checkpoint_dir, self.publish, self.commands, run_id=run["run_id"])
            drive(trainer, run)
        except Exception as e:  # the one broad catch: whatever a run raises becomes an event, the server lives on
            logger.exception("run %s failed", run["run_id"])
            self.publish({"type": "training_error", "error": f"{type(e).__name__}: {e}",
                          "final_checkpoint": trainer.final_checkpoint if trainer is not None else None})
        finally:
            self._end_run()

    def _execute_group(self, run):
        """The run on run["processes"] processes, launched and supervised from this thread (group.py)."""
        spec = {**{k: v for k, v in run.items() if k != "config"}, "config": run["config"].to_dict(),
                "checkpoint_dir": self.checkpoint_dir}
        try:
            GroupRun(spec, run["processes"], self.commands, self.publish).run()
        except GroupFailed as e:  # a rank raised, or was killed: the server lives on
            logger.error("run %s: %s", run["run_id"], e)
            self.publish({"type": "training_error", "error": str(e), "failures": e.as_list(),
                          "final_checkpoint": e.final_checkpoint})
        except Exception as e:  # the launcher itself failed (no free port, no process could start)
            logger.exception("run %s: the process group could not run", run["run_id"])
            self.publish({"type": "training_error", "error": f"{type(e).__name__}: {e}", "final_checkpoint": None})
        finally:
            self._end_run()

    def _data_for(self, config):
        key = (config.dataset, config.data_dir)
        if key not in self._data_cache:
            self._data_cache[key] = load_data(config.dataset, config.data_dir or None)
        return self._data_cache[key]

    def _end_run(self):
        with self._lock:
            if self._status["phase"] in ACTIVE_PHASES:
                self._status = {**self._status, "phase": "finished"}
            self._status = {**self._status, "paused": False}
            leftovers = []
            while True:
                try:
                    leftovers.append(self.commands.get_nowait())
                except queue.Empty:
                    break
        for command in leftovers:
            if command.get("type") == "save":
                self.publish({"type": "checkpoint_error", "request_id": command["request_id"], "name": command["name"],
                              "error": "training ended before this save was served; nothing was written",
                              "reason": "not_served"})
        self._flush(force=True)
        self._publish_status()
        if self._history_file is not None:
            self._history_file.close()
            self._history_file = None

    # ---- requests (called from HTTP handlers)

    def config_from(self, body):
        """TrainConfig from the server defaults plus the request's fields; ValueError names a bad field."""
        if body.get("checkpoint_dir", self.checkpoint_dir) != self.checkpoint_dir:
            raise ValueError("checkpoint_dir is fixed by the server (app.py --checkpoint-dir); leave it out")
        if body.get("data_dir"):
            body = {**body, "data_dir": self._confined_data_dir(body["data_dir"])}
        return TrainConfig.from_dict({**self.train_defaults, **body, "checkpoint_dir": self.checkpoint_dir,
                                      **({"device": self.device} if "device" not in body else {})})

    def _confined_data_dir(self, value):
        """A data_dir from the web: the server's --data-dir or a folder below it, never anything else; the message
        names no other path."""
        if not isinstance(value, str):
            raise ValueError("data_dir must be a string")
        if not self.data_dir:
            raise ValueError("data_dir: this server reads its bundled data only; start it with --data-dir DIR to let "
                             "the page choose DIR or a folder below it")
        base = os.path.realpath(self.data_dir)
        path = os.path.realpath(os.path.join(base, value))
        if os.path.commonpath([base, path]) != base:
            raise ValueError("data_dir must be the server's data folder (app.py --data-dir) or a folder below it")
        return path if path != base else self.data_dir

    def _num_classes(self, config):
        """Puzzle classes of the run's data if it is loaded, else a bound (ARC-AGI-2 has 1,120 puzzles)."""
        data = self._data_cache.get((config.dataset, config.data_dir))
        return len(data.puzzle_ids) if data is not None else 1120

    def _refuse_if_active(self):
        if self._status["phase"] in ACTIVE_PHASES:
            raise Conflict(f"a run is already {self._status['phase']}; stop it first (POST /stop)")

    def start(self, phase, config, mode=None, resume_from=None, fine_tune_from=None, verify_files=True,
              processes=None):
        """Queue a run on `processes` processes (the server's default when None): 1 runs in this worker's thread,
        more as a process group the thread supervises."""
        processes = self.processes if processes is None else check_processes(processes)
        self._refuse_if_active()
        classes = None if phase == "pretraining" else \
            self._num_classes(config) if config.task_type == "puzzle_classification" else 0
        check_memory(config, classes, resolve_device(config.device), self.max_memory_gb)  # a 400, outside the lock
        with self._lock:
            self._refuse_if_active()
            run_id = catalogue.new_run_id()
            self._open_history(run_id)
            self._samples = {}
            self._status = {**self._idle_status(), "phase": phase, "run_id": run_id, "mode": mode,
                            "config": config.to_dict(), "epochs": config.epochs, "processes": processes}
            self._runs.put({"run_id": run_id, "phase": phase, "config": config, "mode": mode,
                            "resume_from": resume_from, "fine_tune_from": fine_tune_from,
                            "verify_files": verify_files, "processes": processes})
        self._publish_status()
        return run_id

    def stop(self):
        with self._lock:
            if self._status["phase"] not in ("pretraining", "training"):
                raise Conflict(f"nothing to stop: the worker is {self._status['phase']}")
            self._status = {**self._status, "phase": "stopping"}
        self.commands.put({"type": "stop"})
        self._publish_status()

    def pause(self, paused):
        with self._lock:
            if self._status["phase"] not in ("pretraining", "training"):
                raise Conflict(f"no run to {'pause' if paused else 'resume'}: the worker is {self._status['phase']}")
            if self._status["paused"] == paused:
                raise Conflict(f"the run is already {'paused' if paused else 'running'}")
            self._status = {**self._status, "paused": paused}
        self.commands.put({"type": "pause" if paused else "resume"})

    def request_save(self, name=None, overwrite=False, contents="full", compression="none"):
        """Queue a manual save of these contents and compression (ckpt.CONTENTS, COMPRESSIONS); returns (request_id,
        name: None until the trainer names it). ValueError for a bad option, Conflict outside main training, Busy
        when full."""
        ckpt.check_contents(contents)
        ckpt.check_compression(compression)
        with self._lock:
            status = self._status
            if (status.get("processes") or 1) > 1:
                store.check_folder_options(contents, compression)
            if status["phase"] != "training":
                raise Conflict(f"checkpoints can be saved during main training only; the worker is {status['phase']}"
                               + (" (pretraining keeps pretrained_encoder_*.pth by itself)"
                                  if status["phase"] == "pretraining" else ""))
            if name is not None:
                ckpt.check_name(name)  # a bad name is the caller's to fix, whatever the queue holds
            waiting = self._unfinished_saves()
            if len(waiting) >= MAX_OUTSTANDING_SAVES:
                raise Busy(f"{len(waiting)} saves are still waiting; try again shortly")
            # No name: the trainer names it by the position it saves (checkpoint_epoch_E_batch_B), known only then.
            if name is not None and not overwrite and self._name_taken(name):
                raise Conflict(f"a checkpoint named {name!r} already exists or is being saved; "
                               "choose another name or send overwrite: true")
            request_id = uuid.uuid4().hex[:12]
            self._track_save(request_id, name)
            self.commands.put({"type": "save", "name": name, "request_id": request_id, "overwrite": overwrite,
                               "contents": contents, "compression": compression})
        return request_id, name

    def _track_save(self, request_id, name):
        self._save_requests[request_id] = {"request_id": request_id, "state": "queued", "name": name,
                                           "run_id": self._status["run_id"], "requested_at": ckpt.utc_now()}
        self._save_clocks[request_id] = time.monotonic()
        finished = [r for r, v in self._save_requests.items() if v["state"] in ("saved", "failed")]
        for old in finished[:max(0, len(self._save_requests) - SAVE_REQUESTS_KEPT)]:
            del self._save_requests[old]
            self._save_clocks.pop(old, None)

    def save_request(self, request_id):
        """A save request's state (queued, copying, writing, saved, failed) and, once done, its outcome; None if
        unknown."""
        with self._lock:
            state = self._save_requests.get(request_id)
            return dict(state) if state else None

    def wait_for_save(self, request_id, timeout):
        """Block until the save is saved or failed, or `timeout` seconds pass; its state then."""
        with self._save_changed:
            self._save_changed.wait_for(lambda: self._save_requests[request_id]["state"] in ("saved", "failed"),
                                        timeout)
            return dict(self._save_requests[request_id])

    def _note_save_outcome(self, event):
        """A requested save's progress or outcome, from the trainer's and the writer's events."""
        request_id = event.get("request_id")
        if request_id not in self._save_requests:
            return
        kind, state = event["type"], self._save_requests[request_id]
        if kind == "checkpoint_progress":
            state = {**state, "state": event["state"], "name": event["name"], "id": event["id"]}
        elif kind == "checkpoint_saved":
            state = {**state, "state": "saved", **{k: event.get(k) for k in SAVED_FIELDS},
                     "seconds": round(time.monotonic() - self._save_clocks.pop(request_id), 6)}
        else:
            state = {**state, "state": "failed", "name": event.get("name") or state["name"], "id": event.get("id"),
                     "error": event.get("error"), "reason": event.get("reason", "failed")}
            self._save_clocks.pop(request_id, None)
        self._save_requests[request_id] = state
        self._save_changed.notify_all()

    def _name_taken(self, name):
        """Taken in the current run: saved there, or being saved. Other runs' names are theirs."""
        entry = catalogue.entry_for(self.checkpoint_dir, self._status["run_id"], name)
        return any(s["name"] == name for s in self._unfinished_saves()) or os.path.lexists(entry.path)

    def _unfinished_saves(self):
        """The states of the saves accepted and not yet saved or failed (an automatic name is known once taken)."""
        return [s for s in self._save_requests.values() if s["state"] not in ("saved", "failed")]

    def status(self):
        with self._lock:
            return {**self._status, "last_event_id": self.bus.last_id,
                    "mirror": self.mirror.status() if self.mirror is not None else None}

    def samples(self):
        """The latest samples event of each split ("train", "val") of the current or last run, and its latest
        language event ("language")."""
        with self._lock:
            return dict(self._samples)

    # ---- events (called from the trainer's threads)

    def publish(self, event):
        """Called from the training and checkpoint-writer threads; the lock keeps status and points consistent."""
        kind = event["type"]
        with self._lock:
            event = {"run_id": self._status["run_id"], **event}
            self._update_status(event)
            if kind in ("checkpoint_progress", "checkpoint_saved", "checkpoint_error"):
                self._note_save_outcome(event)
            if kind == "batch":
                self._chart_points.append(_train_point(event))
                self._flush()
            elif kind == "validation":
                self._chart_points.append({k: v for k, v in event.items() if k != "type"})
                self._flush(force=True)
            else:
                self.bus.publish(kind, event)
                if kind.startswith("training_") or kind in MIRROR_EVENTS:  # the page's mirror row follows these
                    self._publish_status()
        if self.mirror is not None:
            self.mirror.follow(event)

    def _update_status(self, event):
        kind, s = event["type"], self._status
        if kind == "batch":
            self._status = {**s, "epoch": event["epoch"], "batch": event["batch"], "global_step": event["global_step"],
                            "batches_per_epoch": event["batches_per_epoch"], "epochs": event["epochs"],
                            "samples_per_sec": event["samples_per_sec"], "train": _train_point(event)}
        elif kind == "validation":
            val = {k[4:]: v for k, v in event.items() if k.startswith("val_")}
            self._status = {**s, "epoch": event["epoch"], "batch": 0, "val": val}
        elif kind == "training_started":
            self._status = {**s, "epoch": event["epoch"], "batch": event["batch"], "global_step": event["global_step"],
                            "batches_per_epoch": event["batches_per_epoch"], "config": event["config"],
                            "checkpoint_estimate_bytes": event.get("checkpoint_estimate_bytes"),
                            "checkpoint_estimates": event.get("checkpoint_estimates")}
        elif kind == "training_error":
            self._status = {**s, "phase": "error", "error": event["error"]}
        elif kind in ("training_paused", "training_resumed"):
            self._status = {**s, "paused": kind == "training_paused"}
        elif kind == "samples":  # kept apart from status, which goes out 4 times a second: grids are large
            self._samples = {**self._samples, event.get("split", "train"): event}
        elif kind == "language":  # the same: the top messages carry grids
            self._samples = {**self._samples, "language": event}

    def _flush(self, force=False):
        """Send the chart points gathered since the last flush, and a status, at most about 4 times a second."""
        now = time.monotonic()
        if not force and now - self._last_flush < FLUSH_SECONDS:
            return
        self._last_flush = now
        points, self._chart_points = self._chart_points, []
        if points:
            train = [p for p in points if "loss" in p]
            val = [p for p in points if "val_loss" in p]
            self._append_history(points)
            self.bus.publish("metrics", {"run_id": self._status["run_id"], "train": train, "val": val})
        self._publish_status()

    def _publish_status(self):
        status = self.status()
        try:
            status["disk_free_bytes"] = shutil.disk_usage(self.checkpoint_dir).free
        except OSError:
            status["disk_free_bytes"] = None
        self.bus.publish("status", status)

    # ---- metric history on disk: runs/RUN_ID/metrics.jsonl, beside the run.json its trainer writes

    def _open_history(self, run_id):
        folder = catalogue.run_folder(self.checkpoint_dir, run_id)
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(os.path.join(folder, catalogue.METRICS_FILE),
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            self._history_file = os.fdopen(fd, "a", encoding="utf-8")
        except OSError as e:  # history is a convenience: training goes on without it
            logger.warning("cannot keep metric history in %s: %s", folder, e)
            self._history_file = None

    def _append_history(self, points):
        if self._history_file is None:
            return
        try:
            self._history_file.write("".join(ckpt.dumps_strict(p) + "\n" for p in points))
            self._history_file.flush()
        except (OSError, ValueError) as e:
            logger.warning("metric history write failed: %s", e)

    @staticmethod
    def _idle_status():
        return {"phase": "idle", "paused": False, "run_id": None, "mode": None, "config": None, "epoch": 0,
                "epochs": None, "batch": 0, "batches_per_epoch": None, "global_step": 0, "train": {}, "val": {},
                "samples_per_sec": None, "error": None, "checkpoint_estimate_bytes": None, "checkpoint_estimates": None,
                "processes": None}


def drive(trainer, run):
    """Run what a start request asked of a built Trainer: pretraining, or main training (fresh, resumed or
    fine-tuned). The worker thread calls it, and so does every rank of a process group (group.py)."""
    if run["phase"] == "pretraining":
        return trainer.pretrain(run["mode"])
    if run.get("resume_from"):
        trainer.resume(run["resume_from"], verify_file=run["verify_files"])
    else:
        trainer.setup()
    if run.get("fine_tune_from"):
        trainer.load_weights(run["fine_tune_from"], verify_file=run["verify_files"])
    return trainer.train()


def check_processes(value):
    """A run's number of processes: 1 (a thread of the server) up to this machine's CPU cores (a process each at
    least; a GPU machine has more cores than GPUs), and MAX_PROCESSES at most; ValueError otherwise."""
    most = max(1, min(MAX_PROCESSES, os.cpu_count() or 1))
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
        raise ValueError(f"processes must be a whole number from 1 to {most} (this machine's CPU cores), "
                         f"got {value!r}")
    return value


def _train_point(event):
    skip = ("type", "phase", "batches_per_epoch", "epochs", "run_id")
    return {k: v for k, v in event.items() if k not in skip}
