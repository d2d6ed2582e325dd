"""The docs' examples marked `server` (```bash server, ```python server), each run twice in a row against one live
server that is training. The one thing changed in them is the address: the guide's http://127.0.0.1:5002 becomes
the live server's own (a free loopback port, so that tests can run side by side)."""
import re
import subprocess
import sys

import pytest
import requests

from conftest import wait_for
from test_guide import SERVER, block_id, read_blocks

ERROR_ANSWER = re.compile(r'"error"\s*:\s*"')  # an {"error": "..."} answer; a listing's "error": null is none
SERVER_BLOCKS = [b for b in read_blocks() if "server" in b.words and not b.not_run]


@pytest.fixture
def training_server(live_server):
    assert requests.post(live_server.url + "/start_training", json={"epochs": 1000}, timeout=5).status_code == 202
    wait_for(lambda: requests.get(live_server.url + "/status", timeout=5).json()["global_step"] > 0, what="training")
    yield live_server
    requests.post(live_server.url + "/stop", json={}, timeout=5)


def test_there_are_server_examples():
    assert len(SERVER_BLOCKS) >= 3
    assert all(f"http://{SERVER}" in b.code for b in SERVER_BLOCKS), "each names the server's address"


@pytest.mark.parametrize("block", SERVER_BLOCKS, ids=map(block_id, SERVER_BLOCKS))
def test_server_example_runs_twice(training_server, tmp_path, block):
    code = block.code.replace(f"http://{SERVER}", training_server.url)
    command = [sys.executable, "-c", code] if block.lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    for which in ("first", "second"):
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        told = f"{block_id(block)}, {which} run (exit {result.returncode}):\n{block.code}\n{result.stdout}\n{result.stderr}"
        assert result.returncode == 0, told
        assert not ERROR_ANSWER.search(result.stdout), told
