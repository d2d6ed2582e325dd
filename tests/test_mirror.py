"""Checkpoints mirrored to object storage and read back, against a real S3 server (moto_server, over HTTP): the
sidecar goes last, listing is one LIST plus the sidecars, retention follows on both sides or one, a restored
checkpoint resumes bit-identically, and faults (the store gone mid-upload, wrong credentials, no bucket, no
endpoint, hostile keys) lose nothing and leak no secret."""
import hashlib
import json
import os
import pathlib
import re

import pytest
import requests
import torch

import catalogue
import checkpoint as ckpt
import load_checkpoint
import mirror
import remote
import train
from conftest import LiveServer, build_app, wait_for, write_task_folder
from s3server import InProcessS3Server, S3Server, free_port
from test_live import start

# botocore's: a store gone fails at once, and a request it cut off within seconds
FAIL_FAST = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}
TINY = ["--embedding-dim", "4", "--hidden-dim", "16", "--latent-dim", "16", "--num-conv-layers", "2",
        "--batch-size", "8", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def server():
    s3 = S3Server().start()
    yield s3
    s3.stop()


@pytest.fixture
def s3(server, monkeypatch):
    for key, value in server.environment().items():
        monkeypatch.setenv(key, value)
    return server


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return str(write_task_folder(tmp_path_factory.mktemp("tasks"), n_training=6, n_evaluation=2, seed=5))


def train_cli(capsys, root, tasks, *flags):
    code = train.main(["--checkpoint-dir", str(root), "--data-dir", tasks, *TINY, *flags])
    out, err = capsys.readouterr()
    return code, out, err


def only_run(root):
    runs = [r["run_id"] for r in catalogue.list_runs(str(root)) if not r.get("legacy")]
    assert len(runs) == 1, runs
    return runs[0]


def unversioned(keys):
    """Object keys with the version of each checkpoint's bytes dropped: NAME.VERSION.pth -> NAME.pth."""
    return sorted(re.sub(r"\.[0-9a-f]{16}\.", ".", key) for key in keys)


def everything_under(*folders):
    """The bytes of every file under the folders, joined: to look for a secret."""
    return b"".join(p.read_bytes() for folder in folders for p in pathlib.Path(folder).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- runs

def test_a_run_mirrors_each_checkpoint_and_retention_deletes_on_both_sides(s3, capsys, tmp_path, tasks):
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/lab"
    code, out, err = train_cli(capsys, tmp_path / "ck", tasks, "--epochs", "3", "--checkpoint-every-epochs", "1",
                               "--keep-last", "1", "--mirror", url)
    assert code == 0, err
    run_id = only_run(tmp_path / "ck")
    where = f"lab/runs/{run_id}"
    assert unversioned(s3.keys(bucket)) == sorted([f"{where}/run.json"] + [f"{where}/checkpoints/{n}{s}" for n in (
        "best_model", "checkpoint_epoch_3") for s in (".json", ".pth")])  # epoch 1 and 2: gone on both sides
    assert out.count("mirrored: ") >= 2  # epoch 1 may be gone here before its turn came: then it is skipped
    target = remote.ObjectRoot(url)
    listed = target.list_checkpoints()
    local = {m["id"]: m for m in catalogue.list_checkpoints(str(tmp_path / "ck"))}
    assert sorted(m["id"] for m in listed) == sorted(local)
    for meta in listed:
        assert not meta["damaged"] and target.verify(run_id, meta["name"]) == (True, mirror_ok())
        folder = catalogue.checkpoint_folder(str(tmp_path / "ck"), run_id)
        side = json.loads(pathlib.Path(folder, meta["name"] + ".json").read_text())
        assert side["mirror"] == {"state": "mirrored", "url": url, "sha256": side["sha256"],
                                  "at": side["mirror"]["at"]}
        uploaded = json.loads(s3.client().get_object(Bucket=bucket, Key=f"{where}/checkpoints/{meta['name']}.json")[
            "Body"].read())
        version = f"{meta['name']}.{side['sha256'][:16]}.pth"
        assert uploaded == {**{k: v for k, v in side.items() if k != "mirror"}, "object": version}
    remote_bytes = b"".join(s3.client().get_object(Bucket=bucket, Key=k)["Body"].read() for k in s3.keys(bucket))
    assert s3.secret.encode() not in out.encode() + err.encode() + everything_under(tmp_path / "ck") + remote_bytes


def mirror_ok():
    return "every object's size and SHA-256 match"


def test_local_retention_keeps_the_mirror_whole_and_a_restored_checkpoint_resumes_bit_identically(
        s3, capsys, tmp_path, tasks):
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/lab"
    code, _, err = train_cli(capsys, tmp_path / "ck", tasks, "--epochs", "3", "--checkpoint-every-epochs", "1",
                             "--keep-last", "1", "--mirror", url, "--mirror-retention", "local")
    assert code == 0, err
    run_id = only_run(tmp_path / "ck")
    folder = pathlib.Path(catalogue.checkpoint_folder(str(tmp_path / "ck"), run_id))
    assert not (folder / "checkpoint_epoch_1.pth").exists()
    assert {m["name"] for m in remote.ObjectRoot(url).list_checkpoints()} >= {"checkpoint_epoch_1",
                                                                               "checkpoint_epoch_2"}
    # Restore the epoch-1 checkpoint, gone here, into a fresh root; resume it there to the end.
    fresh = tmp_path / "fresh"
    ident = f"{run_id}:checkpoint_epoch_1"
    assert load_checkpoint.main(["--restore", ident, "--mirror", url, "--checkpoint-dir", str(fresh)]) == 0
    assert "restored" in capsys.readouterr().out
    restored = catalogue.locate(str(fresh), ident).path
    assert ckpt.verify(restored) == (True, "size and SHA-256 match")
    assert catalogue.read_run(str(fresh), run_id)["run_id"] == run_id  # its run.json came along
    config = train.TrainConfig.from_dict(dict(embedding_dim=4, hidden_dim=16, latent_dim=16, num_conv_layers=2,
                                              batch_size=8, device="cpu", epochs=3, data_dir=tasks,
                                              checkpoint_dir=str(fresh), checkpoint_every_epochs=0))
    resumed = train.Trainer(config, train.load_data(data_dir=tasks), "cpu", str(fresh), [].append)
    resumed.resume(restored)
    resumed.train()
    final = torch.load(folder / "checkpoint_epoch_3.pth")
    assert resumed.global_step == final["global_step"]
    for key, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, final["model_state_dict"][key]), key
    # Restoring what is already here is refused, leaving it as it was.
    assert load_checkpoint.main(["--restore", ident, "--mirror", url, "--checkpoint-dir", str(fresh)]) == 1
    assert "already" in capsys.readouterr().err


def test_load_checkpoint_reads_urls_like_paths(s3, capsys, tmp_path, tasks):
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/lab"
    assert train_cli(capsys, tmp_path / "ck", tasks, "--max-steps", "3", "--mirror", url)[0] == 0
    run_id = only_run(tmp_path / "ck")
    object_url = f"{url}/runs/{run_id}/checkpoints/best_model.pth"
    assert load_checkpoint.main([object_url, "--verify"]) == 0
    assert "match" in capsys.readouterr().out
    assert load_checkpoint.main(["--list", url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [m["id"] for m in listed] == [f"{run_id}:best_model"] and listed[0]["location"] == "remote"
    assert load_checkpoint.main([f"{url}/runs/{run_id}/checkpoints/nothing.pth", "--info-only"]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    # train.py resumes from a checkpoint's URL too: fetched into its run's place in the local root.
    code, out, err = train_cli(capsys, tmp_path / "ck", tasks, "--max-steps", "5", "--resume", object_url)
    assert code == 0 and f", resume of {run_id}:best_model" in out, out + err


# ---------------------------------------------------------------------------------------------- the object root

def saved_checkpoint(folder, name="m", size=1 << 16, seed=0):
    """A checkpoint file and its sidecar in folder (a run's checkpoint folder): random bytes, true size and hash."""
    folder.mkdir(parents=True, exist_ok=True)
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    path = folder / f"{name}.pth"
    path.write_bytes(data.numpy().tobytes())
    sidecar = {"name": name, "kind": "manual", "file": path.name, "size": size, "created_at": ckpt.utc_now(),
               "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "global_step": seed}
    (folder / f"{name}.json").write_text(json.dumps(sidecar))
    return str(path), sidecar


def test_an_upload_whose_bytes_do_not_match_the_sidecar_commits_nothing(s3, tmp_path):
    bucket = s3.new_bucket()
    target = remote.ObjectRoot(f"s3://{bucket}/p")
    path, sidecar = saved_checkpoint(tmp_path / "r1")
    with pytest.raises(ckpt.CheckpointError, match="changed while it was uploaded"):
        target.upload(path, {**sidecar, "sha256": "0" * 64}, "r1", "m")
    assert s3.keys(bucket) == [] and target.list_checkpoints() == []
    target.upload(path, sidecar, "r1", "m")
    assert target.verify("r1", "m")[0]
    stray = "p/runs/r1/checkpoints/m.0123456789abcdef.pth"  # the bytes of an upload cut before its commit
    s3.client().put_object(Bucket=bucket, Key=stray, Body=b"half")
    assert not target.list_checkpoints()[0]["damaged"]
    assert target.recover() == ["r1:m"] and stray not in s3.keys(bucket) and target.verify("r1", "m")[0]
    # The object replaced behind the sidecar's back: verify says so, and restore puts nothing in place.
    key = f"p/runs/r1/checkpoints/m.{sidecar['sha256'][:16]}.pth"
    assert s3.keys(bucket) == sorted([key, "p/runs/r1/checkpoints/m.json"])
    s3.client().put_object(Bucket=bucket, Key=key, Body=b"x" * sidecar["size"])
    assert target.verify("r1", "m") == (False, f"s3://{bucket}/{key}: size or SHA-256 does not match the sidecar")
    with pytest.raises(remote.RemoteError, match="does not match"):
        target.download("r1", "m", str(tmp_path / "restored"))
    assert [p.name for p in (tmp_path / "restored").iterdir() if not p.name.startswith(".")] == []
    s3.client().put_object(Bucket=bucket, Key=key, Body=b"short")
    assert target.list_checkpoints()[0]["damaged"] and "5 bytes" in target.list_checkpoints()[0]["error"]


def test_hostile_names_never_address_anything_outside_the_prefix(s3, tmp_path):
    bucket = s3.new_bucket()
    target = remote.ObjectRoot(f"s3://{bucket}/p")
    for run_id, file_name in (("r1", "../../escape.pth"), ("r1", "/etc/passwd"), ("r1", "a/b.pth"),
                              ("r1", "x\n.pth"), ("r1", ".."), ("../r1", "m.pth"), ("r1/../..", "m.pth")):
        with pytest.raises(ValueError):
            target.key(run_id, file_name)
    for name in ("../m", "a/b", ""):
        with pytest.raises(ValueError):
            target.sidecar_key("r1", name)
    assert target.sidecar_key("r1", "my save") == "{}/p/runs/r1/checkpoints/my save.json".format(bucket)
    digest = hashlib.sha256(b"hello").hexdigest()
    good = {"name": "m", "kind": "manual", "file": "m.pth", "size": 5, "sha256": digest,
            "object": f"m.{digest[:16]}.pth"}
    client = s3.client()
    for key in ("p/runs/r1/checkpoints/../../../x.json", "p/runs/../checkpoints/m.json", "p/runs/r1/m.json",
                "p/runs/r 1/checkpoints/m.json", "p/runs/r1/checkpoints/sub/m.json", "q/runs/r1/checkpoints/m.json"):
        client.put_object(Bucket=bucket, Key=key, Body=json.dumps(good).encode())
    assert target.list_checkpoints() == []  # none of those is of the layout
    # A sidecar that points its file outside the checkpoint's name is refused, and nothing is written.
    client.put_object(Bucket=bucket, Key="p/runs/r1/checkpoints/m.json",
                      Body=json.dumps({**good, "file": "../../../../etc/passwd"}).encode())
    with pytest.raises(remote.RemoteError, match="not the checkpoint's"):
        target.download("r1", "m", str(tmp_path / "out"))
    client.put_object(Bucket=bucket, Key="p/runs/r1/checkpoints/m.json",
                      Body=json.dumps({**good, "object": "../../../x.pth"}).encode())
    with pytest.raises(remote.RemoteError, match="not a version of"):
        target.download("r1", "m", str(tmp_path / "out"))
    client.put_object(Bucket=bucket, Key="p/runs/r1/checkpoints/m.json", Body=json.dumps(
        {**good, "file": "m.dcp", "object": f"m.{digest[:16]}.dcp",
         "files": [{"path": "../evil", "size": 1, "sha256": "0" * 64}]}).encode())
    with pytest.raises(remote.RemoteError, match="malformed"):
        target.download("r1", "m", str(tmp_path / "out"))
    assert not (tmp_path / "evil").exists() and not list((tmp_path / "out").glob("m*"))
    # A run folder that is a link is never written through.
    client.put_object(Bucket=bucket, Key="p/runs/r1/checkpoints/m.json", Body=json.dumps(good).encode())
    client.put_object(Bucket=bucket, Key=f"p/runs/r1/checkpoints/{good['object']}", Body=b"hello")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "linked" / "runs").mkdir(parents=True)
    (tmp_path / "linked" / "runs" / "r1").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="symbolic link"):
        target.restore("r1", "m", str(tmp_path / "linked"))
    assert list(elsewhere.iterdir()) == []
    assert pathlib.Path(target.restore("r1", "m", str(tmp_path / "real"))).read_bytes() == b"hello"


def test_a_dcp_folder_round_trips_file_by_file(s3, capsys, tmp_path, tasks):
    import dcp_checkpoint
    bucket = s3.new_bucket()
    target = remote.ObjectRoot(f"s3://{bucket}/p")
    folder = tmp_path / "runs" / "r1" / "checkpoints"
    folder.mkdir(parents=True)
    assert train_cli(capsys, tmp_path / "one", tasks, "--max-steps", "2")[0] == 0
    record = ckpt.load_checkpoint(catalogue.locate(str(tmp_path / "one"), "best_model").path)
    dcp_checkpoint.write_record(str(folder / "m.dcp"), {**record, "name": "m", "kind": "manual"})
    sidecar = ckpt.read_sidecar(str(folder / "m.dcp"))
    target.upload(str(folder / "m.dcp"), sidecar, "r1", "m")
    assert target.verify("r1", "m")[0] and not target.list_checkpoints()[0]["damaged"]
    restored = target.restore("r1", "m", str(tmp_path / "fresh"))
    assert ckpt.verify(restored)[0]
    back = ckpt.load_checkpoint(restored)["model_state_dict"]
    assert back.keys() == record["model_state_dict"].keys()
    assert all(torch.equal(back[k], record["model_state_dict"][k]) for k in back)


# ---------------------------------------------------------------------------------------------- faults

class StopsTheServer(remote.ObjectRoot):
    """An ObjectRoot whose store goes away once, when the first piece of a large file is sent."""

    def __init__(self, url, server):
        super().__init__(url, FAIL_FAST)
        self.fs.retries = 1  # s3fs's own retries (a class attribute, no option): the mirror retries by itself
        self.server, self.stopped = server, False

    def _put(self, path, key, sha256, cancel, progress=None):
        def and_stop(done):
            if done >= remote.PIECE and os.path.getsize(path) > remote.PIECE and not self.stopped:
                self.stopped = True
                self.server.stop()
        return super()._put(path, key, sha256, cancel, and_stop)


def test_the_store_going_away_mid_upload_leaves_nothing_listed_and_its_return_lets_the_next_upload_succeed(
        tmp_path, monkeypatch):
    store = InProcessS3Server().start()
    try:
        for key, value in store.environment().items():
            monkeypatch.setenv(key, value)
        bucket = store.new_bucket()
        url = f"s3://{bucket}/p"
        folder = tmp_path / "ck" / "runs" / "r1" / "checkpoints"
        events = []
        uploads = mirror.Mirror(str(tmp_path / "ck"), StopsTheServer(url, store), events.append, attempts=1).start()
        _, first = saved_checkpoint(folder, size=1 << 10, seed=1)
        uploads.upload("r1", "m")
        assert uploads.wait(30) and events[-1]["type"] == "checkpoint_mirrored"
        _, sidecar = saved_checkpoint(folder, size=remote.PIECE + 4096, seed=2)  # saved again, in two parts
        uploads.upload("r1", "m")
        assert uploads.wait(60)
        failure = events[-1]
        assert failure["type"] == "mirror_error" and failure["retry_in"] is None, failure
        assert "cannot reach the endpoint" in failure["error"] and store.secret not in failure["error"]
        state = ckpt.read_sidecar(str(folder / "m.pth"))["mirror"]
        assert state["state"] == "failed" and state["error"] == failure["error"]
        store.start()  # back, with what it held
        target = remote.ObjectRoot(url)
        [old] = target.list_checkpoints()  # the first version is still listed, and whole: nothing was lost
        assert old["sha256"] == first["sha256"] and target.verify("r1", "m")[0]
        assert target.recover() == [] and len(store.keys(bucket)) == 2  # the sidecar and the version it names
        uploads.catch_up()  # what the next start does: every checkpoint not mirrored is queued
        assert uploads.wait(60) and events[-1]["type"] == "checkpoint_mirrored", events[-1]
        assert target.list_checkpoints()[0]["sha256"] == sidecar["sha256"] and target.verify("r1", "m")[0]
        assert unversioned(store.keys(bucket)) == ["p/runs/r1/checkpoints/m.json", "p/runs/r1/checkpoints/m.pth"]
        uploads.close()
    finally:
        store.stop()


def test_the_web_app_mirrors_saves_shows_failures_and_training_goes_on(tmp_path, arc_data, monkeypatch):
    store = InProcessS3Server().start()
    for key, value in store.environment().items():
        monkeypatch.setenv(key, value)
    bucket = store.new_bucket()
    target = remote.ObjectRoot(f"s3://{bucket}/app", FAIL_FAST)
    target.fs.retries = 1
    uploads = mirror.Mirror(str(tmp_path / "ck"), target, None, attempts=2, first_backoff=0.05)
    server = LiveServer(build_app(tmp_path / "ck", arc_data, MIRROR=uploads))
    try:
        start(server)

        def row(name, state):
            rows = requests.get(server.url + "/list_checkpoints", timeout=10).json()["checkpoints"]
            found = [r for r in rows if r["name"] == name and (r.get("mirror") or {}).get("state") == state]
            return found[0] if found else None

        def save(name):
            answer = requests.post(server.url + "/save_checkpoint", json={"name": name, "wait": True}, timeout=60)
            assert answer.status_code == 200, answer.text
            return answer.json()
        saved = save("online")
        assert wait_for(lambda: row("online", "mirrored"), what="the save to be mirrored")
        assert requests.get(server.url + "/status", timeout=10).json()["mirror"]["url"] == target.url
        assert uploads.wait(30)  # no upload (a best_model's) in flight when the store goes
        store.stop()
        offline = save("offline")  # acknowledged: it is durable here
        failed = wait_for(lambda: row("offline", "failed"), what="the upload to fail")
        assert "cannot reach the endpoint" in failed["mirror"]["error"]
        step = requests.get(server.url + "/status", timeout=10).json()["global_step"]
        wait_for(lambda: requests.get(server.url + "/status", timeout=10).json()["global_step"] > step + 2,
                 what="training to go on")
        store.start()
        save("back")
        wait_for(lambda: row("back", "mirrored"), what="the next save to be mirrored")
        assert {m["name"] for m in target.list_checkpoints()} == {"online", "back"}
        ident = catalogue.checkpoint_id(saved["run_id"], "back")
        assert requests.delete(f"{server.url}/checkpoints/{ident}", json={}, timeout=10).status_code == 200
        wait_for(lambda: {m["name"] for m in target.list_checkpoints()} == {"online"}, what="the remote delete")
        assert offline["state"] == "saved"
        page = requests.get(server.url + "/status", timeout=10).text
        assert store.secret not in page
    finally:
        requests.post(server.url + "/stop", json={}, timeout=10)
        server.close()
        store.stop()


@pytest.mark.parametrize("fault", ["wrong credentials", "no bucket", "no endpoint"])
def test_a_store_that_cannot_be_used_is_one_clear_error_at_start_up(fault, capsys, tmp_path, tasks, monkeypatch):
    store = S3Server(auth=True).start()
    try:
        environment = store.environment()
        bucket = store.new_bucket()
        if fault == "wrong credentials":
            environment["AWS_SECRET_ACCESS_KEY"] = "wrong-secret-Xq42"
        elif fault == "no bucket":
            bucket = "no-such-bucket-here"
        else:
            environment["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        url = f"s3://{bucket}/lab"
        code, out, err = train_cli(capsys, tmp_path / "ck", tasks, "--max-steps", "2", "--mirror", url,
                                   "--storage-options", json.dumps(FAIL_FAST))
        assert code == 2 and err.count("\n") == 1 and url in err, err
        assert {"wrong credentials": "access denied", "no bucket": "no such bucket",
                "no endpoint": "cannot reach the endpoint"}[fault] in err
        assert environment["AWS_SECRET_ACCESS_KEY"] not in out + err and "training" not in out
    finally:
        store.stop()


def test_the_web_app_refuses_to_start_with_a_mirror_it_cannot_use(s3, capsys, tmp_path):
    import app
    code = app.main(["--checkpoint-dir", str(tmp_path / "ck"), "--mirror", "s3://no-such-bucket-here/x"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("app.py: error: cannot use s3://no-such-bucket-here/x: no such bucket")


def test_bad_mirror_settings_are_one_line_errors(capsys, tmp_path, tasks):
    for flags, message in ((["--mirror", "s3://AKIAX:hunter2-value@bucket/x"], "must not hold credentials"),
                           (["--mirror", "nosuchprotocol://b/x"], "cannot open nosuchprotocol:// URLs"),
                           (["--mirror", "s3://b/x", "--storage-options", "{not json"], "not valid JSON"),
                           (["--mirror", "s3://b/x", "--storage-options", "[1]"], "must be a JSON object")):
        code, _, err = train_cli(capsys, tmp_path / "ck", tasks, "--max-steps", "1", *flags)
        assert code == 2 and err.count("\n") == 1 and message in err, err
        assert "hunter2" not in err


@pytest.mark.parametrize("program", ["train.py", "app.py"])
def test_a_url_as_checkpoint_dir_never_becomes_a_local_folder(program, s3, capsys, tmp_path, tasks, monkeypatch):
    import app
    monkeypatch.chdir(tmp_path)  # before the fix, s3://bucket/x made the local folders s3:/bucket/x here
    if program == "train.py":  # a URL root: checked at start-up (this bucket does not exist)
        code = train.main(["--checkpoint-dir", "s3://no-such-bucket-here/x", "--data-dir", tasks, *TINY,
                           "--max-steps", "1"])
        expected = "cannot use s3://no-such-bucket-here/x: no such bucket"
    else:  # the web app keeps a local root
        code = app.main(["--checkpoint-dir", "s3://no-such-bucket-here/x"])
        expected = "--mirror s3://no-such-bucket-here/x"
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_compressed_checkpoint_is_mirrored_and_restored_as_it_is(s3, capsys, tmp_path, tasks):
    bucket = s3.new_bucket()
    target = remote.ObjectRoot(f"s3://{bucket}/p")
    assert train_cli(capsys, tmp_path / "one", tasks, "--max-steps", "2")[0] == 0
    plain = catalogue.locate(str(tmp_path / "one"), "best_model").path
    folder = tmp_path / "ck" / "runs" / "r1" / "checkpoints"
    folder.mkdir(parents=True)
    packed = str(folder / "archive.pth.zst")
    assert load_checkpoint.main([plain, "--export", packed, "--contents", "weights", "--compression", "zstd"]) == 0
    capsys.readouterr()
    uploads = mirror.Mirror(str(tmp_path / "ck"), target, [].append).start()
    assert uploads.catch_up() == 1 and uploads.wait(30)
    uploads.close()
    assert [k.rsplit("/", 1)[1] for k in unversioned(s3.keys(bucket, "p/runs/r1/checkpoints/"))] == [
        "archive.json", "archive.pth.zst"]
    listed = target.list_checkpoints()[0]
    assert listed["compression"] == "zstd" and listed["contents"] == "weights" and not listed["damaged"]
    restored = target.restore("r1", "archive", str(tmp_path / "fresh"))
    assert restored.endswith("archive.pth.zst") and ckpt.verify(restored)[0]
    back, original = ckpt.load_checkpoint(restored), ckpt.load_checkpoint(plain)
    assert all(torch.equal(back["model_state_dict"][k], v) for k, v in original["model_state_dict"].items())


# ---------------------------------------------------------------------------------------------- a URL root

def test_a_url_root_keeps_every_checkpoint_there_and_a_resume_from_it_is_bit_identical(s3, capsys, tmp_path, tasks):
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/root"
    code, out, err = train_cli(capsys, url, tasks, "--cache-dir", str(tmp_path / "cache"), "--epochs", "3",
                               "--checkpoint-every-epochs", "1", "--keep-last", "2")
    assert code == 0, err
    target = remote.ObjectRoot(url)
    listed = {m["name"]: m for m in target.list_checkpoints()}
    assert sorted(listed) == ["best_model", "checkpoint_epoch_2", "checkpoint_epoch_3"]  # epoch 1: retention
    run_id = listed["best_model"]["run_id"]
    assert all(target.verify(run_id, name)[0] for name in listed)
    assert f"run {run_id}: checkpoints go to {url}/runs/{run_id}/checkpoints" in out
    assert f"checkpoint_saved: checkpoint_epoch_3 {url}/runs/{run_id}/checkpoints/checkpoint_epoch_3.pth" in out
    assert f"--checkpoint-dir {url} --resume" in out
    assert not list((tmp_path / "cache").rglob("*.pth"))  # saves are only staged here
    assert s3.keys(bucket, f"root/runs/{run_id}/run.json")
    # Another machine (another cache) resumes from the URL root by id, and ends where the run itself ended.
    code, out, err = train_cli(capsys, url, tasks, "--cache-dir", str(tmp_path / "other"), "--epochs", "3",
                               "--resume", f"{run_id}:checkpoint_epoch_2", "--checkpoint-every-epochs", "1")
    assert code == 0, err
    resumed = [m for m in target.list_checkpoints() if m["run_id"] != run_id and m["name"] == "checkpoint_epoch_3"]
    assert len(resumed) == 1
    straight_path = target.restore(run_id, "checkpoint_epoch_3", str(tmp_path / "check"))
    resumed_path = target.restore(resumed[0]["run_id"], "checkpoint_epoch_3", str(tmp_path / "check"))
    straight, again = torch.load(straight_path), torch.load(resumed_path)
    assert again["global_step"] == straight["global_step"]
    for key, tensor in straight["model_state_dict"].items():
        assert torch.equal(again["model_state_dict"][key], tensor), key
    # Fine-tuning from a pretrained encoder kept there, by its bare name.
    assert train_cli(capsys, url, tasks, "--cache-dir", str(tmp_path / "other"), "--phase", "pretrain",
                     "--max-steps", "2")[0] == 0
    code, out, err = train_cli(capsys, url, tasks, "--cache-dir", str(tmp_path / "other"), "--max-steps", "2",
                               "--pretrained-encoder", "pretrained_encoder_binary")
    assert code == 0, err
    fine_tuned = [m for m in target.list_checkpoints() if m["name"] == "best_model" and m["run_id"] not in
                  (run_id, resumed[0]["run_id"])]
    assert fine_tuned and s3.secret not in out + err


def test_a_save_to_a_url_root_whose_store_went_away_fails_alone_and_training_goes_on(tmp_path, tasks, monkeypatch):
    import queue
    import threading
    store = InProcessS3Server().start()
    try:
        for key, value in store.environment().items():
            monkeypatch.setenv(key, value)
        target = remote.ObjectRoot(f"s3://{store.new_bucket()}/root", FAIL_FAST)
        target.fs.retries = 1
        events, commands = queue.Queue(), queue.Queue()
        config = train.TrainConfig.from_dict(dict(embedding_dim=4, hidden_dim=16, latent_dim=16, num_conv_layers=2,
                                                  batch_size=8, device="cpu", epochs=10_000, data_dir=tasks,
                                                  checkpoint_dir=target.url, checkpoint_every_epochs=0))
        trainer = train.Trainer(config, train.load_data(data_dir=tasks), "cpu", str(tmp_path / "cache"),
                                events.put, commands, remote_root=target)
        thread = threading.Thread(target=trainer.train)
        thread.start()
        seen = []

        def next_of(*kinds):
            while True:
                event = events.get(timeout=60)
                seen.append(event)
                if event["type"] in kinds:
                    return event

        def save(name, overwrite=False):
            commands.put({"type": "save", "name": name, "overwrite": overwrite})
            while True:  # best_model's saves at validations come and go meanwhile
                outcome = next_of("checkpoint_saved", "checkpoint_error")
                if outcome["name"] == name:
                    return outcome
        try:
            before = save("before")
            assert before["type"] == "checkpoint_saved"
            store.stop()
            failed = save("while gone")
            assert failed["type"] == "checkpoint_error" and "cannot reach the endpoint" in failed["error"]
            assert save("before", overwrite=True)["type"] == "checkpoint_error"
            step = next_of("batch")["global_step"]
            assert next_of("batch")["global_step"] > step  # training goes on
            store.start()
            kept = [m for m in target.list_checkpoints() if m["name"] == "before"]  # the overwrite cut short
            assert kept[0]["sha256"] == before["sha256"] and target.verify(kept[0]["run_id"], "before")[0]
            saved = save("after")
            assert saved["type"] == "checkpoint_saved" and saved["path"].startswith(target.url)
        finally:
            commands.put({"type": "stop"})
            thread.join(60)
        assert {"after", "before"} <= {m["name"] for m in target.list_checkpoints()} and "while gone" not in {
            m["name"] for m in target.list_checkpoints()}
        assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.suffix in (".pth", ".zst")]
    finally:
        store.stop()


def test_the_web_app_lists_what_is_only_on_the_mirror_and_restores_it(s3, tmp_path, arc_data):
    target = remote.ObjectRoot(f"s3://{s3.new_bucket()}/app")
    uploads = mirror.Mirror(str(tmp_path / "ck"), target, None, retention="local")
    server = LiveServer(build_app(tmp_path / "ck", arc_data, MIRROR=uploads))
    try:
        start(server)
        saved = requests.post(server.url + "/save_checkpoint", json={"name": "kept", "wait": True}, timeout=60).json()
        requests.post(server.url + "/stop", json={}, timeout=10)

        def listed():
            answer = requests.get(server.url + "/list_checkpoints", timeout=10).json()
            assert answer["mirror_error"] is None
            return {r["id"]: r for r in answer["checkpoints"]}
        ident = saved["id"]
        wait_for(lambda: (listed()[ident].get("mirror") or {}).get("state") == "mirrored", what="the upload")
        assert requests.delete(f"{server.url}/checkpoints/{ident}", json={}, timeout=10).status_code == 200
        row = listed()[ident]  # gone here, kept there (retention local): listed as the mirror's
        assert row["location"] == "mirror" and row["path"] is None and row["sha256"] == saved["sha256"]
        answer = requests.post(f"{server.url}/checkpoints/{ident}/restore", json={}, timeout=10)
        assert answer.status_code == 202, answer.text
        wait_for(lambda: listed()[ident].get("location") is None, what="the restore")
        back = listed()[ident]
        assert ckpt.verify(back["path"])[0] and back["sha256"] == saved["sha256"]
        assert back["mirror"]["state"] == "mirrored"  # not uploaded again at the next start
        again = requests.post(f"{server.url}/checkpoints/{ident}/restore", json={}, timeout=10)
        assert again.status_code == 409 and "already here" in again.json()["error"]
        bare = requests.post(f"{server.url}/checkpoints/kept/restore", json={}, timeout=10)
        assert bare.status_code == 400 and "RUN_ID:NAME" in bare.json()["error"]
        foreign = requests.post(f"{server.url}/checkpoints/{ident}/restore", json={}, timeout=10,
                                headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 403
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------- the gaps of issue 21

def local_checkpoint(root, name, seed=0):
    """A real (small) checkpoint saved in a new run of a local root: (run id, its sidecar)."""
    from test_checkpoint import record_fields
    run_id = catalogue.new_run_id()
    catalogue.create_run(str(root), run_id, {"phase": "training"})
    folder = catalogue.checkpoint_folder(str(root), run_id)
    return run_id, ckpt.save_full_checkpoint(folder, **record_fields(name, folder=folder, seed=seed))


def test_concurrent_restores_of_one_checkpoint_restore_it_once(s3, tmp_path, arc_data):
    import threading

    from conftest import EventReader
    from test_faults import temporaries
    root = tmp_path / "ck"
    run_id, sidecar = local_checkpoint(root, "wanted")
    folder = pathlib.Path(catalogue.checkpoint_folder(str(root), run_id))
    target = remote.ObjectRoot(f"s3://{s3.new_bucket()}/app")
    target.upload(str(folder / sidecar["file"]), sidecar, run_id, "wanted")
    ckpt.delete_checkpoint(str(folder / sidecar["file"]))  # now only on the mirror
    ident = catalogue.checkpoint_id(run_id, "wanted")
    server = LiveServer(build_app(root, arc_data, MIRROR=mirror.Mirror(str(root), target, None, retention="local")))
    reader = EventReader(server.url)
    listings, done = [], threading.Event()

    def keep_listing():  # what the page would show meanwhile
        while not done.is_set():
            rows = requests.get(server.url + "/list_checkpoints", timeout=30).json()["checkpoints"]
            listings.append([r for r in rows if r["id"] == ident])
    try:
        lister = threading.Thread(target=keep_listing)
        lister.start()
        wait_for(lambda: listings, what="a first listing")
        clicks, answers = threading.Barrier(8), [None] * 8

        def click(i):
            clicks.wait()  # all at once
            answers[i] = requests.post(f"{server.url}/checkpoints/{ident}/restore", json={}, timeout=30)
        threads = [threading.Thread(target=click, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for answer in answers:
            assert answer.status_code in (202, 409), answer.text
            body = answer.json()
            assert body == {"restoring": ident} if answer.status_code == 202 else "already here" in body["error"]
        wait_for(lambda: requests.get(server.url + "/status", timeout=10).json()["mirror"]["pending"] == 0,
                 what="the mirror to be idle")
        done.set()
        lister.join(60)
        last = requests.get(server.url + "/status", timeout=10).json()["last_event_id"]
        wait_for(lambda: reader.events and reader.events[-1][0] >= last, what="every event so far")
        assert len(reader.named("checkpoint_restored")) == 1 and reader.named("mirror_error") == []
        # Never listed twice or damaged on the way; here once it is done, whole, and marked mirrored.
        assert all(len(rows) == 1 and not rows[0]["damaged"] for rows in listings), listings
        [row] = [r for r in requests.get(server.url + "/list_checkpoints", timeout=10).json()["checkpoints"]
                 if r["id"] == ident]
        assert row["location"] is None and row["sha256"] == sidecar["sha256"] and row["mirror"]["state"] == "mirrored"
        assert ckpt.verify(row["path"]) == (True, "size and SHA-256 match")
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["wanted.json", "wanted.pth"]
        assert temporaries(root) == []
    finally:
        done.set()
        reader.close()
        server.close()


def train_process(cwd, root, tasks, env, *flags):
    """python train.py on the tiny model in a subprocess whose output is read as it comes (test_shutdown's)."""
    import sys

    from test_shutdown import ROOT, Process
    return Process([sys.executable, os.path.join(ROOT, "train.py"), "--checkpoint-dir", str(root),
                    "--data-dir", tasks, *TINY, *flags], cwd=str(cwd), env=env)


def test_ctrl_c_while_train_py_waits_for_its_mirror_exits_at_once_and_the_next_start_uploads_the_rest(
        s3, tmp_path, tasks):
    import signal
    import time

    from s3server import HoldingProxy
    from test_faults import temporaries
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/lab"
    proxy = HoldingProxy(s3.port)
    proxy.hold(f"PUT /{bucket}/lab/runs/".encode())  # the first upload's first request: the store hangs on it
    root = tmp_path / "ck"
    try:
        run = train_process(tmp_path, root, tasks, {**os.environ, **proxy.environment(s3)}, "--max-steps", "3",
                            "--mirror", url)
        run.wait_line(lambda line: line.startswith("mirror: waiting for "), 90, what="the wait for the mirror")
        assert proxy.held.wait(30)
        run.signal(signal.SIGINT)
        signalled = time.monotonic()
        code, lines = run.finish(30)
        took = time.monotonic() - signalled
    finally:
        proxy.close()
    output = "\n".join(lines)
    assert code == 0 and took < 10, (took, output)  # the status a finished run has: its checkpoints are all here
    local = {m["id"]: m for m in catalogue.list_checkpoints(str(root))}
    assert local and not any(m.get("mirror") for m in local.values()) and temporaries(root) == []
    assert "train.py: SIGINT: leaving the uploads not done to the next start with the same --mirror" in output
    assert f"mirror: {len(local)} upload(s) to {url} not done; they are uploaded at the next start" in output
    assert "Traceback" not in output
    assert s3.keys(bucket) == []  # nothing half-written there: the one request sent never reached the store
    # The next start (the same --mirror) catches up.
    events = []
    uploads = mirror.Mirror(str(root), remote.ObjectRoot(url), events.append).start()
    assert uploads.catch_up() == len(local) and uploads.wait(60)
    uploads.close()
    target = remote.ObjectRoot(url)
    assert sorted(m["id"] for m in target.list_checkpoints()) == sorted(local)
    assert all(target.verify(m["run_id"], m["name"])[0] for m in local.values())
    assert [e["type"] for e in events] == ["checkpoint_mirrored"] * len(local)


def test_sigterm_mid_overwrite_to_a_url_root_keeps_the_previous_version_and_exits_cleanly(s3, tmp_path, tasks):
    import signal
    import time

    from s3server import HoldingProxy
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/root"
    proxy = HoldingProxy(s3.port)
    # The second version of best_model's bytes (a validation that improved), held before it reaches the store:
    # the first is committed, this one is cut between its bytes and its sidecar, its commit.
    proxy.hold(re.escape(f"PUT /{bucket}/root/runs/").encode() + rb"[0-9a-f-]+/checkpoints/best_model\.[0-9a-f]{16}"
               rb"\.pth ", skip=1)
    try:
        run = train_process(tmp_path, url, tasks, {**os.environ, **proxy.environment(s3)}, "--cache-dir",
                            str(tmp_path / "cache"), "--epochs", "1000", "--checkpoint-every-epochs", "0",
                            "--shutdown-timeout", "0")
        run_id = run.wait_line(lambda line: line.startswith("run "), 90, what="the run line").split()[1].rstrip(":")
        wait_for(lambda: proxy.held.is_set() or run.proc.poll() is not None, 120, what="a second best_model")
        assert proxy.held.is_set(), "\n".join(run.lines)
        target = remote.ObjectRoot(url)  # straight to the store
        [before] = [m for m in target.list_checkpoints() if m["name"] == "best_model"]
        run.signal(signal.SIGTERM)
        run.wait_line(lambda line: "SIGTERM: stopping at the next step" in line, what="the signal's line")
        run.wait_line(lambda line: "checkpoint writer: abandoning best_model" in line, what="the abandon line")
        proxy.release()  # the bytes go on to the store; the commit after them is not made
        signalled = time.monotonic()
        code, lines = run.finish(60)
        took = time.monotonic() - signalled
    finally:
        proxy.close()
    output = "\n".join(lines)
    assert code == 0 and took < 20 and "Traceback" not in output, output
    assert f"abandoned {run_id}:best_model: abandoned at shutdown: did not finish within 0 s" in lines, output
    listed = {m["name"]: m for m in target.list_checkpoints()}
    assert list(listed) == ["best_model"]  # no final checkpoint of the stop either: abandoned with it
    assert listed["best_model"]["sha256"] == before["sha256"] and not listed["best_model"]["damaged"]
    assert target.verify(run_id, "best_model") == (True, mirror_ok())
    prefix = f"root/runs/{run_id}/checkpoints/"
    versions = [k[len(prefix):] for k in s3.keys(bucket, prefix) if not k.endswith(".json")]
    assert len(versions) == 2 and before["object"] in versions  # the cut one's bytes, named by no sidecar
    assert target.recover() == [f"{run_id}:best_model"]
    assert s3.keys(bucket, prefix) == sorted([prefix + "best_model.json", prefix + before["object"]])
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and ".pth" in p.name]


# ---------------------------------------------------------------------------------------------- --mirror-retries

@pytest.mark.parametrize("program", ["train.py", "app.py"])
@pytest.mark.parametrize("value", ["-1", "101", "2.5", "many"])
def test_a_bad_mirror_retries_is_a_one_line_error(program, value, capsys):
    import app
    with pytest.raises(SystemExit) as exit_:
        (train.main if program == "train.py" else app.main)(["--mirror-retries", value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{program}: error: argument --mirror-retries: expected a whole number of retries from 0 "
                          f"to 100, got {value!r}"), err


DENY_UPLOADS = {"Version": "2012-10-17", "Statement": [  # listing and the start-up probe pass; uploads do not
    {"Effect": "Allow", "Action": "*", "Resource": "*"},
    {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::*/lab/runs/*"}]}


def test_mirror_retries_sets_how_often_a_failed_upload_is_tried(capsys, tmp_path, tasks, arc_data, monkeypatch):
    import app
    store = S3Server(auth=True, policy=DENY_UPLOADS).start()
    try:
        for key, value in store.environment().items():
            monkeypatch.setenv(key, value)
        url = f"s3://{store.new_bucket()}/lab"
        for retries in (0, 1):  # train.py: 1, then 2 attempts, each line saying which of how many
            root = tmp_path / f"ck{retries}"
            code, out, err = train_cli(capsys, root, tasks, "--max-steps", "2", "--mirror", url,
                                       "--mirror-retries", str(retries))
            assert code == 0, err
            run_id = only_run(root)
            where = f"mirror_error: upload {run_id}:best_model -> {url}, attempt"
            tries = [line for line in out.splitlines() if line.startswith(where)]
            assert len(tries) == retries + 1 and all("access denied" in line for line in tries), out
            assert tries[-1].startswith(f"{where} {retries + 1}/{retries + 1}: ")
            assert tries[-1].endswith("gave up until the next start"), out
            if retries:
                assert tries[0].startswith(f"{where} 1/2: ") and tries[0].endswith("retrying in 1 s"), out
            state = ckpt.read_sidecar(catalogue.locate(str(root), f"{run_id}:best_model").path)["mirror"]
            assert state["state"] == "failed" and "access denied" in state["error"]
        # app.py: the flag reaches its mirror, and the page's status says so.
        root = tmp_path / "web"
        run_id, _ = local_checkpoint(root, "kept")
        args = app.build_parser().parse_args(["--checkpoint-dir", str(root), "--mirror", url, "--mirror-retries", "0"])
        server = LiveServer(build_app(root, arc_data, MIRROR=app.open_mirror(args)))
        try:
            def status():
                return requests.get(server.url + "/status", timeout=10).json()["mirror"]
            wait_for(lambda: status()["state"] == "failed", what="the catch-up upload to fail")
            error = status()["last_error"]
            assert error["id"] == f"{run_id}:kept" and (error["attempt"], error["attempts"]) == (1, 1), error
            assert "access denied" in error["error"] and store.secret not in json.dumps(status())
        finally:
            server.close()
    finally:
        store.stop()
