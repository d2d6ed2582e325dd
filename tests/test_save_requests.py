"""Saves you can wait for: POST /save_checkpoint with "wait": true, and GET /save_requests/ID, on a real server."""
import hashlib
import os
import threading

import pytest
import requests
import torch

import catalogue
import checkpoint as ckpt
from conftest import LiveServer, build_app, mount_tmpfs, wait_for
from test_live import start

STATES = ("queued", "copying", "writing", "saved", "failed")


def save(server, **body):
    """A save that waits; the body's own timeout (the server's wait), if any, plus a margin for the HTTP call."""
    return requests.post(server.url + "/save_checkpoint", json={"wait": True, **body},
                         timeout=body.get("timeout", 60) + 30)


def stop(server):
    requests.post(server.url + "/stop", json={}, timeout=10)


def test_a_waited_save_answers_with_its_outcome_once_it_is_on_disk(live_server):
    start(live_server)
    try:
        answer = save(live_server, name="waited for")
        assert answer.status_code == 200, answer.text
        outcome = answer.json()
        assert outcome["state"] == "saved" and outcome["name"] == "waited for" and outcome["seconds"] > 0
        with open(outcome["path"], "rb") as f:  # on disk, whole, the moment the answer came
            assert hashlib.sha256(f.read()).hexdigest() == outcome["sha256"]
        assert os.path.getsize(outcome["path"]) == outcome["size"] and ckpt.verify(outcome["path"])[0]
        record = torch.load(outcome["path"])
        assert (record["epoch"], record["batch"], record["global_step"]) == \
            (outcome["epoch"], outcome["batch"], outcome["global_step"])
        later = requests.get(f"{live_server.url}/save_requests/{outcome['request_id']}", timeout=10).json()
        assert later == outcome
    finally:
        stop(live_server)


def test_an_unnamed_save_is_named_by_the_position_its_record_holds(live_server):
    start(live_server)
    try:
        outcomes = [save(live_server).json() for _ in range(3)]
        for outcome in outcomes:
            record = torch.load(outcome["path"])
            base = f"checkpoint_epoch_{record['epoch']}_batch_{record['batch']}"
            assert outcome["name"] == base or outcome["name"].startswith(base + "_"), outcome
            assert outcome["id"] == catalogue.checkpoint_id(outcome["run_id"], outcome["name"])
        assert len({o["name"] for o in outcomes}) == 3  # same position twice: made unique, never overwritten
    finally:
        stop(live_server)


def test_the_request_passes_through_its_states_and_a_timeout_answers_202(live_server):
    run_id = start(live_server)
    folder = catalogue.checkpoint_folder(live_server.app.extensions["trainer"].checkpoint_dir, run_id)
    os.makedirs(folder, exist_ok=True)
    seen = []
    try:
        with ckpt.checkpoint_lock(os.path.join(folder, "held.pth")):  # the write waits for this lock
            answer = save(live_server, name="held", timeout=0.5)
            assert answer.status_code == 202 and answer.json()["timed_out"] is True
            request_id = answer.json()["request_id"]
            url = f"{live_server.url}/save_requests/{request_id}"
            wait_for(lambda: seen.append(requests.get(url, timeout=10).json()["state"]) or seen[-1] == "writing",
                     what="the save to reach its write")
        outcome = wait_for(lambda: (s := requests.get(url, timeout=10).json())["state"] == "saved" and s,
                           what="the save to finish once the lock is free")
        assert outcome["name"] == "held" and ckpt.verify(outcome["path"])[0]
        order = [STATES.index(s) for s in seen]
        assert order == sorted(order) and "failed" not in seen, seen
    finally:
        stop(live_server)


@pytest.mark.parametrize("body", [{"wait": "yes"}, {"wait": True, "timeout": 0}, {"wait": True, "timeout": -1},
                                  {"wait": True, "timeout": "soon"}, {"wait": True, "timeout": True},
                                  {"wait": True, "timeout": 1e9}, {"wait": 1}])
def test_bad_wait_fields_are_400_and_nothing_is_queued(live_server, body):
    start(live_server)
    try:
        answer = requests.post(live_server.url + "/save_checkpoint", json=body, timeout=10)
        assert answer.status_code == 400 and answer.json()["error"]
        assert live_server.app.extensions["trainer"]._save_requests == {}
    finally:
        stop(live_server)


def test_a_waited_save_on_a_full_disk_answers_507_naming_it_and_training_goes_on(tmp_path, arc_data):
    for _ in mount_tmpfs(tmp_path / "small", "3m"):
        server = LiveServer(build_app(tmp_path / "small" / "checkpoints", arc_data))
        try:
            start(server)
            answers = [save(server, name=f"fill {i}") for i in range(4)]  # about 2 MB each
            full = [a for a in answers if a.status_code != 200]
            assert full and all(a.status_code == 507 for a in full), [a.text for a in answers]
            failed = full[0].json()
            assert failed["state"] == "failed" and failed["reason"] == "ENOSPC" and "space" in failed["error"]
            step = requests.get(server.url + "/status", timeout=10).json()["global_step"]
            wait_for(lambda: requests.get(server.url + "/status", timeout=10).json()["global_step"] > step + 2,
                     what="training to go on after the failed save")
        finally:
            stop(server)
            server.close()


def test_a_save_that_waits_is_answered_when_the_run_ends_before_serving_it(held_app_server):
    server = held_app_server
    requests.post(server.url + "/start_training", json={}, timeout=10)  # the worker holds it: no step is taken
    answer = {}
    waiter = threading.Thread(target=lambda: answer.update(response=save(server, name="never served")))
    waiter.start()
    wait_for(lambda: server.app.extensions["trainer"]._save_requests, what="the save to be queued")
    worker = server.app.extensions["trainer"]
    worker._end_run()  # the run ended with the save still on the queue
    waiter.join(30)
    response = answer["response"]
    assert response.status_code == 409 and response.json()["reason"] == "not_served"
    assert "nothing was written" in response.json()["error"]


def test_save_during_pretraining_with_wait_is_an_immediate_409(live_server):
    assert requests.post(live_server.url + "/start_pretraining", json={"mode": "binary"}, timeout=10).ok
    try:
        answer = save(live_server, timeout=5.0)
        assert answer.status_code == 409 and "pretraining" in answer.json()["error"]
    finally:
        stop(live_server)


@pytest.fixture
def held_app_server(tmp_path, arc_data):
    """A live server whose worker thread never starts: runs stay queued, so the test decides when one ends."""
    app = build_app(tmp_path / "checkpoints", arc_data, START_WORKER=False)
    server = LiveServer(app)
    yield server
    server.server.shutdown()


def test_two_waited_saves_of_one_name_at_once_give_one_checkpoint_and_one_409(live_server):
    start(live_server)
    answers, barrier = [], threading.Barrier(2)

    def ask():
        barrier.wait()
        answers.append(save(live_server, name="contested"))

    try:
        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert sorted(a.status_code for a in answers) == [200, 409], [a.text for a in answers]
        saved = next(a.json() for a in answers if a.status_code == 200)
        assert ckpt.verify(saved["path"])[0] and torch.load(saved["path"])["name"] == "contested"
    finally:
        stop(live_server)
