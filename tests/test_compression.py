"""Save options: contents (full, weights, weights-bf16) and compression (none, zstd), through the trainer, the
files they write, the catalogue, load_checkpoint.py and the HTTP API; and .pth.zst files that lie."""
import io
import json
import os
import queue
import shutil

import pytest
import requests
import torch
import zstandard

import catalogue
import checkpoint as ckpt
import load_checkpoint
from conftest import tiny_config, wait_for, write_task_folder
from data import load_data
from test_live import start
from train import Trainer

OPTIONS = [(contents, compression) for contents in ckpt.CONTENTS for compression in ckpt.COMPRESSIONS]


def option_name(contents, compression):
    return f"{contents} {compression}"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = write_task_folder(str(tmp_path_factory.mktemp("tasks")))
    return {"folder": folder, "data": load_data(data_dir=folder)}


def run(checkpoint_dir, tasks, saves=(), **changes):
    """A tiny run whose saves (dicts of save-command fields) are served before its first step; (trainer, events)."""
    events, commands = [], queue.Queue()
    for save in saves:
        commands.put({"type": "save", "request_id": save["name"], **save})
    config = tiny_config(checkpoint_dir, data_dir=tasks["folder"], checkpoint_every_epochs=0, **changes)
    trainer = Trainer(config, tasks["data"], "cpu", str(checkpoint_dir), events.append, commands)
    trainer.train()
    return trainer, events


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tasks):
    """One run that saved its first step under every option: {(contents, compression): checkpoint_saved event}."""
    root = tmp_path_factory.mktemp("checkpoints")
    saves = [{"name": option_name(*o), "contents": o[0], "compression": o[1]} for o in OPTIONS]
    trainer, events = run(root, tasks, saves)
    assert not [e for e in events if e["type"] == "checkpoint_error"], events
    by_name = {e["name"]: e for e in events if e["type"] == "checkpoint_saved"}
    started = next(e for e in events if e["type"] == "training_started")
    return {"root": str(root), "trainer": trainer, "started": started,
            "events": {o: by_name[option_name(*o)] for o in OPTIONS}}


def plain_record(path):
    """What plain torch.load gives for a checkpoint file: a .pth.zst decompressed first (as --decompress does)."""
    if not ckpt.is_compressed(path):
        return torch.load(path)
    with open(path, "rb") as f:
        return torch.load(io.BytesIO(zstandard.ZstdDecompressor().stream_reader(f).read()))


# ---------------------------------------------------------------------------------------------- what is written

def test_every_option_writes_what_it_says(saved):
    full = plain_record(saved["events"][("full", "none")]["path"])
    for (contents, compression), event in saved["events"].items():
        path = event["path"]
        assert path.endswith(".pth.zst" if compression == "zstd" else ".pth") and os.path.isfile(path)
        assert (event["contents"], event["compression"]) == (contents, compression)
        assert ckpt.verify(path)[0], ckpt.verify(path)
        sidecar = ckpt.read_sidecar(path)
        assert sidecar["size"] == os.path.getsize(path) and sidecar["sha256"] == ckpt.file_sha256(path)
        record = plain_record(path)
        weight = record["model_state_dict"]["example_encoder.encoder.convs.0.weight"]
        if compression == "zstd":
            assert sidecar["compression"] == "zstd" and sidecar["payload_size"] > sidecar["size"] * 0.5
            assert len(sidecar["payload_sha256"]) == 64
        else:
            assert "compression" not in sidecar and "payload_sha256" not in sidecar
        if contents == "full":
            assert record["optimizer_state_dict"]["param_groups"] and "contents" not in sidecar
            assert weight.dtype == torch.float32
            continue
        assert record["optimizer_state_dict"] is None and record["rng_state"] is None
        assert sidecar["contents"] == record["contents"] == contents
        assert sidecar["resumable"] is False and record["resumable"] is False
        assert weight.dtype == (torch.bfloat16 if contents == "weights-bf16" else torch.float32)
        loaded = ckpt.load_checkpoint(path)  # weights come back in the dtype they were trained in
        for key, tensor in full["model_state_dict"].items():
            back = loaded["model_state_dict"][key]
            assert back.dtype == tensor.dtype, key
            expected = tensor.to(torch.bfloat16).to(tensor.dtype) if contents == "weights-bf16" else tensor
            assert torch.equal(back, expected), key
        if contents == "weights-bf16":
            assert sidecar["cast"]["dtype"] == "bfloat16"
            assert sidecar["cast"]["from"]["model_state_dict"]["example_encoder.encoder.convs.0.weight"] == "float32"
        # the encoder's weights are the model's: stored once, not twice
        encoder = record["encoder_state_dict"]["convs.0.weight"]
        assert encoder.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()


def test_sizes_and_estimates_shrink_in_the_expected_order(saved):
    size = {o: saved["events"][o]["size"] for o in OPTIONS}
    payload = {o: ckpt.read_sidecar(saved["events"][o]["path"]).get("payload_size", size[o]) for o in OPTIONS}
    for contents in ckpt.CONTENTS:
        assert size[(contents, "zstd")] < size[(contents, "none")] == payload[(contents, "zstd")]
    assert size[("weights-bf16", "none")] < size[("weights", "none")] < size[("full", "none")]
    estimates = saved["started"]["checkpoint_estimates"]
    assert set(estimates) == set(ckpt.CONTENTS)
    assert estimates["full"] == saved["started"]["checkpoint_estimate_bytes"]
    # each estimate is what the file takes, within its 256 kB margin; a full one before the first step has no Adam
    # moments yet, so it takes less than estimated
    assert estimates["full"] > size[("full", "none")]
    for contents in ("weights", "weights-bf16"):
        assert 0 <= estimates[contents] - size[(contents, "none")] < 300_000, contents


def test_resuming_weights_is_refused_and_fine_tuning_from_them_works(saved, tasks, tmp_path):
    for contents in ("weights", "weights-bf16"):
        path = saved["events"][(contents, "zstd")]["path"]
        trainer = Trainer(tiny_config(tmp_path, data_dir=tasks["folder"]), tasks["data"], "cpu", str(tmp_path),
                          lambda e: None)
        with pytest.raises(ValueError, match="holds weights only .* cannot be resumed; fine-tune from it") as error:
            trainer.resume(path)
        assert "\n" not in str(error.value)
        trainer.setup()
        trainer.load_weights(path)
        expected = ckpt.load_checkpoint(path)["model_state_dict"]
        for key, tensor in trainer.raw_model.state_dict().items():
            assert tensor.dtype == expected[key].dtype and torch.equal(tensor, expected[key]), key
    resumed = Trainer(tiny_config(tmp_path, data_dir=tasks["folder"]), tasks["data"], "cpu", str(tmp_path),
                      lambda e: None)
    record = resumed.resume(saved["events"][("full", "zstd")]["path"])  # a full one resumes, compressed or not
    assert resumed.global_step == record["global_step"] and resumed.parent["name"] == "full zstd"


# ---------------------------------------------------------------------------------------------- one name, one file

def test_a_name_has_one_checkpoint_in_either_form(saved, tmp_path):
    record = ckpt.load_checkpoint(saved["events"][("full", "none")]["path"])
    folder = str(tmp_path / "forms")
    ckpt.write_checkpoint(folder, {**record, "name": "one"})
    with pytest.raises(ckpt.CheckpointExists):
        ckpt.write_checkpoint(folder, {**record, "name": "one"}, compression="zstd")
    ckpt.update_sidecar(os.path.join(folder, "one.pth"), {"notes": "kept"})
    sidecar = ckpt.write_checkpoint(folder, {**record, "name": "one"}, compression="zstd", overwrite=True)
    assert sorted(f for f in os.listdir(folder) if not f.startswith(".")) == ["one.json", "one.pth.zst"]
    assert sidecar["notes"] == "kept" and sidecar["file"] == "one.pth.zst"
    ckpt.write_checkpoint(folder, {**record, "name": "one"}, overwrite=True)  # and back
    assert sorted(f for f in os.listdir(folder) if not f.startswith(".")) == ["one.json", "one.pth"]
    ckpt.delete_checkpoint(os.path.join(folder, "one.pth"))
    assert [f for f in os.listdir(folder) if not f.startswith(".")] == []


def test_both_forms_on_disk_list_once_and_verify_says_which_is_the_checkpoint(saved, tmp_path):
    """An overwrite into the other form cut short after its commit leaves the old file beside the new one."""
    root = tmp_path / "root"
    folder = catalogue.checkpoint_folder(str(root), catalogue.LEGACY_RUN)
    os.makedirs(folder)
    source = saved["events"][("weights", "none")]["path"]
    ckpt.write_checkpoint(folder, {**ckpt.load_checkpoint(source), "name": "both"}, compression="zstd")
    shutil.copyfile(source, os.path.join(folder, "both.pth"))  # the old form, still beside the new one
    listed = [m for m in catalogue.list_checkpoints(str(root)) if m["name"] == "both"]
    assert len(listed) == 1 and listed[0]["file"] == "both.pth.zst" and not listed[0]["damaged"]
    assert "both.pth is on disk under the same name" in listed[0]["problems"][0]
    assert catalogue.locate(str(root), "both").path.endswith("both.pth.zst")
    assert ckpt.verify(os.path.join(folder, "both.pth.zst"))[0]
    ok, reason = ckpt.verify(os.path.join(folder, "both.pth"))
    assert not ok and "a plain .pth, but its sidecar records compression 'zstd' (it describes both.pth.zst)" in reason
    assert catalogue.list_runs(str(root))[-1]["checkpoints"] == 1


def test_a_save_cut_short_between_its_renames_is_finished_by_recovery(saved, tmp_path):
    record = ckpt.load_checkpoint(saved["events"][("full", "none")]["path"])
    folder = str(tmp_path)
    ckpt.write_checkpoint(folder, {**record, "name": "cut"}, compression="zstd")
    leftover = os.path.join(folder, ".cut.pth.zst.tmp-0123abcd")
    os.replace(os.path.join(folder, "cut.pth.zst"), leftover)  # the sidecar is in place, the file is not yet
    removed, problems = ckpt.recover_folder(folder)
    assert not problems and not os.path.exists(leftover)
    assert ckpt.verify(os.path.join(folder, "cut.pth.zst"))[0]


# ---------------------------------------------------------------------------------------------- files that lie

@pytest.fixture
def zstd_file(saved, tmp_path):
    """A copy of the compressed full checkpoint with its sidecar, under a new name; returns (path, bytes)."""
    source = saved["events"][("full", "zstd")]["path"]
    data = open(source, "rb").read()

    def make(name, content=None, sidecar_changes=None, sidecar=True):
        path = str(tmp_path / f"{name}.pth.zst")
        with open(path, "wb") as f:
            f.write(data if content is None else content)
        if sidecar:
            fields = {**ckpt.read_sidecar(source), "name": name, "file": os.path.basename(path),
                      **(sidecar_changes or {})}
            with open(ckpt.sidecar_path(path), "w") as f:
                json.dump(fields, f)
        return path
    make.data = data
    return make


def test_a_truncated_zst_fails_verification_and_loading(zstd_file):
    path = zstd_file("truncated", zstd_file.data[:len(zstd_file.data) // 2])
    ok, reason = ckpt.verify(path)
    assert not ok and "truncated or replaced" in reason
    with pytest.raises(ckpt.CheckpointError, match="truncated or replaced"):
        ckpt.load_checkpoint(path)
    bare = zstd_file("bare_truncated", zstd_file.data[:len(zstd_file.data) // 2], sidecar=False)
    with pytest.raises(ckpt.CheckpointError, match="not a loadable checkpoint"):
        ckpt.load_checkpoint(bare, verify_file=False)
    meta = ckpt.read_metadata(bare)
    assert meta["damaged"] and meta["error"].startswith("unreadable")


def test_a_file_that_is_not_zstd_is_refused(zstd_file):
    path = zstd_file("not_zstd", b"PK\x03\x04 certainly not zstd" * 100, sidecar=False)
    with pytest.raises(ckpt.CheckpointError, match="not zstd-compressed data"):
        ckpt.load_checkpoint(path, verify_file=False)
    assert ckpt.read_metadata(path)["damaged"]
    forged = zstd_file("forged", b"garbage" * 100)
    ckpt.update_sidecar(forged, {"size": os.path.getsize(forged), "sha256": ckpt.file_sha256(forged)})
    ok, reason = ckpt.verify(forged)
    assert not ok and "not zstd-compressed data" in reason


def test_a_zstd_bomb_is_refused_without_decompressing_it_whole(zstd_file, tmp_path):
    bomb = io.BytesIO()
    with zstandard.ZstdCompressor(level=1).stream_writer(bomb, closefd=False) as writer:
        zeros = bytes(1 << 20)
        for _ in range(256):  # 256 MB of zeros in a few kB
            writer.write(zeros)
    assert len(bomb.getvalue()) < 100_000
    path = zstd_file("bomb", bomb.getvalue(), sidecar=False)
    with pytest.raises(ckpt.CheckpointError, match="refused as a zstd bomb"):
        ckpt.load_checkpoint(path, verify_file=False)
    lying = zstd_file("lying_bomb", bomb.getvalue(), sidecar_changes={"payload_size": 1000})
    ckpt.update_sidecar(lying, {"size": os.path.getsize(lying), "sha256": ckpt.file_sha256(lying)})
    ok, reason = ckpt.verify(lying)
    assert not ok and "more than 1,000 bytes" in reason


def test_a_sidecar_lying_about_compression_or_payload_fails_verification(zstd_file, saved, tmp_path):
    says_plain = zstd_file("says_plain", sidecar_changes={"compression": "none"})
    assert "its sidecar records compression 'none'" in ckpt.verify(says_plain)[1]
    says_zstd = str(tmp_path / "says_zstd.pth")
    shutil.copyfile(saved["events"][("full", "none")]["path"], says_zstd)
    with open(ckpt.sidecar_path(says_zstd), "w") as f:
        json.dump({**ckpt.read_sidecar(saved["events"][("full", "none")]["path"]), "compression": "zstd"}, f)
    assert "a plain .pth, but its sidecar records compression 'zstd'" in ckpt.verify(says_zstd)[1]
    wrong_payload = zstd_file("wrong_payload", sidecar_changes={"payload_sha256": "0" * 64})
    ok, reason = ckpt.verify(wrong_payload)
    assert not ok and "decompressed payload's SHA-256 does not match" in reason
    with pytest.raises(ckpt.CheckpointError, match="payload's SHA-256 does not match"):
        ckpt.load_checkpoint(wrong_payload)
    unknown = zstd_file("unknown", sidecar_changes={"compression": "lzma"})
    assert "compression: expected one of none, zstd; ignored" in ckpt.inspect_sidecar(unknown)[1]


# ---------------------------------------------------------------------------------------------- load_checkpoint.py

def cli(capsys, *argv):
    """load_checkpoint.py in this process: (exit code, stdout, stderr); a usage error exits as the CLI would."""
    try:
        code = load_checkpoint.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_reads_exports_and_decompresses(saved, tmp_path, capsys):
    full_zst = saved["events"][("full", "zstd")]["path"]
    code, out, _ = cli(capsys, full_zst, "--verify", "--json")
    report = json.loads(out)
    assert code == 0 and report["verify"]["ok"] and report["metadata"]["compression"] == "zstd"
    assert report["model"]["parameters"] > 0
    code, out, _ = cli(capsys, "--compare", saved["events"][("full", "none")]["path"], full_zst, "--json")
    assert code == 0 and all(c["l2_diff"] == 0 for c in json.loads(out)["tensor_changes"])
    plain = tmp_path / "plain.pth"
    assert cli(capsys, full_zst, "--info-only", "--decompress", plain)[0] == 0
    assert torch.load(plain)["global_step"] == torch.load(saved["events"][("full", "none")]["path"])["global_step"]
    assert ckpt.verify(str(plain))[0] and "compression" not in ckpt.read_sidecar(str(plain))
    small = tmp_path / "small.pth.zst"
    code, out, _ = cli(capsys, plain, "--info-only", "--export", small, "--contents", "weights-bf16",
                       "--compression", "zstd")
    assert code == 0 and f"wrote {small}" in out
    sidecar = ckpt.read_sidecar(str(small))
    assert sidecar["contents"] == "weights-bf16" and sidecar["compression"] == "zstd" and ckpt.verify(str(small))[0]
    assert sidecar["size"] < os.path.getsize(plain) / 2  # no Adam moments at step 0: bf16 halves the weights
    code, out, _ = cli(capsys, "--list", saved["root"])
    assert code == 0 and out.count(f"{saved['events'][('full', 'zstd')]['run_id']}:full zstd ") == 1


def test_cli_refuses_bad_options_in_one_line(saved, tmp_path, capsys):
    path = saved["events"][("weights", "none")]["path"]
    for argv, expected in (
            (("--export", tmp_path / "x.pth", "--contents", "half"), "contents must be one of full, weights, "
                                                                     "weights-bf16, got 'half'"),
            (("--export", tmp_path / "x.pth", "--compression", "gzip"), "compression must be one of none, zstd, "
                                                                        "got 'gzip'"),
            (("--export", tmp_path / "x.pth", "--compression", "zstd"), "its name must end .pth.zst")):
        code, _, err = cli(capsys, path, *argv)
        assert code == 2 and err.count("\n") == 1 and expected in err, err
    code, _, err = cli(capsys, path, "--info-only", "--export", tmp_path / "up.pth", "--contents", "full")
    assert code == 1 and err.count("\n") == 1 and "holds weights only (contents weights)" in err
    code, _, err = cli(capsys, path, "--info-only", "--export", tmp_path / os.path.basename(path))
    assert code == 0  # another folder: a copy
    code, _, err = cli(capsys, path, "--info-only", "--export", path)
    assert code == 1 and "would replace the checkpoint" in err


def test_cli_decompress_and_export_need_names_that_say_their_form(saved, tmp_path, capsys):
    plain = saved["events"][("full", "none")]["path"]
    code, _, err = cli(capsys, plain, "--decompress", tmp_path / "out.pth")
    assert code == 2 and "--decompress turns a .pth.zst into OUT.pth" in err
    code, _, err = cli(capsys, plain, "--compression", "zstd")
    assert code == 2 and "--contents and --compression only apply to --export" in err


def test_dcp_folders_hold_the_full_state_uncompressed_only():
    import store
    store.check_folder_options("full", "none")
    for contents, compression in (("weights", "none"), ("full", "zstd")):
        with pytest.raises(ValueError, match="multi-process run saves DCP folders"):
            store.check_folder_options(contents, compression)
    with pytest.raises(ValueError, match="got 'lz4'"):
        store.check_folder_options("full", "lz4")


# ---------------------------------------------------------------------------------------------- HTTP

def test_the_api_saves_with_options_lists_them_and_refuses_bad_ones(live_server):
    url = live_server.url
    run_id = start(live_server)
    try:
        for body, named in (({"contents": "half"}, "'half'"), ({"compression": "gzip"}, "'gzip'"),
                            ({"contents": 3}, "3")):
            answer = requests.post(url + "/save_checkpoint", json=body, timeout=10)
            assert answer.status_code == 400 and named in answer.json()["error"], answer.text
        answer = requests.post(url + "/save_checkpoint", json={"name": "archived", "contents": "weights",
                                                               "compression": "zstd", "wait": True}, timeout=60)
        assert answer.status_code == 200, answer.text
        outcome = answer.json()
        assert outcome["path"].endswith("archived.pth.zst") and outcome["contents"] == "weights"
        again = requests.post(url + "/save_checkpoint", json={"name": "archived", "wait": True}, timeout=60)
        assert again.status_code == 409  # the name is taken, whatever the form
        status = requests.get(url + "/status", timeout=10).json()
        assert set(status["checkpoint_estimates"]) == set(ckpt.CONTENTS)
    finally:
        requests.post(url + "/stop", json={}, timeout=10)
    wait_for(lambda: requests.get(url + "/status", timeout=10).json()["phase"] == "finished", what="the run to end")
    listed = [c for c in requests.get(url + "/list_checkpoints", timeout=10).json()["checkpoints"]
              if c["name"] == "archived"]
    assert len(listed) == 1 and (listed[0]["contents"], listed[0]["compression"]) == ("weights", "zstd")
    assert listed[0]["resume_command"] is None and listed[0]["file"] == "archived.pth.zst"
    ident = f"{run_id}:archived"
    assert requests.post(f"{url}/checkpoints/{ident}/verify", json={}, timeout=30).json()["ok"]
    refused = requests.post(url + "/start_training", json={"resume_from": ident}, timeout=10)
    assert refused.status_code == 400 and "cannot be resumed" in refused.json()["error"]
    started = requests.post(url + "/start_training", json={"fine_tune_from": ident, "epochs": 1}, timeout=10)
    assert started.status_code == 202, started.text
    run = wait_for(lambda: (s := requests.get(url + "/status", timeout=10).json())["global_step"] > 0
                   and s["run_id"] == started.json()["run_id"] and s, what="the fine-tuning run to take steps")
    requests.post(url + "/stop", json={}, timeout=10)
    assert run["phase"] in ("training", "stopping", "finished")
