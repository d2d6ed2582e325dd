"""A second copy of the checkpoints in object storage (--mirror URL): the local folder stays primary, and each
checkpoint is uploaded in the background once it is durable there.

One thread serves a queue of uploads and deletes, in order, so training never waits on the network. A failed
upload is retried with exponential backoff, each failure an event (mirror_error); after the last attempt the
checkpoint's local sidecar says "upload failed" with the reason, and it is tried again at the next start
(catch_up), as is every checkpoint not yet mirrored. Retention applies to both sides ("both") or only to the local
one ("local": the mirror keeps everything). The local sidecar's "mirror" field is what the table shows: absent
(local only, or waiting), {"state": "mirrored", ...} or {"state": "failed", "error": ...}.
"""
import collections
import logging
import os
import threading
import time

import catalogue
import checkpoint as ckpt
import remote

logger = logging.getLogger(__name__)

RETENTION_CHOICES = ("both", "local")
RETRIES = 5  # after a job's first attempt fails (--mirror-retries): 6 attempts in all
MAX_RETRIES = 100  # with the backoff capped at MAX_BACKOFF, over an hour and a half of retrying
FIRST_BACKOFF = 1.0  # seconds before the second attempt; doubled each time, up to MAX_BACKOFF
MAX_BACKOFF = 60.0
JOIN_TIMEOUT = 30.0  # seconds close() waits for the upload in progress to stop
ABANDON_JOIN = 1.0  # seconds it waits once abandon() was called (a signal asked to exit now), or the job ended
ACTIVE = {"upload": "uploading", "delete": "deleting", "restore": "restoring"}  # the state while serving a job
BUSY = (*ACTIVE.values(), "retrying")


def check_retention(value):
    if value not in RETENTION_CHOICES:
        raise ValueError(f"mirror_retention must be one of {', '.join(RETENTION_CHOICES)}, not {value!r}")
    return value


def check_retries(value):
    """value, a whole number of retries from 0 to MAX_RETRIES; ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RETRIES:
        raise ValueError(f"mirror_retries must be a whole number from 0 to {MAX_RETRIES}, not {value!r}")
    return value


class Mirror:
    """Uploads the checkpoints of a local root to an ObjectRoot, and deletes there what retention deletes here."""

    def __init__(self, checkpoint_dir, target, publish, retention="both", attempts=RETRIES + 1,
                 first_backoff=FIRST_BACKOFF, max_backoff=MAX_BACKOFF):
        self.checkpoint_dir, self.target, self.publish = checkpoint_dir, target, publish
        self.retention = check_retention(retention)
        self.attempts, self.first_backoff, self.max_backoff = attempts, first_backoff, max_backoff
        self._jobs = collections.deque()  # ("upload" | "delete" | "restore", run_id, name), oldest first
        self._current = None
        self._state = "idle"  # what status() says: idle, uploading, deleting, restoring, retrying, failed, stopped
        self._last_error = None  # the last mirror_error: {"error", "action", "id", "attempt", "attempts", "at"}
        self._abandoned = False
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = None

    @property
    def url(self):
        return self.target.url

    # ---- lifecycle

    def start(self):
        if self._thread is not None:
            raise RuntimeError("the mirror is already started")
        self._thread = threading.Thread(target=self._loop, name="checkpoint-mirror", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout=None):
        """Finish what is queued (within timeout seconds, if given, or until abandon()), then stop; the number of
        jobs left undone (their checkpoints are caught up at the next start)."""
        self.wait(timeout)
        self._stop.set()  # an upload in progress stops at its next piece, committing nothing
        with self._cond:
            left = len(self._jobs) + (self._current is not None)
            self._jobs.clear()
            self._state = "stopped"
            self._cond.notify_all()
        if self._thread is not None:
            # The job in progress stops at its next piece, but one piece can hang on the network: it gets
            # JOIN_TIMEOUT, or ABANDON_JOIN from abandon() on (a signal: exit now). One left running never wrote
            # its sidecar object, so nothing of it is listed there.
            with self._cond:
                self._cond.wait_for(lambda: self._current is None or self._abandoned, JOIN_TIMEOUT)
            self._thread.join(ABANDON_JOIN)
            if self._thread.is_alive():
                logger.warning("mirror: an upload to %s did not stop; left to the next start", self.url)
            self._thread = None
        return left

    def abandon(self):
        """Stop waiting (a signal while close() waits): the job in progress stops at its next piece, committing
        nothing, and what is queued is left to the next start's catch_up()."""
        with self._cond:
            self._abandoned = True
            self._stop.set()
            self._cond.notify_all()

    def wait(self, timeout=None):
        """Block until the queue is empty and nothing is uploading (or the mirror is abandoned); whether it is."""
        with self._cond:
            self._cond.wait_for(lambda: self._idle() or self._abandoned, timeout)
            return self._idle()

    def _idle(self):
        return not self._jobs and self._current is None

    def pending(self):
        with self._cond:
            return len(self._jobs) + (self._current is not None)

    def status(self):
        """A plain dict for the status: where to (redacted), what it is doing, how many jobs wait (the one in
        progress included), the retention, and the last error (None before one)."""
        with self._cond:  # a job that has said how it ended (its event may be going out now) waits no more
            busy = self._current is not None and self._state in BUSY
            return {"url": self.target.redact(self.url), "state": self._state, "pending": len(self._jobs) + busy,
                    "retention": self.retention, "last_error": dict(self._last_error) if self._last_error else None}

    # ---- jobs

    def upload(self, run_id, name):
        """Queue an upload of a durable local checkpoint (called from the checkpoint writer after a save)."""
        self._put(("upload", run_id, name))

    def delete(self, run_id, name):
        """Queue the remote delete that follows a local one, if retention applies to both sides."""
        if self.retention == "both":
            self._put(("delete", run_id, name))

    def following(self, publish):
        """publish, after which every checkpoint_saved is uploaded and every checkpoint_deleted followed: the
        mirror subscribes to the events a run publishes, whichever process or thread the run is in."""
        def publish_and_follow(event):
            publish(event)
            self.follow(event)
        return publish_and_follow

    def follow(self, event):
        kind, run_id, name = event.get("type"), event.get("run_id"), event.get("name")
        if kind == "checkpoint_saved" and run_id and name:
            self.upload(run_id, name)
        elif kind == "checkpoint_deleted" and run_id and name:
            self.delete(run_id, name)

    def restore(self, run_id, name):
        """Queue fetching a checkpoint that is only on the mirror back into its run's local folder (the page's
        Restore); checkpoint_restored once it is in place, mirror_error if it cannot be."""
        self._put(("restore", run_id, name))

    def catch_up(self):
        """Queue every local checkpoint that is not mirrored to this URL with its current bytes; their count."""
        queued = 0
        for meta in catalogue.list_checkpoints(self.checkpoint_dir):
            if meta.get("damaged") or meta.get("id") is None or meta.get("run_id") == catalogue.LEGACY_RUN:
                continue
            if not _mirrored(meta, self.url):
                self.upload(meta["run_id"], meta["name"])
                queued += 1
        return queued

    def _put(self, job):
        with self._cond:
            # A second upload of a name still queued would send the same bytes; a second restore of one under way
            # would fetch the same checkpoint (an upload under way is queued again: the name may be saved anew).
            if job not in self._jobs and not (job[0] == "restore" and job == self._current):
                self._jobs.append(job)
            self._cond.notify_all()

    def _loop(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs or self._stop.is_set())
                if self._stop.is_set():
                    return
                self._current = self._jobs.popleft()
                self._state = ACTIVE[self._current[0]]
            try:
                self._serve(*self._current)
            except Exception:  # the mirror outlives any job; the next checkpoint is still mirrored
                logger.exception("mirror: unexpected failure serving %s", self._current)
            finally:
                with self._cond:
                    self._current = None
                    if self._state in BUSY:  # a job that ended without saying how (stopped, or a bug)
                        self._state = "idle"
                    self._cond.notify_all()

    def _serve(self, action, run_id, name):
        ident = catalogue.checkpoint_id(run_id, name)
        for attempt in range(1, self.attempts + 1):
            if attempt > 1:
                self._set_state(ACTIVE[action])  # retrying no more: trying
            try:
                done = {"upload": self._upload, "delete": self._delete, "restore": self._restore}[action](
                    run_id, name)
            except (remote.RemoteError, ckpt.CheckpointError, OSError) as e:
                message = self.target.redact(str(e))
                last = attempt == self.attempts or self._stop.is_set()
                retry_in = None if last else min(self.max_backoff, self.first_backoff * 2 ** (attempt - 1))
                # the state before the event: a status sent on it says what the mirror does now
                self._set_state("failed" if last else "retrying", {
                    "error": message, "action": action, "id": ident, "attempt": attempt, "attempts": self.attempts,
                    "at": ckpt.utc_now()})
                self.publish({"type": "mirror_error", "id": ident, "run_id": run_id, "name": name,
                              "action": action, "attempt": attempt, "attempts": self.attempts, "error": message,
                              "retry_in": retry_in, "url": self.url})
                if last:
                    if action == "upload" and not self._stop.is_set():  # a shutdown is no failure to show
                        self._mark(run_id, name, None, {"state": "failed", "error": message, "url": self.url,
                                                        "at": ckpt.utc_now()})
                    return
                if self._stop.wait(retry_in):
                    return
                continue
            self._set_state("idle")
            if done is not None:
                kind = {"upload": "checkpoint_mirrored", "delete": "mirror_deleted", "restore": "checkpoint_restored"}
                self.publish({"type": kind[action], "id": ident, "run_id": run_id, "name": name, "url": self.url,
                              **done})
            return

    def _set_state(self, state, error=None):
        with self._cond:
            if self._state != "stopped":
                self._state = state
            if error is not None:
                self._last_error = error

    def _upload(self, run_id, name):
        entry = _local_entry(self.checkpoint_dir, run_id, name)
        if entry is None:
            return None  # deleted here before its turn came (retention): nothing to mirror
        sidecar = ckpt.read_sidecar(entry.path)
        if sidecar is None:
            raise ckpt.CheckpointError(f"{entry.id} has no readable sidecar; not uploaded")
        if _mirrored(sidecar, self.url):
            return None
        started = time.monotonic()
        run_file = _run_file(self.checkpoint_dir, run_id)
        if run_file is not None:
            self.target.put_run_file(run_id, run_file)
        self.target.upload(entry.path, sidecar, run_id, name, cancel=self._stop)
        self._mark(run_id, name, sidecar.get("sha256"), {"state": "mirrored", "url": self.url,
                                                         "sha256": sidecar.get("sha256"), "at": ckpt.utc_now()})
        return {"size": sidecar.get("size"), "seconds": round(time.monotonic() - started, 3)}

    def _delete(self, run_id, name):
        try:
            self.target.delete(run_id, name)
        except FileNotFoundError:
            return None
        return {}

    def _restore(self, run_id, name):
        try:
            path = self.target.restore(run_id, name, self.checkpoint_dir)
        except FileExistsError:
            return None  # restored meanwhile (a second click): it is there
        except ValueError as e:  # a linked folder on the way: refused, never retried into
            raise ckpt.CheckpointError(str(e)) from None
        sidecar = ckpt.read_sidecar(path) or {}
        self._mark(run_id, name, sidecar.get("sha256"), {"state": "mirrored", "url": self.url,
                                                         "sha256": sidecar.get("sha256"), "at": ckpt.utc_now()})
        return {"path": path}

    def _mark(self, run_id, name, sha256, state):
        """Record the mirror state in the local sidecar, under the checkpoint's lock, unless the checkpoint was
        replaced meanwhile (sha256 given and no longer its) or is gone."""
        entry = _local_entry(self.checkpoint_dir, run_id, name)
        if entry is None:
            return
        try:
            with ckpt.checkpoint_lock(entry.path):
                current = ckpt.read_sidecar(entry.path)
                if current is not None and (sha256 is None or current.get("sha256") == sha256):
                    ckpt.update_unlocked(entry.path, {"mirror": state})
        except (OSError, ckpt.CheckpointError) as e:
            logger.warning("mirror: could not record the state of %s: %s", name, e)


def _local_entry(checkpoint_dir, run_id, name):
    try:
        entry = catalogue.entry_for(checkpoint_dir, run_id, name)
    except ValueError:
        return None
    return entry if os.path.lexists(entry.path) and not os.path.islink(entry.path) else None


def _run_file(checkpoint_dir, run_id):
    """The bytes of a run's run.json, or None (a legacy checkpoint, or an unreadable file: the checkpoint is
    mirrored without it)."""
    try:
        path = os.path.join(catalogue.run_folder(checkpoint_dir, run_id), catalogue.RUN_FILE)
        return ckpt.read_bytes(path, ckpt.JSON_LIMIT)
    except (ValueError, OSError, ckpt.UnreadableFile):
        return None


def _mirrored(sidecar, url):
    state = sidecar.get("mirror")
    return isinstance(state, dict) and state.get("state") == "mirrored" and state.get("url") == url \
        and state.get("sha256") == sidecar.get("sha256")


def open_mirror(url, storage_options, checkpoint_dir, publish, retention="both", retries=RETRIES):
    """A started Mirror to url, after checking at start-up that it can be listed and written (RemoteError); each
    job is tried once and then up to `retries` times more."""
    target = remote.ObjectRoot(url, storage_options)
    target.check()
    return Mirror(checkpoint_dir, target, publish, retention=retention, attempts=check_retries(retries) + 1).start()
