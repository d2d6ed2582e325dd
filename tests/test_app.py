"""Every endpoint and its error statuses, through app.test_client()."""
import json
import os

import pytest
import torch

import checkpoint as ckpt
import worker as worker_module
from conftest import build_app, checkpoints_of, tiny_config, wait_for
from train import Trainer

JSON = {"Content-Type": "application/json"}


def post(client, url, body=None, headers=JSON):
    return client.post(url, data=None if body is None else json.dumps(body), headers=headers)


@pytest.fixture
def held_app(tmp_path, arc_data):
    """An app whose worker thread is not started: a started run stays 'training' and never serves saves."""
    app = build_app(tmp_path / "checkpoints", arc_data, START_WORKER=False)
    yield app


@pytest.fixture
def folder_with_checkpoints(tmp_path, arc_data):
    """Two real checkpoints (manual saves at different steps) in the app's folder."""
    folder = tmp_path / "checkpoints"
    events = []
    trainer = Trainer(tiny_config(folder, max_steps=6, checkpoint_every_epochs=0), arc_data, "cpu", str(folder),
                      events.append)

    def on_batch(event):
        events.append(event)
        if event["type"] == "batch" and event["global_step"] in (2, 5):
            trainer.commands.put({"type": "save", "name": f"step {event['global_step']}", "request_id": "r"})

    trainer.publish = on_batch
    trainer.train()
    folder = checkpoints_of(trainer)  # the run's own folder under the app's root
    assert os.path.exists(folder / "step 2.pth") and os.path.exists(folder / "step 5.pth")
    return folder


# ---------------------------------------------------------------------------------------------- pages and headers

def test_index_and_vendor_script_are_served_with_security_headers(client):
    page = client.get("/")
    assert page.status_code == 200 and b"<html" in page.data.lower()
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert "Access-Control-Allow-Origin" not in page.headers
    script = client.get("/vendor/plotly.min.js")
    assert script.status_code == 200 and len(script.data) > 1_000_000
    assert script.mimetype == "text/javascript"


def test_config_lists_every_field_with_server_defaults(client):
    body = client.get("/config").get_json()
    names = {f["name"] for f in body["fields"]}
    assert {"task_type", "bottleneck_type", "vocab_size", "learning_rate", "autosave_minutes"} <= names
    assert body["defaults"]["hidden_dim"] == 16  # the app's TRAIN_DEFAULTS, not TrainConfig's


def test_status_when_idle(client, app):
    status = client.get("/status").get_json()
    assert status["phase"] == "idle" and status["global_step"] == 0
    assert status["checkpoint_dir"] == app.extensions["trainer"].checkpoint_dir
    assert status["auth_required"] is False


def test_unknown_route_and_method_answer_json(client):
    missing = client.get("/nope")
    assert missing.status_code == 404 and "error" in missing.get_json()
    wrong = client.get("/save_checkpoint")
    assert wrong.status_code == 405 and "error" in wrong.get_json()


# ---------------------------------------------------------------------------------------------- run control

def test_run_control_refuses_when_idle(client):
    for url in ("/stop", "/pause", "/resume_training", "/save_checkpoint"):
        response = client.post(url, json={})
        assert response.status_code == 409, url
        assert response.get_json()["error"]


@pytest.mark.parametrize("body, needle", [
    ({"bogus": 1}, "bogus"),
    ({"vocab_size": "ten"}, "vocab_size"),
    ({"learning_rate": -1}, "learning_rate"),
    ({"task_type": "dance"}, "task_type"),
    ({"epochs": 10**12}, "epochs"),
    ({"use_input_output_pairs": 1}, "use_input_output_pairs"),
    ({"resume_from": "../etc/passwd"}, "invalid checkpoint name"),
    ({"pretrained_encoder": 5}, "pretrained_encoder"),
])
def test_start_training_refuses_bad_fields_naming_them(held_app, body, needle):
    response = post(held_app.test_client(), "/start_training", body)
    assert response.status_code == 400
    assert needle in response.get_json()["error"]
    assert held_app.test_client().get("/status").get_json()["phase"] == "idle"


def test_bodies_must_be_json_objects(held_app):
    client = held_app.test_client()
    assert client.post("/start_training", data="{not json", headers=JSON).status_code == 400
    assert client.post("/start_training", data="[1, 2]", headers=JSON).status_code == 400
    form = client.post("/start_training", data="task_type=selection",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415 and "application/json" in form.get_json()["error"]
    plain = client.post("/stop", data="x", headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415


def test_start_twice_is_a_conflict(held_app):
    client = held_app.test_client()
    assert post(client, "/start_training", {}).status_code == 202
    second = post(client, "/start_pretraining", {"mode": "binary"})
    assert second.status_code == 409 and "stop it first" in second.get_json()["error"]


def test_resume_from_a_missing_checkpoint_is_404(held_app):
    response = post(held_app.test_client(), "/start_training", {"resume_from": "never saved"})
    assert response.status_code == 404 and "never saved" in response.get_json()["error"]


def test_resume_cannot_be_combined_with_fine_tuning(held_app, folder_with_checkpoints):
    response = post(held_app.test_client(), "/start_training", {"resume_from": "step 2", "fine_tune_from": "step 5"})
    assert response.status_code == 400


# ---------------------------------------------------------------------------------------------- save requests

def test_save_is_queued_with_default_and_given_names(held_app):
    client = held_app.test_client()
    post(client, "/start_training", {})
    first = client.post("/save_checkpoint", json={})
    assert first.status_code == 202
    # No name: the trainer names it by the position it saves at, so the answer cannot know it yet.
    assert first.get_json()["name"] is None and first.get_json()["state"] == "queued"
    state = client.get(f"/save_requests/{first.get_json()['request_id']}").get_json()
    assert state["state"] == "queued" and state["request_id"] == first.get_json()["request_id"]
    named = post(client, "/save_checkpoint", {"name": "before lr change"})
    assert named.status_code == 202 and named.get_json()["name"] == "before lr change"
    commands = held_app.extensions["trainer"].commands
    queued = [commands.get_nowait() for _ in range(commands.qsize())]
    assert [c["name"] for c in queued] == [None, "before lr change"]
    assert client.get("/save_requests/nosuchrequest").status_code == 404


@pytest.mark.parametrize("body, status", [
    ({"name": "../escape"}, 400), ({"name": "a/b"}, 400), ({"name": "x" * 101}, 400), ({"name": "nul\x00"}, 400),
    ({"name": "best_model"}, 400), ({"name": 7}, 400), ({"overwrite": "yes"}, 400), ({"nme": "typo"}, 400),
])
def test_save_refuses_bad_names_and_bodies(held_app, body, status):
    client = held_app.test_client()
    post(client, "/start_training", {})
    response = post(client, "/save_checkpoint", body)
    assert response.status_code == status and response.get_json()["error"]
    assert held_app.extensions["trainer"].commands.qsize() == 0


def test_duplicate_name_is_409_unless_overwrite(held_app):
    client = held_app.test_client()
    post(client, "/start_training", {})
    assert post(client, "/save_checkpoint", {"name": "twice"}).status_code == 202
    duplicate = post(client, "/save_checkpoint", {"name": "twice"})
    assert duplicate.status_code == 409 and "already exists" in duplicate.get_json()["error"]
    assert post(client, "/save_checkpoint", {"name": "twice", "overwrite": True}).status_code == 202


def test_full_save_queue_answers_503_with_retry_after(held_app):
    client = held_app.test_client()
    post(client, "/start_training", {})
    for i in range(worker_module.MAX_OUTSTANDING_SAVES):
        assert post(client, "/save_checkpoint", {"name": f"s{i}"}).status_code == 202
    full = post(client, "/save_checkpoint", {"name": "one too many"})
    assert full.status_code == 503 and full.headers["Retry-After"] == "1"


def test_save_during_pretraining_says_why(held_app):
    client = held_app.test_client()
    post(client, "/start_pretraining", {"mode": "binary"})
    response = client.post("/save_checkpoint", json={})
    assert response.status_code == 409 and "pretraining" in response.get_json()["error"]


# ---------------------------------------------------------------------------------------------- checkpoint routes

def test_list_checkpoints_newest_first_with_metadata(client, folder_with_checkpoints):
    rows = client.get("/list_checkpoints").get_json()["checkpoints"]
    assert [r["name"] for r in rows] == ["best_model", "step 5", "step 2"]  # the run ended with a validation
    row = rows[1]
    for key in ("kind", "file", "size", "created_at", "epoch", "batch", "val_loss", "val_acc", "task_type",
                "bottleneck_type", "sha256"):
        assert key in row
    assert row["kind"] == "manual" and row["global_step"] == 5 and len(row["sha256"]) == 64


def test_checkpoint_info_download_verify_patch_delete(client, folder_with_checkpoints):
    info = client.get("/checkpoints/step%202").get_json()
    assert info["global_step"] == 2 and info["damaged"] is False
    download = client.get("/checkpoints/step%202/download")
    assert download.status_code == 200 and "attachment" in download.headers["Content-Disposition"]
    assert download.data == (folder_with_checkpoints / "step 2.pth").read_bytes()
    verified = client.post("/checkpoints/step%202/verify", json={}).get_json()
    assert verified["ok"] is True
    rows = {r["name"]: r for r in client.get("/list_checkpoints").get_json()["checkpoints"]}
    assert rows["step 2"]["verified_at"] and not rows["step 5"]["verified_at"]
    pth_before = (folder_with_checkpoints / "step 2.pth").read_bytes()
    patched = client.patch("/checkpoints/step%202", json={"notes": "good one", "tags": ["keep"]})
    assert patched.status_code == 200 and patched.get_json()["notes"] == "good one"
    assert (folder_with_checkpoints / "step 2.pth").read_bytes() == pth_before  # sidecar only
    assert client.delete("/checkpoints/step%202", json={}).status_code == 200
    assert not (folder_with_checkpoints / "step 2.pth").exists()
    assert not (folder_with_checkpoints / "step 2.json").exists()
    assert client.get("/checkpoints/step%202").status_code == 404


def test_verify_reports_a_corrupted_file(client, folder_with_checkpoints):
    path = folder_with_checkpoints / "step 5.pth"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = client.post("/checkpoints/step%205/verify", json={}).get_json()
    assert result["ok"] is False and "SHA-256" in result["reason"]


@pytest.mark.parametrize("name", ["..%2F..%2Fetc%2Fpasswd", "../secret", "%2Fetc%2Fpasswd", "a%00b", "..", "%5C..%5Cx"])
def test_routes_never_leave_the_checkpoint_folder(client, tmp_path, name):
    (tmp_path / "secret.pth").write_bytes(b"outside")
    for method, url in (("get", f"/checkpoints/{name}"), ("get", f"/checkpoints/{name}/download"),
                        ("delete", f"/checkpoints/{name}"), ("post", f"/checkpoints/{name}/verify")):
        response = getattr(client, method)(url, **({} if method == "get" else {"json": {}}))
        assert response.status_code in (400, 404, 405), (method, url, response.status_code)
        assert b"outside" not in response.data
    assert (tmp_path / "secret.pth").exists()


def test_patch_refuses_other_fields(client, folder_with_checkpoints):
    assert client.patch("/checkpoints/step%202", json={"global_step": 99}).status_code == 400
    assert client.patch("/checkpoints/step%202", json={"tags": "notalist"}).status_code == 400
    assert client.patch("/checkpoints/missing", json={"notes": "x"}).status_code == 404


def test_compare_two_checkpoints(client, folder_with_checkpoints):
    result = client.get("/compare?a=step%202&b=step%205").get_json()
    assert result["a"] == "step 2" and result["b"] == "step 5"
    assert result["parameters"]["a"] == result["parameters"]["b"] > 0
    assert any(change["l2_diff"] > 0 for change in result["tensor_changes"])
    assert result["config_diff"] == []
    assert client.get("/compare?a=step%202").status_code == 400
    assert client.get("/compare?a=step%202&b=missing").status_code == 404


def test_runs_history_routes(client, app):
    assert client.get("/runs").get_json() == {"runs": []}
    assert client.get("/runs/bad..id/metrics").status_code == 400
    assert client.get("/runs/20990101-000000-abcdef/metrics").status_code == 404


# ---------------------------------------------------------------------------------------------- access token

def test_token_guards_every_route_but_the_page_shell(tmp_path, arc_data, folder_with_checkpoints):
    app = build_app(tmp_path / "checkpoints", arc_data, TOKEN="s3cret", START_WORKER=False)
    client = app.test_client()
    for url in ("/", "/vendor/plotly.min.js", "/static/app.js"):
        assert client.get(url).status_code == 200, url  # the page shell, which then asks for the token
    for url in ("/status", "/events", "/list_checkpoints", "/checkpoints/step%202", "/compare?a=step%202&b=step%202",
                "/runs", "/config"):
        response = client.get(url)
        assert response.status_code == 401 and "access token" in response.get_json()["error"], url
    assert client.post("/start_training", json={}).status_code == 401
    assert client.get("/checkpoints/step%202/download").status_code == 401
    assert client.delete("/checkpoints/step%202", json={}).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.post("/start_training", json={}, headers=wrong).status_code == 401
    good = {"Authorization": "Bearer s3cret"}
    assert client.get("/status", headers=good).get_json()["auth_required"] is True
    assert client.get("/checkpoints/step%202/download", headers=good).status_code == 200
    # The page trades the token for an HttpOnly cookie once; its event stream carries it (EventSource cannot
    # send headers).
    assert client.post("/login", json={"token": "nope"}).status_code == 401
    login = client.post("/login", json={"token": "s3cret"})
    assert login.status_code == 200 and "HttpOnly" in login.headers["Set-Cookie"]
    assert "SameSite=Strict" in login.headers["Set-Cookie"]
    assert client.get("/list_checkpoints").status_code == 200
    assert client.post("/start_training", json={}).status_code == 202


def test_non_loopback_bind_without_token_refuses_to_start(capsys):
    import app as app_module
    assert app_module.main(["--host", "0.0.0.0", "--port", "0"]) == 2
    assert "token" in capsys.readouterr().err


def test_worker_runs_a_tiny_training_to_the_end(client, app):
    assert post(client, "/start_training", {"max_steps": 3, "epochs": 1}).status_code == 202
    wait_for(lambda: client.get("/status").get_json()["phase"] == "finished", what="run to finish")
    status = client.get("/status").get_json()
    assert status["global_step"] == 3 and status["error"] is None
    runs = client.get("/runs").get_json()["runs"]
    history = client.get(f"/runs/{runs[0]['run_id']}/metrics").get_json()
    assert [p["global_step"] for p in history["train"]] == [1, 2, 3]


def test_a_failing_run_reports_training_error_and_the_server_lives_on(client, app, monkeypatch):
    def explode(self):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(Trainer, "train", explode)
    assert post(client, "/start_training", {}).status_code == 202
    wait_for(lambda: client.get("/status").get_json()["phase"] == "error", what="error phase")
    assert "injected failure" in client.get("/status").get_json()["error"]
    monkeypatch.undo()
    assert post(client, "/start_training", {"max_steps": 2, "epochs": 1}).status_code == 202
    wait_for(lambda: client.get("/status").get_json()["phase"] == "finished", what="second run")


def test_checkpoint_files_load_with_plain_torch_load(folder_with_checkpoints):
    record = torch.load(folder_with_checkpoints / "step 5.pth")
    assert record["global_step"] == 5 and record["kind"] == "manual"
    assert ckpt.verify(str(folder_with_checkpoints / "step 5.pth"))[0]


def test_fine_tune_starts_a_new_run_from_a_checkpoints_weights_with_new_settings(client, app, folder_with_checkpoints,
                                                                                monkeypatch):
    seen, original_train = {}, Trainer.train

    def spy(self):
        seen.update(state={k: v.clone() for k, v in self.model.state_dict().items()}, step=self.global_step,
                    lr=self.optimizer.param_groups[0]["lr"])
        return original_train(self)

    monkeypatch.setattr(Trainer, "train", spy)
    body = {"fine_tune_from": "step 5", "learning_rate": 0.005, "max_steps": 2, "epochs": 1}
    assert post(client, "/start_training", body).status_code == 202
    wait_for(lambda: client.get("/status").get_json()["phase"] == "finished", what="fine-tuning run")
    saved = torch.load(folder_with_checkpoints / "step 5.pth")
    assert seen["step"] == 0 and seen["lr"] == 0.005  # a new run, with its own settings and a fresh optimizer
    assert seen["state"].keys() == saved["model_state_dict"].keys()
    assert all(torch.equal(seen["state"][k], saved["model_state_dict"][k]) for k in seen["state"])
    assert client.get("/status").get_json()["error"] is None
