"""train.py: TrainConfig validation, learning, determinism, the events a run publishes, commands, the CLI,
pretraining, and exact resume (bit-identical weights and metrics)."""
import math
import os
import queue
import re
import subprocess
import sys
import threading

import pytest
import torch

import catalogue
import checkpoint as ckpt
import train
from checkpoint_manager import CheckpointManager, CheckpointPolicy, CheckpointWriter
from conftest import assert_same, checkpoints_of, newest_run_checkpoints, tiny_config, wait_for, write_task_folder
from data import PAD, load_data
from model import ARCEncoder
from train import LOSSES, TrainConfig, Trainer, reconstruction_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = ["--embedding-dim", "4", "--hidden-dim", "16", "--latent-dim", "16", "--num-conv-layers", "2",
             "--batch-size", "8", "--device", "cpu"]
BATCHES_PER_EPOCH = 5  # small_data: 5 training puzzles x 8 grids, batches of 8


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """6 training + 2 evaluation puzzles: 1 validation puzzle, epochs of 5 batches of 8 grids (4 for
    puzzle_classification), so a short run crosses several epochs."""
    root = write_task_folder(tmp_path_factory.mktemp("tasks"), n_training=6, n_evaluation=2, seed=5)
    return str(root), load_data(data_dir=str(root))


def run(config, data, on_event=None, commands=None):
    """Train to the end; returns the trainer and every event it published."""
    events = []
    trainer = None

    def publish(event):
        events.append(event)
        if on_event is not None:
            on_event(trainer, event)

    trainer = Trainer(config, data, "cpu", config.checkpoint_dir, publish, commands)
    trainer.train()
    return trainer, events


def of_type(events, kind):
    return [e for e in events if e["type"] == kind]


def comparable(events, after=0):
    """Batch and validation events after global_step `after`, without wall-clock fields."""
    return [{k: v for k, v in e.items() if k != "samples_per_sec"} for e in events
            if e["type"] in ("batch", "validation") and e["global_step"] > after]


def assert_same_training_state(a, b):
    assert_same(a.model.state_dict(), b.model.state_dict(), "model")
    assert_same(a.optimizer.state_dict(), b.optimizer.state_dict(), "optimizer")
    assert (a.epoch, a.batch, a.global_step) == (b.epoch, b.batch, b.global_step)
    assert_same(a.generator.get_state(), b.generator.get_state(), "generator")


def save_and_stop_at(step, name="mid"):
    """An on_event callback: at the batch event of `step`, ask for a manual save, then a stop."""
    def on_event(trainer, event):
        if event["type"] == "batch" and event["global_step"] == step:
            trainer.commands.put({"type": "save", "name": name, "request_id": "r-" + name})
            trainer.commands.put({"type": "stop"})
    return on_event


# ---------------------------------------------------------------------------------------------- TrainConfig

def test_reconstruction_metrics_count_real_pixels_sizes_and_whole_grids():
    """Two 2x3 grids decoded right except one pixel of the second, and whatever lies in the padding: pixel
    accuracy 11/12, size accuracy 1, exact grids 1/2."""
    target = torch.full((2, 1, 30, 30), PAD)
    target[:, 0, :2, :3] = torch.tensor([[1, 2, 3], [4, 5, 6]])
    colors = torch.zeros(2, 1, 10, 30, 30)
    colors.scatter_(2, target.clamp(max=9).unsqueeze(2), 5.0)  # the right colour on real pixels
    colors[:, :, 7, 10:, 10:] = 9.0  # padding: never counted
    colors[1, 0, 0, 1, 2] = 6.0  # one wrong pixel in the second grid
    sizes = torch.zeros(2, 1, 2, 30)
    sizes[:, :, 0, 1] = sizes[:, :, 1, 2] = 5.0  # height 2, width 3
    batch = {"examples": target, "sizes": torch.tensor([[[2, 3]], [[2, 3]]])}
    _, sums = reconstruction_loss({"colors": colors, "sizes": sizes}, batch)
    assert sums["acc"] == (11, 12) and sums["size_acc"] == (2, 2) and sums["exact_acc"] == (1, 2)


def test_defaults_round_trip_and_every_field_is_documented():
    config = TrainConfig()
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert config.replace(batch_size=3).batch_size == 3
    for f in train.dataclasses.fields(TrainConfig):
        assert f.metadata["help"], f"{f.name} has no help"
    with pytest.raises(train.dataclasses.FrozenInstanceError):
        config.batch_size = 2


def test_numbers_for_float_fields_become_floats():
    config = TrainConfig.from_dict({"learning_rate": 1, "temperature": 2})
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert isinstance(config.temperature, float)


BAD_VALUES = [
    ("batch_size", "8"), ("batch_size", 8.0), ("batch_size", True), ("batch_size", None), ("batch_size", 0),
    ("batch_size", 4097), ("epochs", -1), ("max_steps", 1.5), ("seed", -1), ("seed", 2**31),
    ("learning_rate", "0.1"), ("learning_rate", float("nan")), ("learning_rate", float("inf")),
    ("learning_rate", True), ("learning_rate", 0.0), ("learning_rate", 2.0),
    ("temperature", 0), ("temperature", float("-inf")), ("temperature_decay", 1.5),
    ("use_input_output_pairs", 1), ("use_input_output_pairs", "true"), ("freeze_encoder", None),
    ("task_type", "classification"), ("task_type", 3), ("bottleneck_type", "Communication"),
    ("device", "tpu"), ("dataset", "arcagi3"), ("pretrain_mode", "contrastive"),
    ("num_distractors", 0), ("num_distractors", 64), ("num_colors", 11), ("vocab_size", 1),
    ("checkpoint_dir", "a\x00b"), ("checkpoint_dir", ["x"]), ("data_dir", 5), ("autosave_minutes", -1),
    ("min_temperature", 5.0),  # above temperature 1.0
    ("cell_channels", -1), ("cell_channels", 65), ("pattern_buckets", -1), ("pattern_buckets", 2**22 + 1),
    ("pattern_kinds", "colours"),
    ("num_conv_layers", 1),  # reconstruction's default cell code reads the second layer's map
]


@pytest.mark.parametrize("field,value", BAD_VALUES, ids=[f"{f}={v!r}"[:40] for f, v in BAD_VALUES])
def test_bad_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict({field: value})
    assert field in str(info.value)


def test_one_conv_layer_is_refused_only_where_a_cell_code_needs_a_second():
    assert TrainConfig.from_dict({"num_conv_layers": 1, "cell_channels": 0}).num_conv_layers == 1
    assert TrainConfig.from_dict({"num_conv_layers": 1, "task_type": "selection"}).cell_channels == 8  # unused
    with pytest.raises(ValueError, match="set cell_channels to 0"):
        TrainConfig.from_dict({"num_conv_layers": 1, "task_type": "reconstruction"})


def test_unknown_keys_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown config field.*bogus.*lr"):
        TrainConfig.from_dict({"bogus": 1, "lr": 0.1, "batch_size": 8})
    with pytest.raises(ValueError, match="unknown config field"):
        TrainConfig.from_dict({1: 2, "x": 3})
    with pytest.raises(ValueError, match="object"):
        TrainConfig.from_dict([("batch_size", 8)])


# ---------------------------------------------------------------------------------------------- learning

# Reconstruction through a message steps more gently: at 0.01 one flipped symbol of the tiny model's message can
# undo ten steps of progress in the (hard-message) evaluation loss.
FEW_STEPS_CASES = [  # (task, settings, learning rate)
    ("reconstruction", dict(bottleneck_type="communication"), 0.003),
    ("selection", dict(bottleneck_type="communication", selection_negatives="distractors"), 0.01),
    ("selection", dict(bottleneck_type="communication", selection_negatives="batch"), 0.01),
    ("puzzle_classification", dict(bottleneck_type="communication"), 0.01),
    ("puzzle_classification", dict(bottleneck_type="autoencoder", pattern_buckets=4096), 0.01),
    ("reconstruction", dict(bottleneck_type="autoencoder"), 0.01)]


@pytest.mark.parametrize("task,settings,learning_rate", FEW_STEPS_CASES,
                         ids=[f"{t}-" + "-".join(map(str, s.values())) for t, s, _ in FEW_STEPS_CASES])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(arc_data, make_config, task, settings, learning_rate):
    config = make_config(task_type=task, learning_rate=learning_rate, **settings)
    trainer = Trainer(config, arc_data, "cpu", config.checkpoint_dir, lambda event: None)
    trainer.setup()
    trainer.phase = "training"
    trainer.manager = CheckpointManager(config.checkpoint_dir, trainer.run_id, CheckpointPolicy(), lambda e: None,
                                        trainer._snapshot)
    trainer.manager.writer = CheckpointWriter(lambda event: None)
    batch = trainer.train_batches.batch(0, 0)
    loss_fn, model = LOSSES[task], trainer.model

    def eval_loss():
        model.eval()
        with torch.no_grad():
            loss = loss_fn(trainer._forward(model, batch), batch)[0].item()
        model.train()
        return loss

    before = eval_loss()
    for _ in range(10):
        trainer._train_step(model, loss_fn, batch)
    trainer.manager.close()
    after = eval_loss()
    assert after < 0.8 * before, f"loss went from {before:.4f} to {after:.4f}"


def test_two_runs_with_the_same_seed_are_identical(small_data, tmp_path):
    data_dir, data = small_data
    base = dict(task_type="selection", epochs=2, max_steps=7, data_dir=data_dir)
    a, events_a = run(tiny_config(tmp_path / "a", **base), data)
    b, events_b = run(tiny_config(tmp_path / "b", **base), data)
    c, events_c = run(tiny_config(tmp_path / "c", seed=1, **base), data)
    assert_same_training_state(a, b)
    assert comparable(events_a) == comparable(events_b)
    assert len(comparable(events_a)) == 7 + 2  # batches, and validation after epoch 1 and at max_steps
    assert not torch.equal(a.model.encoder.color_embedding.weight, c.model.encoder.color_embedding.weight)
    assert comparable(events_a) != comparable(events_c)
    assert a.test() == b.test()


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_weight_decay_is_decoupled_from_the_gradient(arc_data, make_config, weight_decay):
    config = make_config(learning_rate=0.1, weight_decay=weight_decay)
    trainer = Trainer(config, arc_data, "cpu", "unused", lambda event: None)
    trainer.setup()
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    for p in trainer.model.parameters():
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    # A zero gradient moves nothing through Adam's moments: only the decay, (1 - lr * weight_decay), is left.
    for name, p in trainer.model.named_parameters():
        assert torch.allclose(p, before[name] * (1 - 0.1 * weight_decay), rtol=0, atol=1e-7), name


def test_augment_changes_what_training_sees_but_never_validation_or_test(arc_data, make_config):
    trainers = {}
    for augment in ("off", "symmetries+colours"):
        trainer = Trainer(make_config(augment=augment), arc_data, "cpu", "unused", lambda event: None)
        trainer.setup()
        trainers[augment] = trainer
    plain, views = trainers["off"], trainers["symmetries+colours"]
    assert not torch.equal(plain.train_batches.batch(0, 0)["examples"], views.train_batches.batch(0, 0)["examples"])
    for split in ("val_batches", "test_batches"):
        assert torch.equal(getattr(plain, split).batch(0, 0)["examples"], getattr(views, split).batch(0, 0)["examples"])
    # Same initial weights, so the same validation figures.
    assert plain.evaluate(plain.model, plain.val_batches, LOSSES["reconstruction"])[0] == \
        views.evaluate(views.model, views.val_batches, LOSSES["reconstruction"])[0]


def test_max_steps_ends_the_run_after_one_last_validation(small_data, make_config):
    trainer, events = run(make_config(max_steps=3, data_dir=small_data[0]), small_data[1])
    kinds = [e["type"] for e in events if e["type"] in ("batch", "validation", "training_finished")]
    assert kinds == ["batch"] * 3 + ["validation", "training_finished"]
    assert (trainer.global_step, trainer.epoch, trainer.batch) == (3, 0, 3)
    finished = of_type(events, "training_finished")[0]
    assert finished["global_step"] == 3 and finished["val"]["loss"] == finished["best_val_loss"]


# ---------------------------------------------------------------------------------------------- published metrics

@pytest.mark.parametrize("task,bottleneck,k", [("reconstruction", "communication", 3),
                                               ("selection", "communication", 3), ("selection", "autoencoder", 5),
                                               ("puzzle_classification", "communication", 3)])
def test_batch_and_validation_events_carry_the_metrics(small_data, make_config, task, bottleneck, k):
    data_dir, data = small_data
    trainer, events = run(make_config(task_type=task, bottleneck_type=bottleneck, num_distractors=k,
                                      data_dir=data_dir), data)
    batches = of_type(events, "batch")
    assert [e["global_step"] for e in batches] == [1, 2, 3, 4]
    for e in batches:
        assert e["phase"] == "training" and e["epoch"] == 0 and e["batches_per_epoch"] == len(trainer.train_batches)
        assert math.isfinite(e["loss"]) and 0.0 <= e["acc"] <= 1.0
        assert e["temperature"] == 1.0 and e["samples_per_sec"] > 0
    [val] = of_type(events, "validation")
    assert math.isfinite(val["val_loss"]) and 0.0 <= val["val_acc"] <= 1.0
    if task == "selection":
        assert val["val_chance"] == pytest.approx(1 / (k + 1))
    if task == "reconstruction":
        assert 0.0 <= val["val_exact_acc"] <= val["val_size_acc"] <= 1.0
    if bottleneck == "communication":
        assert 0.0 < val["val_distinct_share"] <= 1.0
        assert 0.0 <= val["val_message_entropy"] <= math.log2(10) * 5
        assert isinstance(val["val_message_collapse"], bool)
    else:
        assert "val_distinct_share" not in val and "val_message_entropy" not in val
    started = of_type(events, "training_started")[0]
    assert started["config"] == trainer.config.to_dict() and started["checkpoint_estimate_bytes"] > 0
    assert of_type(events, "samples"), "no sample of what the model makes of a grid"


def test_message_stats():
    messages = torch.tensor([[0, 1], [0, 1], [2, 3], [4, 5]])
    stats = train.message_stats(messages)
    assert stats["distinct_share"] == 0.75
    assert stats["message_entropy"] == pytest.approx(1.5)
    assert stats["message_collapse"] is False
    assert train.message_stats(torch.zeros(4, 3, dtype=torch.long))["message_entropy"] == 0.0


def test_temperature_anneals_per_epoch_down_to_the_minimum(small_data, tmp_path):
    data_dir, data = small_data
    config = tiny_config(tmp_path, data_dir=data_dir, epochs=4, temperature=2.0, temperature_decay=0.5,
                         min_temperature=0.3, max_steps=0, task_type="selection")
    seen = []

    def on_event(trainer, event):
        if event["type"] == "batch":
            seen.append((event["epoch"], event["temperature"], trainer.model.temperature))

    run(config, data, on_event)
    expected = {0: 2.0, 1: 1.0, 2: 0.5, 3: 0.3}
    assert len(seen) == 4 * BATCHES_PER_EPOCH and [epoch for epoch, _, _ in seen[4::5]] == [0, 1, 2, 3]
    for epoch, published, used in seen:
        assert published == pytest.approx(expected[epoch]) and used == pytest.approx(expected[epoch])


# ---------------------------------------------------------------------------------------------- commands

def test_stop_command_and_stop_flag_end_the_run_between_batches(small_data, make_config):
    data_dir, data = small_data

    def command(trainer, event):
        if event["type"] == "batch" and event["global_step"] == 2:
            trainer.commands.put({"type": "stop"})

    trainer, events = run(make_config(max_steps=10, task_type="selection", data_dir=data_dir), data, command)
    assert trainer.global_step == 2 and of_type(events, "training_stopped")[0]["global_step"] == 2
    assert not of_type(events, "training_finished") and not of_type(events, "validation")

    def flag(trainer, event):
        if event["type"] == "batch" and event["global_step"] == 3:
            trainer.stop_requested.set()

    trainer, events = run(make_config(max_steps=10, task_type="selection", data_dir=data_dir), data, flag)
    assert trainer.global_step == 3 and events[-1]["type"] == "training_stopped"


def test_save_command_writes_a_manual_checkpoint_with_its_request_id(small_data, make_config):
    def on_event(trainer, event):
        if event["type"] == "batch" and event["global_step"] == 2:
            trainer.commands.put({"type": "save", "name": "my save", "request_id": "abc"})
            trainer.commands.put({"type": "save", "name": "my save", "request_id": "again"})
            trainer.commands.put({"type": "save", "name": "best_model", "request_id": "reserved"})
        if event["type"] == "batch" and event["global_step"] == 3:
            trainer.commands.put({"type": "save", "name": "my save", "request_id": "over", "overwrite": True})

    config = make_config(max_steps=4, data_dir=small_data[0])
    trainer, events = run(config, small_data[1], on_event)
    results = {e["request_id"]: e for e in events if e["type"].startswith("checkpoint_") and e.get("request_id")}
    assert results["abc"]["type"] == "checkpoint_saved" and results["abc"]["global_step"] == 2
    assert results["again"]["type"] == "checkpoint_error" and "already exists" in results["again"]["error"]
    assert results["reserved"]["type"] == "checkpoint_error" and "reserved" in results["reserved"]["error"]
    assert results["over"]["type"] == "checkpoint_saved" and results["over"]["global_step"] == 3
    record = ckpt.load_checkpoint(str(checkpoints_of(trainer) / "my save.pth"))
    assert record["kind"] == "manual" and record["global_step"] == 3 and record["name"] == "my save"
    assert record["task_type"] == "reconstruction" and record["config"] == trainer.config.to_dict()


def test_pause_holds_training_saves_while_paused_and_resume_goes_on(small_data, make_config):
    commands = queue.Queue()
    events = []

    def on_event(trainer, event):
        if event["type"] == "batch" and event["global_step"] == 2:
            commands.put({"type": "pause"})

    config = make_config(max_steps=5, data_dir=small_data[0])
    trainer = Trainer(config, small_data[1], "cpu", config.checkpoint_dir,
                      lambda e: (events.append(e), on_event(trainer, e)), commands)
    thread = threading.Thread(target=trainer.train)
    thread.start()
    try:
        wait_for(lambda: of_type(events, "training_paused"), what="training_paused")
        count = len(of_type(events, "batch"))
        commands.put({"type": "save", "name": "while paused", "request_id": "p"})
        wait_for(lambda: of_type(events, "checkpoint_saved"), what="the save while paused")
        threading.Event().wait(0.5)
        assert len(of_type(events, "batch")) == count == 2, "a batch ran while paused"
        commands.put({"type": "resume"})
        thread.join(60)
    finally:
        trainer.stop_requested.set()
        thread.join(60)
    kinds = [e["type"] for e in events if e["type"] in ("training_paused", "training_resumed", "checkpoint_saved",
                                                       "training_finished")]
    assert kinds[:3] == ["training_paused", "checkpoint_saved", "training_resumed"]
    assert of_type(events, "checkpoint_saved")[0]["global_step"] == 2
    assert of_type(events, "training_paused")[0]["global_step"] == 2
    assert [e["global_step"] for e in of_type(events, "batch")] == [1, 2, 3, 4, 5]
    assert events[-1]["type"] == "training_finished"


def test_stop_while_paused(small_data, make_config):
    def on_event(trainer, event):
        if event["type"] == "batch" and event["global_step"] == 1:
            trainer.commands.put({"type": "pause"})
        if event["type"] == "training_paused":
            threading.Timer(0.3, trainer.commands.put, [{"type": "stop"}]).start()

    trainer, events = run(make_config(max_steps=5, data_dir=small_data[0]), small_data[1], on_event)
    assert trainer.global_step == 1 and events[-1]["type"] == "training_stopped"


def test_saves_during_pretraining_are_refused_with_a_reason(small_data, tmp_path):
    data_dir, data = small_data
    config = tiny_config(tmp_path, data_dir=data_dir, max_steps=3)
    events = []
    trainer = None

    def publish(event):
        events.append(event)
        if event["type"] == "batch" and event["global_step"] == 1:
            trainer.commands.put({"type": "save", "name": "nope", "request_id": "x"})

    trainer = Trainer(config, data, "cpu", config.checkpoint_dir, publish)
    trainer.pretrain("binary")
    [error] = [e for e in of_type(events, "checkpoint_error") if e["request_id"] == "x"]
    assert "main training only" in error["error"]
    assert not os.path.exists(checkpoints_of(trainer) / "nope.pth")


def test_keep_last_retains_the_newest_periodic_checkpoints(small_data, tmp_path):
    data_dir, data = small_data
    config = tiny_config(tmp_path, data_dir=data_dir, epochs=4, max_steps=0, keep_last=2, task_type="selection")
    trainer, events = run(config, data)
    names = {m["name"] for m in catalogue.list_checkpoints(config.checkpoint_dir)}
    assert {"checkpoint_epoch_3", "checkpoint_epoch_4", "best_model"} <= names
    assert not {"checkpoint_epoch_1", "checkpoint_epoch_2"} & names
    assert {e["name"] for e in of_type(events, "checkpoint_deleted")} == {"checkpoint_epoch_1", "checkpoint_epoch_2"}


# ---------------------------------------------------------------------------------------------- exact resume

# (task, bottleneck, use_input_output_pairs, augment): augmented views must be as exactly reproducible as the rest.
RESUME_CASES = [("reconstruction", "communication", False, "off"), ("selection", "communication", False, "off"),
                ("puzzle_classification", "communication", False, "off"),
                ("selection", "autoencoder", True, "symmetries+colours")]
RESUME_IDS = ["-".join(map(str, case)) for case in RESUME_CASES]
# The pattern bag's embedding rows and their Adam moments must come back exactly too.
RESUME_CASES.append(("puzzle_classification", "autoencoder", False, "symmetries", dict(pattern_buckets=512)))
RESUME_IDS.append("puzzle_classification-autoencoder-False-symmetries-patterns")
# bf16-mixed: the same steps round the same way, so a resume at the same precision is exact too.
RESUME_CASES += [("reconstruction", "communication", False, "off", dict(precision="bf16-mixed", cell_channels=2)),
                 ("selection", "communication", False, "off", dict(precision="bf16-mixed"))]
RESUME_IDS += ["reconstruction-communication-bf16-mixed", "selection-communication-bf16-mixed"]
MID, END = 7, 13  # the manual save's step and the last step


def resume_config(folder, data_dir, task, bottleneck, pairs, **changes):
    values = dict(task_type=task, bottleneck_type=bottleneck, use_input_output_pairs=pairs, data_dir=data_dir,
                  epochs=5, max_steps=END, temperature=2.0, temperature_decay=0.7, min_temperature=0.5,
                  checkpoint_every_epochs=1, keep_last=0)
    values.update(changes)
    return tiny_config(folder, **values)


def resume_and_compare(path, config, data, straight, straight_events, after, test_split=True):
    """Resume from path with config, train to its end; everything must equal the uninterrupted run's."""
    events = []
    resumed = Trainer(config, data, "cpu", config.checkpoint_dir, events.append)
    record = resumed.resume(path)
    assert resumed.global_step == record["global_step"] == after
    resumed.train()
    assert_same_training_state(straight, resumed)
    assert comparable(events, after) == comparable(straight_events, after)
    assert of_type(events, "training_finished")[0] == of_type(straight_events, "training_finished")[0]
    assert resumed.best_val_loss == straight.best_val_loss
    if test_split:
        assert resumed.test() == straight.test()


@pytest.mark.parametrize("case", RESUME_CASES, ids=RESUME_IDS)
def test_resume_is_bit_identical_from_mid_epoch_and_end_of_epoch(small_data, tmp_path, case):
    data_dir, data = small_data
    task, bottleneck, pairs, augment, *changes = case
    changes = dict(augment=augment, **(changes[0] if changes else {}))
    config = resume_config(tmp_path / "straight", data_dir, task, bottleneck, pairs, **changes)
    straight, straight_events = run(config, data)
    per_epoch = len(straight.train_batches)
    assert straight.global_step == END and straight.epoch >= 2 and MID % per_epoch, "MID must be mid-epoch"
    # Interrupted: a manual save at step MID (in epoch 1), then a stop; its events so far are the same.
    first = resume_config(tmp_path / "first", data_dir, task, bottleneck, pairs, **changes)
    stopped, events = run(first, data, save_and_stop_at(MID))
    assert stopped.global_step == MID and events[-1]["type"] == "training_stopped"
    assert comparable(events) == comparable(straight_events)[:len(comparable(events))]
    mid = str(checkpoints_of(stopped) / "mid.pth")
    assert (ckpt.read_sidecar(mid)["epoch"], ckpt.read_sidecar(mid)["batch"]) == divmod(MID, per_epoch)
    resume_and_compare(mid, resume_config(tmp_path / "second", data_dir, task, bottleneck, pairs, **changes),
                       data, straight, straight_events, after=MID)
    # From the periodic checkpoint the uninterrupted run wrote at the end of epoch 1.
    end_of_epoch = str(checkpoints_of(straight) / "checkpoint_epoch_1.pth")
    assert ckpt.read_sidecar(end_of_epoch)["global_step"] == per_epoch
    assert ckpt.read_sidecar(end_of_epoch)["batch"] == 0
    third = resume_config(tmp_path / "third", data_dir, task, bottleneck, pairs, **changes)
    resume_and_compare(end_of_epoch, third, data, straight, straight_events, after=per_epoch)


def test_resume_on_the_full_dataset_mid_epoch(arc_data, tmp_path):
    def config(folder, **changes):
        return tiny_config(folder, task_type="selection", max_steps=7, temperature=1.5, **changes)

    straight, straight_events = run(config(tmp_path / "straight"), arc_data)
    stopped, _ = run(config(tmp_path / "first"), arc_data, save_and_stop_at(4, "four"))
    resume_and_compare(str(checkpoints_of(stopped) / "four.pth"), config(tmp_path / "second"), arc_data,
                       straight, straight_events, after=4, test_split=False)


def test_resume_takes_the_checkpoint_settings_and_refuses_what_does_not_fit(small_data, tmp_path, arc_data):
    data_dir, data = small_data
    first = resume_config(tmp_path / "first", data_dir, "selection", "communication", False, max_steps=5)
    stopped, _ = run(first, data, save_and_stop_at(3))
    path = str(checkpoints_of(stopped) / "mid.pth")
    # A config that differs in what the checkpoint fixes takes the checkpoint's values.
    other = tiny_config(tmp_path / "second", data_dir=data_dir, task_type="reconstruction", hidden_dim=32,
                        max_steps=5)
    trainer = Trainer(other, data, "cpu", other.checkpoint_dir, lambda event: None)
    trainer.resume(path)
    assert trainer.config.task_type == "selection" and trainer.config.hidden_dim == 16
    assert trainer.config.max_steps == 5 and trainer.config.checkpoint_dir == other.checkpoint_dir
    # Other data than the checkpoint was trained on: refused, naming both.
    elsewhere = Trainer(other, arc_data, "cpu", other.checkpoint_dir, lambda event: None)
    with pytest.raises(ValueError, match="arcagi") as info:
        elsewhere.resume(path)
    assert data.name in str(info.value)
    # A file that fails verification is refused before anything is built.
    data_bytes = bytearray(open(path, "rb").read())
    data_bytes[-2000] ^= 0x10
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "mid.pth").write_bytes(bytes(data_bytes))
    os.link(checkpoints_of(stopped) / "mid.json", damaged / "mid.json")
    with pytest.raises(ckpt.CheckpointError, match="SHA-256"):
        Trainer(other, data, "cpu", str(tmp_path / "x"), lambda e: None).resume(str(damaged / "mid.pth"))


def test_weights_from_an_older_project_version_are_refused_saying_so(small_data, tmp_path):
    data_dir, data = small_data
    first = resume_config(tmp_path / "first", data_dir, "reconstruction", "autoencoder", False, max_steps=3)
    stopped, _ = run(first, data, save_and_stop_at(2))
    record = ckpt.load_checkpoint(str(checkpoints_of(stopped) / "mid.pth"))
    # What a 0.1.0 reconstruction checkpoint holds: the decoder's layers under their old names.
    record["model_state_dict"] = {k.replace("decoder.refine_8.", "decoder.refine.0."): v
                                  for k, v in record["model_state_dict"].items()}
    record["versions"]["project"] = "0.1.0"
    old = tmp_path / "old"
    ckpt.write_checkpoint(str(old), {**record, "name": "old", "kind": "manual"})
    second = resume_config(tmp_path / "second", data_dir, "reconstruction", "autoencoder", False)
    for attempt in (Trainer(second, data, "cpu", second.checkpoint_dir, lambda e: None).resume,
                    lambda path: fine_tune(second, data, path)):
        with pytest.raises((ckpt.CheckpointError, ValueError), match=r"version 0\.1\.0 of this project, this is "
                           + re.escape(ckpt.PROJECT_VERSION)):
            attempt(str(old / "old.pth"))
    inspect = subprocess.run([sys.executable, os.path.join(ROOT, "load_checkpoint.py"), str(old / "old.pth")],
                             capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 1 and "version 0.1.0 of this project" in inspect.stderr, inspect
    # The same mismatch from the current version names no version: it is damage, not age.
    record["versions"]["project"] = ckpt.PROJECT_VERSION
    ckpt.write_checkpoint(str(old), {**record, "name": "same", "kind": "manual"})
    with pytest.raises(ckpt.CheckpointError) as info:
        Trainer(second, data, "cpu", second.checkpoint_dir, lambda e: None).resume(str(old / "same.pth"))
    assert "damaged" in str(info.value) and "version" not in str(info.value)


OLDER_VERSIONS = [  # (task, version, the settings it predates, at the value that rebuilds its model; others it has)
    ("selection", "0.2.0", dict(message_norm="none", scoring="dot"), {}),
    ("puzzle_classification", "0.2.0", dict(message_norm="none", scoring="dot"), {}),
    ("reconstruction", "0.2.0", dict(message_norm="none", scoring="dot", cell_channels=0), {}),
    ("reconstruction", "0.3.0", dict(cell_channels=0), {}),
    ("puzzle_classification", "0.4.0", dict(pattern_buckets=0), {}),
    ("puzzle_classification", "0.5.0", dict(pattern_kinds="exact"), dict(pattern_buckets=64)),
]


@pytest.mark.parametrize("task, version, before, kept", OLDER_VERSIONS, ids=[f"{t}-{v}" for t, v, _, _ in OLDER_VERSIONS])
def test_a_checkpoint_from_before_a_setting_resumes_exactly_as_it_was(small_data, tmp_path, task, version, before,
                                                                      kept):
    data_dir, data = small_data

    def config(folder, **changes):
        return resume_config(tmp_path / folder, data_dir, task, "communication", False, **kept, **changes)

    straight, straight_events = run(config("straight", **before), data)
    first = config("first", **before)
    stopped, _ = run(first, data, save_and_stop_at(MID))
    # What such a file holds: none of the settings, and the parts they add missing from its weights (0.2.0: no
    # normalisation buffers in the sender, a classifier with a bias; 0.3.0: no cell code; 0.4.0: no pattern bag;
    # 0.5.0: a bag of the same shape as today's, which read exact colour windows).
    record = ckpt.load_checkpoint(str(checkpoints_of(stopped) / "mid.pth"))
    weights = record["model_state_dict"]
    assert any(k.startswith("sender.norm.") for k in weights) == ("message_norm" not in before)
    assert ("classifier.bias" in weights) == (task == "puzzle_classification" and "scoring" in before)
    assert not any(k.startswith(("cell_code.", "decoder.from_code.")) for k in weights)
    assert any(".patterns." in k for k in weights) == bool(kept.get("pattern_buckets"))
    for name in before:
        del record["config"][name]
    record["versions"]["project"] = version
    ckpt.write_checkpoint(str(tmp_path / "old"), {**record, "name": "old", "kind": "manual"})
    old = str(tmp_path / "old" / "old.pth")
    second = config("second")
    assert (second.message_norm, second.scoring, second.cell_channels, second.pattern_kinds) == (
        "batch", "cosine", 8, "shapes")  # not the file's
    resume_and_compare(old, second, data, straight, straight_events, after=MID)
    inspect = subprocess.run([sys.executable, os.path.join(ROOT, "load_checkpoint.py"), old],
                             capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0 and "weights loaded" in inspect.stdout, inspect
    if "pattern_kinds" in before:  # fine-tuning keeps this run's settings: a shapes bag must refuse exact weights
        with pytest.raises(ValueError, match="set pattern_kinds=exact to load it"):
            fine_tune(config("third"), data, old)


def test_a_snapshot_holds_the_running_figures_of_its_own_step(small_data, make_config):
    """Batch norm's buffers change in the forward pass that the snapshot's copy overlaps."""
    data_dir, data = small_data
    trainer = Trainer(make_config(task_type="selection", bottleneck_type="communication"), data, "cpu",
                      "unused", lambda e: None)
    trainer.setup()
    trainer.manager = CheckpointManager("unused", trainer.run_id, CheckpointPolicy(), lambda e: None,
                                        trainer._snapshot)
    fields = trainer._snapshot("manual", "snap")
    running_mean = fields["model_state_dict"]["sender.norm.running_mean"]
    before = running_mean.clone()
    trainer.model.train()
    trainer._forward(trainer.model, trainer.train_batches.batch(0, 0))
    assert not torch.equal(trainer.model.sender.norm.running_mean, before), "the forward pass moved nothing"
    assert torch.equal(running_mean, before)


def fine_tune(config, data, path):
    trainer = Trainer(config, data, "cpu", config.checkpoint_dir, lambda e: None)
    trainer.setup()
    trainer.load_weights(path)


# ---------------------------------------------------------------------------------------------- pretraining

@pytest.mark.parametrize("mode", ["binary", "selection"])
def test_cli_pretrain_writes_the_encoder_and_training_loads_it(small_data, tmp_path, capsys, mode):
    data_dir, data = small_data
    folder = str(tmp_path / "checkpoints")
    base = ["--data-dir", data_dir, "--checkpoint-dir", folder, "--epochs", "1", "--no-progress"]
    common = base + TINY_ARGS
    assert train.main(["--phase", "pretrain", "--pretrain-mode", mode, *common]) == 0
    pretraining_run = newest_run_checkpoints(folder)
    path = str(pretraining_run / f"pretrained_encoder_{mode}.pth")
    record = ckpt.load_checkpoint(path)
    assert record["kind"] == "pretrained" and record["pretrain_mode"] == mode
    encoder = ARCEncoder(10, 4, 16, 16, 2)
    assert set(record["encoder_state_dict"]) == set(encoder.state_dict())
    assert "validation:" in capsys.readouterr().out
    # Main training starts from it...
    config = tiny_config(tmp_path / "main", data_dir=data_dir, pretrained_encoder=path, freeze_encoder=True)
    trainer = Trainer(config, data, "cpu", config.checkpoint_dir, lambda event: None)
    trainer.setup()
    assert_same(record["encoder_state_dict"], trainer.model.encoder.state_dict(), "encoder")
    trainer.train()
    assert_same(record["encoder_state_dict"], trainer.model.encoder.state_dict(), "frozen encoder")
    assert train.main(["--pretrained-encoder", path, "--max-steps", "2", *common]) == 0
    best = str(newest_run_checkpoints(folder) / "best_model.pth")
    # ...but only with the same encoder shape, and only from a pretrained checkpoint.
    wider = TINY_ARGS[:2] + ["--hidden-dim", "32"] + TINY_ARGS[4:]
    assert train.main(["--pretrained-encoder", path, *base, *wider]) == 1
    assert "encoder shape does not match" in capsys.readouterr().err
    # an encoder without a bag has no kind of pattern to disagree about: what is missing is the bag
    assert train.main(["--pretrained-encoder", path, "--pattern-buckets", "64", "--pattern-kinds", "exact",
                       "--max-steps", "2", *common]) == 1
    err = capsys.readouterr().err
    assert "pattern_buckets must be the same" in err and "reads other patterns" not in err
    assert train.main(["--pretrained-encoder", best, *common]) == 1
    assert "not a pretrained encoder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pretrained encoder"):
        Trainer(config, data, "cpu", config.checkpoint_dir, lambda event: None).resume(path)


def test_a_pretrained_encoder_with_a_pattern_bag_needs_one_to_load_into_and_inspects(small_data, tmp_path, capsys):
    data_dir, _ = small_data
    folder = str(tmp_path / "checkpoints")
    common = ["--data-dir", data_dir, "--checkpoint-dir", folder, "--epochs", "1", "--no-progress", *TINY_ARGS]
    assert train.main(["--phase", "pretrain", "--pattern-buckets", "64", *common]) == 0
    path = str(newest_run_checkpoints(folder) / "pretrained_encoder_binary.pth")
    weights = ckpt.load_checkpoint(path)["encoder_state_dict"]
    assert weights["patterns.embedding.weight"].shape == (64, 16)
    assert train.main(["--pretrained-encoder", path, "--pattern-buckets", "64", "--max-steps", "2", *common]) == 0
    assert train.main(["--pretrained-encoder", path, "--max-steps", "2", *common]) == 1
    assert "pattern_buckets must be the same" in capsys.readouterr().err
    # a bag of the other kind has the same shape: without the check it would load, every row meaning another pattern
    assert train.main(["--pretrained-encoder", path, "--pattern-buckets", "64", "--pattern-kinds", "exact",
                       "--max-steps", "2", *common]) == 1
    assert "set pattern_kinds=shapes to load it" in capsys.readouterr().err
    inspect = subprocess.run([sys.executable, os.path.join(ROOT, "load_checkpoint.py"), path],
                             capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0 and "weights loaded" in inspect.stdout, inspect


# ---------------------------------------------------------------------------------------------- the CLI

def cli(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_cli_end_to_end(small_data, tmp_path):
    data_dir, _ = small_data
    folder = tmp_path / "checkpoints"
    result = cli("--data-dir", data_dir, "--checkpoint-dir", str(folder), "--epochs", "1",
                 "--checkpoint-every-epochs", "1", "--no-progress", *TINY_ARGS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    summary = re.compile(rf"epoch 1: step {BATCHES_PER_EPOCH} val_loss=\d+\.\d{{4}} val_acc=")
    assert any(summary.match(line) for line in lines), result.stdout
    assert any(line.startswith("test: loss=") for line in lines), result.stdout
    assert any(line.startswith("validation: loss=") and "acc=" in line for line in lines), result.stdout
    run_folder = newest_run_checkpoints(folder)
    for name in ("best_model", "checkpoint_epoch_1"):
        assert (run_folder / f"{name}.pth").is_file() and (run_folder / f"{name}.json").is_file()
        assert ckpt.verify(str(run_folder / f"{name}.pth"))[0]
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"], "the CLI wrote outside its checkpoint folder"


def test_cli_on_the_bundled_dataset_with_a_progress_bar(tmp_path):
    result = cli("--checkpoint-dir", str(tmp_path / "c"), "--max-steps", "2", *TINY_ARGS[:-4], "--batch-size", "64",
                 "--device", "cpu", "--task", "puzzle_classification", "--bottleneck", "autoencoder", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "epoch 0: step 2 val_loss=" in result.stdout and "val_acc=" in result.stdout
    assert "it/s" in result.stderr or "s/it" in result.stderr, "no progress bar"
    assert "test: " in result.stdout
    assert ckpt.verify(str(newest_run_checkpoints(tmp_path / "c") / "best_model.pth"))[0]


def test_cli_help_lists_every_option_with_its_default(tmp_path):
    result = cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    text = " ".join(result.stdout.split("options:", 1)[1].split())  # the option list, not the usage line
    for f in train.dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        start = text.index(flag + " ")
        block = text[start:text.find(" --", start + len(flag) + 1 + len(f.name))]
        help_text = " ".join(f.metadata["help"].split())
        assert help_text in block, f"{flag}: help missing"
        assert f"(default: {f.default})" in block, f"{flag}: default {f.default!r} missing from {block!r}"
    for extra in ("--phase", "--resume", "--skip-verify", "--no-progress", "--task ", "--bottleneck "):
        assert extra in text


@pytest.mark.parametrize("args,needle", [
    (["--batch-size", "0"], "batch_size must be between 1 and 4096"),
    (["--learning-rate", "nan"], "learning_rate must be a finite number"),
    (["--min-temperature", "5"], "min_temperature"),
    (["--task", "nope"], "invalid choice: 'nope'"),
    (["--batch-size", "eight"], "invalid int value: 'eight'"),
    (["--use-input-output-pairs", "maybe"], "expected true or false"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--phase", "both"], "invalid choice: 'both'"),
    (["--num-conv-layers", "1"], "cell_channels needs num_conv_layers of at least 2"),
    (["--data-dir", "/no/such/folder"], "/no/such/folder: not a folder"),
    (["--device", "cuda"], "cuda") if not torch.cuda.is_available() else (["--seed", "-3"], "seed"),
])
def test_cli_invalid_options_exit_2_with_a_clear_message(args, needle, capsys):
    try:
        code = train.main(args)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err and "error" in err


def test_cli_invalid_value_exits_2_as_a_process(tmp_path):
    result = cli("--epochs", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "epochs must be between 1 and 100000, got 0" in result.stderr
    assert os.listdir(tmp_path) == []


def test_cli_resume_continues_exactly(small_data, tmp_path, capsys):
    data_dir, _ = small_data
    straight = str(tmp_path / "straight")
    common = ["--data-dir", data_dir, "--epochs", "2", "--no-progress", "--checkpoint-every-epochs", "1",
              "--task", "selection", "--temperature-decay", "0.8", *TINY_ARGS]
    assert train.main(["--checkpoint-dir", straight, *common]) == 0
    straight_out = capsys.readouterr().out
    straight_lines = [line for line in straight_out.splitlines() if line.startswith(("epoch 2:", "test:",
                                                                                      "validation:"))]
    assert len(straight_lines) == 3
    straight_run = str(newest_run_checkpoints(straight))
    # Only what says where: the rest of the settings come from the checkpoint.
    resumed = tmp_path / "resumed"
    result = cli("--resume", os.path.join(straight_run, "checkpoint_epoch_1.pth"), "--data-dir", data_dir,
                 "--checkpoint-dir", str(resumed), "--epochs", "2", "--checkpoint-every-epochs", "1", "--device", "cpu",
                 "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not any(line.startswith("epoch 1:") for line in result.stdout.splitlines())
    resumed_lines = [line for line in result.stdout.splitlines() if line.startswith(("epoch", "test:", "validation:"))]
    assert resumed_lines == straight_lines
    a = ckpt.load_checkpoint(os.path.join(straight_run, "checkpoint_epoch_2.pth"))
    b = ckpt.load_checkpoint(str(newest_run_checkpoints(resumed) / "checkpoint_epoch_2.pth"))
    assert_same(a["model_state_dict"], b["model_state_dict"], "model")
    assert_same(a["optimizer_state_dict"], b["optimizer_state_dict"], "optimizer")
    assert a["global_step"] == b["global_step"] == 2 * BATCHES_PER_EPOCH
    # A file that fails verification is refused (exit 1); --skip-verify salvages one that still loads.
    with open(os.path.join(straight_run, "checkpoint_epoch_2.pth"), "r+b") as f:
        f.seek(-3000, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3000, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    salvage = ["--data-dir", data_dir, "--checkpoint-dir", str(tmp_path / "salvage"), "--device", "cpu",
               "--no-progress", "--epochs", "2"]
    assert train.main(["--resume", os.path.join(straight_run, "checkpoint_epoch_2.pth"), *salvage]) == 1
    assert "Refusing to load" in capsys.readouterr().err
    os.remove(os.path.join(straight_run, "checkpoint_epoch_1.json"))
    assert train.main(["--resume", os.path.join(straight_run, "checkpoint_epoch_1.pth"), *salvage]) == 1
    assert "no sidecar" in capsys.readouterr().err
    assert train.main(["--resume", os.path.join(straight_run, "checkpoint_epoch_1.pth"), "--skip-verify", *salvage]) == 0
    salvaged = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("validation:", "test:"))]
    assert salvaged == [line for line in straight_lines if line.startswith(("validation:", "test:"))]


def test_a_run_with_a_frozen_pretrained_encoder_resumes_exactly_and_stays_frozen(small_data, tmp_path):
    data_dir, data = small_data
    pre = tiny_config(tmp_path / "pre", data_dir=data_dir, epochs=1, max_steps=3)
    pretrainer = Trainer(pre, data, "cpu", pre.checkpoint_dir, lambda e: None)
    pretrainer.pretrain("binary")
    encoder_file = str(checkpoints_of(pretrainer) / "pretrained_encoder_binary.pth")

    def config(folder):
        return resume_config(folder, data_dir, "reconstruction", "communication", False,
                             pretrained_encoder=encoder_file, freeze_encoder=True)

    straight, straight_events = run(config(tmp_path / "straight"), data)
    frozen = ckpt.load_checkpoint(encoder_file)["encoder_state_dict"]
    for name, value in straight.model.encoder.state_dict().items():
        assert torch.equal(value, frozen[name]), f"frozen encoder weight {name} changed"
    stopped, _ = run(config(tmp_path / "first"), data, save_and_stop_at(MID))
    # Resume with neither flag given: the checkpoint's freeze_encoder holds, the optimizer state fits.
    plain = resume_config(tmp_path / "second", data_dir, "reconstruction", "communication", False)
    resume_and_compare(str(checkpoints_of(stopped) / "mid.pth"), plain, data, straight, straight_events, after=MID)
