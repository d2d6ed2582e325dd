"""The README's and CHECKPOINT_GUIDE.md's examples are true: each runs as written, twice in a row, on a fresh folder.

Every fenced block of both files is an example (```python, ```bash, ```sh, ```shell) or says it is none (```text).
An example runs here unless it says otherwise, in one of two ways:
- `server` in its info string (```bash server): it talks to the web server; test_guide_server.py runs it, twice,
  against a live one;
- a comment `<!-- not run: REASON -->` on the line just above its fence: it is run nowhere, and is listed here as
  a skip with its reason (its train.py and load_checkpoint.py command lines are still parsed).
A block that needs what no test here gives (pip install, python app.py, a server) and says neither fails.

Each example runs in a folder of its own laid out as a clone of the project: a copy of the project's files (those
git tracks or would track) and a checkpoints/ holding the two runs the guide names, made by tiny headless runs:
TRAINING_RUN (best_model, checkpoint_epoch_1, checkpoint_epoch_2) and, started after it, PRETRAINING_RUN
(pretrained_encoder_binary). Their ids are fixed (Trainer's run_id) so that the guide can show real ids and
paths. Nothing in an example is rewritten: a bash block runs with `bash -euo pipefail -c`, a python block with
`python -c`, from that folder, where `python` is this interpreter; then it runs a second time in the same folder,
as a user who runs it again would. Every file the two runs created or changed there must be one that the
project's .gitignore ignores. All examples run at once (each run pays about 1.7 s of importing torch). The
guide's key table and its troubleshooting messages are checked against real records and the source.
"""
import concurrent.futures
import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

import catalogue
import checkpoint as ckpt
from conftest import tiny_config, write_task_folder
from data import load_data
from train import Trainer

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "CHECKPOINT_GUIDE.md"
DOCS = (ROOT / "README.md", GUIDE)
FENCE = re.compile(r"^```(\S*)[ \t]*([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
NOT_RUN = re.compile(r"^<!-- not run: (\S.*?) -->$")
EXAMPLE_LANGS = {"python", "bash", "sh", "shell"}
NOT_CODE_LANGS = {"text"}
SERVER = "127.0.0.1:5002"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: a second thread only adds overhead on 2 cores
TRAINING_RUN = "20261201-191154-9b17c5"
PRETRAINING_RUN = "20261201-191502-4e0a7d"

Block = namedtuple("Block", "doc line lang words code not_run")


def read_blocks(docs=DOCS):
    """Every fenced block of the docs, in order; not_run is the reason of a `<!-- not run: ... -->` above it."""
    blocks = []
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            above = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = NOT_RUN.match(above)
            blocks.append(Block(doc.name, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2).split(),
                                m.group(3), marker.group(1) if marker else None))
    return blocks


def block_id(block):
    return f"{block.doc}:{block.line}"


def section(title):
    """The guide's text under the heading `## title`, up to the next `## ` heading."""
    text = GUIDE.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def cannot_run_alone(code):
    """Why a block cannot run on its own in a test folder, or None."""
    if re.search(r"\bpip install\b", code):
        return "it installs packages"
    if re.search(r"\bpython app\.py\b", code):
        return "it starts the web server"
    if SERVER in code or re.search(r"\bcurl\b", code) or "import requests" in code:
        return "it needs a running server"
    return None


BLOCKS = read_blocks()
EXAMPLES = [b for b in BLOCKS if b.lang in EXAMPLE_LANGS]
SKIPPED = [b for b in EXAMPLES if b.not_run]
RUN_HERE = [b for b in EXAMPLES if not b.not_run and "server" not in b.words]


def project_files():
    """The project as a clone would have it, with this working tree's contents: tracked and trackable files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return [name for name in listed if name and (ROOT / name).is_file()]


def snapshot(folder):
    """{relative path: (size, mtime)} of every file and link under folder, hidden ones included."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            found[os.path.relpath(path, folder)] = (info.st_size, info.st_mtime_ns)
    return found


def not_ignored(paths):
    """Those of paths (relative, in the project's layout) that the project's .gitignore does not ignore."""
    if not paths:
        return []
    result = subprocess.run(["git", "check-ignore", "--stdin", "-z"], cwd=ROOT, input="\0".join(paths) + "\0",
                            capture_output=True, text=True)
    assert result.returncode in (0, 1), result.stderr  # 1: none ignored
    ignored = set(result.stdout.split("\0"))
    return sorted(p for p in paths if p not in ignored)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """checkpoints/ of a 2-epoch tiny run and a short encoder pretraining (two runs), and the project's files."""
    root = tmp_path_factory.mktemp("guide")
    tasks = write_task_folder(str(root / "tasks"))
    folder = root / "checkpoints"
    data, events = load_data(data_dir=tasks), []
    # The records say checkpoint_dir "checkpoints", as a run started in the project folder would: an example that
    # resumes with the saved config then writes into its own folder's checkpoints/.
    Trainer(tiny_config("checkpoints", data_dir=tasks, epochs=2, max_steps=0), data, "cpu", str(folder),
            events.append, run_id=TRAINING_RUN).train()
    pretraining = Trainer(tiny_config("checkpoints", data_dir=tasks, max_steps=2), data, "cpu", str(folder),
                          events.append, run_id=PRETRAINING_RUN)
    pretraining.pretrain("binary")
    saved = {e["id"] for e in events if e["type"] == "checkpoint_saved"}
    assert saved == {f"{TRAINING_RUN}:best_model", f"{TRAINING_RUN}:checkpoint_epoch_1",
                     f"{TRAINING_RUN}:checkpoint_epoch_2", f"{PRETRAINING_RUN}:pretrained_encoder_binary"}, saved
    assert [r["run_id"] for r in catalogue.list_runs(str(folder))] == [PRETRAINING_RUN, TRAINING_RUN]
    return {"checkpoints": folder, "files": project_files(), "tasks": tasks}


def fresh_folder(prepared, where):
    """A clone-like copy of the project with the prepared checkpoints/, and a scratch TMPDIR beside it."""
    project = where / "project"
    for name in prepared["files"]:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, project / name)
    shutil.copytree(prepared["checkpoints"], project / "checkpoints")  # the hidden lock files too
    (where / "tmp").mkdir()
    return project


def example_env(where):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the copy's modules, not the repository's
    return {**env, **ONE_THREAD, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "TMPDIR": str(where / "tmp")}


def run_example(lang, code, project, env):
    command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)


def run_twice(block, prepared, where):
    """The block run twice in one fresh folder: (the runs, the files they created or changed)."""
    project = fresh_folder(prepared, where)
    env, before, runs = example_env(where), snapshot(project), []
    for _ in range(2):
        runs.append(run_example(block.lang, block.code, project, env))
        if runs[-1].returncode != 0:
            break
    after = snapshot(project)
    written = sorted(p for p in after if before.get(p) != after[p]) + sorted(set(before) - set(after))
    return runs, written


@pytest.fixture(scope="module")
def results(prepared, tmp_path_factory):
    """Every example that runs here, each in its own fresh folder: {block id: (runs, written)}."""
    runnable = [b for b in RUN_HERE if not cannot_run_alone(b.code)]
    runnable.sort(key=lambda b: -(b.code.count("train.py") + b.code.count("Trainer(")))  # the longest first
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {block_id(b): pool.submit(run_twice, b, prepared, tmp_path_factory.mktemp("example"))
                   for b in runnable}
        return {key: future.result() for key, future in futures.items()}


def failure(block, which, result):
    return (f"{block_id(block)}: the example failed on its {which} run (exit {result.returncode}):\n"
            f"{block.code}\n--- stdout ---\n{result.stdout[-2000:]}\n--- stderr ---\n{result.stderr[-3000:]}")


def test_every_block_is_an_example_or_says_it_is_none():
    for block in BLOCKS:
        assert block.lang in EXAMPLE_LANGS | NOT_CODE_LANGS, (
            f"{block_id(block)}: a ```{block.lang} block would go untested: make it python or bash, or text "
            "if it is no example")
    assert all(b.lang in EXAMPLE_LANGS for b in BLOCKS if b.not_run or "server" in b.words)
    markers = sum(len(re.findall(r"<!-- not run:", doc.read_text(encoding="utf-8"))) for doc in DOCS)
    assert markers == len(SKIPPED), "a `<!-- not run: ... -->` comment must sit on the line just above a fence"


def test_a_block_marked_server_is_one_that_needs_the_server():
    for block in EXAMPLES:
        if "server" in block.words:
            assert not block.not_run, f"{block_id(block)}: marked both `server` and not run"
            assert cannot_run_alone(block.code) == "it needs a running server", (
                f"{block_id(block)}: marked `server` but needs none; let it run here")


@pytest.mark.parametrize("block", SKIPPED, ids=map(block_id, SKIPPED))
def test_example_not_run(block):
    """Listed as skips, with the reasons the docs give; their command lines must still parse."""
    for script, args in command_lines(block.code):
        parser = {"train.py": "train", "load_checkpoint.py": "load_checkpoint"}[script]
        assert parses(parser, args), f"{block_id(block)}: `python {script} {shlex.join(args)}` does not parse"
    pytest.skip(f"{block_id(block)} not run: {block.not_run}")


def command_lines(code):
    """(script, args) of each `python train.py ...` / `python load_checkpoint.py ...` command in a shell block."""
    found = []
    for line in code.splitlines():
        words = shlex.split(line, comments=True)
        command = []
        for word in words + [";"]:
            if word in ("&&", "||", ";", "|"):
                if command[:1] == ["python"] and command[1:2] and command[1] in ("train.py", "load_checkpoint.py"):
                    found.append((command[1], command[2:]))
                command = []
            else:
                command.append(word)
    return found


def parses(module_name, args):
    module = __import__(module_name)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            module.build_parser().parse_args(args)
    except SystemExit as e:
        return e.code == 0  # --help
    return True


def test_command_lines_of_skipped_blocks_are_found():
    """The parse check above is not empty: the README's training block names its commands."""
    assert sum(len(command_lines(b.code)) for b in SKIPPED) >= 5
    assert not parses("train", ["--no-such-option"])


@pytest.mark.parametrize("block", RUN_HERE, ids=map(block_id, RUN_HERE))
def test_example_runs_twice(results, block):
    reason = cannot_run_alone(block.code)
    assert reason is None, (f"{block_id(block)}: {reason}, so no test runs it: mark it `server` (run against a live "
                            f"server by test_guide_server.py) or `<!-- not run: REASON -->`:\n{block.code}")
    runs, _ = results[block_id(block)]
    for which, result in zip(("first", "second"), runs):
        assert result.returncode == 0, failure(block, which, result)
        assert "Traceback" not in result.stderr, failure(block, which, result)
    assert len(runs) == 2


def test_examples_write_only_what_git_ignores(results):
    """In a clone, `git status` would show nothing new after running every example twice."""
    assert results, "no example ran"
    offending = {key: not_ignored(written) for key, (_, written) in results.items()}
    offending = {key: paths for key, paths in offending.items() if paths}
    assert not offending, f"examples left files that git does not ignore (or changed tracked ones): {offending}"
    wrote = {p.split(os.sep)[0] for _, written in results.values() for p in written}
    assert {"checkpoints", "headless_checkpoints", "best_model.safetensors"} <= wrote, wrote


def test_the_ignore_check_can_fail():
    assert not_ignored(["checkpoints/runs/x/checkpoints/a.pth", "headless_checkpoints/x", "out.safetensors"]) == []
    assert not_ignored(["train.py", "notes.txt"]) == ["notes.txt", "train.py"]


def test_there_are_examples_of_each_kind():
    assert sum(b.lang == "python" for b in RUN_HERE) >= 6 and sum(b.lang == "bash" for b in RUN_HERE) >= 3
    assert {b.doc for b in SKIPPED} == {"README.md", "CHECKPOINT_GUIDE.md"}


def test_no_example_indexes_what_may_be_none():
    """read_sidecar gives None for a missing sidecar: an example that indexes it would die with a TypeError."""
    for block in EXAMPLES:
        assert not re.search(r"read_sidecar\([^)]*\)\s*\[", block.code), (
            f"{block_id(block)}: use checkpoint.read_metadata, which reads the .pth when the sidecar is missing")


def resume_example():
    [block] = [b for b in RUN_HERE if "trainer.resume(path)" in b.code and "read_metadata(path)" in b.code]
    return block


def test_the_resume_example_without_a_sidecar_fails_clearly(prepared, tmp_path):
    project = fresh_folder(prepared, tmp_path)
    path = catalogue.locate(str(project / "checkpoints"), f"{TRAINING_RUN}:checkpoint_epoch_1").path
    os.remove(ckpt.sidecar_path(path))
    result = run_example("python", resume_example().code, project, example_env(tmp_path))
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("checkpoint.CheckpointError: ") and "no sidecar checkpoint_epoch_1.json" in last, last
    assert "TypeError" not in result.stderr and "KeyError" not in result.stderr


def test_the_resume_example_without_the_file_fails_clearly(prepared, tmp_path):
    project = fresh_folder(prepared, tmp_path)
    shutil.rmtree(project / "checkpoints" / "runs" / TRAINING_RUN)
    result = run_example("python", resume_example().code, project, example_env(tmp_path))
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and last.startswith("FileNotFoundError: no checkpoint 'checkpoint_epoch_1'"), last


def test_read_metadata_reads_the_file_when_the_sidecar_is_missing(prepared, tmp_path):
    shutil.copytree(prepared["checkpoints"], tmp_path / "checkpoints")
    path = catalogue.locate(str(tmp_path / "checkpoints"), f"{TRAINING_RUN}:checkpoint_epoch_1").path
    with_sidecar = ckpt.read_metadata(path)
    os.remove(ckpt.sidecar_path(path))
    without = ckpt.read_metadata(path)
    assert without["config"] == with_sidecar["config"] and not without["damaged"] and without["sha256"] is None
    with pytest.raises(ckpt.CheckpointError, match="no sidecar"):
        ckpt.load_checkpoint(path)
    os.remove(path)
    with pytest.raises(FileNotFoundError):
        ckpt.read_metadata(path)


def path_of(prepared, ident):
    return catalogue.locate(str(prepared["checkpoints"]), ident).path


def test_the_docs_name_the_runs_the_examples_see():
    text = "".join(doc.read_text(encoding="utf-8") for doc in DOCS)
    assert TRAINING_RUN in GUIDE.read_text(encoding="utf-8") and PRETRAINING_RUN in GUIDE.read_text(encoding="utf-8")
    assert set(re.findall(r"\b\d{8}-\d{6}-[0-9a-f]{6}\b", text)) == {TRAINING_RUN, PRETRAINING_RUN}


def test_the_key_table_lists_exactly_the_keys_of_real_records(prepared):
    table = [row for row in section("What is inside").splitlines() if row.startswith("| `")]
    documented = {key for row in table for key in re.findall(r"`(\w+)`", row.split("|")[1])}
    main = ckpt.load_checkpoint(path_of(prepared, f"{TRAINING_RUN}:checkpoint_epoch_1"))
    pretrained = ckpt.load_checkpoint(path_of(prepared, f"{PRETRAINING_RUN}:pretrained_encoder_binary"))
    assert documented == set(main) | set(pretrained)
    assert set(ckpt.FLAT_CONFIG_KEYS) <= documented and set(ckpt.TENSOR_KEYS) <= documented
    kind_row = next(row for row in table if row.startswith("| `kind`"))
    assert set(re.findall(r"`(\w+)`", kind_row.split("|")[2])) == set(ckpt.KINDS)
    rng_row = next(row for row in table if row.startswith("| `rng_state`"))
    assert set(re.findall(r"`(\w+)`", rng_row.split("|")[2])) == set(main["rng_state"])


def test_the_sidecar_fields_beyond_the_record_are_documented(prepared):
    path = path_of(prepared, f"{TRAINING_RUN}:best_model")
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
