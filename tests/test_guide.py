"""CHECKPOINT_GUIDE.md is true: every example runs as written against a folder made by tiny headless runs.

Blocks fenced ```python or ```bash run here, all at once (each run pays about 1.7 s of importing torch), each in
its own working folder holding a copy of checkpoints/, so the examples' relative paths resolve there. That root
holds the two runs the guide names: TRAINING_RUN (best_model, checkpoint_epoch_1, checkpoint_epoch_2) and, started
after it, PRETRAINING_RUN (pretrained_encoder_binary), each in checkpoints/runs/RUN_ID/checkpoints/. Their ids are
fixed (Trainer's run_id) so that the guide can show real ids and paths. Blocks whose info string has the word
`server` need the web server and are run elsewhere. In bash blocks, `python train.py` gets tiny settings and the
test's task folder in front of the example's own flags (argparse keeps the last value), so each command takes
seconds. The guide's key table and its troubleshooting messages are checked against real records and the source.
"""
import concurrent.futures
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import catalogue
import checkpoint as ckpt
from conftest import tiny_config, write_task_folder
from data import load_data
from train import Trainer

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "CHECKPOINT_GUIDE.md"
FENCE = re.compile(r"^```(\S*)[ \t]*([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
COMMAND = re.compile(r"\bpython (train\.py|load_checkpoint\.py)\b")
SERVER = "127.0.0.1:5002"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: a second thread only adds overhead on 2 cores
TRAINING_RUN = "20261201-191154-9b17c5"
PRETRAINING_RUN = "20261201-191502-4e0a7d"


def read_blocks():
    """[(language, info words, code, line number)] of every fenced block, in order."""
    text = GUIDE.read_text(encoding="utf-8")
    return [(m.group(1), m.group(2).split(), m.group(3), text.count("\n", 0, m.start()) + 1)
            for m in FENCE.finditer(text)]


def section(title):
    """The guide's text under the heading `## title`, up to the next `## ` heading."""
    text = GUIDE.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


BLOCKS = read_blocks()
RUNNABLE = [(lang, code, line) for lang, words, code, line in BLOCKS
            if lang in ("python", "bash") and "server" not in words]


def tiny_train_flags(tasks):
    return ["--data-dir", tasks, "--embedding-dim", "4", "--hidden-dim", "16", "--latent-dim", "16",
            "--num-conv-layers", "2", "--batch-size", "8", "--device", "cpu", "--epochs", "1", "--no-progress"]


def shell_script(code, tasks):
    """The block with its python commands run by this interpreter from the project; train.py made tiny."""
    def rewrite(match):
        script = match.group(1)
        tiny = " " + shlex.join(tiny_train_flags(tasks)) if script == "train.py" else ""
        return f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / script))}{tiny}"
    return COMMAND.sub(rewrite, code)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """checkpoints/ of a 2-epoch tiny run and a short encoder pretraining (two runs), and their task folder."""
    root = tmp_path_factory.mktemp("guide")
    tasks = write_task_folder(str(root / "tasks"))
    folder = root / "work" / "checkpoints"
    data, events = load_data(data_dir=tasks), []
    # The records say checkpoint_dir "checkpoints", as a run started in its working folder would: an example that
    # resumes with the saved config then writes into its own copy, never into the folder the others copy from.
    Trainer(tiny_config("checkpoints", data_dir=tasks, epochs=2, max_steps=0), data, "cpu", str(folder),
            events.append, run_id=TRAINING_RUN).train()
    pretraining = Trainer(tiny_config("checkpoints", data_dir=tasks, max_steps=2), data, "cpu", str(folder),
                          events.append, run_id=PRETRAINING_RUN)
    pretraining.pretrain("binary")
    saved = {e["id"] for e in events if e["type"] == "checkpoint_saved"}
    assert saved == {f"{TRAINING_RUN}:best_model", f"{TRAINING_RUN}:checkpoint_epoch_1",
                     f"{TRAINING_RUN}:checkpoint_epoch_2", f"{PRETRAINING_RUN}:pretrained_encoder_binary"}, saved
    assert [r["run_id"] for r in catalogue.list_runs(str(folder))] == [PRETRAINING_RUN, TRAINING_RUN]
    return {"work": root / "work", "tasks": tasks}


def run_block(lang, code, workdir, cwd):
    shutil.copytree(workdir["work"] / "checkpoints", cwd / "checkpoints")  # the hidden lock files too
    if lang == "python":
        command = [sys.executable, "-c", code]
    else:
        command = ["bash", "-euo", "pipefail", "-c", shell_script(code, workdir["tasks"])]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD})


@pytest.fixture(scope="module")
def results(workdir, tmp_path_factory):
    """Every runnable block run at once, each in a fresh copy of the working folder: {line: CompletedProcess}."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {line: pool.submit(run_block, lang, code, workdir, tmp_path_factory.mktemp(f"line{line}"))
                   for lang, code, line in RUNNABLE}
        return {line: future.result() for line, future in futures.items()}


def test_every_example_is_run_here_or_marked_server():
    assert {lang for lang, *_ in BLOCKS} == {"python", "bash"}, "a block in another language would go untested"
    for lang, words, code, line in BLOCKS:
        needs_server = SERVER in code or "curl " in code or "import requests" in code
        assert needs_server == ("server" in words), f"line {line}: mark a block `server` exactly when it needs one"
        if lang == "bash" and "server" not in words:
            commands = [c for c in code.splitlines() if c.strip() and not c.lstrip().startswith("#")]
            assert all(COMMAND.match(c) for c in commands), f"line {line}: only train.py / load_checkpoint.py run here"
    assert sum(lang == "python" for lang, *_ in RUNNABLE) >= 4 and sum(lang == "bash" for lang, *_ in RUNNABLE) >= 3


@pytest.mark.parametrize("lang, code, line", RUNNABLE, ids=[f"{lang}-line{line}" for lang, _, line in RUNNABLE])
def test_example_runs(results, lang, code, line):
    result = results[line]
    assert result.returncode == 0, f"example at line {line} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr


def path_of(workdir, ident):
    return catalogue.locate(str(workdir["work"] / "checkpoints"), ident).path


def test_the_guide_names_the_runs_the_examples_see():
    text = GUIDE.read_text(encoding="utf-8")
    assert TRAINING_RUN in text and PRETRAINING_RUN in text
    assert set(re.findall(r"\b\d{8}-\d{6}-[0-9a-f]{6}\b", text)) == {TRAINING_RUN, PRETRAINING_RUN}


def test_the_key_table_lists_exactly_the_keys_of_real_records(workdir):
    table = [row for row in section("What is inside").splitlines() if row.startswith("| `")]
    documented = {key for row in table for key in re.findall(r"`(\w+)`", row.split("|")[1])}
    main = ckpt.load_checkpoint(path_of(workdir, f"{TRAINING_RUN}:checkpoint_epoch_1"))
    pretrained = ckpt.load_checkpoint(path_of(workdir, f"{PRETRAINING_RUN}:pretrained_encoder_binary"))
    assert documented == set(main) | set(pretrained)
    assert set(ckpt.FLAT_CONFIG_KEYS) <= documented and set(ckpt.TENSOR_KEYS) <= documented
    kind_row = next(row for row in table if row.startswith("| `kind`"))
    assert set(re.findall(r"`(\w+)`", kind_row.split("|")[2])) == set(ckpt.KINDS)
    rng_row = next(row for row in table if row.startswith("| `rng_state`"))
    assert set(re.findall(r"`(\w+)`", rng_row.split("|")[2])) == set(main["rng_state"])


def test_the_sidecar_fields_beyond_the_record_are_documented(workdir):
    path = path_of(workdir, f"{TRAINING_RUN}:best_model")
    sidecar = ckpt.read_sidecar(path)
    extra = set(sidecar) - set(ckpt.metadata_of(ckpt.load_checkpoint(path)))
    text = section("What is inside").split("### The sidecar", 1)[1]
    assert extra == {"file", "size", "sha256", "verified_at"}
    assert all(f"`{field}`" in text for field in extra)


def test_each_troubleshooting_message_is_one_the_code_gives():
    sources = "".join((ROOT / name).read_text(encoding="utf-8")
                      for name in ("checkpoint.py", "catalogue.py", "checkpoint_manager.py", "train.py",
                                   "load_checkpoint.py", "worker.py", "app.py"))
    messages = re.findall(r"^- `([^`]+)`", section("Troubleshooting"), re.M)
    assert len(messages) >= 15
    missing = [m for m in messages if m not in sources]
    assert not missing, f"the guide quotes messages no code gives: {missing}"
