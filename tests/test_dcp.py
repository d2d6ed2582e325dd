"""DCP folder checkpoints (NAME.dcp + NAME.json) in one process: written, listed, verified, loaded, served over HTTP,
deleted, recovered after a crash, and converted both ways by load_checkpoint.py. What several processes write into
one is tested in test_distributed.py; this is the same format, made here from a one-process run's record."""
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading

import pytest
import torch

import catalogue
import checkpoint as ckpt
import dcp_checkpoint
from conftest import assert_same, build_app, checkpoints_of, tiny_config
from train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, arc_data):
    """A tiny run's best_model.pth, and its twin as a folder (twin.dcp) in the same run's folder."""
    root = tmp_path_factory.mktemp("dcp") / "checkpoints"
    trainer = Trainer(tiny_config(root, task_type="selection", bottleneck_type="communication"), arc_data, "cpu",
                      str(root), lambda e: None)
    trainer.train()
    folder = checkpoints_of(trainer)
    pth = folder / "best_model.pth"
    record = ckpt.load_checkpoint(str(pth))
    dcp_checkpoint.write_record(str(folder / "twin.dcp"), {**record, "name": "twin"})
    return {"root": root, "folder": folder, "pth": pth, "dcp": folder / "twin.dcp", "record": record,
            "run_id": trainer.run_id, "data": arc_data}


@pytest.fixture
def copy(trained, tmp_path):
    """A fresh copy of the run's checkpoints folder, to damage."""
    folder = tmp_path / "runs" / trained["run_id"] / "checkpoints"
    shutil.copytree(trained["folder"], folder)
    return {"root": tmp_path, "folder": folder, "dcp": folder / "twin.dcp", "id": f"{trained['run_id']}:twin"}


def listed(root, name="twin"):
    return next(m for m in catalogue.list_checkpoints(str(root)) if m["name"] == name)


# ---------------------------------------------------------------------------------------------- the format

def test_a_folder_holds_dcp_files_and_a_record_and_its_sidecar_lists_each_with_its_sha256(trained):
    names = sorted(os.listdir(trained["dcp"]))
    assert names == [".metadata", "__0_0.distcp", "record.pth"]
    sidecar = json.loads((trained["folder"] / "twin.json").read_text())
    assert sidecar["format"] == "dcp" and sidecar["file"] == "twin.dcp"
    for entry in sidecar["files"]:
        data = (trained["dcp"] / entry["path"]).read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert sidecar["size"] == sum(f["size"] for f in sidecar["files"])
    assert torch.load(trained["dcp"] / "record.pth")["global_step"] == trained["record"]["global_step"]


def test_a_folder_loads_as_the_record_it_was_made_from(trained):
    record = ckpt.load_checkpoint(str(trained["dcp"]))
    original = trained["record"]
    for key in ("model_state_dict", "encoder_state_dict", "optimizer_state_dict", "rng_state", "config", "epoch",
                "batch", "global_step", "metrics", "dataset"):
        assert_same(original[key], record[key], key)
    assert record["name"] == "twin"


def test_a_folder_is_listed_verified_and_described_like_a_file(trained):
    meta = listed(trained["root"])
    assert not meta["damaged"] and meta["format"] == "dcp" and meta["path"].endswith("twin.dcp")
    assert meta["resume_command"].endswith(f"--resume {trained['run_id']}:twin")
    assert ckpt.verify(str(trained["dcp"])) == (True, "every file's size and SHA-256 match")
    assert catalogue.locate(str(trained["root"]), "twin").path == str(trained["dcp"])


def test_resuming_from_the_folder_continues_exactly_as_from_the_file(trained, tmp_path):
    ends = []
    for source in (trained["pth"], trained["dcp"]):
        trainer = Trainer(tiny_config(tmp_path / str(len(ends)), max_steps=7), trained["data"], "cpu",
                          str(tmp_path / str(len(ends))), lambda e: None)
        trainer.resume(str(source))
        trainer.train()
        ends.append(trainer.model.state_dict())
    assert_same(ends[0], ends[1], "weights after resuming")


# ---------------------------------------------------------------------------------------------- folders that lie

@pytest.mark.parametrize("damage, reason", [
    ("flip", "__0_0.distcp's SHA-256 does not match"),
    ("truncate", "__0_0.distcp is"),
    ("remove", "__0_0.distcp is missing"),
    ("extra", "holds files its sidecar does not list (stray)"),
    ("link", "__0_0.distcp is a symbolic link"),
])
def test_a_damaged_folder_fails_verification_and_does_not_load(copy, damage, reason):
    shard = copy["dcp"] / "__0_0.distcp"
    data = shard.read_bytes()
    if damage == "flip":
        shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "truncate":
        shard.write_bytes(data[:-10])
    elif damage == "remove":
        shard.unlink()
    elif damage == "extra":
        (copy["dcp"] / "stray").write_bytes(b"x")
    else:
        outside = copy["root"] / "outside.distcp"
        outside.write_bytes(data)
        shard.unlink()
        shard.symlink_to(outside)
    ok, why = ckpt.verify(str(copy["dcp"]))
    assert not ok and reason in why
    with pytest.raises(ckpt.CheckpointError, match="Refusing to load"):
        ckpt.load_checkpoint(str(copy["dcp"]))
    if damage != "flip":  # listing checks sizes and names, never hashes
        assert listed(copy["root"])["damaged"]


def test_a_sidecar_whose_file_list_leaves_the_folder_is_refused(copy):
    side = copy["folder"] / "twin.json"
    sidecar = json.loads(side.read_text())
    sidecar["files"][0]["path"] = "../../escape"
    side.write_text(json.dumps(sidecar))
    ok, why = ckpt.verify(str(copy["dcp"]))
    assert not ok and "malformed" in why


def test_a_folder_that_is_a_link_is_refused_never_followed(copy, tmp_path):
    real = tmp_path / "elsewhere.dcp"
    shutil.move(copy["dcp"], real)
    copy["dcp"].symlink_to(real, target_is_directory=True)
    meta = listed(copy["root"])
    assert meta["refused"] and "symbolic link" in meta["error"]
    with pytest.raises(ckpt.CheckpointError):
        ckpt.delete_checkpoint(str(copy["dcp"]))
    assert real.is_dir()


# ---------------------------------------------------------------------------------------------- crashes and deletes

def test_a_save_killed_while_writing_leaves_nothing_listed_and_recovery_removes_it(copy):
    staging = dcp_checkpoint.stage(str(copy["folder"]), "cut_short", 1000)
    (copy["folder"] / os.path.basename(staging.path) / "__0_0.distcp").write_bytes(b"partial")
    assert catalogue.recover(str(copy["root"])) == ([], [])  # its writer still holds it: left alone
    staging._release()  # the writer dies
    assert all(m["name"] != "cut_short" for m in catalogue.list_checkpoints(str(copy["root"])))
    removed, problems = catalogue.recover(str(copy["root"]))
    assert removed == [os.path.basename(staging.path)] and problems == []
    assert not os.path.exists(staging.path)


def test_a_commit_cut_between_its_renames_is_finished_by_recovery(copy):
    record = ckpt.load_checkpoint(str(copy["dcp"]))
    pid = os.fork()
    if pid == 0:  # the saving process, killed between the sidecar's rename and the folder's
        real_rename = os.rename

        def killed_at_the_folder(src, dst):
            if str(dst).endswith("again.dcp"):
                os._exit(9)
            real_rename(src, dst)
        os.rename = killed_at_the_folder
        dcp_checkpoint.write_record(str(copy["folder"] / "again.dcp"), {**record, "name": "again"})
        os._exit(0)
    assert os.waitpid(pid, 0)[1] >> 8 == 9
    names = [m["name"] for m in catalogue.list_checkpoints(str(copy["root"]))]
    assert "again" not in names  # its sidecar is in place, its folder not yet: nothing to list
    catalogue.recover(str(copy["root"]))
    assert not listed(copy["root"], "again")["damaged"]
    assert ckpt.verify(str(copy["folder"] / "again.dcp"))[0]


def test_overwriting_a_folder_keeps_its_notes_and_replaces_its_files(copy):
    ckpt.update_sidecar(str(copy["dcp"]), {"notes": "kept"})
    record = ckpt.load_checkpoint(str(copy["dcp"]))
    staging = dcp_checkpoint.stage(str(copy["folder"]), "twin", 1000)
    shutil.copytree(copy["dcp"], staging.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("record.pth"))
    with pytest.raises(ckpt.CheckpointExists):
        dcp_checkpoint.commit(str(copy["folder"]), staging, {**record, "global_step": 99})
    staging = dcp_checkpoint.stage(str(copy["folder"]), "twin", 1000)
    shutil.copytree(copy["dcp"], staging.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("record.pth"))
    sidecar = dcp_checkpoint.commit(str(copy["folder"]), staging, {**record, "global_step": 99}, overwrite=True)
    assert sidecar["notes"] == "kept" and ckpt.verify(str(copy["dcp"]))[0]
    assert ckpt.load_checkpoint(str(copy["dcp"]))["global_step"] == 99
    assert not [e for e in os.listdir(copy["folder"]) if ckpt.TEMP_MARK in e]


def test_deleting_a_folder_removes_it_and_its_sidecar(copy):
    ckpt.delete_checkpoint(str(copy["dcp"]))
    assert not copy["dcp"].exists() and not (copy["folder"] / "twin.json").exists()
    assert all(m["name"] != "twin" for m in catalogue.list_checkpoints(str(copy["root"])))
    with pytest.raises(FileNotFoundError):
        ckpt.delete_checkpoint(str(copy["dcp"]))


def test_a_verify_waits_for_a_delete_of_the_same_folder(copy):
    """Concurrent requests on one folder: each holds its lock, so a verify sees it whole or not at all."""
    results = []
    threads = [threading.Thread(target=lambda: results.append(ckpt.verify(str(copy["dcp"])))) for _ in range(4)]
    threads.append(threading.Thread(target=lambda: ckpt.delete_checkpoint(str(copy["dcp"]))))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(ok or "no such checkpoint" in why for ok, why in results), results


# ---------------------------------------------------------------------------------------------- over HTTP

def test_the_api_lists_describes_downloads_verifies_compares_and_deletes_a_folder(copy, arc_data):
    app = build_app(copy["root"], arc_data)
    client = app.test_client()
    try:
        rows = client.get("/list_checkpoints").get_json()["checkpoints"]
        assert any(r["id"] == copy["id"] and not r["damaged"] for r in rows)
        assert client.get(f"/checkpoints/{copy['id']}").get_json()["format"] == "dcp"
        download = client.get(f"/checkpoints/{copy['id']}/download")
        assert download.status_code == 200 and download.mimetype == "application/x-tar"
        assert int(download.headers["Content-Length"]) == len(download.data)
        with tarfile.open(fileobj=io.BytesIO(download.data)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        sidecar = json.loads((copy["folder"] / "twin.json").read_text())
        assert {n: hashlib.sha256(b).hexdigest() for n, b in members.items()} == \
            {f"twin.dcp/{f['path']}": f["sha256"] for f in sidecar["files"]}
        verified = client.post(f"/checkpoints/{copy['id']}/verify", json={}, headers=JSON).get_json()
        assert verified["ok"]
        pth_id = copy["id"].replace("twin", "best_model")
        same = client.get(f"/compare?a={pth_id}&b={copy['id']}").get_json()
        assert same["tensor_changes"] and all(c["l2_diff"] == 0 for c in same["tensor_changes"])
        assert client.delete(f"/checkpoints/{copy['id']}", json={}).status_code == 200
        assert not copy["dcp"].exists()
    finally:
        app.extensions["trainer"].shutdown()


# ---------------------------------------------------------------------------------------------- load_checkpoint.py

def cli(*args):
    """load_checkpoint.py as a user runs it: a process of its own."""
    return subprocess.run([sys.executable, "load_checkpoint.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def main(capsys, *args):
    """load_checkpoint.main in this process (no torch start-up to pay): (exit code, stdout, stderr)."""
    import load_checkpoint
    try:
        code = load_checkpoint.main(list(map(str, args)))
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_consolidate_gives_a_plain_torch_file_and_to_dcp_gives_the_folder_back(copy, tmp_path, capsys):
    out = tmp_path / "one.pth"
    done = cli(copy["dcp"], "--consolidate", out)
    assert done.returncode == 0, done.stderr
    assert "wrote " + str(out) in done.stdout
    record = torch.load(out)  # weights_only, the default
    from train import build_model
    model = build_model(record["config"], record.get("num_classes", 0))
    model.load_state_dict(record["model_state_dict"])  # the guide's loading example
    assert ckpt.verify(str(out))[0]
    back = tmp_path / "back.dcp"
    code, _, err = main(capsys, out, "--to-dcp", back, "--info-only")
    assert code == 0, err
    assert_same(ckpt.load_checkpoint(str(back))["model_state_dict"], record["model_state_dict"])
    code, _, err = main(capsys, copy["dcp"], "--consolidate", out, "--info-only")
    assert code == 1 and "already exists" in err and len(err.splitlines()) == 1


def test_info_only_reads_no_shard(copy, capsys):
    shard = copy["dcp"] / "__0_0.distcp"
    shard.write_bytes(b"\0" * shard.stat().st_size)  # same size, nothing loadable
    code, out, err = main(capsys, copy["dcp"], "--info-only", "--skip-verify", "--json")
    assert code == 0, err
    report = json.loads(out)["metadata"]
    assert report["global_step"] == 4 and report["format"] == "dcp"
    assert report["shards"]["model.example_encoder.encoder.color_embedding.weight"]["shape"][1] == 4
    code, _, err = main(capsys, copy["dcp"], "--skip-verify")
    assert code == 1 and "shards do not load" in err


@pytest.mark.parametrize("args, message", [
    (["x.pth", "--consolidate", "y.pth"], "--consolidate turns a .dcp folder into OUT.pth"),
    (["x.dcp", "--to-dcp", "y.dcp"], "--to-dcp turns a .pth into OUT.dcp"),
])
def test_conversions_refuse_the_wrong_kinds(args, message, capsys):
    code, _, err = main(capsys, *args)
    assert code == 2 and message in err


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_metadata_file_that_would_run_code_is_refused_without_running_it(copy, tmp_path):
    """DCP reads .metadata with pickle: a hostile folder (whose sidecar lists its files truly) must not run."""
    import pickle
    marker = tmp_path / "ran"
    (copy["dcp"] / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    side = copy["folder"] / "twin.json"
    sidecar = json.loads(side.read_text())
    sidecar["files"] = dcp_checkpoint.manifest(str(copy["dcp"]))
    sidecar["sha256"] = dcp_checkpoint.manifest_digest(sidecar["files"])
    side.write_text(json.dumps(sidecar))
    assert ckpt.verify(str(copy["dcp"]))[0]  # its files are what its sidecar says: only their contents lie
    with pytest.raises(ckpt.CheckpointError, match="would run code from the file; refused"):
        ckpt.load_checkpoint(str(copy["dcp"]))
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        dcp_checkpoint.read_record(str(copy["dcp"]), verify_file=False)
    assert not marker.exists()


def test_a_rank_that_fails_to_write_its_part_fails_the_save_naming_the_cause():
    """DCP raises its CheckpointException (a BaseException) with each rank's failure; the save fails as a
    CheckpointError caused by that OSError, so its checkpoint_error's reason is the errno's name (ENOSPC)."""
    import concurrent.futures
    import errno
    from types import SimpleNamespace

    from torch.distributed.checkpoint.api import CheckpointException

    import checkpoint_manager
    upload = concurrent.futures.Future()
    upload.set_exception(CheckpointException("write", {1: OSError(errno.ENOSPC, "No space left on device")}))
    save = dcp_checkpoint.ShardedSave(response=SimpleNamespace(upload_completion=upload))
    with pytest.raises(ckpt.CheckpointError, match="No space left on device") as failed:
        save.wait_uploaded()
    job = SimpleNamespace(cancel=threading.Event())
    assert checkpoint_manager._failure_reason(job, failed.value) == "ENOSPC"


def test_load_checkpoint_verifies_compares_and_lists_a_folder_like_a_file(copy, capsys):
    code, out, err = main(capsys, copy["dcp"], "--verify", "--info-only")
    assert code == 0 and "verify: OK: every file's size and SHA-256 match" in out, err
    pth = copy["folder"] / "best_model.pth"
    code, out, err = main(capsys, "--compare", pth, copy["dcp"], "--json")
    assert code == 0, err
    changes = json.loads(out)["tensor_changes"]
    assert changes and all(c["l2_diff"] == 0 for c in changes)
    code, out, err = main(capsys, "--list", copy["root"], "--json")
    assert code == 0, err
    row = next(m for m in json.loads(out)["checkpoints"] if m["name"] == "twin")
    assert row["format"] == "dcp" and not row["damaged"]
    (copy["dcp"] / "__0_0.distcp").write_bytes(b"x")
    code, _, err = main(capsys, copy["dcp"], "--verify")
    assert code == 1 and "__0_0.distcp is 1 bytes" in err and len(err.strip().splitlines()) == 1
