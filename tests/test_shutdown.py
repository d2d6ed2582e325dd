"""Graceful shutdown: the writer abandons what a deadline leaves unwritten, and real processes (app.py, train.py)
get SIGTERM or SIGINT while a save of about 60 MB is in flight. The process finishes the save (or abandons it after
--shutdown-timeout, leaving nothing partial), prints one line per save and exits 0; a second signal exits at once
(130).

To have a save in flight when the signal comes, whatever the speed of the disk, the test holds the checkpoint's lock
(as load_checkpoint.py verifying it would) until the process has said it is stopping."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch

import catalogue
import checkpoint as ckpt
import checkpoint_manager
import shutdown
from conftest import write_task_folder
from test_checkpoint import record_fields
from test_faults import BIG_MODEL, temporaries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON = {"Content-Type": "application/json"}
LINE = re.compile(r"(saved|abandoned) ([^\s:]+:[^:]+?)(?: at step (\d+)|: (.+))$")  # RUN_ID:NAME, names have no colon


class Process:
    """A subprocess whose stdout and stderr are read, line by line, into `lines` by a thread of its own (so the
    pipe never fills while the test waits)."""

    def __init__(self, args, cwd=ROOT, env=None):
        self.lines, self._new = [], threading.Condition()
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self._new:
                self.lines.append(line.rstrip("\n"))
                self._new.notify_all()
        with self._new:
            self._new.notify_all()

    def wait_line(self, predicate, timeout=60, what="a line"):
        """The first line satisfying predicate, waiting for it as the process prints."""
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                found = next((line for line in self.lines if predicate(line)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    self.proc.kill()
                    raise AssertionError(f"no {what} in the output:\n" + "\n".join(self.lines[-40:]))
                self._new.wait(min(left, 0.5))

    def signal(self, number):
        self.proc.send_signal(number)

    def finish(self, timeout=60):
        """Exit status and every line printed."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the process did not exit:\n" + "\n".join(self.lines[-40:])) from None
        self._reader.join(10)
        return code, list(self.lines)


def save_lines(lines):
    """{checkpoint id: (outcome, step or reason)} from the per-save lines printed at shutdown."""
    found = {}
    for line in lines:
        match = LINE.match(line)
        if match:
            outcome, ident, step, reason = match.groups()
            found[ident] = (outcome, int(step) if step else reason)
    return found


def held_lock(root, run_id, name):
    """The lock of checkpoint run_id:name, held by this process: a save of it waits until the lock is let go."""
    folder = catalogue.checkpoint_folder(str(root), run_id)
    os.makedirs(folder, exist_ok=True)
    return ckpt.checkpoint_lock(os.path.join(folder, name + ".pth"))


def check_root(root):
    """Nothing partial anywhere under the root, and every checkpoint listed verifies."""
    assert temporaries(root) == [], f"partial files left: {temporaries(root)}"
    listed = catalogue.list_checkpoints(str(root))
    for meta in listed:
        assert not meta["damaged"], meta
        ok, reason = ckpt.verify(meta["path"])
        assert ok, reason
    return {meta["id"]: meta for meta in listed}


# ---------------------------------------------------------------------------------------------- the writer

def big_fields(name, global_step):
    """A record whose model holds a 24 MB tensor: written in three pieces."""
    fields = record_fields(name, global_step=global_step)
    fields["model_state_dict"] = {**fields["model_state_dict"], "big": torch.zeros(6_000_000)}
    return fields


def test_an_abandoned_write_stops_midway_removes_its_temporary_and_keeps_the_previous_checkpoint(tmp_path,
                                                                                                 monkeypatch):
    events = []
    writer = checkpoint_manager.CheckpointWriter(events.append)
    writer.submit(checkpoint_manager.SaveJob(record_fields("x", global_step=1), str(tmp_path), "run"))
    assert writer.flush(timeout=60)
    before = ckpt.file_sha256(str(tmp_path / "x.pth"))
    real, pieces = ckpt._HashingFile._write_piece, []

    def abandon_after_the_first_piece(self, data):
        if len(data) == ckpt._HashingFile.PIECE:
            pieces.append(len(data))
            if len(pieces) == 1:
                writer.abandon("stopped by the test")
        return real(self, data)

    monkeypatch.setattr(ckpt._HashingFile, "_write_piece", abandon_after_the_first_piece)
    writer.submit(checkpoint_manager.SaveJob(big_fields("x", 2), str(tmp_path), "run", request_id="over",
                                             overwrite=True))
    writer.submit(checkpoint_manager.SaveJob(record_fields("y"), str(tmp_path), "run", request_id="later"))
    writer.close()
    assert pieces == [ckpt._HashingFile.PIECE], "the write went on after it was abandoned"
    errors = {e["request_id"]: e for e in events if e["type"] == "checkpoint_error"}
    assert set(errors) == {"over", "later"} and {e["error"] for e in errors.values()} == {"stopped by the test"}
    assert errors["over"]["id"] == "run:x"
    assert temporaries(tmp_path) == [] and not (tmp_path / "y.pth").exists()
    assert ckpt.file_sha256(str(tmp_path / "x.pth")) == before and ckpt.verify(str(tmp_path / "x.pth"))[0]
    assert ckpt.load_checkpoint(str(tmp_path / "x.pth"))["global_step"] == 1


def test_close_abandons_at_its_deadline_the_saves_waiting_and_those_not_started(tmp_path):
    events = []
    writer = checkpoint_manager.CheckpointWriter(events.append)
    with ckpt.checkpoint_lock(str(tmp_path / "held.pth")):  # the first save waits for this lock
        for i, name in enumerate(["held", "next", "last"]):
            writer.submit(checkpoint_manager.SaveJob(record_fields(name), str(tmp_path), "run", request_id=str(i)))
        started = time.monotonic()
        writer.close(deadline=time.monotonic() + 0.2, timeout=0.2)
        assert time.monotonic() - started < 5, "close did not return soon after its deadline"
    assert not any(thread.is_alive() for thread in writer._threads)
    assert [(e["type"], e["request_id"], e["error"]) for e in events if e["type"] != "checkpoint_progress"] == [
        ("checkpoint_error", str(i), "abandoned at shutdown: did not finish within 0.2 s") for i in range(3)]
    assert temporaries(tmp_path) == [] and not list(tmp_path.glob("*.pth")) and not list(tmp_path.glob("*.json"))


def test_save_lines_say_one_line_per_save_or_that_none_was_in_flight():
    assert shutdown.save_lines([]) == ["no save was in flight"]
    events = [{"type": "checkpoint_saved", "id": "r:a", "request_id": "1", "global_step": 5},
              {"type": "checkpoint_error", "id": "r:a", "request_id": "1", "error": "saved, but retention failed"},
              {"type": "checkpoint_error", "run_id": "r", "name": "b", "request_id": "2", "error": "why"}]
    assert shutdown.save_lines(events) == ["saved r:a at step 5", "abandoned r:b: why"]


# ---------------------------------------------------------------------------------------------- app.py

def start_app(root, *flags):
    """python app.py training a model whose checkpoints take about 60 MB; (process, url, run id) once it steps."""
    app = Process([sys.executable, "app.py", "--checkpoint-dir", str(root), "--port", "0", "--device", "cpu", *flags])
    url = app.wait_line(lambda line: "http://" in line, 90, what="address").split()[-1]
    answer = requests.post(url + "/start_training", json=BIG_MODEL, headers=JSON, timeout=10)
    assert answer.status_code == 202, answer.text
    deadline = time.monotonic() + 60
    while requests.get(url + "/status", timeout=5).json()["global_step"] < 1:
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    return app, url, answer.json()["run_id"]


def request_save(url, name):
    answer = requests.post(url + "/save_checkpoint", json={"name": name}, headers=JSON, timeout=10)
    assert answer.status_code == 202, answer.text
    return answer.json()["name"]


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_save_finishes_it_and_exits_0(tmp_path, number):
    root = tmp_path / "checkpoints"
    app, url, run_id = start_app(root)
    with held_lock(root, run_id, "before shutdown"):
        name = request_save(url, "before shutdown")
        app.signal(number)
        app.wait_line(lambda line: "stopping" in line, what="the signal's message")
    code, lines = app.finish()
    output = "\n".join(lines)
    assert code == 0, output
    assert any(f"{signal.Signals(number).name}: stopping" in line and "again to exit at once (status 130)" in line
               for line in lines), output
    ident = catalogue.checkpoint_id(run_id, name)
    outcome, step = save_lines(lines)[ident]
    assert outcome == "saved", output
    listed = check_root(root)
    assert listed[ident]["global_step"] == step and listed[ident]["size"] > 40e6
    # The run's own final checkpoint, where it stopped: resumable, and named on the way out.
    final = [i for i in listed if i.startswith(f"{run_id}:interrupted_step_")]
    assert len(final) == 1 and listed[final[0]]["kind"] == "interrupted", output
    assert save_lines(lines)[final[0]][0] == "saved", output


def test_saves_not_finished_within_the_shutdown_timeout_are_abandoned_leaving_nothing_partial(tmp_path):
    root = tmp_path / "checkpoints"
    app, url, run_id = start_app(root, "--shutdown-timeout", "0.01")
    with held_lock(root, run_id, "late 0"):  # the first save waits for it, the others wait behind the first
        names = [request_save(url, f"late {i}") for i in range(3)]
        app.signal(signal.SIGTERM)
        code, lines = app.finish()
    output = "\n".join(lines)
    assert code == 0, output
    outcomes = save_lines(lines)
    final = [ident for ident in outcomes if ident.split(":")[1].startswith("interrupted_step_")]
    assert len(final) == 1, output  # the run's final checkpoint waits behind the others, and is abandoned with them
    assert {catalogue.checkpoint_id(run_id, name): ("abandoned", "abandoned at shutdown: did not finish within 0.01 s")
            for name in names + [final[0].split(":")[1]]} == outcomes, output
    assert check_root(root) == {}


# ---------------------------------------------------------------------------------------------- train.py

def start_train(tmp_path, *flags):
    """python train.py on a few tasks with the same large model; the process and its run id once the run began."""
    tasks = write_task_folder(str(tmp_path / "tasks"), n_training=8, n_evaluation=2)
    sizes = {k: BIG_MODEL[k] for k in ("latent_dim", "hidden_dim", "embedding_dim", "num_conv_layers", "batch_size")}
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--checkpoint-dir", str(tmp_path / "checkpoints"),
            "--data-dir", tasks, "--device", "cpu", "--no-progress", "--epochs", "1000",
            "--checkpoint-every-epochs", "0", *flags]
    for key, value in sizes.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    train = Process(args, cwd=tmp_path)
    run_id = train.wait_line(lambda line: line.startswith("run "), what="run line").split()[1].rstrip(":")
    return train, run_id


def first_validation(train):
    """Wait for the first validation's line: the best_model save follows at once."""
    train.wait_line(lambda line: line.startswith("epoch 1:"), 90, what="first validation")


@pytest.mark.parametrize("timeout", ["30", "0.01"])
def test_train_py_stops_on_sigterm_during_a_save_and_says_what_became_of_it(tmp_path, timeout):
    root = tmp_path / "checkpoints"
    train, run_id = start_train(tmp_path, "--shutdown-timeout", timeout)
    with held_lock(root, run_id, "best_model"):
        first_validation(train)
        train.signal(signal.SIGTERM)
        train.wait_line(lambda line: "SIGTERM: stopping" in line, what="the signal's message")
        if timeout == "0.01":  # held to the end: the save cannot finish
            code, lines = train.finish()
    if timeout == "30":  # let go: the save in flight finishes
        code, lines = train.finish()
    output = "\n".join(lines)
    assert code == 0, output
    ident = catalogue.checkpoint_id(run_id, "best_model")
    summary = next(line for line in lines if line.startswith("interrupted at epoch"))
    outcome, detail = save_lines(lines)[ident]
    listed = check_root(root)
    if timeout == "30":
        assert outcome == "saved", output
        assert listed[ident]["global_step"] == detail and f"{ident} (step {detail})" in summary
        final = [i for i in listed if i.startswith(f"{run_id}:interrupted_step_")]
        assert len(final) == 1 and listed[final[0]]["kind"] == "interrupted", output
        assert any(line.startswith("resume: ") and f"--resume {final[0]}" in line for line in lines), output
    else:
        assert outcome == "abandoned" and detail == "abandoned at shutdown: did not finish within 0.01 s", output
        assert ident not in listed and "this run wrote no checkpoint" in summary
        assert f"not saved: {ident}: {detail}" in lines, output
    assert not any(line.startswith("test:") for line in lines), "a stopped run is not tested"


def test_a_second_signal_exits_at_once_and_the_next_start_cleans_up(tmp_path):
    train, _ = start_train(tmp_path)
    first_validation(train)
    train.signal(signal.SIGTERM)
    train.signal(signal.SIGINT)  # another signal, so the two never merge into one pending signal
    code, lines = train.finish()
    output = "\n".join(lines)
    assert code == 130, output
    assert any(re.search(r"SIG(TERM|INT): stopping", line) for line in lines), output
    assert any(re.search(r"SIG(TERM|INT), a second signal: exiting at once \(status 130\)", line) for line in lines)
    assert not any(line.startswith("interrupted at epoch") for line in lines), output
    root = tmp_path / "checkpoints"
    catalogue.recover(str(root))  # what the next start does first
    check_root(root)
