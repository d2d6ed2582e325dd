"""The guide's examples that need the web server, run against a live one (the address rewritten to its port)."""
import re
import subprocess
import sys

import pytest
import requests

from conftest import wait_for
from test_guide import SERVER, read_blocks

ERROR_ANSWER = re.compile(r'"error"\s*:\s*"')  # an {"error": "..."} answer; a listing's "error": null is none
SERVER_BLOCKS = [(lang, code, line) for lang, words, code, line in read_blocks() if "server" in words]


@pytest.fixture
def training_server(live_server):
    assert requests.post(live_server.url + "/start_training", json={"epochs": 1000}, timeout=5).status_code == 202
    wait_for(lambda: requests.get(live_server.url + "/status", timeout=5).json()["global_step"] > 0, what="training")
    yield live_server
    requests.post(live_server.url + "/stop", json={}, timeout=5)


def runnable(code):
    """Drop lines that follow the stream forever (curl -N): they are for a second terminal."""
    return "\n".join(line for line in code.splitlines() if "curl -N" not in line)


def test_there_are_server_examples():
    assert len(SERVER_BLOCKS) >= 3


@pytest.mark.parametrize("lang, code, line", SERVER_BLOCKS, ids=[f"line {b[2]}" for b in SERVER_BLOCKS])
def test_server_example_runs(training_server, tmp_path, lang, code, line):
    code = runnable(code).replace(f"http://{SERVER}", training_server.url)
    command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"guide line {line}:\n{result.stdout}\n{result.stderr}"
    assert not ERROR_ANSWER.search(result.stdout), result.stdout
