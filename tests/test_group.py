"""The web app runs a multi-process run as a process group (group.py): real server, real HTTP and server-sent events,
2 real processes launched by torch.distributed's launcher. Save, pause, resume and stop reach rank 0 through the
worker's queue; rank 0's events come back to the page's stream; a killed rank ends the run with a training_error
that names it, and the server lives on."""
import os
import random
import signal

import pytest
import requests

import catalogue
import checkpoint as ckpt
from conftest import EventReader, LiveServer, build_app, wait_for, write_task_folder
from data import load_data

TINY = dict(embedding_dim=4, hidden_dim=16, latent_dim=16, num_conv_layers=2, batch_size=9, epochs=100000,
            device="cpu", checkpoint_every_epochs=0, task_type="selection")
GROUP_START = 120  # seconds for 2 processes to import torch, load the data and meet (far less, unloaded)


@pytest.fixture
def server(tmp_path):
    tasks = write_task_folder(tmp_path / "tasks", n_training=6, n_evaluation=2)
    app = build_app(tmp_path / "checkpoints", load_data("arcagi", str(tasks)), DATA_DIR=str(tasks), PROCESSES=2)
    app.config["TRAIN_DEFAULTS"] = TINY
    live = LiveServer(app)
    reader = EventReader(live.url)
    yield live, reader
    reader.close()
    live.close()


def post(server, path, **body):
    return requests.post(server.url + path, json=body, timeout=60)


def status(server):
    return requests.get(server.url + "/status", timeout=10).json()


def start(server, reader, **fields):
    response = post(server, "/start_training", **{**TINY, **fields})
    assert response.status_code == 202, response.text
    reader.wait("training_started", timeout=GROUP_START)
    wait_for(lambda: status(server)["global_step"] > 2, timeout=60, what="the group to take steps")
    return response.json()["run_id"]


def worker_pids(rank):
    """This process's grandchildren of that rank: the launcher's agent runs here, its workers are our children."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if parent == os.getpid() and f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b"".join(env):
            found.append(int(pid))
    return found


def test_a_two_process_run_saves_pauses_resumes_and_stops_from_http(server):
    live, reader = server
    run_id = start(live, reader)
    assert status(live)["processes"] == 2
    saved = post(live, "/save_checkpoint", name="by_curl", wait=True, timeout=120)
    assert saved.status_code == 200, saved.text
    path = saved.json()["path"]
    assert path.endswith("by_curl.dcp") and ckpt.verify(path)[0]
    assert post(live, "/pause").status_code == 202
    wait_for(lambda: reader.named("training_paused"), timeout=60, what="the group to pause")
    step = status(live)["global_step"]
    assert post(live, "/resume_training").status_code == 202
    wait_for(lambda: status(live)["global_step"] > step, timeout=60, what="training to go on after resume")
    assert reader.wait("metrics", lambda d: d["run_id"] == run_id and d["train"])  # the live charts' points
    assert post(live, "/stop").status_code == 202
    stopped = reader.wait("training_stopped", timeout=120)
    final = stopped["final_checkpoint"]
    assert final["name"].startswith("interrupted_step_") and final["path"].endswith(".dcp")
    rows = catalogue.list_checkpoints(str(live.app.config["CHECKPOINT_DIR"]), run=run_id)
    assert {"by_curl", final["name"]} <= {r["name"] for r in rows} and not any(r["damaged"] for r in rows)
    wait_for(lambda: status(live)["phase"] == "finished", timeout=60, what="the worker to finish the run")


def test_twenty_random_requests_on_a_two_process_run_never_hang(server):
    """Saves (waited or not), pauses, resumes and stops in random order; a stop is followed by a new run that
    resumes the stopped one from its final checkpoint (a DCP folder, on 2 processes again). Every request is
    answered within its timeout and every save it accepted is saved."""
    live, reader = server
    start(live, reader)
    rng, paused, accepted = random.Random(20), False, []
    for i in range(20):
        op = rng.choice(["save", "save", "wait_save", "pause", "resume", "stop"])
        if op in ("save", "wait_save"):
            waited = {"wait": True, "timeout": 120} if op == "wait_save" else {}
            response = post(live, "/save_checkpoint", name=f"random_{i}", **waited)
            assert response.status_code == (200 if waited else 202), response.text
            accepted.append(response.json()["request_id"])
        elif op == "stop":
            stops = len(reader.named("training_stopped"))
            assert post(live, "/stop").status_code == 202
            wait_for(lambda: len(reader.named("training_stopped")) > stops, timeout=120, what="the stop")
            final = reader.named("training_stopped")[-1]["final_checkpoint"]
            wait_for(lambda: status(live)["phase"] == "finished", timeout=60, what="the run to end")
            response = post(live, "/start_training", resume_from=final["id"])
            assert response.status_code == 202, response.text
            wait_for(lambda: status(live)["phase"] == "training" and status(live)["global_step"] > final["global_step"],
                     timeout=GROUP_START, what="the resumed run to take steps")
            paused = False
        else:
            response = post(live, "/pause" if op == "pause" else "/resume_training")
            expected = 409 if paused == (op == "pause") else 202
            assert response.status_code == expected, (op, paused, response.text)
            paused = op == "pause" if response.status_code == 202 else paused
    assert post(live, "/stop").status_code == 202
    wait_for(lambda: status(live)["phase"] == "finished", timeout=120, what="the last run to end")
    assert accepted
    for request_id in accepted:
        state = requests.get(f"{live.url}/save_requests/{request_id}", timeout=10).json()
        assert state["state"] == "saved" and state["path"].endswith(".dcp"), state


def test_a_killed_rank_ends_the_run_with_an_error_naming_it_and_the_server_lives_on(server):
    live, reader = server
    start(live, reader, checkpoint_every_epochs=1)
    reader.wait("checkpoint_saved", timeout=60)
    victims = worker_pids(1)
    assert len(victims) == 1, victims
    os.kill(victims[0], signal.SIGKILL)
    error = reader.wait("training_error", timeout=120)
    assert "rank 1" in error["error"] and "SIGKILL" in error["error"], error
    assert {"rank": 1, "signal": "SIGKILL"}.items() <= next(f for f in error["failures"] if f["rank"] == 1).items()
    assert status(live)["phase"] == "error"
    rows = catalogue.list_checkpoints(str(live.app.config["CHECKPOINT_DIR"]))
    assert rows and not any(r["damaged"] for r in rows)
    response = post(live, "/start_training", **TINY, processes=1, max_steps=2)  # the server goes on serving
    assert response.status_code == 202, response.text
    wait_for(lambda: status(live)["phase"] == "finished", timeout=60, what="a one-process run after the crash")


@pytest.mark.parametrize("processes", [0, 65, "2", True, 1.5])
def test_a_bad_number_of_processes_is_a_400_naming_it(server, processes):
    live, _ = server
    response = post(live, "/start_training", **TINY, processes=processes)
    assert response.status_code == 400 and "processes" in response.json()["error"]


@pytest.mark.parametrize("flag, message", [("0", "from 1 to"), ("x", "expected a whole number of processes"),
                                           (str(os.cpu_count() + 1), "this machine's CPU cores")])
def test_app_py_refuses_a_bad_nproc_per_node_in_one_line(flag, message, capsys):
    import app
    with pytest.raises(SystemExit) as exit_:
        app.build_parser().parse_args(["--nproc-per-node", flag])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.strip().splitlines()[-1].startswith("usage") is False
