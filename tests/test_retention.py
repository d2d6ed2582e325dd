"""Retention: keep_last periodic/autosave checkpoints and the keep_best_k best; never manual, best_model or encoders."""
import catalogue
import checkpoint as ckpt
from conftest import checkpoints_of, tiny_config, write_task_folder
from data import load_data
from train import Trainer


def run(tmp_path, **changes):
    data = load_data(data_dir=write_task_folder(str(tmp_path / "tasks"), n_training=8, n_evaluation=2))
    folder = tmp_path / "checkpoints"
    config = tiny_config(folder, **{"epochs": 8, "max_steps": 0, "checkpoint_every_epochs": 1, **changes})
    events = []
    trainer = Trainer(config, data, "cpu", str(folder), events.append)

    def publish(event):
        events.append(event)
        if event["type"] == "batch" and event["global_step"] == 3:
            trainer.commands.put({"type": "save", "name": "my manual save", "request_id": "m"})

    trainer.publish = publish
    trainer.train()
    return checkpoints_of(trainer), events, {m["name"]: m for m in catalogue.list_checkpoints(str(folder))}


def test_keep_last_keeps_the_newest_periodic_saves_and_never_touches_others(tmp_path):
    folder, events, kept = run(tmp_path, keep_last=3)
    periodic = sorted(name for name, m in kept.items() if m["kind"] == "periodic")
    assert periodic == ["checkpoint_epoch_6", "checkpoint_epoch_7", "checkpoint_epoch_8"]
    assert "my manual save" in kept and "best_model" in kept
    deleted = [e for e in events if e["type"] == "checkpoint_deleted"]
    assert sorted(e["name"] for e in deleted) == [f"checkpoint_epoch_{i}" for i in range(1, 6)]
    assert all("keep_last=3" in e["reason"] for e in deleted)
    assert all(ckpt.verify(str(folder / m["file"]))[0] for m in kept.values())


def test_keep_best_k_keeps_the_k_best_by_the_monitored_metric(tmp_path):
    folder, events, kept = run(tmp_path, keep_last=0, keep_best_k=2, monitor="val_loss", monitor_mode="min")
    val_losses = {e["global_step"]: e["val_loss"] for e in events if e["type"] == "validation"}
    best_two = sorted(val_losses, key=val_losses.get)[:2]
    top = sorted(name for name in kept if name.startswith("best_k_step_"))
    assert top == sorted(f"best_k_step_{step}" for step in best_two)
    assert len([name for name, m in kept.items() if m["kind"] == "periodic"]) == 8  # keep_last=0 keeps all
    assert any("not among the 2 best" in e["reason"] for e in events if e["type"] == "checkpoint_deleted") \
        or len(val_losses) <= 2


def test_time_based_autosave_writes_and_retains(tmp_path):
    folder, events, kept = run(tmp_path, keep_last=2, autosave_minutes=0.002, checkpoint_every_epochs=0)
    autosaves = [e for e in events if e["type"] == "checkpoint_saved" and e["kind"] == "autosave"]
    assert len(autosaves) >= 3, "an autosave every 0.12 s should have fired several times"
    kept_autosaves = sorted((m["global_step"], name) for name, m in kept.items() if m["kind"] == "autosave")
    assert len(kept_autosaves) == 2
    assert [name for _, name in kept_autosaves] == [f"autosave_step_{s}" for s, _ in kept_autosaves]
    newest = max(e["global_step"] for e in autosaves)
    assert kept_autosaves[-1][0] == newest
