"""A final, resumable checkpoint when a run stops (kind interrupted) or its loss turns NaN (kind error)."""
import pytest
import requests
import torch

import checkpoint as ckpt
import train
from conftest import EventReader, assert_same, checkpoints_of, wait_for
from test_live import start
from test_train import (END, assert_same_training_state, comparable, of_type, resume_and_compare, resume_config, run,
                        small_data)  # noqa: F401 (small_data is a fixture)

STOP_AT = 7  # mid-epoch: epochs are 5 batches


def stop_at(step):
    def on_event(trainer, event):
        if event["type"] == "batch" and event["global_step"] == step:
            trainer.commands.put({"type": "stop"})
    return on_event


def test_a_stopped_run_saves_where_it_stopped_and_resumes_from_there_exactly(small_data, tmp_path):
    data_dir, data = small_data
    straight, straight_events = run(resume_config(tmp_path / "straight", data_dir, "selection", "communication",
                                                  False), data)
    stopped, events = run(resume_config(tmp_path / "first", data_dir, "selection", "communication", False), data,
                          stop_at(STOP_AT))
    final = stopped.final_checkpoint
    assert final["name"] == f"interrupted_step_{STOP_AT}" and final["kind"] == "interrupted"
    assert of_type(events, "training_stopped")[0]["final_checkpoint"] == final
    assert final["path"] == str(checkpoints_of(stopped) / f"interrupted_step_{STOP_AT}.pth")
    assert final["resume_command"].endswith(f"--resume {final['id']}") and "--checkpoint-dir" in final["resume_command"]
    record = torch.load(final["path"])  # plain torch.load
    assert record["kind"] == "interrupted" and record["global_step"] == STOP_AT
    assert (record["epoch"], record["batch"]) == (stopped.epoch, stopped.batch) == divmod(STOP_AT, 5)
    second = resume_config(tmp_path / "second", data_dir, "selection", "communication", False)
    resume_and_compare(final["path"], second, data, straight, straight_events, after=STOP_AT)


def test_save_on_stop_off_saves_nothing_and_a_run_stopped_before_its_first_step_saves_nothing(small_data, tmp_path):
    data_dir, data = small_data
    off = resume_config(tmp_path / "off", data_dir, "reconstruction", "autoencoder", False, save_on_stop=False,
                        checkpoint_every_epochs=0)
    stopped, _ = run(off, data, stop_at(3))
    assert stopped.final_checkpoint is None and not list(checkpoints_of(stopped).glob("interrupted*"))
    early = resume_config(tmp_path / "early", data_dir, "reconstruction", "autoencoder", False)
    trainer = train.Trainer(early, data, "cpu", early.checkpoint_dir, lambda event: None)
    trainer.commands.put({"type": "stop"})
    trainer.train()
    assert trainer.final_checkpoint is None and not list(checkpoints_of(trainer).glob("*.pth"))


def test_a_nan_loss_saves_the_last_good_state_as_kind_error(small_data, tmp_path, monkeypatch):
    data_dir, data = small_data
    good, _ = run(resume_config(tmp_path / "good", data_dir, "reconstruction", "communication", False,
                                max_steps=STOP_AT), data)
    real_loss, calls = train.LOSSES["reconstruction"], []

    def loss_that_fails(out, batch):
        loss, sums = real_loss(out, batch)
        if torch.is_grad_enabled():  # a training step, not validation
            calls.append(1)
            if len(calls) == STOP_AT + 1:
                return loss * float("nan"), sums
        return loss, sums

    monkeypatch.setitem(train.LOSSES, "reconstruction", loss_that_fails)
    config = resume_config(tmp_path / "bad", data_dir, "reconstruction", "communication", False)
    trainer = train.Trainer(config, data, "cpu", config.checkpoint_dir, lambda event: None)
    with pytest.raises(FloatingPointError, match=f"at step {STOP_AT}"):
        trainer.train()
    final = trainer.final_checkpoint
    assert final["kind"] == "error" and final["name"] == f"error_step_{STOP_AT}"
    record = torch.load(final["path"])
    assert record["kind"] == "error" and ckpt.verify(final["path"])[0]
    # The last good state: the weights, batch norm's running figures and the noise generator after step STOP_AT,
    # exactly as a run that ended there has them (the failed forward pass changed buffers and drew noise).
    assert_same(record["model_state_dict"], good.model.state_dict(), "model")
    assert_same(record["optimizer_state_dict"], good.optimizer.state_dict(), "optimizer")
    assert_same(record["rng_state"]["generator"], good.generator.get_state(), "generator")
    assert (record["epoch"], record["batch"], record["global_step"]) == (good.epoch, good.batch, good.global_step)


def test_stop_on_the_page_saves_a_final_checkpoint_the_event_and_list_name(live_server):
    reader = EventReader(live_server.url)
    try:
        start(live_server)
        assert requests.post(live_server.url + "/stop", json={}, timeout=10).status_code == 202
        stopped = reader.wait("training_stopped", timeout=60)
        final = stopped["final_checkpoint"]
        assert final["kind"] == "interrupted" and final["name"] == f"interrupted_step_{stopped['global_step']}"
        rows = requests.get(live_server.url + "/list_checkpoints", timeout=10).json()["checkpoints"]
        row = next(r for r in rows if r["id"] == final["id"])
        assert row["kind"] == "interrupted" and row["resume_command"] == final["resume_command"]
        assert ckpt.verify(row["path"])[0]
    finally:
        reader.close()


def test_a_nan_in_the_web_app_names_its_error_checkpoint_in_the_training_error(live_server, monkeypatch):
    real_loss, calls = train.LOSSES["reconstruction"], []

    def loss_that_fails(out, batch):
        loss, sums = real_loss(out, batch)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 3:
                return loss * float("nan"), sums
        return loss, sums

    monkeypatch.setitem(train.LOSSES, "reconstruction", loss_that_fails)
    reader = EventReader(live_server.url)
    try:
        assert requests.post(live_server.url + "/start_training", json={}, timeout=10).status_code == 202
        error = reader.wait("training_error", timeout=60)
        assert "FloatingPointError" in error["error"]
        assert error["final_checkpoint"]["kind"] == "error" and error["final_checkpoint"]["name"] == "error_step_2"
        wait_for(lambda: requests.get(live_server.url + "/status", timeout=10).json()["phase"] == "error",
                 what="the page's status to say error")
    finally:
        reader.close()
