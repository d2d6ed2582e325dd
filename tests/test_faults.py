"""Faults with real processes and real file systems: SIGKILL mid-write, disk full, permission denied,
a folder deleted while running, a training step that fails."""
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import requests

import catalogue
import checkpoint as ckpt
from conftest import EventReader, LiveServer, build_app, mount_tmpfs, newest_run_checkpoints, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG_MODEL = {"latent_dim": 384, "hidden_dim": 128, "embedding_dim": 16, "num_conv_layers": 3, "batch_size": 4,
             "epochs": 1000, "checkpoint_every_epochs": 0, "device": "cpu"}


class AppProcess:
    """python app.py in a subprocess on a free port."""

    def __init__(self, folder):
        self.proc = subprocess.Popen(
            [sys.executable, "app.py", "--checkpoint-dir", str(folder), "--port", "0", "--device", "cpu"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if "http://" in line:
                self.url = line.strip().split()[-1]
                return
            if not line and self.proc.poll() is not None:
                break
        self.proc.kill()
        raise AssertionError("app.py did not print its address")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc.stdout.close()


def temporaries(root):
    """Hidden files anywhere under a checkpoint root, but the lock files, which stay by design."""
    return [os.path.join(folder, n) for folder, _, names in os.walk(root) for n in names
            if n.startswith(".") and not n.endswith(ckpt.LOCK_SUFFIX)]


def check_folder_after_crash(folder, saved_before_kill):
    """What a restart must find: no temporaries, nothing damaged, every announced checkpoint intact."""
    assert temporaries(folder) == [], f"temporaries left after restart: {temporaries(folder)}"
    listed = {m["id"]: m for m in catalogue.list_checkpoints(str(folder))}
    damaged = [ident for ident, m in listed.items() if m["damaged"]]
    assert damaged == [], f"damaged checkpoints listed: {damaged}"
    for ident in saved_before_kill:
        assert ident in listed, f"{ident} was announced as saved but is missing"
        ok, reason = ckpt.verify(listed[ident]["path"])
        assert ok, reason


KILLS = 12  # each lands at a random point of three ~100 MB writes (20 cost the suite 40 s more)


@pytest.mark.slow
def test_sigkill_during_writes_never_leaves_a_damaged_or_missing_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    rng = random.Random(1234)
    kills, sizes = 0, []
    saved_before = []
    while kills < KILLS:
        app = AppProcess(folder)
        check_folder_after_crash(folder, saved_before)  # the restart itself cleaned up
        for ident in saved_before[:-1]:  # keep the disk small: the checks above are done for these
            ckpt.delete_checkpoint(catalogue.locate(str(folder), ident).path)
        reader = EventReader(app.url)
        try:
            assert requests.post(app.url + "/start_training", json=BIG_MODEL, timeout=10).status_code == 202
            wait_for(lambda: requests.get(app.url + "/status", timeout=5).json()["global_step"] > 0, 60,
                     what="training to start")
            for i in range(3):
                requests.post(app.url + "/save_checkpoint", json={"name": f"kill {kills} save {i}"}, timeout=10)
            if kills % 3 == 0:  # now and then let a save land first, so there is something that must survive
                reader.wait("checkpoint_saved", timeout=120)
            time.sleep(rng.uniform(0.05, 1.5))  # land somewhere in the writes
        finally:
            app.kill()
            reader.close()
        kills += 1
        saved = reader.named("checkpoint_saved")
        sizes += [e["size"] for e in saved]
        saved_before = [e["id"] for e in saved]
    app = AppProcess(folder)
    app.kill()
    check_folder_after_crash(folder, saved_before)
    assert sizes and max(sizes) >= 50e6, f"checkpoints were only {max(sizes, default=0) / 1e6:.0f} MB"


def save_and_wait(server, reader, name):
    response = requests.post(server.url + "/save_checkpoint", json={"name": name}, timeout=5)
    assert response.status_code == 202, response.text
    request_id = response.json()["request_id"]
    wait_for(lambda: any(e.get("request_id") == request_id
                         for e in reader.named("checkpoint_saved") + reader.named("checkpoint_error")),
             what=f"the result of saving {name!r}")
    ok = [e for e in reader.named("checkpoint_saved") if e.get("request_id") == request_id]
    errors = [e for e in reader.named("checkpoint_error") if e.get("request_id") == request_id]
    return (ok or errors)[0], bool(ok)


def global_step(server):
    return requests.get(server.url + "/status", timeout=5).json()["global_step"]


@pytest.fixture
def tmpfs(tmp_path):
    yield from mount_tmpfs(tmp_path / "small", "5m")


def run_live(folder, arc_data, **train):
    app = build_app(folder, arc_data)
    server = LiveServer(app)
    reader = EventReader(server.url)
    body = {"epochs": 1000, **train}
    assert requests.post(server.url + "/start_training", json=body, timeout=5).status_code == 202
    wait_for(lambda: global_step(server) > 0, what="training to start")
    return server, reader


def test_disk_full_is_an_error_event_training_goes_on_and_a_later_save_succeeds(tmpfs, arc_data, monkeypatch):
    folder = tmpfs / "checkpoints"
    # The tiny model's checkpoints take about 2 MB each on a 5 MB disk.
    server, reader = run_live(folder, arc_data)
    try:
        results = [save_and_wait(server, reader, f"fill {i}") for i in range(6)]
        failures = [event for event, ok in results if not ok]
        assert failures, "the disk never filled up"
        assert any("MB free" in e["error"] or "space" in e["error"].lower() for e in failures)
        assert not temporaries(folder), "a partial file was left behind"
        for meta in catalogue.list_checkpoints(str(folder)):
            assert not meta["damaged"] and ckpt.verify(meta["path"])[0]

        # Past the up-front check: the disk lies about free space, so the write itself hits ENOSPC.
        monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
        event, ok = save_and_wait(server, reader, "mid-write failure")
        assert not ok and "space" in event["error"].lower()
        assert not temporaries(folder)
        assert not os.path.exists(newest_run_checkpoints(folder) / "mid-write failure.pth")
        monkeypatch.undo()

        before = global_step(server)
        wait_for(lambda: global_step(server) > before + 2, what="training to go on")
        for meta in catalogue.list_checkpoints(str(folder)):
            ckpt.delete_checkpoint(meta["path"])
        event, ok = save_and_wait(server, reader, "after freeing space")
        assert ok, event
    finally:
        reader.close()
        server.close()


def test_permission_denied_is_an_error_event_and_training_goes_on(tmp_path, arc_data, monkeypatch):
    server, reader = run_live(tmp_path / "checkpoints", arc_data)
    real_open, real_os_open = open, os.open

    def refused(path):
        return ".tmp-" in os.path.basename(str(path))

    def refuse(path, *args, **kwargs):
        if refused(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    def refuse_os_open(path, *args, **kwargs):  # the .pth is opened with os.open for O_DIRECT
        if refused(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_os_open(path, *args, **kwargs)

    try:
        monkeypatch.setattr("builtins.open", refuse)
        monkeypatch.setattr(os, "open", refuse_os_open)
        event, ok = save_and_wait(server, reader, "denied")
        assert not ok and "Permission denied" in event["error"]
        monkeypatch.undo()
        assert not os.path.exists(newest_run_checkpoints(tmp_path / "checkpoints") / "denied.pth")
        before = global_step(server)
        wait_for(lambda: global_step(server) > before + 2, what="training to go on")
        assert save_and_wait(server, reader, "allowed again")[1]
    finally:
        reader.close()
        server.close()


def test_checkpoint_folder_deleted_while_running(tmp_path, arc_data):
    folder = tmp_path / "checkpoints"
    server, reader = run_live(folder, arc_data)
    try:
        assert save_and_wait(server, reader, "before")[1]
        shutil.rmtree(folder)
        event, ok = save_and_wait(server, reader, "after deletion")
        assert ok, event  # the folder is made again; nothing half-written appears
        assert ckpt.verify(event["path"])[0]
        before = global_step(server)
        wait_for(lambda: global_step(server) > before + 2, what="training to go on")
    finally:
        reader.close()
        server.close()


def test_nan_loss_is_a_training_error_and_a_new_run_can_start(tmp_path, arc_data, monkeypatch):
    import train
    real = train.LOSSES["reconstruction"]

    def nan_loss(out, batch):
        loss, sums = real(out, batch)
        return loss * float("nan"), sums

    monkeypatch.setitem(train.LOSSES, "reconstruction", nan_loss)
    app = build_app(tmp_path / "checkpoints", arc_data)
    server = LiveServer(app)
    reader = EventReader(server.url)
    try:
        assert requests.post(server.url + "/start_training", json={}, timeout=5).status_code == 202
        error = reader.wait("training_error")
        assert "loss became nan" in error["error"] and "learning rate" in error["error"]
        status = requests.get(server.url + "/status", timeout=5).json()
        assert status["phase"] == "error" and "nan" in status["error"]
        monkeypatch.undo()
        assert requests.post(server.url + "/start_training", json={"max_steps": 3}, timeout=5).status_code == 202
        reader.wait("training_finished")
    finally:
        reader.close()
        server.close()
