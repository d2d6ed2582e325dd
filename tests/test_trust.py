"""Checkpoints you can trust: runs never clobber each other, retention stays in its run, edits never race a save,
the writer never dies, no file on disk breaks the catalogue, symlinks are never followed, every response is
strict JSON, and an interrupted CLI says exactly what it wrote. Each test here failed on version 0.6.0."""
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

import catalogue
import checkpoint as ckpt
import checkpoint_manager
from conftest import (EventReader, LiveServer, build_app, checkpoints_of, tiny_config, wait_for,
                      write_task_folder)
from data import load_data
from train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON = {"Content-Type": "application/json"}


def strict_json(text):
    """json.loads that fails on NaN and Infinity, as a browser's JSON.parse does."""
    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = write_task_folder(str(tmp_path_factory.mktemp("tasks")), n_training=8, n_evaluation=2)
    return folder, load_data(data_dir=folder)


def train(root, data, commands=None, resume=None, fine_tune=None, **changes):
    """A tiny run into root; returns the trainer and its events."""
    events = []
    config = tiny_config(root, data_dir=data[0], **{"max_steps": 0, **changes})
    trainer = Trainer(config, data[1], "cpu", str(root), events.append, commands)
    if resume:
        trainer.resume(resume)
    else:
        trainer.setup()
    if fine_tune:
        trainer.load_weights(fine_tune)
    trainer.train()
    return trainer, events


def train_with_a_save(root, small, name, **changes):
    """A tiny run that saves `name` before its first step; returns the trainer and its checkpoint folder."""
    commands = queue.Queue()
    commands.put({"type": "save", "name": name, "request_id": name})
    trainer, _ = train(root, small, commands=commands, **{"max_steps": 2, **changes})
    return trainer, checkpoints_of(trainer)


def fingerprints(root):
    """{id: sha256} of every checkpoint under root, each checked to verify."""
    listed = catalogue.list_checkpoints(str(root))
    for meta in listed:
        assert not meta["damaged"], meta
        assert ckpt.verify(meta["path"]) == (True, "size and SHA-256 match"), meta["id"]
    return {m["id"]: m["sha256"] for m in listed}


# ---------------------------------------------------------------------------------------------- 1, 2: runs

def test_runs_in_one_folder_never_overwrite_each_other(small, tmp_path):
    """A run, a resume of its oldest checkpoint, a fine-tune and a short fresh run: every file of every run stays."""
    root = tmp_path / "checkpoints"
    first, _ = train(root, small, epochs=4, checkpoint_every_epochs=1, keep_last=0)
    before = fingerprints(root)
    first_best = ckpt.read_sidecar(str(checkpoints_of(first) / "best_model.pth"))
    oldest = str(checkpoints_of(first) / "checkpoint_epoch_1.pth")
    resumed, events = train(root, small, resume=oldest, epochs=4, checkpoint_every_epochs=1, keep_last=0)
    assert resumed.run_id != first.run_id
    assert resumed.parent == {"relation": "resume", "run_id": first.run_id, "name": "checkpoint_epoch_1",
                              "id": f"{first.run_id}:checkpoint_epoch_1",
                              "global_step": ckpt.read_sidecar(oldest)["global_step"],
                              "path": os.path.abspath(oldest)}
    fine, _ = train(root, small, fine_tune=str(checkpoints_of(first) / "best_model.pth"), epochs=2,
                    checkpoint_every_epochs=1, learning_rate=0.01)
    fresh, _ = train(root, small, epochs=2, checkpoint_every_epochs=1, learning_rate=0.05)
    after = fingerprints(root)
    assert {k: after[k] for k in before} == before, "a later run changed or removed an earlier run's checkpoint"
    assert ckpt.read_sidecar(str(checkpoints_of(first) / "best_model.pth")) == first_best
    for trainer in (resumed, fine, fresh):
        assert (checkpoints_of(trainer) / "checkpoint_epoch_2.pth").is_file()
    runs = {r["run_id"]: r for r in catalogue.list_runs(str(root))}
    assert runs[resumed.run_id]["parent"]["id"] == f"{first.run_id}:checkpoint_epoch_1"
    assert runs[fine.run_id]["parent"]["relation"] == "fine-tune"
    assert runs[first.run_id]["parent"] is None and runs[fresh.run_id]["parent"] is None
    # The resumed run continues the first run's best score: it saved best_model only if it beat it.
    assert resumed.best_val_loss <= first.best_val_loss or not (checkpoints_of(resumed) / "best_model.pth").exists()


def test_resuming_from_the_page_branches_a_new_run(small, tmp_path):
    root = tmp_path / "checkpoints"
    first, _ = train(root, small, epochs=3, checkpoint_every_epochs=1, keep_last=0)
    before = fingerprints(root)
    app = build_app(root, small[1], DATA_DIR=small[0])
    client = app.test_client()
    try:
        answer = client.post("/start_training", json={"resume_from": f"{first.run_id}:checkpoint_epoch_1",
                                                      "epochs": 3})
        assert answer.status_code == 202, answer.get_json()
        run_id = answer.get_json()["run_id"]
        wait_for(lambda: client.get("/status").get_json()["phase"] == "finished", what="the resumed run")
        assert client.get("/status").get_json()["error"] is None
    finally:
        app.extensions["trainer"].shutdown()
    after = fingerprints(root)
    assert {k: after[k] for k in before} == before
    assert f"{run_id}:best_model" in after or f"{run_id}:checkpoint_epoch_3" in after
    runs = {r["run_id"]: r for r in client.get("/runs").get_json()["runs"]}
    assert runs[run_id]["parent"]["id"] == f"{first.run_id}:checkpoint_epoch_1"


def test_retention_ranks_and_deletes_within_its_own_run(small, tmp_path):
    """0.6.0 ranked by step across every run: a new run deleted its own newest save (checkpoint_epoch_1)."""
    root = tmp_path / "checkpoints"
    older, _ = train(root, small, epochs=6, checkpoint_every_epochs=1, keep_last=0)
    before = fingerprints(root)
    newer, events = train(root, small, epochs=3, checkpoint_every_epochs=1, keep_last=2)
    deleted = [e for e in events if e["type"] == "checkpoint_deleted"]
    assert [e["id"] for e in deleted] == [f"{newer.run_id}:checkpoint_epoch_1"]
    kept = sorted(p.stem for p in checkpoints_of(newer).glob("checkpoint_epoch_*.pth"))
    assert kept == ["checkpoint_epoch_2", "checkpoint_epoch_3"]
    after = fingerprints(root)
    assert {k: after[k] for k in before} == before


def test_top_k_from_a_resumed_run_is_ranked_but_never_deleted(small, tmp_path):
    root = tmp_path / "checkpoints"
    first, _ = train(root, small, epochs=3, keep_best_k=2, checkpoint_every_epochs=1, keep_last=0)
    first_top = sorted(p.name for p in checkpoints_of(first).glob("best_k_step_*.pth"))
    assert len(first_top) == 2
    resumed, events = train(root, small, resume=str(checkpoints_of(first) / "checkpoint_epoch_1.pth"), epochs=6,
                            keep_best_k=2, checkpoint_every_epochs=1, keep_last=0, learning_rate=0.01)
    assert sorted(p.name for p in checkpoints_of(first).glob("best_k_step_*.pth")) == first_top
    assert all(e["run_id"] == resumed.run_id for e in events if e["type"] == "checkpoint_deleted")
    state = resumed.manager.state_dict()
    assert len(state["top_k"]) == 2
    record = ckpt.load_checkpoint(str(checkpoints_of(resumed) / "checkpoint_epoch_6.pth"))
    assert record["checkpoint_manager"]["top_k"] == state["top_k"]  # the policy's state travels in the record
    assert record["run_id"] == resumed.run_id


# ---------------------------------------------------------------------------------------------- 3: races

def test_edits_verify_and_listing_racing_overwrite_saves_lose_nothing(small, tmp_path, capsys):
    app = build_app(tmp_path / "checkpoints", small[1], DATA_DIR=small[0])
    server = LiveServer(app)
    reader = EventReader(server.url)
    counts = {"rounds": 0, "saves verified": 0, "patches": 0, "verifies": 0, "lists": 0, "errors": 0}
    try:
        assert requests.post(server.url + "/start_training", json={"epochs": 100000}, timeout=5).status_code == 202
        wait_for(lambda: requests.get(server.url + "/status", timeout=5).json()["global_step"] > 0, what="training")
        assert requests.post(server.url + "/save_checkpoint", json={"name": "x"}, timeout=5).status_code == 202
        reader.wait("checkpoint_saved", lambda d: d["name"] == "x")
        run_id = requests.get(server.url + "/status", timeout=5).json()["run_id"]
        url = f"{server.url}/checkpoints/{run_id}:x"
        for round_number in range(30):
            stop, last = threading.Event(), {}

            def patcher(field, value_of):
                i = 0
                while not stop.is_set():
                    value = value_of(round_number, i)
                    response = requests.patch(url, json={field: value}, timeout=30)
                    counts["patches" if response.status_code == 200 else "errors"] += 1
                    if response.status_code == 200:
                        last[field] = value
                    i += 1

            def verifier():
                while not stop.is_set():
                    response = requests.post(url + "/verify", headers=JSON, timeout=30)
                    counts["verifies" if response.status_code == 200 else "errors"] += 1

            def lister():
                while not stop.is_set():
                    response = requests.get(server.url + "/list_checkpoints", timeout=30)
                    strict_json(response.text)
                    counts["lists" if response.status_code == 200 else "errors"] += 1

            threads = [threading.Thread(target=patcher, args=("notes", lambda r, i: f"round {r} edit {i}")),
                       threading.Thread(target=patcher, args=("tags", lambda r, i: [f"r{r}", f"e{i}"])),
                       threading.Thread(target=verifier), threading.Thread(target=lister)]
            for thread in threads:
                thread.start()
            answer = requests.post(server.url + "/save_checkpoint", json={"name": "x", "overwrite": True}, timeout=5)
            request_id = answer.json()["request_id"]
            saved = reader.wait("checkpoint_saved", lambda d: d.get("request_id") == request_id, timeout=60)
            ok, reason = ckpt.verify(saved["path"])  # acknowledged: it verifies, whatever runs beside it
            assert ok, f"round {round_number}: {reason}"
            counts["saves verified"] += 1
            time.sleep(0.02)  # let edits land on the new pair too
            stop.set()
            for thread in threads:
                thread.join()
            sidecar = ckpt.read_sidecar(saved["path"])
            assert sidecar["notes"] == last["notes"] and sidecar["tags"] == last["tags"], f"round {round_number}"
            assert ckpt.verify(saved["path"])[0]
            counts["rounds"] += 1
    finally:
        requests.post(server.url + "/stop", headers=JSON, timeout=5)
        reader.close()
        server.close()
    with capsys.disabled():
        print("\nrace:", ", ".join(f"{k} {v}" for k, v in counts.items()))
    assert counts["rounds"] == 30 and counts["errors"] == 0 and counts["patches"] > 60


def test_two_threads_editing_different_fields_both_land(tmp_path):
    folder = tmp_path / "f"
    ckpt.write_checkpoint(str(folder), {"name": "e", "model_state_dict": {}, "global_step": 1})
    path = str(folder / "e.pth")
    for round_number in range(40):
        barrier = threading.Barrier(2)

        def edit(changes):
            barrier.wait()
            ckpt.update_sidecar(path, changes)

        threads = [threading.Thread(target=edit, args=({"notes": f"n{round_number}"},)),
                   threading.Thread(target=edit, args=({"tags": [f"t{round_number}"]},))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sidecar = ckpt.read_sidecar(path)
        assert (sidecar["notes"], sidecar["tags"]) == (f"n{round_number}", [f"t{round_number}"])


LOCK_HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
import checkpoint as ckpt
with ckpt.checkpoint_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_the_checkpoint_lock_excludes_another_process(tmp_path):
    folder = tmp_path / "f"
    ckpt.write_checkpoint(str(folder), {"name": "held", "model_state_dict": {}})
    path = str(folder / "held.pth")
    script = tmp_path / "hold.py"
    script.write_text(LOCK_HOLDER.format(root=ROOT))
    holder = subprocess.Popen([sys.executable, str(script), path, "1.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ckpt.CheckpointBusy):
            with ckpt.checkpoint_lock(path, timeout=0.2):
                pass
        started = time.monotonic()
        ckpt.update_sidecar(path, {"notes": "after the other process"})  # waits for the lock, then lands
        assert time.monotonic() - started > 0.3
        assert holder.wait(10) == 0
    finally:
        holder.kill()
    assert ckpt.read_sidecar(path)["notes"] == "after the other process"


# ---------------------------------------------------------------------------------------------- 4: the writer

def test_the_writer_outlives_a_failing_callback_and_a_failing_copy(tmp_path, monkeypatch):
    events = []
    writer = checkpoint_manager.CheckpointWriter(events.append)
    fields = {"name": "a", "kind": "manual", "config": {k: 0 for k in ckpt.FLAT_CONFIG_KEYS},
              "model_state_dict": {}, "encoder_state_dict": {}, "optimizer_state_dict": {},
              "progress": {"epoch": 0, "batch": 0, "global_step": 0}, "rng_state": {}, "dataset": {}, "metrics": {}}

    def explode(sidecar):
        raise TypeError("'<' not supported between instances of 'int' and 'str'")

    writer.submit(checkpoint_manager.SaveJob(dict(fields), str(tmp_path), "r", request_id="1", on_saved=explode))
    writer.wait_for_copies()
    real_clone = checkpoint_manager.clone_tensors
    monkeypatch.setattr(checkpoint_manager, "clone_tensors",
                        lambda value: (_ for _ in ()).throw(MemoryError("no memory for the copy")))
    writer.submit(checkpoint_manager.SaveJob({**fields, "name": "b"}, str(tmp_path), "r", request_id="2"))
    assert writer.flush(timeout=60)
    monkeypatch.setattr(checkpoint_manager, "clone_tensors", real_clone)
    writer.submit(checkpoint_manager.SaveJob({**fields, "name": "c"}, str(tmp_path), "r", request_id="3"))
    assert writer.flush(timeout=60)
    writer.close()
    events = [e for e in events if e["type"] != "checkpoint_progress"]
    outcome = [(e["type"], e["request_id"]) for e in events]
    assert outcome == [("checkpoint_saved", "1"), ("checkpoint_error", "1"), ("checkpoint_error", "2"),
                       ("checkpoint_saved", "3")]
    assert "retention after it failed" in events[1]["error"] and "MemoryError" in events[2]["error"]
    assert not any(thread.is_alive() for thread in writer._threads)


def test_a_run_whose_retention_fails_still_stops_and_a_new_run_starts(small, tmp_path, monkeypatch):
    def broken_delete(path):
        raise TypeError("injected: retention broke")

    monkeypatch.setattr(ckpt, "delete_checkpoint", broken_delete)
    app = build_app(tmp_path / "checkpoints", small[1], DATA_DIR=small[0])
    server = LiveServer(app)
    reader = EventReader(server.url)
    try:
        body = {"epochs": 100000, "checkpoint_every_epochs": 1, "keep_last": 1}
        assert requests.post(server.url + "/start_training", json=body, timeout=5).status_code == 202
        error = reader.wait("checkpoint_error", lambda d: "retention" in d["error"], timeout=120)
        assert "injected" in error["error"]
        answer = requests.post(server.url + "/save_checkpoint", json={"name": "still served"}, timeout=5)
        reader.wait("checkpoint_saved", lambda d: d.get("request_id") == answer.json()["request_id"])
        assert requests.post(server.url + "/stop", headers=JSON, timeout=5).status_code == 202
        reader.wait("training_stopped", timeout=60)
        assert requests.post(server.url + "/start_training", json={"max_steps": 2, "epochs": 1},
                             timeout=5).status_code == 202
        reader.wait("training_finished", timeout=60)
    finally:
        reader.close()
        server.close()


# ---------------------------------------------------------------------------------------------- 5-9: files that lie

def hostile_root(root, outside, good_run):
    """A checkpoint root holding one good run plus every kind of lying file; returns what the good run holds."""
    folder = root / "runs" / good_run / "checkpoints"
    lying = {
        "nested": "[" * 100_000,
        "number time": {"created_at": 12345, "global_step": 3, "size": 1, "sha256": "0" * 64},
        "object name": {"name": {"a": 1}, "file": ["x"], "kind": "manual", "size": 1, "sha256": "0" * 64},
        "nan loss": '{"val_loss": NaN, "val_acc": Infinity, "kind": "manual", "size": 1}',
        "huge": '{"notes": "' + "x" * 10_000_000 + '"}',
        "not utf8": b"\xff\xfe{\x00",
    }
    for name, content in lying.items():
        (folder / f"{name}.pth").write_bytes(b"PK not really")
        sidecar = folder / f"{name}.json"
        if isinstance(content, bytes):
            sidecar.write_bytes(content)
        else:
            sidecar.write_text(content if isinstance(content, str) else json.dumps(content))
    (folder / ".nested.json.pending").write_text("{" * 100_000)
    (folder / ".gone.json.pending").write_text('{"size": "big"}')
    (outside / "secret.json").write_text(json.dumps({"notes": "SECRET OUTSIDE", "size": 1, "sha256": "0" * 64}))
    (outside / "secret.pth").write_bytes(b"SECRET BYTES")
    shutil.copyfile(folder / "good.pth", folder / "linked sidecar.pth")
    os.symlink(outside / "secret.json", folder / "linked sidecar.json")
    os.symlink("/etc/passwd", folder / "passwd.pth")
    os.symlink(folder / "good.pth", folder / "alias.pth")
    os.symlink(folder / "good.json", folder / "alias.json")
    (folder / "bad name!.pth").write_bytes(b"x")
    os.mkfifo(folder / "fifo.pth")
    os.symlink(outside, root / "runs" / "20990101-000000-linked")
    nested_run = root / "runs" / "20990101-000000-nested"
    (nested_run / "checkpoints").mkdir(parents=True)
    (nested_run / "run.json").write_text("[" * 100_000)
    (nested_run / "metrics.jsonl").write_text("[" * 100_000 + "\n" + '{"global_step": 1, "loss": 1.0}\n')
    typed_run = root / "runs" / "20990101-000000-typed"
    typed_run.mkdir()
    (typed_run / "run.json").write_text(json.dumps({"started_at": 7, "config": [1], "parent": "x"}))
    (root / "runs" / "20990101-000000-huge").mkdir()
    (root / "runs" / "20990101-000000-huge" / "run.json").write_text(" " * (2 << 20))
    return lying


@pytest.fixture
def hostile(small, tmp_path):
    root, outside = tmp_path / "checkpoints", tmp_path / "outside"
    outside.mkdir()
    trainer, folder = train_with_a_save(root, small, "good", checkpoint_every_epochs=0)
    good_sha = ckpt.read_sidecar(str(folder / "good.pth"))["sha256"]
    lying = hostile_root(root, outside, trainer.run_id)
    return {"root": root, "outside": outside, "run_id": trainer.run_id, "lying": lying, "good_sha": good_sha,
            "folder": checkpoints_of(trainer)}


def test_lying_files_never_break_the_catalogue_or_start_up(hostile, small):
    root, run_id = hostile["root"], hostile["run_id"]
    listed = {m["name"]: m for m in catalogue.list_checkpoints(str(root))}
    assert listed["good"]["damaged"] is False and listed["best_model"]["damaged"] is False
    for name in hostile["lying"]:
        assert listed[name]["damaged"] or listed[name]["problems"], name
    assert listed["number time"].get("created_at") is None
    assert any("created_at" in p for p in listed["number time"]["problems"])
    assert listed["object name"]["name"] == "object name" and listed["object name"]["file"] == "object name.pth"
    assert listed["nan loss"]["val_loss"] is None
    for name in ("passwd", "alias", "fifo", "bad name!"):
        assert listed[name]["refused"] is True and listed[name]["error"], name
    assert listed["passwd"]["size"] is None
    assert "SECRET" not in json.dumps(listed)
    app = build_app(root, small[1], DATA_DIR=small[0])  # start-up recovers the folder: it must not fail
    client = app.test_client()
    try:
        response = client.get("/list_checkpoints")
        assert response.status_code == 200 and "SECRET" not in response.get_data(as_text=True)
        rows = {r["name"]: r for r in strict_json(response.get_data(as_text=True))["checkpoints"]}
        assert rows["good"]["id"] == f"{run_id}:good" and rows["bad name!"]["id"] is None
        runs = client.get("/runs")
        assert runs.status_code == 200
        by_id = {r["run_id"]: r for r in strict_json(runs.get_data(as_text=True))["runs"]}
        assert by_id["20990101-000000-linked"]["refused"] is True
        assert by_id["20990101-000000-nested"]["problems"] and by_id["20990101-000000-typed"]["problems"]
        assert by_id["20990101-000000-huge"]["problems"]
        metrics = client.get("/runs/20990101-000000-nested/metrics")
        assert metrics.status_code == 200 and strict_json(metrics.get_data(as_text=True))["train"][0]["loss"] == 1.0
        assert client.get(f"/checkpoints/{run_id}:good/download").status_code == 200
        assert strict_json(client.post(f"/checkpoints/{run_id}:good/verify", json={}).get_data(as_text=True))["ok"]
        for name in ("number time", "nested", "huge", "not utf8"):
            response = client.get(f"/checkpoints/{run_id}:{name}")
            assert response.status_code == 200, name
            strict_json(response.get_data(as_text=True))
    finally:
        app.extensions["trainer"].shutdown()
    assert not (hostile["folder"] / ".nested.json.pending").exists()  # recovery removed what it could not use
    assert ckpt.read_sidecar(str(hostile["folder"] / "good.pth"))["sha256"] == hostile["good_sha"]
    result = subprocess.run([sys.executable, "load_checkpoint.py", "--list", str(root)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert f"{run_id}:good" in result.stdout and "refused" in result.stdout


def test_a_real_server_starts_on_a_folder_of_lying_files(hostile):
    proc = subprocess.Popen([sys.executable, "app.py", "--checkpoint-dir", str(hostile["root"]), "--port", "0",
                             "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in proc.stdout:
            if "http://" in line:
                url = line.strip().split()[-1]
                break
        assert url, f"app.py did not start (rc {proc.poll()})"
        response = requests.get(url + "/list_checkpoints", timeout=30)
        assert response.status_code == 200 and len(strict_json(response.text)["checkpoints"]) >= 10
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


def test_symlinks_are_never_read_served_hashed_or_deleted_through(hostile, small):
    root, run_id, folder = hostile["root"], hostile["run_id"], hostile["folder"]
    app = build_app(root, small[1], DATA_DIR=small[0], START_WORKER=False)
    client = app.test_client()
    info = client.get(f"/checkpoints/{run_id}:linked sidecar")
    assert info.status_code == 200 and "SECRET" not in info.get_data(as_text=True)
    assert any("symbolic link" in p for p in info.get_json()["problems"])
    verified = client.post(f"/checkpoints/{run_id}:linked sidecar/verify", json={}).get_json()
    assert verified["ok"] is False
    for name in ("passwd", "alias"):
        assert client.get(f"/checkpoints/{run_id}:{name}/download").status_code == 400
        assert client.delete(f"/checkpoints/{run_id}:{name}", json={}).status_code == 400
        assert client.post(f"/checkpoints/{run_id}:{name}/verify", json={}).get_json()["ok"] is False
    assert (folder / "good.pth").is_file() and (folder / "good.json").is_file()
    assert ckpt.verify(str(folder / "good.pth"))[0] and os.path.isfile("/etc/passwd")
    linked = client.get("/checkpoints/20990101-000000-linked:secret")
    assert linked.status_code == 400 and "symbolic link" in linked.get_json()["error"]
    assert (hostile["outside"] / "secret.pth").exists()
    with pytest.raises(ValueError, match="symbolic link"):
        ckpt.write_checkpoint(str(folder), {"name": "alias", "model_state_dict": {}}, overwrite=True)
    assert os.path.islink(folder / "alias.pth")


def test_a_hand_copy_lists_under_its_own_name_and_deletes_alone(small, tmp_path):
    root = tmp_path / "checkpoints"
    trainer, folder = train_with_a_save(root, small, "base")
    shutil.copyfile(folder / "base.pth", folder / "copy.pth")
    shutil.copyfile(folder / "base.json", folder / "copy.json")
    app = build_app(root, small[1], DATA_DIR=small[0], START_WORKER=False)
    client = app.test_client()
    names = sorted(r["name"] for r in client.get("/list_checkpoints").get_json()["checkpoints"])
    assert names == ["base", "best_model", "copy"]
    assert client.post(f"/checkpoints/{trainer.run_id}:copy/verify", json={}).get_json()["ok"] is True
    assert client.delete(f"/checkpoints/{trainer.run_id}:copy", json={}).status_code == 200
    assert not (folder / "copy.pth").exists() and (folder / "base.pth").is_file()
    assert ckpt.verify(str(folder / "base.pth"))[0]


def test_every_json_response_is_strict_before_the_first_validation(small, tmp_path):
    app = build_app(tmp_path / "checkpoints", small[1], DATA_DIR=small[0])
    server = LiveServer(app)
    reader = EventReader(server.url)
    try:
        assert requests.post(server.url + "/start_training", json={"epochs": 100000}, timeout=5).status_code == 202
        answer = requests.post(server.url + "/save_checkpoint", json={"name": "early"}, timeout=5).json()
        saved = reader.wait("checkpoint_saved", lambda d: d.get("request_id") == answer["request_id"])
        run_id = saved["run_id"]
        with open(ckpt.sidecar_path(saved["path"])) as f:
            strict_json(f.read())  # the sidecar itself holds no Infinity
        urls = ["/status", "/config", "/list_checkpoints", "/runs", f"/runs/{run_id}/metrics",
                f"/checkpoints/{run_id}:early", f"/compare?a={run_id}:early&b=early", "/checkpoints/none",
                "/list_checkpoints?run=bad..id"]
        for url in urls:
            response = requests.get(server.url + url, timeout=30)
            strict_json(response.text)
        info = requests.get(f"{server.url}/checkpoints/{run_id}:early", timeout=5).json()
        assert info["trainer"]["best_val_loss"] is None
        assert reader.named("not-strict-json") == [] and reader.named("status")  # the reader parses strictly
    finally:
        requests.post(server.url + "/stop", headers=JSON, timeout=5)
        reader.close()
        server.close()


def test_a_nan_in_a_sidecar_is_listed_as_null(tmp_path, small):
    folder = tmp_path / "checkpoints"
    ckpt.write_checkpoint(str(folder), {"name": "nan", "model_state_dict": {}, "val_loss": 1.0})
    sidecar = folder / "nan.json"
    sidecar.write_text(sidecar.read_text().replace('"val_loss": 1.0', '"val_loss": NaN'))
    app = build_app(folder, small[1], START_WORKER=False)
    text = app.test_client().get("/list_checkpoints").get_data(as_text=True)
    [row] = strict_json(text)["checkpoints"]
    assert row["id"] == "legacy:nan" and row["val_loss"] is None


# ---------------------------------------------------------------------------------------------- 7: failed sidecar

def chattr(flag, path):
    return subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)


def test_an_immutable_sidecar_leaves_the_old_checkpoint_whole_and_nothing_pending(small, tmp_path):
    root = tmp_path / "checkpoints"
    trainer, folder = train_with_a_save(root, small, "keep")
    before = (folder / "keep.pth").read_bytes()
    if shutil.which("chattr") is None or chattr("+i", folder / "keep.json").returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        record = ckpt.load_checkpoint(str(folder / "keep.pth"))
        with pytest.raises(ckpt.CheckpointError, match="not permitted"):
            ckpt.write_checkpoint(str(folder), {**record, "global_step": 99}, overwrite=True)
        assert (folder / "keep.pth").read_bytes() == before and ckpt.verify(str(folder / "keep.pth"))[0]
        leftovers = [n for n in os.listdir(folder) if n.startswith(".") and not n.endswith(ckpt.LOCK_SUFFIX)]
        assert leftovers == []
        assert catalogue.recover(str(root)) == ([], [])
        app = build_app(root, small[1], DATA_DIR=small[0], START_WORKER=False)
        response = app.test_client().delete(f"/checkpoints/{trainer.run_id}:keep", json={})
        assert response.status_code == 403 and "not permitted" in response.get_json()["error"]
        assert (folder / "keep.pth").read_bytes() == before
    finally:
        chattr("-i", folder / "keep.json")
    assert ckpt.verify(str(folder / "keep.pth"))[0]


# ---------------------------------------------------------------------------------------------- 10: the CLI

def test_an_interrupted_cli_says_exactly_what_it_wrote(tmp_path):
    root = tmp_path / "checkpoints"
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--checkpoint-dir", str(root), "--embedding-dim", "4",
            "--hidden-dim", "16", "--latent-dim", "16", "--num-conv-layers", "2", "--batch-size", "8",
            "--device", "cpu", "--no-progress", "--epochs", "100000", "--checkpoint-every-epochs", "0"]
    for wait_for_line in ("run ", "checkpoint_saved: best_model"):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        for line in proc.stdout:
            if line.startswith(wait_for_line):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err  # a graceful stop: the saves in flight were finished
        run_id = sorted(os.listdir(root / "runs"))[-1] if wait_for_line == "run " else max(
            os.listdir(root / "runs"), key=lambda r: catalogue.read_run_file(str(root), r)["started_at"])
        on_disk = sorted(p.stem for p in (root / "runs" / run_id / "checkpoints").glob("*.pth"))
        lines = err.strip().splitlines()
        at = next((i for i, line in enumerate(lines) if line.startswith("interrupted at epoch")), None)
        assert at is not None, err
        summary = lines[at] if "not saved" not in err else err
        resume = [line for line in lines[at + 1:] if line.startswith("resume: ")]
        after = [line for line in lines[at + 1:] if not line.startswith(("not saved: ", "resume: "))]
        assert after and all(line.startswith(("saved ", "abandoned ")) for line in after) \
            or after == ["no save was in flight"], err  # then one line per save that was in flight
        final = [name for name in on_disk if name.startswith("interrupted_step_")]
        if final:  # the stop's own checkpoint, and the command that goes on from it
            assert len(resume) == 1 and resume[0].split("   ")[0].endswith(f"--resume {run_id}:{final[0]}"), err
        if on_disk:
            assert f"wrote {len(on_disk)} checkpoint(s)" in summary
            assert all(f"{run_id}:{name}" in summary for name in on_disk)
        else:
            assert "this run wrote no checkpoint" in summary
        assert "pending checkpoints were written" not in err
    assert "best_model" in on_disk


def test_a_flat_folder_of_version_0_6_lists_loads_and_resumes_as_the_run_legacy(small, tmp_path):
    root = tmp_path / "checkpoints"
    _, made = train_with_a_save(tmp_path / "made", small, "old save", max_steps=3)
    root.mkdir()
    for suffix in (".pth", ".json"):  # where 0.6.0 kept them: flat, at the top of the folder
        shutil.copyfile(made / f"old save{suffix}", root / f"old save{suffix}")
    before = ckpt.file_sha256(str(root / "old save.pth"))
    app = build_app(root, small[1], DATA_DIR=small[0])
    client = app.test_client()
    try:
        [row] = client.get("/list_checkpoints").get_json()["checkpoints"]
        assert (row["id"], row["run_id"], row["damaged"]) == ("legacy:old save", "legacy", False)
        runs = client.get("/runs").get_json()["runs"]
        assert runs[-1]["run_id"] == "legacy" and runs[-1]["legacy"] is True
        assert client.post("/checkpoints/legacy:old%20save/verify", json={}).get_json()["ok"] is True
        answer = client.post("/start_training", json={"resume_from": "legacy:old save", "max_steps": 5})
        assert answer.status_code == 202, answer.get_json()
        wait_for(lambda: client.get("/status").get_json()["phase"] == "finished", what="the resumed run")
        assert client.get("/status").get_json()["global_step"] == 5
    finally:
        app.extensions["trainer"].shutdown()
    assert ckpt.file_sha256(str(root / "old save.pth")) == before
    run = catalogue.read_run_file(str(root), answer.get_json()["run_id"])
    assert run["parent"]["name"] == "old save" and run["parent"]["id"] == "legacy:old save"
    assert run["parent"]["global_step"] == ckpt.read_sidecar(str(root / "old save.pth"))["global_step"]
