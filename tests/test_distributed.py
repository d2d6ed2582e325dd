"""Many processes (torchrun) train as one does: 2 real processes (DDP and FSDP2, gloo on CPU) against 1, on the
same global batches. In float64 weights and every logged metric agree to 1e-9; in float32 the largest difference is
printed. Each launch runs several runs in one process group, to keep torch's start-up to a few launches."""
import json
import math
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

import catalogue
import checkpoint as ckpt
import distributed
from conftest import write_task_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "tests", "distributed_run.py")
TASKS = {  # each with the parts that compute over the batch: normalised logits, a cell code, in-batch negatives
    "reconstruction": dict(task_type="reconstruction", bottleneck_type="communication", cell_channels=2),
    "selection": dict(task_type="selection", bottleneck_type="communication", selection_negatives="batch"),
    "puzzle_classification": dict(task_type="puzzle_classification", bottleneck_type="communication"),
}
# batch_size 9 leaves last batches of 7, 3 and 2 (odd ones split 4 / 3 and so on between 2 processes)
TINY = dict(embedding_dim=4, hidden_dim=16, latent_dim=16, num_conv_layers=2, batch_size=9, epochs=100,
            max_steps=20, checkpoint_every_epochs=0, device="cpu", temperature=2.0, temperature_decay=0.8)
TOLERANCE = 1e-9
# The sender's last bias feeds a batch norm without affine, which cancels it: its gradient is rounding alone (about
# 1e-14, against 20 for the weight beside it), which Adam scales up to lr * g / (|g| + eps), some 1e-9 a step, and
# rounds differently for each way of summing the batch; the running mean follows it. The normalised logits, the
# losses and every metric do not see it. Held to 1e-6.
ROUNDING_DRIVEN = {"sender.net.2.bias": 1e-6, "sender.norm.running_mean": 1e-6}


def launch(tmp, name, runs, data_dir, processes):
    """Run the runner on `processes` processes (torchrun when above 1); rank 0's results."""
    spec, out = tmp / f"{name}.json", tmp / f"{name}.pkl"
    spec.write_text(json.dumps({"data_dir": str(data_dir), "runs": runs}))
    command = [sys.executable, RUNNER, str(spec), str(out)]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                        "--standalone"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    with open(out, "rb") as f:
        return pickle.load(f)


def spec(name, root, dtype="float64", **changes):
    return {"name": name, "dtype": dtype, "config": {**TINY, "checkpoint_dir": str(root / name), **changes}}


def task_runs(root, strategy=None):
    extra = {"strategy": strategy} if strategy else {}
    return [spec(f"{task}-{dtype}", root, dtype, **values, **extra)
            for task, values in TASKS.items() for dtype in ("float64", "float32")]


def logged(events):
    """Every number the run published in batch, validation and finish events, by (event, step, key)."""
    figures = {}
    for i, e in enumerate(events):
        if e["type"] in ("batch", "validation", "training_finished"):
            for k, v in e.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "samples_per_sec":
                    figures[(e["type"], e.get("global_step"), k)] = v
            for k, v in (e.get("val") or {}).items():
                if isinstance(v, (int, float)):
                    figures[(e["type"], e.get("global_step"), "val_" + k)] = v
    return figures


def weight_difference(one, many):
    """The largest difference between two runs' weights; ROUNDING_DRIVEN ones only where above their bound."""
    assert one["state"].keys() == many["state"].keys()
    largest = 0.0
    for k in one["state"]:
        difference = (one["state"][k] - many["state"][k]).abs().max().item()
        largest = max(largest, difference if difference > ROUNDING_DRIVEN.get(k, 0.0) else 0.0)
    return largest


def differences(one, many):
    """The largest difference between two runs' weights, and between the metrics they logged (and tested)."""
    weights = weight_difference(one, many)
    a, b = metric_pairs(one, many)
    metrics = max(abs(a[k] - b[k]) for k in a if not (isinstance(a[k], float) and math.isnan(a[k])))
    return weights, metrics


def metric_pairs(one, many):
    """Every logged and tested figure of two runs, by (event, step, key)."""
    a, b = logged(one["events"]), logged(many["events"])
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for split in ("test",):
        if one[split] is not None:
            # a figure may be undefined (None: the topographic similarity of messages all alike), in both or neither
            assert [k for k, v in one[split].items() if v is None] == [k for k, v in many[split].items() if v is None]
            a.update({(split, k): v for k, v in one[split].items() if v is not None})
            b.update({(split, k): many[split][k] for k in one[split] if one[split][k] is not None})
    return a, b


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The task folder; then ddp on 2 processes (with a run that saves at step 10, one that resumes from that
    save, and one given commands), one process (the references, a resume of the ddp folder, a save at step 10),
    fsdp on 2 (a save at step 10; resumes of it under fsdp and ddp, of the ddp folder, and of the one-process
    file)."""
    tmp = tmp_path_factory.mktemp("distributed")
    data_dir = write_task_folder(tmp / "tasks", n_training=6, n_evaluation=2)
    ddp_runs = task_runs(tmp / "ddp", "ddp") + [
        spec("save10", tmp / "ddp", **TASKS["selection"], max_steps=10),
        {**spec("same-size", tmp / "ddp", **TASKS["selection"]), "resume_from": ["save10", "best_model"]},
        {**spec("commands", tmp / "ddp", **TASKS["reconstruction"], checkpoint_every_epochs=1, keep_best_k=2,
                autosave_minutes=1e-5),  # an autosave at nearly every step, on rank 0's clock
         "commands": {2: {"type": "pause"}, 3: {"type": "save", "name": "asked_at_3"}, 7: {"type": "stop"}},
         "when_paused": {"type": "resume"}}]
    ddp = launch(tmp, "ddp", ddp_runs, data_dir, 2)
    record = ddp["save10"]["events"]
    best = [e for e in record if e["type"] == "checkpoint_saved" and e["name"] == "best_model"][-1]
    one = launch(tmp, "one", task_runs(tmp / "one") + [
        {**spec("resumed", tmp / "one", **TASKS["selection"]), "resume": best["path"]},
        spec("save10", tmp / "one", **TASKS["selection"], max_steps=10)], data_dir, 1)
    one_file = [e for e in one["save10"]["events"] if e["type"] == "checkpoint_saved"][-1]["path"]
    fsdp = launch(tmp, "fsdp", task_runs(tmp / "fsdp", "fsdp") + [
        spec("save10", tmp / "fsdp", **TASKS["selection"], max_steps=10, strategy="fsdp"),
        {**spec("resumed", tmp / "fsdp", **TASKS["selection"], strategy="fsdp"), "resume": best["path"]},
        {**spec("same-size", tmp / "fsdp", **TASKS["selection"], strategy="fsdp"),
         "resume_from": ["save10", "best_model"]},
        {**spec("under-ddp", tmp / "fsdp", **TASKS["selection"], strategy="ddp"),
         "resume_from": ["save10", "best_model"]},
        {**spec("from-file", tmp / "fsdp", **TASKS["selection"], strategy="fsdp"), "resume": one_file}],
        data_dir, 2)
    return {"ddp": ddp, "one": one, "fsdp": fsdp, "best": best, "one_file": one_file}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("task", list(TASKS))
def test_two_processes_train_as_one(runs, strategy, task):
    one, many = runs["one"][f"{task}-float64"], runs[strategy][f"{task}-float64"]
    assert many["steps"] == [20, 20]
    assert sum(e["type"] == "validation" for e in many["events"]) > 1  # every epoch's, pooled over both processes
    weights, metrics = differences(one, many)
    assert weights < TOLERANCE and metrics < TOLERANCE, (weights, metrics)
    print(f"\n{strategy} {task} float32, 2 processes vs 1: " + float32_report(
        runs["one"][f"{task}-float32"], runs[strategy][f"{task}-float32"]))


def float32_report(one, many):
    """The largest float32 differences: weights (the rounding-driven apart), the first step's loss, any metric."""
    weight = {k: (one["state"][k] - many["state"][k]).abs().max().item() for k in one["state"]}
    driven = max((v for k, v in weight.items() if k in ROUNDING_DRIVEN), default=0.0)
    a, b = metric_pairs(one, many)
    first = abs(a[("batch", 1, "loss")] - b[("batch", 1, "loss")])
    key = max((k for k in a if not math.isnan(a[k])), key=lambda k: abs(a[k] - b[k]))
    return (f"weights {max(v for k, v in weight.items() if k not in ROUNDING_DRIVEN):.1e} (rounding-driven "
            f"{driven:.1e}), step 1 loss {first:.1e}, largest metric difference {abs(a[key] - b[key]):.1e} "
            f"({' '.join(map(str, key))})")


def test_a_checkpoint_resumes_at_another_world_size_and_strategy(runs):
    """2 processes (ddp) -> 1 and -> fsdp; fsdp -> ddp; a one-process .pth -> 2 processes: to the float64
    tolerance of the one-process run that never stopped."""
    best = runs["best"]
    assert best["global_step"] == 10 and best["path"].endswith(".dcp")
    record = ckpt.load_checkpoint(best["path"])  # consolidated: the raw model's keys, torch.optim's own form
    assert not any(k.startswith("module.") for k in record["model_state_dict"])
    assert all(isinstance(k, int) for k in record["optimizer_state_dict"]["state"])
    assert runs["one_file"].endswith(".pth")
    straight = runs["one"]["selection-float64"]
    for resumed in (runs["one"]["resumed"], runs["fsdp"]["resumed"], runs["fsdp"]["under-ddp"],
                    runs["fsdp"]["from-file"]):
        assert resumed["steps"][0] == 20
        assert weight_difference(straight, resumed) < TOLERANCE
        assert max(abs(straight["test"][k] - resumed["test"][k]) for k in straight["test"]) < TOLERANCE


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_checkpoint_resumes_bit_identically_at_the_same_world_size(runs, strategy):
    straight, resumed = runs[strategy]["selection-float64"], runs[strategy]["same-size"]
    assert resumed["steps"] == [20, 20]
    for key, tensor in straight["state"].items():
        assert torch.equal(tensor, resumed["state"][key]), key
    assert straight["test"] == resumed["test"]
    after = [e for e in straight["events"] if e["type"] == "batch" and e["global_step"] > 10]
    again = [e for e in resumed["events"] if e["type"] == "batch"]
    assert [e["loss"] for e in after] == [e["loss"] for e in again]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_several_processes_save_dcp_folders_sharded_or_deduplicated(runs, strategy):
    """Each rank writes its part: fsdp's shards split the state, ddp's replicas are written once (by whichever
    rank DCP's planner gives each tensor). The sidecar lists every file; every rank's RNG state is kept."""
    saved = [e for e in runs[strategy]["save10"]["events"] if e["type"] == "checkpoint_saved"][-1]
    folder = saved["path"]
    assert folder.endswith("best_model.dcp") and ckpt.verify(folder)[0]
    files = sorted(os.listdir(folder))
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "record.pth"]
    sizes = [os.path.getsize(os.path.join(folder, f)) for f in ("__0_0.distcp", "__1_0.distcp")]
    record = ckpt.load_checkpoint(folder)
    tensor_bytes = sum(t.numel() * t.element_size() for t in record["model_state_dict"].values()) + sum(
        t.numel() * t.element_size() for s in record["optimizer_state_dict"]["state"].values() for t in s.values())
    assert tensor_bytes <= sum(sizes) < 1.2 * tensor_bytes  # one copy of the state, not one per rank
    assert min(sizes) > 0.2 * sum(sizes)  # both ranks wrote a share
    rest = torch.load(os.path.join(folder, "record.pth"))
    assert len(rest["rng_states"]) == 2 and rest["dcp"]["world_size"] == 2 and rest["dcp"]["strategy"] == strategy


def test_rank_0_decides_saves_pause_and_stop_and_the_others_follow(runs):
    run = runs["ddp"]["commands"]
    assert run["steps"] == [7, 7]  # the stop was queued on rank 0 only
    kinds = [e["type"] for e in run["events"]]
    assert kinds.index("training_paused") < kinds.index("training_resumed")
    saved = {e["name"]: e for e in run["events"] if e["type"] == "checkpoint_saved"}
    assert saved["asked_at_3"]["global_step"] == 3
    assert saved["checkpoint_epoch_1"]["global_step"] == 5
    assert any(name.startswith("autosave_step_") for name in saved)
    assert any(name.startswith("best_k_step_") for name in saved)
    assert run["final_checkpoint"]["name"] == "interrupted_step_7"
    assert ckpt.load_checkpoint(saved["interrupted_step_7"]["path"])["global_step"] == 7
    assert kinds[-1] == "training_stopped"


def test_ddp_and_fsdp_folders_consolidate_to_the_same_record(runs):
    """The same 10 steps saved under ddp and under fsdp: the same consolidated record, optimizer state included."""
    ddp, fsdp = (ckpt.load_checkpoint([e for e in runs[s]["save10"]["events"] if e["type"] == "checkpoint_saved"
                                       and e["name"] == "best_model"][-1]["path"]) for s in ("ddp", "fsdp"))
    assert ddp["model_state_dict"].keys() == fsdp["model_state_dict"].keys()
    assert weight_difference({"state": ddp["model_state_dict"]}, {"state": fsdp["model_state_dict"]}) < TOLERANCE
    ours, theirs = ddp["optimizer_state_dict"], fsdp["optimizer_state_dict"]
    assert ours["param_groups"] == theirs["param_groups"] and ours["state"].keys() == theirs["state"].keys()
    for i, moments in ours["state"].items():  # step, exp_avg, exp_avg_sq
        assert all((moments[k] - theirs["state"][i][k]).abs().max() < TOLERANCE for k in moments)


def test_split_rows_cover_the_batch_in_order():
    for n in range(0, 12):
        for world in (1, 2, 3):
            parts = [distributed.DistributedContext(rank, world).split_rows(n) for rank in range(world)]
            rows = [i for part in parts for i in range(n)[part]]
            assert rows == list(range(n))
            assert max(map(len, map(range(n).__getitem__, parts))) - min(
                map(len, map(range(n).__getitem__, parts))) <= 1


def test_one_process_context_does_nothing():
    one = distributed.SINGLE
    sums = {"loss": (3.0, 2)}
    assert one.is_primary and one.world_size == 1
    assert one.all_reduce_sums(sums) is sums and one.broadcast("x") == "x" and one.rows(5) == (0, 5)
    x = torch.ones(3)
    assert one.gather_rows(x) is x and one.sum_rows(x) is x and one.total(4) == 4
    with pytest.raises(ValueError, match="strategy"):
        one.wrap(torch.nn.Linear(1, 1), "zero")


def torchrun_train(tmp_path, data_dir, *flags, launcher=()):
    """train.py under real torchrun on 2 processes (with torchrun's own flags `launcher`), its output piped."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--standalone", *launcher, "train.py", "--data-dir", str(data_dir), "--no-progress",
               "--checkpoint-dir", str(tmp_path / "checkpoints"), "--device", "cpu", "--embedding-dim", "4",
               "--hidden-dim", "16", "--latent-dim", "16", "--num-conv-layers", "2", "--batch-size", "9",
               "--checkpoint-every-epochs", "0", *flags]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_pid(launcher, rank):
    """The pid of torchrun's worker of that rank (a child of its agent), read from the workers' environment."""
    with open(f"/proc/{launcher.pid}/task/{launcher.pid}/children") as f:
        children = f.read().split()
    for pid in children:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_task_folder(tmp_path_factory.mktemp("cli") / "tasks", n_training=6, n_evaluation=2)


def test_train_py_under_torchrun_prints_once_from_rank_0(tmp_path, task_dir):
    run = torchrun_train(tmp_path, task_dir, "--strategy", "fsdp", "--max-steps", "6")
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err[-3000:]
    starts = [line.split(" ")[0] for line in out.splitlines()]
    assert starts.count("run") == starts.count("validation:") == starts.count("test:") == 1, out
    assert "best: validation at step 6" in out


@pytest.mark.parametrize("rank", [0, 1])
def test_a_signal_to_one_rank_stops_every_rank_at_one_step(tmp_path, task_dir, rank):
    """Rank 0 alone (it decides, and broadcasts the stop), or rank 1 alone (as a signal to one node's agent reaches
    only its own ranks): every rank stops at the same step and the interrupted checkpoint is saved."""
    run = torchrun_train(tmp_path, task_dir, "--epochs", "100000", "--task", "selection")
    for line in run.stdout:  # the first epoch's line: training is under way on both ranks
        if line.startswith("epoch 1:"):
            break
    os.kill(rank_pid(run, rank), signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err[-3000:]
    interrupted = [p for p in (tmp_path / "checkpoints").rglob("interrupted_step_*.dcp")]
    assert len(interrupted) == 1, err[-3000:]
    assert "resume: " in err and "test: " not in out


def test_a_batch_size_that_leaves_a_process_no_example_is_refused(tmp_path, task_dir):
    run = torchrun_train(tmp_path, task_dir, "--batch-size", "13")  # 40 training grids: a last batch of 1
    out, err = run.communicate(timeout=120)
    assert run.returncode != 0
    assert "batch_size 13 leaves a reconstruction batch of 1 example(s), fewer than the 2 processes" in err


def final_weights(root):
    """The model state of the one run under root, as its last periodic checkpoint holds it."""
    runs = catalogue.list_runs(str(root))
    assert len(runs) == 1, runs  # a restarted group continues its run: no second one
    rows = catalogue.list_checkpoints(str(root), run=runs[0]["run_id"])
    assert rows and not any(r["damaged"] for r in rows)
    last = max((r for r in rows if r["kind"] == "periodic"), key=lambda r: r["global_step"])
    return last["global_step"], ckpt.load_checkpoint(last["path"])["model_state_dict"]


def test_with_max_restarts_a_killed_rank_restarts_the_group_which_ends_as_if_never_stopped(tmp_path, task_dir):
    """torchrun --max-restarts 1: rank 1 SIGKILLed mid-run; torchrun restarts both ranks, which continue the run
    from its latest good checkpoint and end with the very weights of a run never stopped (bit-exact)."""
    flags = ("--epochs", "12", "--task", "selection", "--checkpoint-every-epochs", "1")
    straight = torchrun_train(tmp_path / "straight", task_dir, *flags)
    out, err = straight.communicate(timeout=180)
    assert straight.returncode == 0, err[-3000:]
    killed = torchrun_train(tmp_path / "killed", task_dir, *flags, launcher=("--max-restarts", "1"))
    before = []
    for line in killed.stdout:
        before.append(line)
        if line.startswith("epoch 4:"):
            break
    os.kill(rank_pid(killed, 1), signal.SIGKILL)
    out, err = killed.communicate(timeout=180)
    assert killed.returncode == 0, err[-3000:]
    banners = [line for line in before + out.splitlines(True) if line.startswith("run ")]
    runs = [line.split()[1].rstrip(":,") for line in banners]
    assert len(runs) == 2 and runs[0] == runs[1], banners  # the restarted group went on with the same run
    assert f"restart of {runs[0]}:checkpoint_epoch_" in banners[1], banners
    (step_a, a), (step_b, b) = final_weights(tmp_path / "straight" / "checkpoints"), \
        final_weights(tmp_path / "killed" / "checkpoints")
    assert step_a == step_b
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
