"""Bad input, property-based: whatever arrives gets a clear 4xx (never a 500) and training keeps running.
Bad checkpoint files are refused by listing and resume without executing anything."""
import json
import math
import os
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checkpoint as ckpt
from conftest import build_app, newest_run_checkpoints, wait_for
from train import TrainConfig

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
JSON = {"Content-Type": "application/json"}
nasty_text = st.one_of(
    st.text(max_size=200),
    st.sampled_from(["..", "../x", "/etc/passwd", "a\\b", "nul\x00", "tab\t", "\u202e", "é", "💾", " lead", "trail ",
                     "x" * 101, "x" * 10_000, "%2e%2e%2f", "best_model", "checkpoint_epoch_3", "CON", ""]),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-10**30, max_value=10**30) | st.floats() | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4),
    max_leaves=10,
)


@pytest.fixture(scope="module")
def running(tmp_path_factory, arc_data):
    """A real worker training a tiny model for the whole module."""
    app = build_app(tmp_path_factory.mktemp("bad") / "checkpoints", arc_data)
    client = app.test_client()
    assert client.post("/start_training", json={"epochs": 10_000}).status_code == 202
    wait_for(lambda: client.get("/status").get_json()["global_step"] > 0, what="training")
    yield app, client
    app.extensions["trainer"].shutdown()


def assert_clear_4xx(response):
    assert 400 <= response.status_code < 500, (response.status_code, response.data[:200])
    assert_error_body(response)


def assert_error_body(response):
    body = response.get_json()
    assert isinstance(body, dict) and isinstance(body["error"], str) and body["error"]


def name_is_valid(name):
    try:
        ckpt.check_name(name)
        return True
    except ValueError:
        return False


@SETTINGS
@given(name=nasty_text)
def test_save_names_are_accepted_only_when_valid(running, name):
    app, client = running
    response = client.post("/save_checkpoint", data=json.dumps({"name": name}), headers=JSON)
    if name_is_valid(name) or name == "":
        assert response.status_code in (202, 409, 503), response.data
    else:
        assert_clear_4xx(response)


@SETTINGS
@given(body=json_values)
def test_any_json_body_on_any_endpoint_is_never_a_500(running, body):
    app, client = running
    data = json.dumps(body)
    for url in ("/save_checkpoint", "/start_training", "/start_pretraining"):
        response = client.post(url, data=data, headers=JSON)
        # 503 is the one 5xx by design: the save queue is full (it comes with Retry-After).
        assert response.status_code < 500 or (response.status_code == 503 and response.headers["Retry-After"]), \
            (url, body, response.data[:200])
        if response.status_code >= 400:
            assert_error_body(response)
    patch = client.patch("/checkpoints/anything", data=data, headers=JSON)
    assert 400 <= patch.status_code < 500


@SETTINGS
@given(raw=st.binary(max_size=300), content_type=st.sampled_from(
    ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""]))
def test_raw_bytes_bodies_are_refused_clearly(running, raw, content_type):
    app, client = running
    response = client.post("/start_training", data=raw, headers={"Content-Type": content_type} if content_type else {})
    assert response.status_code < 500
    if response.status_code >= 400:
        assert_clear_4xx(response)


numbers = st.one_of(st.integers(min_value=-10**40, max_value=10**40), st.floats(allow_nan=True, allow_infinity=True),
                    st.booleans(), st.text(max_size=5), st.none())


@SETTINGS
@given(field=st.sampled_from([f for f in TrainConfig.__dataclass_fields__]), value=numbers)
def test_every_config_field_refuses_bad_values_with_its_name(running, field, value):
    app, client = running
    response = client.post("/start_training", data=json.dumps({field: value}), headers=JSON)
    # 409: the values were fine but a run is active; 404: a well-formed checkpoint name that does not exist.
    assert response.status_code in (400, 404, 409), response.data
    if response.status_code == 400:
        error = response.get_json()["error"]
        if isinstance(value, float) and not math.isfinite(value):  # json.dumps wrote NaN or Infinity: not JSON
            assert "not valid JSON" in error and "JSON allows" in error
        else:
            assert field in error


@SETTINGS
@given(name=nasty_text)
def test_checkpoint_routes_with_any_name_answer_4xx(running, name):
    app, client = running
    from urllib.parse import quote
    for method, suffix in (("get", ""), ("get", "/download"), ("delete", ""), ("post", "/verify")):
        response = getattr(client, method)(f"/checkpoints/{quote(name, safe='')}{suffix}",
                                           **({} if method == "get" else {"json": {}}))
        if name_is_valid(name):  # an earlier example may really have saved it
            assert response.status_code < 500, (method, name, response.status_code)
        else:
            assert_clear_4xx(response)


def test_training_kept_running_through_all_of_it(running):
    app, client = running
    before = client.get("/status").get_json()
    wait_for(lambda: client.get("/status").get_json()["global_step"] > before["global_step"], what="more steps")
    assert client.get("/status").get_json()["phase"] == "training"


# ---------------------------------------------------------------------------------------------- bad files

class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def bad_files(folder, good_path, marker):
    """Write each kind of bad checkpoint next to a good one; returns their names."""
    good = open(good_path, "rb").read()
    files = {
        "truncated": good[: len(good) // 2],
        "bit flipped": good[:1000] + bytes([good[1000] ^ 0x10]) + good[1001:],
        "zero length": b"",
        "not a zip": b"hello, this is not a checkpoint\n" * 10,
        "exploit": pickle.dumps(Exploit(marker)),
    }
    for name, data in files.items():
        (folder / f"{name}.pth").write_bytes(data)
    # A sidecar that matches the exploit's bytes: verification passes, the weights-only loader must still refuse.
    (folder / "exploit.json").write_text(json.dumps({"name": "exploit", "size": len(files["exploit"]),
                                                     "sha256": ckpt.file_sha256(str(folder / "exploit.pth"))}))
    return list(files)


def test_bad_checkpoint_files_are_listed_as_damaged_and_refused_for_resume(tmp_path, arc_data):
    marker = tmp_path / "exploit-ran"
    root = tmp_path / "checkpoints"
    app = build_app(root, arc_data)
    client = app.test_client()
    try:
        assert client.post("/start_training", json={"max_steps": 2, "epochs": 1}).status_code == 202
        wait_for(lambda: client.get("/status").get_json()["phase"] == "finished", what="a good checkpoint")
        folder = newest_run_checkpoints(root)  # the bad files go into the run's own folder, beside its best_model
        names = bad_files(folder, folder / "best_model.pth", marker)
        rows = {r["name"]: r for r in client.get("/list_checkpoints").get_json()["checkpoints"]}
        for name in ("truncated", "zero length", "not a zip"):
            assert rows[name]["damaged"] is True, name
        assert rows["best_model"]["damaged"] is False
        for name in names:
            if name == "exploit":
                continue
            response = client.post("/start_training", json={"resume_from": name})
            assert response.status_code == 400 and "verification" in response.get_json()["error"], name
        # Salvage mode gets as far as the loader, which refuses: a training_error, never an executed pickle.
        for name in ("exploit", "bit flipped"):
            body = {"resume_from": name, **({"skip_verify": True} if name != "exploit" else {})}
            assert client.post("/start_training", json=body).status_code == 202
            wait_for(lambda: client.get("/status").get_json()["phase"] == "error", what=f"{name} refused")
            error = client.get("/status").get_json()["error"]
            assert any(s in error for s in ("not a loadable checkpoint", "do not fit", "other than tensors")), error
        with pytest.raises(ckpt.CheckpointError):
            ckpt.load_checkpoint(str(folder / "exploit.pth"))
        assert not marker.exists(), "unpickling ran code"
        assert torch.load(folder / "best_model.pth")["kind"] == "best"
    finally:
        app.extensions["trainer"].shutdown()


@SETTINGS
@given(depth=st.integers(min_value=1, max_value=200_000), opener=st.sampled_from(["[", '{"a":']),
       closed=st.booleans(), url=st.sampled_from(["/save_checkpoint", "/start_training", "/start_pretraining",
                                                  "/login", "/checkpoints/anything/verify"]))
def test_bodies_nested_to_any_depth_are_never_a_500(running, depth, opener, closed, url):
    app, client = running
    closer = "]" if opener == "[" else "}"
    body = opener * depth + ("1" + closer * depth if closed else "")
    response = client.post(url, data=body, headers=JSON)
    assert response.status_code < 500, (url, depth, response.status_code)
    if depth > 64 or not closed:
        assert_clear_4xx(response)
