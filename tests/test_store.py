"""The store interface the checkpoint writer writes through (store.py)."""
import os

import pytest
import torch

import checkpoint as ckpt
import checkpoint_manager
from store import SingleFileStore
from test_checkpoint import record_fields


class RecordingStore(SingleFileStore):
    """A store that notes each call: the writer must go through the store, never around it."""

    def __init__(self, folder):
        super().__init__(folder)
        self.written = []

    def write(self, fields, **options):
        self.written.append(fields["name"])
        return super().write(fields, **options)


def test_the_writer_writes_through_the_jobs_store(tmp_path):
    store, events = RecordingStore(str(tmp_path)), []
    writer = checkpoint_manager.CheckpointWriter(events.append)
    writer.submit(checkpoint_manager.SaveJob(record_fields("through"), str(tmp_path), "run", store=store))
    assert writer.flush(timeout=60)
    writer.close()
    saved = [e for e in events if e["type"] == "checkpoint_saved"]
    assert store.written == ["through"] and saved[0]["path"] == os.path.join(str(tmp_path), "through.pth")
    assert torch.load(saved[0]["path"])["name"] == "through" and store.exists("through")


def test_a_single_file_store_counts_a_link_as_taken_and_never_deletes_through_it(tmp_path):
    store = SingleFileStore(str(tmp_path))
    sidecar, path = store.write(record_fields("real"))
    assert path == store.path("real") and sidecar["name"] == "real" and ckpt.verify(path)[0]
    os.symlink(path, tmp_path / "link.pth")
    assert store.exists("link") and not store.exists("absent")
    with pytest.raises(ValueError, match="symbolic link"):
        store.path("link")
    with pytest.raises(ckpt.CheckpointError, match="never deleted through"):
        store.delete("link")
    assert os.path.exists(path)
    store.delete("real")
    assert not store.exists("real") and not os.path.exists(ckpt.sidecar_path(path))
    with pytest.raises(FileNotFoundError):
        store.delete("real")
    with pytest.raises(ValueError):
        store.exists("../escape")
