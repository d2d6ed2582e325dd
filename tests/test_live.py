"""The app on a real loopback port with its real worker thread: HTTP, server-sent events, files on disk."""
import os
import subprocess
import sys
import time

import requests
import torch

import catalogue
import checkpoint as ckpt
from conftest import EventReader, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def status(server):
    return requests.get(server.url + "/status", timeout=5).json()


def start(server, **fields):
    response = requests.post(server.url + "/start_training", json=fields, timeout=5)
    assert response.status_code == 202, response.text
    wait_for(lambda: status(server)["global_step"] > 0, what="training to take steps")
    return response.json()["run_id"]


def test_save_during_training_arrives_as_an_event_and_training_goes_on(live_server):
    reader = EventReader(live_server.url)
    try:
        start(live_server)
        response = requests.post(live_server.url + "/save_checkpoint", json={"name": "live save"}, timeout=5)
        assert response.status_code == 202
        request_id = response.json()["request_id"]
        saved = reader.wait("checkpoint_saved", lambda d: d["request_id"] == request_id)
        assert saved["name"] == "live save" and saved["size"] > 0
        path = saved["path"]
        assert os.path.isfile(path) and ckpt.verify(path)[0]
        record = torch.load(path)  # plain torch.load, weights_only by default
        assert record["global_step"] == saved["global_step"] and record["kind"] == "manual"
        # Training did not wait for the write: steps after the saved one keep arriving.
        later = reader.wait("metrics", lambda d: any(p["global_step"] > saved["global_step"] + 3 for p in d["train"]))
        assert later["run_id"]
        listed = requests.get(live_server.url + "/list_checkpoints", timeout=5).json()["checkpoints"]
        assert "live save" in [row["name"] for row in listed]
    finally:
        reader.close()
        requests.post(live_server.url + "/stop", json={}, timeout=5)


def test_every_client_gets_every_event_and_reconnects_catch_up(live_server):
    first, second = EventReader(live_server.url), EventReader(live_server.url)
    try:
        start(live_server)
        requests.post(live_server.url + "/save_checkpoint", json={"name": "for both"}, timeout=5)
        first.wait("checkpoint_saved")
        second.wait("checkpoint_saved")
        requests.post(live_server.url + "/stop", json={}, timeout=5)
        first.wait("training_stopped")
        second.wait("training_stopped")
        stop_id = max(i for i, name, _ in first.events if name == "training_stopped")
        ids_first = [i for i, _, _ in first.events if i <= stop_id]
        ids_second = [i for i, _, _ in second.events if i <= stop_id]
        assert ids_first == ids_second and len(ids_first) > 5  # nobody stole anybody's events
        assert ids_first == sorted(ids_first)
        # A client that reconnects with Last-Event-ID gets what it missed, from the history.
        replay = EventReader(live_server.url, last_event_id=ids_first[2])
        wait_for(lambda: len([e for e in replay.events if e[0] <= stop_id]) == len(ids_first) - 3, what="replay")
        assert [i for i, _, _ in replay.events if i <= stop_id] == ids_first[3:]
        replay.close()
    finally:
        first.close()
        second.close()


def test_stream_headers_retry_and_cleanup(live_server):
    response = requests.get(live_server.url + "/events", stream=True, timeout=5)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["X-Accel-Buffering"] == "no"
    first = next(response.iter_lines(decode_unicode=True))
    assert first.startswith("retry: ")
    bus = live_server.app.extensions["trainer"].bus
    assert bus.client_count() >= 1
    response.close()
    # The server notices the gone client at its next write (a status event or the heartbeat).
    bus.publish("status", {"poke": True})
    wait_for(lambda: bus.client_count() == 0, timeout=10, what="the closed stream to be unsubscribed")


def test_pause_holds_training_and_saving_while_paused_works(live_server):
    reader = EventReader(live_server.url)
    try:
        start(live_server)
        assert requests.post(live_server.url + "/pause", json={}, timeout=5).status_code == 202
        reader.wait("training_paused")
        held = status(live_server)["global_step"]
        time.sleep(0.5)
        assert status(live_server)["global_step"] == held and status(live_server)["paused"] is True
        response = requests.post(live_server.url + "/save_checkpoint", json={"name": "while paused"}, timeout=5)
        saved = reader.wait("checkpoint_saved", lambda d: d["request_id"] == response.json()["request_id"])
        assert saved["global_step"] == held
        assert requests.post(live_server.url + "/pause", json={}, timeout=5).status_code == 409
        assert requests.post(live_server.url + "/resume_training", json={}, timeout=5).status_code == 202
        wait_for(lambda: status(live_server)["global_step"] > held, what="training to go on after resume")
    finally:
        reader.close()
        requests.post(live_server.url + "/stop", json={}, timeout=5)


def test_resume_from_a_checkpoint_over_http(live_server):
    reader = EventReader(live_server.url)
    try:
        start(live_server)
        response = requests.post(live_server.url + "/save_checkpoint", json={"name": "to resume"}, timeout=5)
        saved = reader.wait("checkpoint_saved", lambda d: d["request_id"] == response.json()["request_id"])
        requests.post(live_server.url + "/stop", json={}, timeout=5)
        wait_for(lambda: status(live_server)["phase"] == "finished", what="stop")
        response = requests.post(live_server.url + "/start_training", json={"resume_from": "to resume"}, timeout=5)
        assert response.status_code == 202
        started = reader.wait("training_started", lambda d: d["run_id"] == response.json()["run_id"])
        assert started["global_step"] == saved["global_step"]
    finally:
        reader.close()
        requests.post(live_server.url + "/stop", json={}, timeout=5)


def run_script(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "test_checkpoint_api.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_user_script_flags_against_the_live_server(live_server):
    idle = run_script("--url", live_server.url, "--status")
    assert idle.returncode == 0 and "phase idle" in idle.stdout
    refused = run_script("--url", live_server.url, "--save", "too early")
    assert refused.returncode == 1 and "HTTP 409" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    start(live_server)
    try:
        saved = run_script("--url", live_server.url, "--save", "from the script")
        assert saved.returncode == 0, saved.stderr
        folder = live_server.app.extensions["trainer"].checkpoint_dir
        by_name = {m["name"]: m for m in catalogue.list_checkpoints(folder)}
        written = by_name["from the script"]  # it waited: the file is there the moment the script returns
        assert f"saved {written['id']} at epoch {written['epoch']}, batch {written['batch']}" in saved.stdout
        assert written["path"] in saved.stdout and written["sha256"][:12] in saved.stdout
        periodic = run_script("--url", live_server.url, "--every", "0.2", "--count", "2")
        assert periodic.returncode == 0 and periodic.stdout.count("saved ") == 2, periodic.stdout
        auto = [m for m in catalogue.list_checkpoints(folder) if m["name"].startswith("checkpoint_epoch_")]
        assert len(auto) == 2 and all(m["name"] in periodic.stdout for m in auto)
        for meta in auto:  # the automatic name says the position the record holds
            assert meta["name"].startswith(f"checkpoint_epoch_{meta['epoch']}_batch_{meta['batch']}")
        listed = run_script("--url", live_server.url, "--list")
        assert listed.returncode == 0 and "from the script" in listed.stdout
        piped = subprocess.run(f"{sys.executable} {os.path.join(ROOT, 'test_checkpoint_api.py')} --url "
                               f"{live_server.url} --list | head -n 1", shell=True, capture_output=True, text=True,
                               timeout=60)
        assert piped.returncode == 0 and piped.stdout.count("\n") == 1 and piped.stderr == "", piped.stderr
    finally:
        requests.post(live_server.url + "/stop", json={}, timeout=5)


def test_user_script_says_so_in_one_line_when_the_server_is_down():
    down = run_script("--url", "http://127.0.0.1:9", "--status")
    assert down.returncode == 1
    assert down.stderr.count("\n") == 1 and "cannot reach the server" in down.stderr
    assert "Traceback" not in down.stderr
