"""Web security: a Host allow-list (DNS rebinding), same-origin proof on every state change, the token on every
route but the page shell, bounded request bodies, a resource check before a run, environment faults that name
themselves, and web data paths confined to the server's own folder. Each test here failed on version 0.7.0's
first cut of the app, which accepted any Host and body-less cross-site POSTs."""
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checkpoint as ckpt
from conftest import LiveServer, build_app, checkpoints_of, mount_tmpfs, tiny_config, wait_for, write_task_folder
from data import load_data
from train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = write_task_folder(str(tmp_path_factory.mktemp("tasks")), n_training=6, n_evaluation=2)
    return folder, load_data(data_dir=folder)


@pytest.fixture
def saved(small, tmp_path):
    """A root with one run that holds the manual checkpoint `victim`; (root, id)."""
    commands = queue.Queue()
    commands.put({"type": "save", "name": "victim", "request_id": "v"})
    config = tiny_config(tmp_path / "checkpoints", data_dir=small[0], max_steps=2)
    trainer = Trainer(config, small[1], "cpu", config.checkpoint_dir, lambda e: None, commands)
    trainer.train()
    return tmp_path / "checkpoints", f"{trainer.run_id}:victim", checkpoints_of(trainer)


# ---------------------------------------------------------------------------------------------- 1, 2: origin

def test_a_rebound_host_can_neither_start_nor_download_nor_edit(saved, small):
    root, ident, folder = saved
    app = build_app(root, small[1], DATA_DIR=small[0], START_WORKER=False)
    client = app.test_client()
    evil = {"Host": "evil.example:5002", "Origin": "http://evil.example:5002"}
    attempts = [client.post("/start_training", json={}, headers=evil),
                client.get(f"/checkpoints/{ident}/download", headers={"Host": "attacker.com"}),
                client.patch(f"/checkpoints/{ident}", json={"notes": "owned"}, headers=evil),
                client.delete(f"/checkpoints/{ident}", json={}, headers=evil),
                client.get("/", headers={"Host": "attacker.com"})]
    for response in attempts:
        assert response.status_code == 403 and "--allowed-host" in response.get_json()["error"]
    assert ckpt.verify(str(folder / "victim.pth"))[0] and "notes" not in ckpt.read_sidecar(str(folder / "victim.pth"))
    assert client.get("/status").get_json()["phase"] == "idle"
    allowed = build_app(root, small[1], DATA_DIR=small[0], START_WORKER=False,
                        ALLOWED_HOSTS=("lab.internal",)).test_client()
    assert allowed.get("/status", headers={"Host": "lab.internal:5002"}).status_code == 200
    for host in ("127.0.0.1:5002", "localhost:5002", "[::1]:5002"):
        assert client.get("/status", headers={"Host": host}).status_code == 200, host


@pytest.mark.parametrize("url", ["/stop", "/save_checkpoint", "/start_training", "/pause", "/resume_training",
                                 "/checkpoints/victim/verify", "/start_pretraining"])
def test_a_bodyless_cross_site_post_changes_nothing(saved, small, url):
    root, _, _ = saved
    app = build_app(root, small[1], DATA_DIR=small[0], START_WORKER=False)
    client = app.test_client()
    simple = client.post(url, headers={"Origin": "http://evil.example"})  # what fetch(..., {mode: "no-cors"}) sends
    assert simple.status_code == 415 and "Content-Type: application/json" in simple.get_json()["error"]
    bare = client.post(url)
    assert bare.status_code == 415
    forged = client.post(url, json={}, headers={"Origin": "http://evil.example"})
    assert forged.status_code == 403 and "evil.example" in forged.get_json()["error"]
    sibling = client.post(url, json={}, headers={"Sec-Fetch-Site": "same-site"})  # another app on this machine
    assert sibling.status_code == 403
    assert client.get("/status").get_json()["phase"] == "idle"


def test_frames_and_referrers_are_refused(client):
    page = client.get("/")
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY" and page.headers["Referrer-Policy"] == "no-referrer"


# ---------------------------------------------------------------------------------------------- 3: resources

def test_a_run_that_cannot_fit_is_refused_before_it_starts(held_app_factory):
    client = held_app_factory().test_client()
    response = client.post("/start_training", json={"hidden_dim": 4096, "latent_dim": 8192, "epochs": 1})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert "needs about" in error and "GB" in error and "hidden_dim" in error and "free" in error
    assert client.get("/status").get_json()["phase"] == "idle"
    limited = held_app_factory(MAX_MEMORY_GB=0.0001).test_client()
    refused = limited.post("/start_training", json={})
    assert refused.status_code == 400 and "--max-memory-gb" in refused.get_json()["error"]


def test_train_py_refuses_a_run_that_cannot_fit_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--hidden-dim", "4096", "--latent-dim",
                             "8192", "--checkpoint-dir", str(tmp_path / "c"), "--epochs", "1", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1 and "needs about" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.fixture
def held_app_factory(tmp_path, arc_data):
    apps = []

    def make(**config):
        app = build_app(tmp_path / f"checkpoints{len(apps)}", arc_data, START_WORKER=False, **config)
        apps.append(app)
        return app

    return make


# ---------------------------------------------------------------------------------------------- 4: bodies

@pytest.mark.parametrize("body", ["[" * 100_000, '{"name": ' + "[" * 50_000 + "]" * 50_000 + "}",
                                  '{"a": ' * 5_000 + "1" + "}" * 5_000, '{"learning_rate": NaN}', "\xff\xfe"])
@pytest.mark.parametrize("method,url", [("post", "/start_training"), ("post", "/start_pretraining"),
                                        ("post", "/save_checkpoint"), ("post", "/stop"), ("post", "/login"),
                                        ("patch", "/checkpoints/victim"), ("post", "/checkpoints/victim/verify")])
def test_deep_or_malformed_bodies_are_a_400(saved, small, body, method, url):
    root, _, _ = saved
    client = build_app(root, small[1], START_WORKER=False).test_client()
    response = getattr(client, method)(url, data=body.encode("utf-8", "surrogateescape") if isinstance(body, str)
                                       else body, headers=JSON)
    assert response.status_code == 400, response.data[:200]
    assert response.get_json()["error"]


# ---------------------------------------------------------------------------------------------- 5: faults

@pytest.fixture
def tiny_disk(tmp_path):
    yield from mount_tmpfs(tmp_path / "tiny", "12m")


def test_a_full_disk_and_an_immutable_folder_name_themselves(small, tiny_disk):
    commands = queue.Queue()
    commands.put({"type": "save", "name": "victim", "request_id": "v"})
    config = tiny_config(tiny_disk / "checkpoints", data_dir=small[0], max_steps=1, checkpoint_every_epochs=0)
    trainer = Trainer(config, small[1], "cpu", config.checkpoint_dir, lambda e: None, commands)
    trainer.train()
    folder = checkpoints_of(trainer)
    client = build_app(tiny_disk / "checkpoints", small[1], START_WORKER=False).test_client()
    ident = f"{trainer.run_id}:victim"
    filler = tiny_disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass
    try:
        for response in (client.patch(f"/checkpoints/{ident}", json={"notes": "x" * 5000}),
                         client.post(f"/checkpoints/{ident}/verify", json={})):
            assert response.status_code == 507 and "No space left" in response.get_json()["error"]
    finally:
        filler.unlink()
    assert ckpt.verify(str(folder / "victim.pth"))[0]
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        for response in (client.patch(f"/checkpoints/{ident}", json={"notes": "x"}),
                         client.post(f"/checkpoints/{ident}/verify", json={}),
                         client.delete(f"/checkpoints/{ident}", json={})):
            assert response.status_code == 403 and "not permitted" in response.get_json()["error"], response.data
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert ckpt.verify(str(folder / "victim.pth"))[0]


# ---------------------------------------------------------------------------------------------- 7, 8: paths, reads

def test_web_data_paths_stay_inside_the_servers_data_folder(small, tmp_path, arc_data):
    folder = small[0]
    os.makedirs(os.path.join(folder, "training", "sub"), exist_ok=True)
    confined = build_app(tmp_path / "a", small[1], DATA_DIR=folder, START_WORKER=False).test_client()
    for outside in ("/", "/etc", "..", os.path.dirname(folder), "../../", "training/../../"):
        response = confined.post("/start_training", json={"data_dir": outside})
        error = response.get_json()["error"]
        assert response.status_code == 400 and "--data-dir" in error and "/etc" not in error, outside
        assert "container_info" not in error
    assert confined.post("/start_training", json={"data_dir": "training"}).status_code == 202
    bundled = build_app(tmp_path / "b", arc_data, START_WORKER=False).test_client()
    response = bundled.post("/start_training", json={"data_dir": "/"})
    assert response.status_code == 400 and "bundled" in response.get_json()["error"]


# ---------------------------------------------------------------------------------------------- the sweep

HOSTS = ["localhost", "127.0.0.1:5002", "[::1]:5002", "LOCALHOST", "evil.example", "evil.example:5002",
         "127.0.0.1.evil.com", "localhost.evil", "lab.internal"]
ORIGINS = [None, "http://{host}", "http://evil.example", "null", "https://{host}", "http://localhost:1"]
FETCH_SITES = [None, "same-origin", "none", "same-site", "cross-site"]
CONTENT_TYPES = [None, "application/json", "application/json; charset=utf-8", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data"]
ROUTES = [("GET", "/"), ("GET", "/static/app.js"), ("GET", "/config"), ("GET", "/status"),
          ("GET", "/list_checkpoints"), ("GET", "/runs"), ("GET", "/checkpoints/victim"),
          ("GET", "/checkpoints/victim/download"), ("GET", "/compare?a=victim&b=victim"), ("GET", "/runs/x/metrics"),
          ("GET", "/samples"), ("GET", "/save_requests/nosuchrequest"),
          ("POST", "/start_pretraining"), ("POST", "/start_training"), ("POST", "/stop"), ("POST", "/pause"),
          ("POST", "/resume_training"), ("POST", "/save_checkpoint"), ("POST", "/checkpoints/victim/verify"),
          ("POST", "/login"), ("PATCH", "/checkpoints/victim"), ("DELETE", "/checkpoints/nothing"),
          ("PUT", "/checkpoints/victim")]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, small):
    root = tmp_path_factory.mktemp("sweep") / "checkpoints"
    root.mkdir()
    ckpt.write_checkpoint(str(root), {"name": "victim", "model_state_dict": {}, "config": {}})
    return build_app(root, small[1], START_WORKER=False, ALLOWED_HOSTS=("lab.internal",),
                     TOKEN=None).test_client()


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(ROUTES), host=st.sampled_from(HOSTS), origin=st.sampled_from(ORIGINS),
       fetch_site=st.sampled_from(FETCH_SITES), content_type=st.sampled_from(CONTENT_TYPES),
       body=st.sampled_from([None, "{}", '{"notes": "n"}', "x=1"]))
def test_every_route_answers_2xx_only_to_a_legitimate_request_and_never_500(swept, route, host, origin,
                                                                             fetch_site, content_type, body):
    method, url = route
    headers = {"Host": host}
    if origin is not None:
        headers["Origin"] = origin.format(host=host)
    if fetch_site is not None:
        headers["Sec-Fetch-Site"] = fetch_site
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = swept.open(url, method=method, headers=headers, data=body)
    assert response.status_code != 500 and response.status_code < 500 or response.status_code == 503, \
        response.data[:200]
    host_ok = urllib.parse.urlsplit("//" + host).hostname in ("localhost", "127.0.0.1", "::1", "lab.internal")
    changes = method != "GET"
    same_origin = (origin is None or origin.format(host=host).lower() == f"http://{host}".lower()) and \
        fetch_site in (None, "same-origin", "none")
    json_type = content_type is not None and content_type.startswith("application/json")
    legitimate = host_ok and (not changes or (json_type and same_origin))
    if not legitimate:
        assert response.status_code in (403, 405, 415), (headers, response.status_code)
    if 200 <= response.status_code < 300:
        assert legitimate
    if response.mimetype == "application/json":
        json.loads(response.get_data(as_text=True), parse_constant=lambda c: pytest.fail(f"{c} in a response"))


# ---------------------------------------------------------------------------------------------- the mix

@pytest.mark.slow
def test_a_hostile_mix_of_5000_requests_gets_no_500_and_training_goes_on(small, tmp_path, capsys):
    app = build_app(tmp_path / "checkpoints", small[1], DATA_DIR=small[0])
    server = LiveServer(app)
    base = server.url
    port = base.rsplit(":", 1)[1]
    counts, lock = {}, threading.Lock()
    kinds = [
        ("foreign host", lambda s: s.get(base + "/status", headers={"Host": f"evil.example:{port}"})),
        ("rebound start", lambda s: s.post(base + "/start_training", json={}, headers={
            "Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"})),
        ("simple cross-site post", lambda s: s.post(base + "/stop", headers={"Origin": "http://evil.example"})),
        ("forged origin", lambda s: s.post(base + "/save_checkpoint", json={}, headers={"Origin": "http://x.y"})),
        ("deep body", lambda s: s.post(base + "/save_checkpoint", data="[" * 100_000, headers=JSON)),
        ("huge body", lambda s: s.post(base + "/start_training", data=b"{" + b" " * (2 << 20) + b"}", headers=JSON)),
        ("bad name", lambda s: s.get(base + "/checkpoints/..%2F..%2Fetc%2Fpasswd")),
        ("outside data", lambda s: s.post(base + "/start_training", json={"data_dir": "/"})),
        ("too big a model", lambda s: s.post(base + "/start_training", json={"hidden_dim": 4096, "latent_dim": 8192})),
        ("nan", lambda s: s.post(base + "/start_training", data='{"learning_rate": NaN}', headers=JSON)),
        ("legitimate save", lambda s: s.post(base + "/save_checkpoint", json={})),
        ("legitimate list", lambda s: s.get(base + "/list_checkpoints")),
    ]
    try:
        assert requests.post(base + "/start_training", json={"epochs": 100000}, timeout=5).status_code == 202
        wait_for(lambda: requests.get(base + "/status", timeout=5).json()["global_step"] > 0, what="training")
        started = requests.get(base + "/status", timeout=5).json()["global_step"]

        def worker(offset):
            with requests.Session() as session:
                for i in range(500):
                    name, send = kinds[(offset + i) % len(kinds)]
                    status = send(session).status_code
                    with lock:
                        counts.setdefault(name, {}).setdefault(status, 0)
                        counts[name][status] += 1

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(10)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - began
        status = requests.get(base + "/status", timeout=5).json()
        assert status["phase"] == "training" and status["global_step"] > started
    finally:
        requests.post(base + "/stop", json={}, timeout=5)
        server.close()
    total = sum(sum(by.values()) for by in counts.values())
    with capsys.disabled():
        print(f"\nhostile mix: {total} requests in {elapsed:.1f} s")
        for name, by in counts.items():
            print(f"  {name:24} " + ", ".join(f"{code}: {n}" for code, n in sorted(by.items())))
    assert total == 5000
    assert not any(code == 500 for by in counts.values() for code in by)
    for name in ("foreign host", "rebound start", "simple cross-site post", "forged origin", "deep body",
                 "huge body", "outside data", "too big a model", "nan"):
        assert all(400 <= code < 500 for code in counts[name]), (name, counts[name])
