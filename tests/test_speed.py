"""bf16 mixed precision and torch.compile (speed.py): what changes, what must not, and how a missing backend reads."""
import logging
import os
import subprocess
import sys

import pytest
import torch

import speed
from conftest import newest_run_checkpoints, tiny_config, write_task_folder
from data import load_data
from train import LOSSES, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = write_task_folder(tmp_path_factory.mktemp("tasks"), n_training=6, n_evaluation=2, seed=5)
    return str(root), load_data(data_dir=str(root))


def built(tmp_path, data, **changes):
    trainer = Trainer(tiny_config(tmp_path / "ck", **changes), data, "cpu", str(tmp_path / "ck"), lambda e: None)
    trainer.setup()
    return trainer


@pytest.mark.parametrize("task", ["reconstruction", "selection"])
def test_bf16_mixed_computes_the_forward_pass_in_bf16_and_keeps_the_rest_float32(small_data, tmp_path, task):
    _, data = small_data
    trainer = built(tmp_path, data, task_type=task, precision="bf16-mixed", cell_channels=2)
    batch = trainer._to_device(trainer.train_batches.batch(0, 0))
    seen = []
    hook = trainer.model.encoder.convs[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out = trainer._forward(trainer.model, batch)
    hook.remove()
    assert seen == [torch.bfloat16] * len(seen) and seen  # the convolutions ran in bf16
    floats = [v for v in out.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)  # the losses read float32
    loss, _ = LOSSES[task](out, batch)
    loss.backward()
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
               for p in trainer.model.parameters())
    trainer.optimizer.step()
    assert all(v.dtype == torch.float32 for s in trainer.optimizer.state.values() for v in s.values()
               if v.is_floating_point() and v.dim())
    # the same model in float32 gives close but other outputs: autocast did change the arithmetic
    eager = built(tmp_path / "b", data, task_type=task, cell_channels=2)
    eager.model.load_state_dict(trainer.model.state_dict())
    again = trainer.generator.get_state()
    key = "colors" if task == "reconstruction" else "scores"
    with torch.no_grad():
        trainer.model.eval(), eager.model.eval()
        low, high = trainer._forward(trainer.model, batch)[key], eager._forward(eager.model, batch)[key]
    assert again is not None and not torch.equal(low, high) and torch.allclose(low, high, atol=0.5, rtol=0.1)


def test_a_checkpoint_resumes_and_fine_tunes_at_another_precision_with_a_log_line(small_data, tmp_path, caplog):
    _, data = small_data
    first = built(tmp_path / "a", data, max_steps=2)
    first.train()
    path = str(newest_run_checkpoints(tmp_path / "a" / "ck") / "best_model.pth")
    assert torch.load(path)["config"]["precision"] == "32"
    with caplog.at_level(logging.WARNING, logger="train"):
        resumed = Trainer(tiny_config(tmp_path / "b", max_steps=4, precision="bf16-mixed"), data, "cpu",
                          str(tmp_path / "b"), lambda e: None)
        resumed.resume(path)
        resumed.train()
    assert resumed.global_step == 4 and resumed.config.precision == "bf16-mixed"
    assert f"resuming {path} at precision bf16-mixed; it trained at 32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="train"):
        tuned = built(tmp_path / "c", data, precision="bf16-mixed")
        tuned.load_weights(path)
    assert f"fine-tuning from {path} at precision bf16-mixed; it trained at 32" in caplog.text


def test_precision_is_refused_unless_known(tmp_path):
    with pytest.raises(ValueError, match="precision must be one of 32, bf16-mixed, got 'fp16'"):
        tiny_config(tmp_path, precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        speed.autocast("cpu", "16")


def test_compile_without_a_cxx_compiler_warns_once_and_trains_eager(small_data, tmp_path):
    data_dir, _ = small_data
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "train.py", "--data-dir", data_dir, "--checkpoint-dir", str(tmp_path / "ck"),
         "--embedding-dim", "4", "--hidden-dim", "16", "--latent-dim", "16", "--num-conv-layers", "2",
         "--batch-size", "8", "--epochs", "1", "--max-steps", "2", "--compile", "true", "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "compile" in line]
    assert len(warnings) == 1, result.stderr
    assert "torch.compile cannot run here" in warnings[0] and "No working C++ compiler" in warnings[0]
    assert "training runs eager instead" in warnings[0]
    assert "Traceback" not in result.stderr and ", compiled" not in result.stdout
    assert (newest_run_checkpoints(tmp_path / "ck") / "best_model.pth").exists()


def events_of(tmp_path, data, **changes):
    """A trainer on a tiny config and the events it publishes."""
    events = []
    trainer = Trainer(tiny_config(tmp_path / "ck", **changes), data, "cpu", str(tmp_path / "ck"), events.append)
    return trainer, events


def test_a_compiled_run_reports_its_compile_time_and_its_checkpoints_load_into_eager_models_and_back(
        small_data, tmp_path, monkeypatch):
    # aot_eager traces and wraps the model as inductor does, without generating C++ (a minute on these cores)
    monkeypatch.setattr(speed, "BACKEND", "aot_eager")
    _, data = small_data
    compiled, events = events_of(tmp_path / "a", data, bottleneck_type="autoencoder", compile=True, max_steps=3)
    compiled.train()
    reports = [e for e in events if e["type"] == "compile"]
    assert compiled.compiled and len(reports) == 1 and reports[0]["compiled"] and reports[0]["seconds"] > 0
    path = str(newest_run_checkpoints(tmp_path / "a" / "ck") / "best_model.pth")
    record = torch.load(path)
    assert record["config"]["compile"] is True
    assert not [k for k in record["model_state_dict"] if "_orig_mod" in k]
    eager = built(tmp_path / "b", data, bottleneck_type="autoencoder")
    eager.model.load_state_dict(record["model_state_dict"])  # strict: the same keys
    batch = eager._to_device(eager.train_batches.batch(0, 0))
    with torch.no_grad():
        compiled.model.eval(), eager.model.eval()
        ran_compiled = compiled._forward(compiled.model, batch)["colors"]
        ran_eager = eager._forward(eager.model, batch)["colors"]
    assert torch.allclose(ran_compiled, ran_eager, atol=1e-5)
    again, _ = events_of(tmp_path / "c", data, bottleneck_type="autoencoder", compile=True, max_steps=5)
    again.resume(path)  # and back: an eager-loadable checkpoint resumes compiled
    again.train()
    assert again.compiled and again.global_step == 5


def test_a_backend_that_fails_inside_a_step_warns_once_and_the_run_goes_on_eager_exactly(
        small_data, tmp_path, monkeypatch, caplog):
    graphs = []

    def fails_after_the_probe(graph, example_inputs):
        graphs.append(graph)
        if len(graphs) > 1:
            raise RuntimeError("the backend broke on this graph")
        return graph.forward

    monkeypatch.setattr(speed, "BACKEND", fails_after_the_probe)
    _, data = small_data
    with caplog.at_level(logging.WARNING, logger="train"):
        trainer, events = events_of(tmp_path / "a", data, compile=True, max_steps=3)
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "compile" in r.getMessage()]
    assert len(graphs) == 2 and len(warnings) == 1, warnings  # the probe, then the step's first graph
    assert "torch.compile failed inside step 1" in warnings[0] and "the backend broke" in warnings[0]
    reports = [e for e in events if e["type"] == "compile"]
    assert [r["compiled"] for r in reports] == [False] and not trainer.compiled
    eager, _ = events_of(tmp_path / "b", data, max_steps=3)
    eager.train()  # the failed step was taken again from the same state: the two runs are one run
    for name, value in eager.model.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[name]), name
