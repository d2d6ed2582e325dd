"""checkpoint.py: the record round trip, sidecar and verification, atomic writes under SIGKILL, disk full and
permission denied, name rules, listing, the background writer and snapshots that are never torn."""
import copy
import errno
import gc
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import weakref

import pytest
import torch

import catalogue
import checkpoint as ckpt
import checkpoint_manager
from conftest import assert_same, mount_tmpfs
from train import TrainConfig, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record_fields(name="run", kind="manual", global_step=7, width=64, folder="unused", seed=0):
    """Keyword arguments of save_full_checkpoint, as the trainer builds them, for a small real model."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(3, width)).sum().backward()
    optimizer.step()
    config = TrainConfig().to_dict()
    trainer = Trainer(TrainConfig(), None, "cpu", str(folder), lambda event: None)
    return {
        "name": name, "kind": kind, "config": config, "model_state_dict": model.state_dict(),
        "encoder_state_dict": {k[2:]: v for k, v in model.state_dict().items() if k.startswith("0.")},
        "optimizer_state_dict": optimizer.state_dict(),
        "progress": {"epoch": 1, "batch": 3, "global_step": global_step, "val_loss": 0.5, "val_acc": 0.25},
        "rng_state": trainer._rng_state(),
        "dataset": {"name": "arcagi", "split_seed": 0, "num_puzzles": 800},
        "metrics": {"train": {"loss": 1.5, "acc": 0.5}, "val": {"loss": 0.5, "acc": 0.25, "message_collapse": False}},
        "extra": {"num_classes": 0, "trainer": {"best_val_loss": 0.5, "phase": "training"}},
    }


def save(folder, name="run", **kwargs):
    options = {k: kwargs.pop(k) for k in ("overwrite", "verify_after_save") if k in kwargs}
    return ckpt.save_full_checkpoint(str(folder), **record_fields(name, folder=folder, **kwargs), **options)


def dot_files(folder):
    """Hidden files but the lock files, which stay by design (each checkpoint is locked through its own)."""
    return sorted(n for n in os.listdir(folder) if n.startswith(".") and not n.endswith(ckpt.LOCK_SUFFIX))


def files(folder):
    """What a user sees in a folder: every file but the hidden lock files."""
    return sorted(n for n in os.listdir(folder) if not n.endswith(ckpt.LOCK_SUFFIX))


# ---------------------------------------------------------------------------------------------- the record

def test_every_top_level_key_round_trips(tmp_path):
    fields = record_fields("round trip", folder=tmp_path)
    sidecar = ckpt.save_full_checkpoint(str(tmp_path), **fields)
    record = ckpt.load_checkpoint(str(tmp_path / "round trip.pth"))
    config = fields["config"]
    expected = {
        "format_version": ckpt.FORMAT_VERSION, "name": "round trip", "kind": "manual",
        "epoch": 1, "batch": 3, "global_step": 7, "val_loss": 0.5, "val_acc": 0.25,
        "model_state_dict": fields["model_state_dict"], "encoder_state_dict": fields["encoder_state_dict"],
        "optimizer_state_dict": fields["optimizer_state_dict"], "config": config,
        "rng_state": fields["rng_state"], "dataset": fields["dataset"], "metrics": fields["metrics"],
        "versions": {"torch": str(torch.__version__), "project": ckpt.PROJECT_VERSION},
        "num_classes": 0, "trainer": {"best_val_loss": 0.5, "phase": "training"},
        **{key: config[key] for key in ckpt.FLAT_CONFIG_KEYS},
    }
    created_at = record.pop("created_at")
    assert created_at.endswith("Z") and created_at == sidecar["created_at"]
    assert_same(expected, record)
    assert record["vocab_size"] == config["vocab_size"] == 10
    # The sidecar holds every field but the tensors, plus the file's size and hash.
    plain = (set(record) | {"created_at"}) - set(ckpt.TENSOR_KEYS)
    assert set(sidecar) == plain | {"file", "size", "sha256", "verified_at"}
    on_disk = json.loads((tmp_path / "round trip.json").read_text())
    assert on_disk == json.loads(json.dumps(sidecar, default=str))


def test_loads_with_plain_torch_load(tmp_path):
    save(tmp_path, "plain")
    record = torch.load(str(tmp_path / "plain.pth"))  # weights_only is torch's default
    assert record["name"] == "plain" and "model_state_dict" in record
    record = torch.load(str(tmp_path / "plain.pth"), weights_only=True)
    assert isinstance(record["rng_state"]["generator"], torch.Tensor)


def test_sidecar_has_the_size_and_sha256_of_the_file(tmp_path):
    sidecar = save(tmp_path, "hashed")
    data = (tmp_path / "hashed.pth").read_bytes()
    assert sidecar["file"] == "hashed.pth"
    assert sidecar["size"] == len(data)
    assert sidecar["sha256"] == hashlib.sha256(data).hexdigest()
    assert sidecar["verified_at"] is None
    assert ckpt.verify(str(tmp_path / "hashed.pth")) == (True, "size and SHA-256 match")


@pytest.mark.parametrize("parallel_from", [None, 1], ids=["large-chunks-in-helper", "every-chunk-in-helper"])
def test_hashing_beside_the_write_matches_the_file_and_torch_crc_setting_is_restored(tmp_path, monkeypatch,
                                                                                      parallel_from):
    import zipfile

    from torch.utils.serialization import config
    if parallel_from is not None:
        monkeypatch.setattr(ckpt._HashingFile, "PARALLEL_FROM", parallel_from)
    sidecar = save(tmp_path, "big", width=40_000)  # a 1.3 MB weight: one chunk over PARALLEL_FROM's default
    data = (tmp_path / "big.pth").read_bytes()
    assert sidecar["size"] == len(data) > 1 << 20
    assert sidecar["sha256"] == hashlib.sha256(data).hexdigest()
    assert config.save.compute_crc32 is True  # the user's torch.save keeps its CRC
    assert zipfile.ZipFile(tmp_path / "big.pth").testzip() is not None  # ours skipped it: the SHA-256 covers all
    assert torch.load(str(tmp_path / "big.pth"))["model_state_dict"]["0.weight"].shape == (8, 40_000)


def _direct_io_flag_of(fd):
    import fcntl
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_direct_file_writes_exactly_the_bytes_through_a_small_staging_buffer(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt._DirectFile, "STAGING", 2 * ckpt._DirectFile.BLOCK)
    path = tmp_path / "direct.bin"
    chunks = [os.urandom(n) for n in (1, 4095, 4096, 8193, 3, 20_000, 0, 77)]
    out = ckpt.open_for_checkpoint(str(path))
    try:
        if isinstance(out, ckpt._BufferedFile):
            pytest.skip("this file system refuses O_DIRECT")
        assert _direct_io_flag_of(out.fd)
        for chunk in chunks:
            assert out.write(memoryview(chunk)) == len(chunk)
        out.finish()
    finally:
        out.close()
    assert path.read_bytes() == b"".join(chunks)  # the tail's padding was cut off


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_a_file_system_refusing_direct_writes_gets_the_rest_through_the_page_cache(tmp_path, monkeypatch):
    real_write = os.write
    refused = []

    def refuse_direct_writes(fd, data):
        if _direct_io_flag_of(fd):
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(ckpt._DirectFile, "STAGING", 2 * ckpt._DirectFile.BLOCK)
    monkeypatch.setattr(os, "write", refuse_direct_writes)
    chunks = [os.urandom(n) for n in (5000, 9000, 10)]
    out = ckpt.open_for_checkpoint(str(tmp_path / "mixed.bin"))
    try:
        if isinstance(out, ckpt._BufferedFile):
            pytest.skip("this file system refuses O_DIRECT")
        for chunk in chunks:
            out.write(chunk)
        out.finish()
        assert refused and not _direct_io_flag_of(out.fd)
    finally:
        out.close()
    assert (tmp_path / "mixed.bin").read_bytes() == b"".join(chunks)


def test_a_file_system_refusing_o_direct_gets_a_buffered_write(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    out = ckpt.open_for_checkpoint(str(tmp_path / "probe"))
    out.close()
    assert isinstance(out, ckpt._BufferedFile)
    sidecar = save(tmp_path, "buffered", width=3000)
    data = (tmp_path / "buffered.pth").read_bytes()
    assert sidecar["size"] == len(data) and sidecar["sha256"] == hashlib.sha256(data).hexdigest()
    assert torch.load(str(tmp_path / "buffered.pth"))["model_state_dict"]["0.weight"].shape == (8, 3000)


def test_verify_after_save_marks_the_sidecar(tmp_path):
    sidecar = save(tmp_path, "checked", verify_after_save=True)
    assert sidecar["verified_at"]
    assert json.loads((tmp_path / "checked.json").read_text())["verified_at"] == sidecar["verified_at"]


def test_verify_catches_truncation_and_a_flipped_bit(tmp_path):
    save(tmp_path, "cut")
    save(tmp_path, "flip")
    cut, flip = tmp_path / "cut.pth", tmp_path / "flip.pth"
    data = cut.read_bytes()
    cut.write_bytes(data[:-100])
    ok, reason = ckpt.verify(str(cut))
    assert not ok and "truncated" in reason and str(cut) in reason
    data = bytearray(flip.read_bytes())
    data[len(data) // 2] ^= 0x04
    flip.write_bytes(bytes(data))
    ok, reason = ckpt.verify(str(flip))
    assert not ok and "SHA-256" in reason
    for path in (cut, flip):
        with pytest.raises(ckpt.CheckpointError, match="Refusing to load"):
            ckpt.load_checkpoint(str(path))
    with pytest.raises(ckpt.CheckpointError, match="not a loadable checkpoint"):
        ckpt.load_checkpoint(str(cut), verify_file=False)


def test_load_refuses_an_unverifiable_file_unless_verify_file_false(tmp_path):
    save(tmp_path, "bare")
    os.remove(tmp_path / "bare.json")
    ok, reason = ckpt.verify(str(tmp_path / "bare.pth"))
    assert not ok and "no sidecar" in reason
    with pytest.raises(ckpt.CheckpointError, match="no sidecar"):
        ckpt.load_checkpoint(str(tmp_path / "bare.pth"))
    assert ckpt.load_checkpoint(str(tmp_path / "bare.pth"), verify_file=False)["name"] == "bare"


def test_load_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        ckpt.load_checkpoint(str(tmp_path / "missing.pth"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pth")
    with pytest.raises(ckpt.CheckpointError, match="no model_state_dict"):
        ckpt.load_checkpoint(str(tmp_path / "foreign.pth"), verify_file=False)
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(ckpt.CheckpointError, match="not a loadable checkpoint"):
        ckpt.load_checkpoint(str(tmp_path / "text.pth"), verify_file=False)


# ---------------------------------------------------------------------------------------------- atomicity

KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import torch
    import checkpoint as ckpt
    folder = sys.argv[1]
    big = torch.randn(5_000_000)  # 20 MB: most of the time goes into writing it
    print("ready", flush=True)
    for i in range(1000):
        name = "kept_%d" % (i % 3)  # overwrites too, so a kill can land between the two renames
        ckpt.write_checkpoint(folder, {{"name": name, "model_state_dict": {{"w": big + i}}, "global_step": i,
                                        "created_at": ckpt.utc_now()}}, overwrite=True)
        print("saved", name, i, flush=True)
""")


@pytest.mark.slow
def test_sigkill_mid_write_leaves_nothing_damaged_and_recover_cleans_up(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT.format(root=ROOT))
    temporaries_seen, announced = 0, {}
    for delay in (0.03, 0.2, 0.45, 0.8, 1.2):
        proc = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        for line in out.splitlines():
            _, name, step = line.split()
            announced[name] = int(step)
        temporaries_seen += bool(dot_files(folder))
        removed, problems = ckpt.recover_folder(str(folder))
        assert problems == []
        assert dot_files(folder) == [], f"recover() left temporaries (removed {removed})"
        listed = catalogue.list_checkpoints(str(folder))
        assert not [m for m in listed if m["damaged"]], listed
        for meta in listed:
            ok, reason = ckpt.verify(str(folder / meta["file"]))
            assert ok, reason
        # Every save announced as done is there, at least as new as announced.
        steps = {m["name"]: m["global_step"] for m in listed}
        for name, step in announced.items():
            assert steps.get(name, -1) >= step, f"{name} step {step} was announced, found {steps.get(name)}"
    assert temporaries_seen, "no kill landed in the middle of a write; the test proved nothing"


def test_recover_finishes_a_save_cut_between_its_two_renames(tmp_path):
    save(tmp_path, "cut", global_step=1)
    new = tmp_path / "new"
    save(new, "cut", global_step=2, seed=1)
    # A kill between the renames: the new sidecar is in place, the new .pth still under its temporary name.
    os.replace(new / "cut.json", tmp_path / "cut.json")
    os.replace(new / "cut.pth", tmp_path / f".cut.pth{ckpt.TEMP_MARK}0123abcd")
    assert not ckpt.verify(str(tmp_path / "cut.pth"))[0]
    removed, problems = ckpt.recover_folder(str(tmp_path))
    assert removed == [] and problems == []
    assert dot_files(tmp_path) == []
    assert ckpt.verify(str(tmp_path / "cut.pth"))[0]
    assert ckpt.load_checkpoint(str(tmp_path / "cut.pth"))["global_step"] == 2


def test_recover_finishes_a_version_0_6_pending_sidecar_and_removes_temporaries(tmp_path):
    save(tmp_path, "renamed")
    # 0.6.0 renamed the .pth first: a kill then left the new .pth in place, its sidecar still pending.
    os.replace(tmp_path / "renamed.json", tmp_path / f".renamed.json{ckpt.PENDING_SIDECAR}")
    (tmp_path / f".gone.pth{ckpt.TEMP_MARK}0123abcd").write_bytes(b"half a file")
    (tmp_path / f".gone.json{ckpt.PENDING_SIDECAR}").write_text("{}")
    (tmp_path / f".x.json{ckpt.TEMP_MARK}77").write_text("{")
    removed, problems = ckpt.recover_folder(str(tmp_path))
    assert sorted(removed) == sorted([f".gone.pth{ckpt.TEMP_MARK}0123abcd", f".gone.json{ckpt.PENDING_SIDECAR}",
                                      f".x.json{ckpt.TEMP_MARK}77"])
    assert dot_files(tmp_path) == []
    assert ckpt.verify(str(tmp_path / "renamed.pth"))[0]


def failing_at(real, n, error):
    """real, except that its n-th call (1-based) raises error."""
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise error
        return real(*args, **kwargs)

    return wrapper


# Where a write can fail: torch.save, the folder fsync before the renames, the sidecar's rename, the .pth's rename
# and the last folder fsync. os.replace is patched for the whole os module, as the checkpoint code calls it.
FAILURES = {
    "torch.save": ("torch", "save", 1),
    "folder fsync before the renames": ("ckpt", "fsync_folder", 1),
    "sidecar rename": ("os", "replace", 1),
    "pth rename": ("os", "replace", 2),
    "last folder fsync": ("ckpt", "fsync_folder", 2),
}


@pytest.mark.parametrize("where", FAILURES)
def test_a_failed_overwrite_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch, where):
    save(tmp_path, "keep", global_step=1)
    before = (tmp_path / "keep.pth").read_bytes(), (tmp_path / "keep.json").read_bytes()
    module_name, attribute, n = FAILURES[where]
    module = {"torch": torch, "os": os, "ckpt": ckpt}[module_name]
    monkeypatch.setattr(module, attribute, failing_at(getattr(module, attribute), n, OSError(5, "Input/output error")))
    with pytest.raises(ckpt.CheckpointError, match="Input/output error"):
        save(tmp_path, "keep", global_step=2, seed=1, overwrite=True)
    monkeypatch.undo()
    assert dot_files(tmp_path) == []  # nothing left for recover() to find
    assert ((tmp_path / "keep.pth").read_bytes(), (tmp_path / "keep.json").read_bytes()) == before
    listed = catalogue.list_checkpoints(str(tmp_path))
    assert [(m["name"], m["damaged"]) for m in listed] == [("keep", False)]
    ok, reason = ckpt.verify(str(tmp_path / "keep.pth"))
    assert ok, reason
    assert ckpt.load_checkpoint(str(tmp_path / "keep.pth"))["global_step"] == 1


@pytest.mark.parametrize("where", FAILURES)
def test_a_failed_save_under_a_new_name_leaves_no_checkpoint(tmp_path, monkeypatch, where):
    module_name, attribute, n = FAILURES[where]
    module = {"torch": torch, "os": os, "ckpt": ckpt}[module_name]
    monkeypatch.setattr(module, attribute, failing_at(getattr(module, attribute), n, OSError(5, "Input/output error")))
    with pytest.raises(ckpt.CheckpointError, match="Input/output error"):
        save(tmp_path, "fresh")
    monkeypatch.undo()
    assert files(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path):
    yield from mount_tmpfs(tmp_path / "small", "2m")


def test_disk_full_is_a_checkpoint_error_with_no_partial_file(small_disk, monkeypatch):
    save(small_disk, "small")  # fits
    filler = small_disk / "filler.bin"
    filler.write_bytes(b"\0" * 1_400_000)
    # Refused up front: the estimate says it cannot fit.
    with pytest.raises(ckpt.CheckpointError, match="free") as info:
        save(small_disk, "medium", width=10_000)
    assert str(small_disk) in str(info.value)
    assert files(small_disk) == ["filler.bin", "small.json", "small.pth"]
    # The write itself runs out of space (the estimate fooled): still a CheckpointError and nothing left over.
    monkeypatch.setattr(ckpt, "estimate_size", lambda record: 0)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device"):
        save(small_disk, "medium", width=10_000)
    assert files(small_disk) == ["filler.bin", "small.json", "small.pth"]
    monkeypatch.undo()
    assert ckpt.verify(str(small_disk / "small.pth"))[0]
    # Free the space: the same save now works.
    filler.unlink()
    save(small_disk, "medium", width=10_000)
    assert ckpt.verify(str(small_disk / "medium.pth"))[0]
    assert [m["name"] for m in catalogue.list_checkpoints(str(small_disk)) if not m["damaged"]] == ["medium", "small"]


PERMISSION_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import torch
    import checkpoint as ckpt
    try:
        ckpt.write_checkpoint(sys.argv[1], {{"name": "denied", "model_state_dict": {{"w": torch.zeros(3)}}}})
    except ckpt.CheckpointError as e:
        print("CheckpointError:", e)
""")


def test_permission_denied_is_a_checkpoint_error(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    os.chmod(folder, 0o500)
    try:
        probe = folder / "probe"
        try:
            probe.write_text("x")
            can_write = True
            probe.unlink()
        except PermissionError:
            can_write = False
        if not can_write:
            with pytest.raises(ckpt.CheckpointError, match="Permission denied") as info:
                save(folder, "denied")
            message = str(info.value)
        else:  # root: drop the capability that lets root ignore permissions, in a child process
            if shutil.which("setpriv") is None:
                pytest.skip("running as root and setpriv is missing: root can write to a 0o500 folder")
            script = tmp_path / "denied.py"
            script.write_text(PERMISSION_SCRIPT.format(root=ROOT))
            caps = "-dac_override,-dac_read_search"
            result = subprocess.run(["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", sys.executable,
                                     str(script), str(folder)], capture_output=True, text=True, cwd=ROOT, timeout=120)
            if "Operation not permitted" in result.stderr and "setpriv" in result.stderr:
                pytest.skip(f"cannot drop capabilities here: {result.stderr.strip()}")
            message = result.stdout
            assert "CheckpointError:" in message, result.stdout + result.stderr
            assert "Permission denied" in message
        assert "denied" in message and str(folder) in message
        assert files(folder) == []
    finally:
        os.chmod(folder, 0o700)
    save(folder, "allowed")
    assert ckpt.verify(str(folder / "allowed.pth"))[0]


# ---------------------------------------------------------------------------------------------- names

GOOD_NAMES = ["a", "Z", "0", "run 1", "my-run_2", "x" * 100, "best_model2", "checkpoint_epoch_", "Best_Model"]
BAD_NAMES = ["", " ", "..", ".", "../x", "a/b", "/etc/passwd", "a\\b", "a\x00b", "a\nb", "tab\there", "\x7f",
             "caf\u00e9", "\u540d\u524d", "\uff41", "x" * 101, " lead", "trail ", "a.pth", "a*", "a:b", "~"]
RESERVED = ["best_model", "checkpoint_epoch_3", "autosave_step_120", "pretrained_encoder_binary",
            "pretrained_encoder_selection"]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_check_name_accepts(name):
    assert ckpt.check_name(name) == name


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:20] for n in BAD_NAMES])
def test_check_name_refuses(name):
    with pytest.raises(ValueError, match="letters, digits, spaces, hyphens and underscores"):
        ckpt.check_name(name)
    with pytest.raises(ValueError):
        ckpt.check_name(name, automatic=True)
    with pytest.raises(ValueError):
        ckpt.checkpoint_path("/tmp/somewhere", name)


@pytest.mark.parametrize("name", RESERVED)
def test_reserved_names_are_for_automatic_saves_only(name, tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        ckpt.check_name(name)
    assert ckpt.check_name(name, automatic=True) == name
    with pytest.raises(ValueError, match="reserved"):
        save(tmp_path, name, kind="manual")
    save(tmp_path, name, kind="periodic")
    assert (tmp_path / f"{name}.pth").exists()


@pytest.mark.parametrize("value", [None, 3, b"bytes", ["a"]])
def test_check_name_refuses_non_strings(value):
    with pytest.raises(ValueError, match="must be a string"):
        ckpt.check_name(value)


def test_checkpoint_path_never_escapes_the_folder(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    outside = tmp_path / "outside.pth"
    outside.write_text("secret")
    assert ckpt.checkpoint_path(str(folder), "ok") == os.path.join(os.path.realpath(folder), "ok.pth")
    assert ckpt.checkpoint_path(str(folder), "ok", ".json").endswith("ok.json")
    os.symlink(outside, folder / "evil.pth")
    with pytest.raises(ValueError, match="inside the checkpoint folder"):
        ckpt.checkpoint_path(str(folder), "evil")
    with pytest.raises(ValueError):
        save(folder, "evil", overwrite=True)
    assert outside.read_text() == "secret"
    # A folder reached through a symlink is fine: only the resolved file must stay inside it.
    os.symlink(folder, tmp_path / "link")
    assert os.path.dirname(ckpt.checkpoint_path(str(tmp_path / "link"), "ok")) == os.path.realpath(folder)


def test_overwrite_is_refused_unless_asked_for(tmp_path):
    first = save(tmp_path, "same", global_step=1)
    with pytest.raises(ckpt.CheckpointError, match="already exists"):
        save(tmp_path, "same", global_step=2, seed=1)
    assert ckpt.read_sidecar(str(tmp_path / "same.pth"))["sha256"] == first["sha256"]
    assert ckpt.load_checkpoint(str(tmp_path / "same.pth"))["global_step"] == 1
    second = save(tmp_path, "same", global_step=2, seed=1, overwrite=True)
    assert second["sha256"] != first["sha256"]
    assert ckpt.load_checkpoint(str(tmp_path / "same.pth"))["global_step"] == 2
    assert dot_files(tmp_path) == []


# ---------------------------------------------------------------------------------------------- listing

def test_list_newest_first_by_stored_time(tmp_path):
    for name, step in (("oldest", 50), ("middle", 10), ("newest", 30)):
        save(tmp_path, name, global_step=step)
        time.sleep(0.01)
    # File times say the opposite: the listing must not use them.
    for i, name in enumerate(("oldest", "middle", "newest")):
        os.utime(tmp_path / f"{name}.pth", (1000 - i, 1000 - i))
    listed = catalogue.list_checkpoints(str(tmp_path))
    assert [m["name"] for m in listed] == ["newest", "middle", "oldest"]
    assert [m["global_step"] for m in listed] == [30, 10, 50]
    assert all(m["damaged"] is False and m["size"] > 0 and m["sha256"] for m in listed)
    assert catalogue.list_checkpoints(str(tmp_path / "no such folder")) == []


def test_list_shows_a_pth_without_sidecar_from_its_own_metadata(tmp_path):
    save(tmp_path, "bare", global_step=42)
    os.remove(tmp_path / "bare.json")
    [meta] = catalogue.list_checkpoints(str(tmp_path))
    assert meta["name"] == "bare" and meta["global_step"] == 42 and meta["kind"] == "manual"
    assert meta["damaged"] is False and meta["sha256"] is None
    assert meta["size"] == os.path.getsize(tmp_path / "bare.pth")
    assert "model_state_dict" not in meta and "rng_state" not in meta


def test_list_shows_damaged_and_unreadable_files_as_damaged(tmp_path):
    save(tmp_path, "good")
    save(tmp_path, "truncated")
    data = (tmp_path / "truncated.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pth").write_bytes(os.urandom(3000))
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save({"just": "a dict"}, tmp_path / "foreign.pth")
    save(tmp_path, "bad sidecar")
    (tmp_path / "bad sidecar.json").write_text("{not json")  # falls back to reading the .pth
    (tmp_path / "folder.pth").mkdir()  # not a file: not listed
    (tmp_path / ".hidden.pth").write_bytes(b"x")  # a temporary: not listed
    listed = {m["name"]: m for m in catalogue.list_checkpoints(str(tmp_path))}
    assert set(listed) == {"good", "truncated", "garbage", "empty", "foreign", "bad sidecar"}
    assert {n for n, m in listed.items() if m["damaged"]} == {"truncated", "garbage", "empty", "foreign"}
    assert all(listed[n]["error"] for n in ("truncated", "garbage", "empty", "foreign"))
    assert "truncated" in listed["truncated"]["error"]


def test_a_file_deleted_while_listing_is_skipped_not_a_crash(tmp_path, monkeypatch):
    save(tmp_path, "stays")
    save(tmp_path, "vanishes")
    real = ckpt.inspect_sidecar

    def read_then_lose(path):  # another thread deletes the checkpoint right after its sidecar is read
        sidecar = real(path)
        if path.endswith("vanishes.pth"):
            os.remove(path)
        return sidecar

    monkeypatch.setattr(ckpt, "inspect_sidecar", read_then_lose)
    assert [m["name"] for m in catalogue.list_checkpoints(str(tmp_path))] == ["stays"]


def test_two_hundred_checkpoints_list(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not what this test is about
    for i in range(200):
        ckpt.write_checkpoint(str(tmp_path), {"name": f"c{i:03d}", "model_state_dict": {"w": torch.zeros(4)},
                                              "global_step": i, "created_at": "2026-01-01T00:00:00.000Z"})
    listed = catalogue.list_checkpoints(str(tmp_path))
    assert len(listed) == 200
    # Same stored time: the stored step breaks the tie, newest first.
    assert [m["global_step"] for m in listed] == list(range(199, -1, -1))


def test_update_sidecar_and_delete(tmp_path):
    save(tmp_path, "noted")
    before = (tmp_path / "noted.pth").read_bytes()
    ckpt.update_sidecar(str(tmp_path / "noted.pth"), {"notes": "good run"})
    assert ckpt.read_sidecar(str(tmp_path / "noted.pth"))["notes"] == "good run"
    assert (tmp_path / "noted.pth").read_bytes() == before and ckpt.verify(str(tmp_path / "noted.pth"))[0]
    ckpt.delete_checkpoint(str(tmp_path / "noted.pth"))
    assert files(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        ckpt.delete_checkpoint(str(tmp_path / "noted.pth"))


# ---------------------------------------------------------------------------------------------- the writer

def test_writer_serves_jobs_in_order_and_publishes_the_outcome(tmp_path):
    events, saved = [], []
    writer = checkpoint_manager.CheckpointWriter(events.append)
    names = ["one", "two", "three", "one", "../escape", "four"]
    for i, name in enumerate(names):
        fields = record_fields(name, global_step=i, folder=tmp_path)
        writer.submit(checkpoint_manager.SaveJob(fields, str(tmp_path), "run", request_id=f"r{i}", on_saved=saved.append))
    assert writer.flush(timeout=60)
    writer.close()
    assert not writer.busy()
    progress = [(e["request_id"], e["state"]) for e in events if e["type"] == "checkpoint_progress"]
    assert sorted(progress) == sorted([(f"r{i}", s) for i in range(len(names)) for s in ("copying", "writing")])
    events = [e for e in events if e["type"] != "checkpoint_progress"]
    assert [e["request_id"] for e in events] == [f"r{i}" for i in range(len(names))]
    assert [e.get("reason") for e in events if e["type"] == "checkpoint_error"] == ["exists", "failed"]
    kinds = [e["type"] for e in events]
    assert kinds == ["checkpoint_saved"] * 3 + ["checkpoint_error"] * 2 + ["checkpoint_saved"]
    assert "already exists" in events[3]["error"] and events[3]["name"] == "one"
    assert "invalid checkpoint name" in events[4]["error"]
    ok = [e for e in events if e["type"] == "checkpoint_saved"]
    for e in ok:
        assert ckpt.verify(e["path"])[0]
        assert e["size"] == os.path.getsize(e["path"]) and e["kind"] == "manual" and e["verified"] is False
    assert [s["name"] for s in saved] == ["one", "two", "three", "four"]
    assert ckpt.load_checkpoint(str(tmp_path / "one.pth"))["global_step"] == 0


def test_writer_snapshot_is_taken_before_the_tensors_change(tmp_path):
    writer = checkpoint_manager.CheckpointWriter(lambda event: None)
    fields = record_fields("snap", folder=tmp_path)
    weight = fields["model_state_dict"]["0.weight"]
    expected = weight.clone()
    writer.submit(checkpoint_manager.SaveJob(fields, str(tmp_path), "run"))
    writer.wait_for_copies()
    weight.add_(1.0)  # what optimizer.step() does after wait_for_copies()
    writer.close()
    saved = ckpt.load_checkpoint(str(tmp_path / "snap.pth"))["model_state_dict"]["0.weight"]
    assert torch.equal(saved, expected)


def test_writer_frees_each_snapshot_once_written_and_close_ends_its_threads(tmp_path, monkeypatch):
    """A daemon thread still freeing a snapshot's tensors when the interpreter exits is killed inside torch and
    the process aborts (seen: `train.py --phase pretrain` exiting 134 one run in three). So the copies go as
    soon as they are written, and close() returns only when both threads are gone."""
    copies = []
    real_clone = checkpoint_manager.clone_tensors

    def clone_and_watch(value):
        cloned = real_clone(value)
        copies.append(weakref.ref(cloned["model_state_dict"]["0.weight"]))
        return cloned

    monkeypatch.setattr(checkpoint_manager, "clone_tensors", clone_and_watch)
    writer = checkpoint_manager.CheckpointWriter(lambda event: None)
    job = checkpoint_manager.SaveJob(record_fields("freed", folder=tmp_path), str(tmp_path), "run")
    writer.submit(job)
    assert writer.flush(timeout=60)
    gc.collect()
    assert len(copies) == 1 and copies[0]() is None and job.fields is None  # while the writer waits for more
    writer.close()
    assert not any(thread.is_alive() for thread in writer._threads)
    assert ckpt.verify(str(tmp_path / "freed.pth"))[0]


def test_clone_tensors_keeps_shared_storage_shared():
    base = torch.arange(10.0)
    value = {"a": base, "b": [base, base[2:5]], "c": (1, "x")}
    clone = checkpoint_manager.clone_tensors(value)
    assert clone["a"] is clone["b"][0]
    assert torch.equal(clone["b"][1], base[2:5]) and clone["c"] == (1, "x")
    base.zero_()
    assert clone["a"][3] == 3


def test_manual_saves_mid_run_are_never_torn(arc_data, make_config, monkeypatch):
    """Each saved weight, Adam moment and step count, epoch, batch and global_step belong to the same step,
    even when copying a snapshot is slow and training races on."""
    real_clone = checkpoint_manager.clone_tensors

    def slow_clone(value):
        time.sleep(0.1)
        return real_clone(value)

    monkeypatch.setattr(checkpoint_manager, "clone_tensors", slow_clone)
    config = make_config(task_type="selection", hidden_dim=32, latent_dim=32, max_steps=12)
    save_at = {2: ["at 2"], 5: ["at 5 a", "at 5 b"], 6: ["at 6"], 9: ["at 9"]}
    probes, events = {}, []
    trainer = None

    def publish(event):
        events.append(event)
        if event["type"] == "batch":
            step = event["global_step"]
            probes[step] = {"model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
                            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
                            "epoch": event["epoch"], "batch": event["batch"]}
            for name in save_at.get(step, []):
                trainer.commands.put({"type": "save", "name": name, "request_id": name})

    trainer = Trainer(config, arc_data, "cpu", config.checkpoint_dir, publish)
    trainer.train()
    saved = {e["request_id"]: e for e in events if e["type"] == "checkpoint_saved" and e["request_id"]}
    assert set(saved) == {n for names in save_at.values() for n in names}
    for step, names in save_at.items():
        probe = probes[step]
        for name in names:
            record = ckpt.load_checkpoint(saved[name]["path"])
            assert (record["epoch"], record["batch"], record["global_step"]) == (probe["epoch"], probe["batch"], step)
            assert record["rng_state"]["sampler"] == {"seed": 0, "epoch": probe["epoch"], "batch": probe["batch"]}
            assert_same(probe["model"], record["model_state_dict"], f"{name} model")
            assert_same(probe["optimizer"], record["optimizer_state_dict"], f"{name} optimizer")
            steps = {float(s["step"]) for s in record["optimizer_state_dict"]["state"].values()}
            assert steps == {float(step)}, f"{name}: Adam step counts {steps}, expected {step}"
            encoder = {k[len("example_encoder.encoder."):]: v for k, v in probe["model"].items()
                       if k.startswith("example_encoder.encoder.")}
            assert_same(encoder, record["encoder_state_dict"], f"{name} encoder")
