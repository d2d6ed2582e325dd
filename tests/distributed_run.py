"""What tests/test_distributed.py launches, under torchrun or as one plain process: the runs a JSON spec lists.

    python tests/distributed_run.py SPEC.json OUT.pkl
    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_run.py SPEC.json OUT.pkl

SPEC: {"data_dir", "runs": [{"name", "config": {TrainConfig fields}, "dtype": "float64" | "float32",
"resume": path or null, "resume_from": [an earlier run of this spec, a checkpoint it saved] or null, "commands": {global step: command} (put on rank 0's queue after that step),
"when_paused": command (put on it when the run has paused)}]}.
Rank 0 writes OUT: {name: {"events", "state" (the whole model state, float64), "test", "steps" (every rank's
global_step), "final_checkpoint"}}.
"""
import json
import os
import pickle
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distributed  # noqa: E402
from data import load_data  # noqa: E402
from train import Trainer, TrainConfig  # noqa: E402


def run(spec, data, context, earlier):
    """One run of the spec, in its dtype: what rank 0 keeps of it."""
    events, commands = [], {int(step): command for step, command in spec.get("commands", {}).items()}
    torch.set_default_dtype(getattr(torch, spec["dtype"]))
    try:
        config = TrainConfig.from_dict(spec["config"])

        def publish(event):  # rank 0's only: the others' publish is dropped
            events.append(event)
            if event["type"] == "batch" and event["global_step"] in commands:
                trainer.commands.put(commands[event["global_step"]])
            if event["type"] == "training_paused" and spec.get("when_paused"):
                trainer.commands.put(spec["when_paused"])

        trainer = Trainer(config, data, context.device, config.checkpoint_dir, publish, dist=context)
        if spec.get("resume_from"):  # rank 0 saw where the earlier run saved it; every rank resumes from there
            run_name, name = spec["resume_from"]
            saved = [e for e in earlier.get(run_name, {}).get("events", [])
                     if e["type"] == "checkpoint_saved" and e["name"] == name]
            trainer.resume(context.broadcast(saved[-1]["path"] if saved else None))
        elif spec.get("resume"):
            trainer.resume(spec["resume"])
        else:
            trainer.setup()
        trainer.train()
        test = None if trainer.stop_requested.is_set() else trainer.test()
        state = distributed.full_state(trainer.model, trainer.optimizer)[0] if context.world_size > 1 else \
            trainer.raw_model.state_dict()
        steps = context.gather_objects(trainer.global_step)
    finally:
        torch.set_default_dtype(torch.float32)
    return {"events": events, "test": test, "steps": steps, "final_checkpoint": trainer.final_checkpoint,
            "state": {k: v.detach().to(torch.float64).clone() for k, v in state.items()}}


def main(spec_path, out_path):
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    context = distributed.from_environment("cpu")
    try:
        data = load_data("arcagi", spec["data_dir"])
        results = {}
        for one in spec["runs"]:
            results[one["name"]] = run(one, data, context, results)
        if context.is_primary:
            with open(out_path, "wb") as f:
                pickle.dump(results, f)
    finally:
        context.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
    distributed.leave(0)
