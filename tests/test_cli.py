"""The command line as a user meets it: train.py's start banner, end summary, yes/no booleans, the collapse note,
--help, presets, a --data-dir holding other JSON files, one-line errors; and app.py's server log."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading

import pytest
import requests
import torch

import catalogue
import checkpoint as ckpt
import train
from conftest import write_task_folder
from test_shutdown import Process
from data import baselines, load_data
from train import PRESETS, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import learning  # noqa: E402  (bench/ is not a package)

TINY = ["--embedding-dim", "4", "--hidden-dim", "16", "--latent-dim", "16", "--num-conv-layers", "2",
        "--batch-size", "8", "--device", "cpu", "--no-progress"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: a second thread only adds overhead on 2 cores
# The configs the README's learning figures were measured with (bench rows before they came from PRESETS): a
# preset that drifts from them would make those figures describe another configuration.
MEASURED = {
    "selection": dict(task_type="selection", bottleneck_type="communication", num_distractors=3, vocab_size=10,
                      max_message_length=5, selection_negatives="batch"),
    "selection-15": dict(task_type="selection", bottleneck_type="communication", num_distractors=15, vocab_size=10,
                         max_message_length=5, selection_negatives="batch"),
    "reconstruction": dict(task_type="reconstruction", bottleneck_type="autoencoder", augment="symmetries+colours"),
    "reconstruction-message": dict(task_type="reconstruction", bottleneck_type="communication",
                                   augment="symmetries+colours", cell_channels=2),
    "puzzles": dict(task_type="puzzle_classification", bottleneck_type="autoencoder", augment="symmetries",
                    pattern_buckets=131072),
    "puzzle-pairs": dict(task_type="puzzle_classification", bottleneck_type="autoencoder", augment="symmetries",
                         use_input_output_pairs=True),
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """6 training + 2 evaluation puzzles: splits of 5 / 1 / 2 puzzles, epochs of 5 batches of 8 grids."""
    return str(write_task_folder(tmp_path_factory.mktemp("tasks"), n_training=6, n_evaluation=2, seed=5))


def run_main(capsys, *args):
    """train.main in this process: (exit status, stdout lines, stderr)."""
    try:
        code = train.main(list(args))
    except SystemExit as e:  # argparse's errors and --help
        code = e.code
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def line(lines, prefix):
    found = [x for x in lines if x.startswith(prefix)]
    assert len(found) == 1, f"{len(found)} lines start with {prefix!r}:\n" + "\n".join(lines)
    return found[0]


# ---------------------------------------------------------------------------------------------- banner and summary

def test_the_banner_says_data_model_device_folder_and_saves_and_the_summary_best_test_and_resume(tasks, tmp_path,
                                                                                                capsys):
    root = str(tmp_path / "checkpoints")
    code, lines, err = run_main(capsys, "--data-dir", tasks, "--checkpoint-dir", root, "--task", "reconstruction",
                                "--epochs", "2", "--checkpoint-every-epochs", "1", "--keep-last", "3", *TINY)
    assert code == 0, err
    run_id = line(lines, "run ").split()[1].rstrip(":")
    folder = catalogue.checkpoint_folder(root, run_id)
    assert line(lines, "run ") == f"run {run_id}: checkpoints go to {folder}"
    data = load_data(data_dir=tasks)
    config = TrainConfig.from_dict(dict(embedding_dim=4, hidden_dim=16, latent_dim=16, num_conv_layers=2))
    splits = train.make_splits(data, "reconstruction", False, 0)
    counts = {s: (len(torch.unique(data.grid_puzzle[u])), len(u)) for s, u in splits.items()}
    assert counts == {"train": (5, 40), "val": (1, 8), "test": (2, 16)}  # what the banner must say
    assert line(lines, "data: ") == (f"data: {data.name}: train 5 puzzles / 40 grids, val 1 puzzles / 8 grids, "
                                     "test 2 puzzles / 16 grids")
    parameters = sum(p.numel() for p in train.build_model(config.to_dict(), 0).parameters())
    assert line(lines, "model: ") == (f"model: reconstruction, communication: {parameters:,} parameters; device "
                                      f"cpu, {torch.get_num_threads()} torch threads, precision 32")
    assert line(lines, "length: ") == "length: 2 epochs of 5 batches of 8"
    saves = line(lines, "saves: ")
    assert saves == ("saves: best_model whenever validation loss improves; checkpoint_epoch_N every 1 epochs; no "
                     "autosave (--autosave-minutes M); the newest 3 of those kept (keep_last); interrupted_step_N "
                     "if stopped, error_step_N on a NaN loss")
    assert lines.index(line(lines, "saves: ")) < lines.index(line(lines, "epoch 1:")), "the banner comes first"

    # The summary: best validation and its checkpoint, test beside its baselines, the command that goes on.
    losses = {int(m.group(1)): float(m.group(2)) for m in
              (re.match(r"epoch \d+: step (\d+) val_loss=(\S+)", x) for x in lines) if m}
    best_step = min(losses, key=losses.get)
    best = line(lines, "best: ")
    path = os.path.join(folder, "best_model.pth")
    assert best.startswith(f"best: validation at step {best_step}: loss={losses[best_step]:.4f} acc=")
    assert best.endswith(f"; {run_id}:best_model at {path}") and ckpt.verify(path)[0]
    assert ckpt.load_checkpoint(path)["global_step"] == best_step
    expected = baselines(*(train.Batches(data, splits[s], "reconstruction", 8, 0) for s in ("train", "test")))
    test = line(lines, "test: ")
    assert f"(majority colour {expected['acc'][1]:.4f})" in test and re.search(r" acc=\S+ \(majority colour", test)
    assert re.search(rf" size_acc=\S+ \(most common size {expected['size_acc'][1]:.4f}\)", test), test
    resume = line(lines, "resume: ")
    command = catalogue.resume_command(root, f"{run_id}:checkpoint_epoch_2") + " --epochs 4"
    assert resume.startswith(f"resume: {command}   ({run_id}:checkpoint_epoch_2, step 10,"), resume

    # The command resumes: the run goes on from epoch 2 to 4.
    words = shlex.split(command)
    assert words[:2] == ["python", "train.py"]
    code, resumed, err = run_main(capsys, *words[2:], "--no-progress")
    assert code == 0, err
    assert [x.split(":")[0] for x in resumed if x.startswith("epoch ")] == ["epoch 3", "epoch 4"]
    assert f", resume of {run_id}:checkpoint_epoch_2: checkpoints go to {root}" in line(resumed, "run ")
    assert line(resumed, "length: ") == "length: 4 epochs of 5 batches of 8, from epoch 2 step 10"


def test_a_run_that_saved_nothing_says_which_setting_saves_and_a_pretraining_says_how_to_use_its_encoder(
        tasks, tmp_path, capsys, monkeypatch):
    root = str(tmp_path / "checkpoints")
    # No save ever lands: every write fails (as a full disk would fail it).
    monkeypatch.setattr(ckpt, "save_full_checkpoint", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    code, lines, err = run_main(capsys, "--data-dir", tasks, "--checkpoint-dir", root, "--epochs", "1",
                                "--checkpoint-every-epochs", "0", *TINY)
    assert code == 0, err
    assert line(lines, "resume: ") == ("resume: this run saved no checkpoint to resume from (--checkpoint-every-"
                                       "epochs N or --autosave-minutes M save them as it goes)")
    assert "best_model, not saved: " in line(lines, "best: ")
    monkeypatch.undo()
    code, lines, err = run_main(capsys, "--phase", "pretrain", "--data-dir", tasks, "--checkpoint-dir", root,
                                "--epochs", "1", *TINY)
    assert code == 0, err
    run_id = line(lines, "run ").split()[1].rstrip(":")
    assert line(lines, "saves: ") == "saves: pretrained_encoder_binary whenever validation accuracy improves"
    assert line(lines, "model: ").startswith("model: encoder pretraining (binary): ")
    ident = f"{run_id}:pretrained_encoder_binary"
    assert line(lines, "train from the encoder: ") == \
        f"train from the encoder: {catalogue.resume_command(root, ident, 'pretrained')}"
    encoder = catalogue.entry_for(root, run_id, "pretrained_encoder_binary").path
    assert line(lines, "best: ").endswith(f"; {ident} at {encoder}")
    assert not any(x.startswith("test: ") for x in lines), "pretraining has no test split"


def test_a_stopped_run_names_the_checkpoint_it_saved_as_it_stopped_and_the_command_that_resumes_it(tasks, tmp_path,
                                                                                                    monkeypatch):
    root = str(tmp_path / "checkpoints")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = Process([sys.executable, os.path.join(ROOT, "train.py"), "--data-dir", tasks, "--checkpoint-dir", root,
                   "--epochs", "1000", "--checkpoint-every-epochs", "0", *TINY], cwd=tmp_path)
    run_id = run.wait_line(lambda x: x.startswith("run "), what="run line").split()[1].rstrip(":")
    run.wait_line(lambda x: x.startswith("epoch 1:"), 120, what="first validation")
    run.signal(signal.SIGTERM)
    code, lines = run.finish()
    assert code == 0, "\n".join(lines)
    final = next(m.group(0) for m in map(re.compile(r"interrupted_step_\d+").search, lines) if m)
    ident = f"{run_id}:{final}"
    assert ckpt.verify(catalogue.entry_for(root, run_id, final).path)[0]
    assert lines[-1].startswith(f"resume: {catalogue.resume_command(root, ident)}   ({ident}, step "), lines[-1]
    assert lines[-1].endswith(", saved as it stopped)") and "--epochs" not in lines[-1]


def test_a_nan_loss_is_a_one_line_error_naming_the_last_good_state(tasks, tmp_path, capsys, monkeypatch):
    real = train.LOSSES["reconstruction"]

    def nan_at_step_3(out, batch):
        loss, sums = real(out, batch)
        calls.append(1)
        return (loss * float("nan"), sums) if len(calls) == 3 else (loss, sums)
    calls = []
    monkeypatch.setitem(train.LOSSES, "reconstruction", nan_at_step_3)
    root = str(tmp_path / "checkpoints")
    code, lines, err = run_main(capsys, "--data-dir", tasks, "--checkpoint-dir", root, "--epochs", "1", *TINY)
    assert code == 1
    run_id = line(lines, "run ").split()[1].rstrip(":")
    path = catalogue.entry_for(root, run_id, "error_step_2").path
    assert err == (f"train.py: error: loss became nan at step 2; lower the learning rate or the temperature and "
                   f"start again (the last good state is saved as {run_id}:error_step_2: {path})\n")
    assert ckpt.load_checkpoint(path)["global_step"] == 2


# ---------------------------------------------------------------------------------------------- booleans, collapse

def test_booleans_print_as_yes_or_no_and_a_collapsed_message_gets_one_note_per_run(tasks, tmp_path, capsys):
    # One symbol of two: at most 2 distinct messages for the 8 validation grids, a distinct share of at most 0.25.
    code, lines, err = run_main(capsys, "--data-dir", tasks, "--checkpoint-dir", str(tmp_path / "c"), "--task",
                                "selection", "--selection-negatives", "distractors", "--message-norm", "none",
                                "--vocab-size", "2", "--max-message-length", "1", "--epochs", "3", *TINY)
    assert code == 0, err
    epochs = [x for x in lines if x.startswith("epoch ")]
    assert len(epochs) == 3 and all("val_message_collapse=yes" in x for x in epochs), epochs
    for x in epochs + [line(lines, "validation: "), line(lines, "test: ")]:
        assert not re.search(r"message_collapse=\d", x) and re.search(r"message_collapse=(yes|no)\b", x), x
    notes = [x for x in lines if "the message has collapsed" in x]
    assert len(notes) == 1, "once a run, not once an epoch"
    assert lines.index(notes[0]) == lines.index(epochs[0]) + 1  # right below the first collapsed validation
    for says in ("the sender sends nearly the same message for every input", "cannot tell them apart",
                 "--selection-negatives batch", "--message-norm batch", "--preset selection"):
        assert says in notes[0], notes[0]


def test_a_collapse_under_the_preset_itself_does_not_suggest_that_preset():
    preset = train.TrainConfig.from_dict(train.PRESETS["selection"].values)
    note = train.collapse_note(preset, 0.1)
    assert "--preset" not in note and "train longer" in note, note
    assert "--preset selection" in train.collapse_note(preset.replace(selection_negatives="distractors"), 0.1)


def test_no_note_without_a_collapse(tasks, tmp_path, capsys):
    code, lines, err = run_main(capsys, "--data-dir", tasks, "--checkpoint-dir", str(tmp_path / "c"), "--task",
                                "selection", "--bottleneck", "autoencoder", "--epochs", "1", *TINY)
    assert code == 0, err
    assert not any("collapsed" in x or "message_collapse" in x for x in lines), "no message, nothing to collapse"


# ---------------------------------------------------------------------------------------------- --help

def test_help_lists_every_choice_and_default_and_the_presets(capsys):
    code, lines, _ = run_main(capsys, "--help")
    assert code == 0
    text = " ".join(" ".join(lines).split())
    for f in train.dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.metadata["choices"]:
            assert f"{flag} {{{','.join(f.metadata['choices'])}}}" in text, f"{flag}: its choices are not shown"
        assert f"(default: {f.default})" in text
    assert "--task {reconstruction,selection,puzzle_classification}" in text
    assert "--preset {" + ",".join(PRESETS) + "}" in text
    for name, preset in PRESETS.items():
        assert f"{name} {preset.title}: " in text and " ".join(train.preset_flags(name)) in text
    # With a preset, --help shows the preset's values as the defaults.
    code, lines, _ = run_main(capsys, "--preset", "selection", "--help")
    text = " ".join(" ".join(lines).split())
    assert code == 0 and "task (default: selection)" in text and "in the batch (default: batch)" in text


# ---------------------------------------------------------------------------------------------- presets

def test_every_preset_is_a_valid_config_with_epochs_and_the_bench_measures_exactly_it():
    assert list(PRESETS) == list(MEASURED)
    for name, preset in PRESETS.items():
        values = dict(preset.values)
        assert 1 <= values.pop("epochs") <= 1000, name
        assert values == MEASURED[name], f"{name} is no longer the config the README's figures were measured with"
        TrainConfig.from_dict(dict(preset.values))
    assert {row.preset for row in learning.ROWS.values()} == set(PRESETS)
    for name, row in learning.ROWS.items():
        config = learning.config_of(row, {}, seed=2)
        assert config == TrainConfig.from_dict({**MEASURED[row.preset], "device": "cpu", "checkpoint_every_epochs": 0,
                                                "epochs": 100_000, "seed": 2, **dict(row.changes)}), name
    assert {name for name, row in learning.ROWS.items() if row.changes} == \
        {f"{name}_bf16" for name in ("selection_3", "selection_15", "reconstruction_autoencoder",
                                     "reconstruction_communication")}  # the variants, and only they, change a preset


def test_get_config_lists_the_presets_for_the_page(tasks, tmp_path):
    from app import create_app
    app = create_app({"CHECKPOINT_DIR": str(tmp_path / "c"), "DATA": load_data(data_dir=tasks), "START_WORKER": False})
    try:
        presets = app.test_client().get("/config").get_json()["presets"]
    finally:
        app.extensions["trainer"].shutdown()
    assert presets == [{"name": name, "title": p.title, "description": p.description, "values": p.values}
                       for name, p in PRESETS.items()]


def test_a_preset_sets_its_values_and_flags_beside_it_win(tasks, tmp_path, capsys):
    root = str(tmp_path / "checkpoints")
    code, lines, err = run_main(capsys, "--preset", "selection", "--data-dir", tasks, "--checkpoint-dir", root,
                                "--epochs", "1", "--max-steps", "2", *TINY)
    assert code == 0, err
    run_id = line(lines, "run ").split()[1].rstrip(":")
    saved = ckpt.read_metadata(os.path.join(catalogue.checkpoint_folder(root, run_id), "best_model.pth"))["config"]
    assert {k: saved[k] for k in MEASURED["selection"]} == MEASURED["selection"]
    assert (saved["epochs"], saved["max_steps"], saved["batch_size"]) == (1, 2, 8)  # the flags given beside it


def test_an_unknown_preset_is_a_one_line_error_naming_the_presets(capsys):
    code, lines, err = run_main(capsys, "--preset", "fastest")
    assert code == 2 and not lines
    assert err.count("\n") == 1 and err.startswith("train.py: error: argument --preset: invalid choice: 'fastest'")
    assert all(f"'{name}'" in err for name in PRESETS), err


@pytest.mark.parametrize("args,needle", [(["--batch-size", "eight"], "invalid int value: 'eight'"),
                                         (["--epochs", "0"], "epochs must be between 1 and 100000, got 0"),
                                         (["--bogus"], "unrecognized arguments: --bogus")])
def test_errors_are_one_line(args, needle, capsys):
    code, lines, err = run_main(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith("train.py: error: ") and needle in err, err


def test_the_readme_shows_the_presets_and_each_command_it_shows_parses():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    commands = re.findall(r"^python train\.py([^\n#]*)", text, re.M)
    assert commands, "no train.py command in the README"
    for flags in commands:
        if "--help" not in flags:
            args = train.parse_args(shlex.split(flags))  # argparse exits on a flag that does not exist
            assert args.phase in ("train", "pretrain")
    shown = {args for args in commands if "--preset" in args}
    assert {shlex.split(args)[shlex.split(args).index("--preset") + 1] for args in shown} == set(PRESETS)
    for name, preset in PRESETS.items():  # the presets' table: its epochs are the preset's
        row = re.search(rf"^\| `{re.escape(name)}` \|[^|]*\| (\d+) \|", text, re.M)
        assert row and int(row.group(1)) == preset.values["epochs"], name
    # The example that collapses its message (no in-batch negatives) is no longer what the README offers.
    assert "--task selection --bottleneck communication --num-distractors 3 --epochs 20" not in text


# ---------------------------------------------------------------------------------------------- --data-dir

def test_a_data_dir_with_other_json_files_trains_on_the_tasks_and_says_once_what_it_skipped(tasks, tmp_path):
    folder = tmp_path / "mixed"
    subprocess.run(["cp", "-r", tasks, str(folder)], check=True)
    (folder / "package.json").write_text(json.dumps({"name": "arc-tools", "version": "1.0.0"}))
    (folder / "training" / "solutions.json").write_text(json.dumps([[[1, 2]]]))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data-dir", str(folder),
                             "--checkpoint-dir", str(tmp_path / "c"), "--epochs", "1", "--max-steps", "1", *TINY],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    skipped = [x for x in result.stderr.splitlines() if "skipped" in x]
    assert skipped == [f"train.py: {folder}: skipped 2 .json file(s) that are not ARC tasks (no 'train' or 'test' "
                       f"key), first package.json"], result.stderr
    assert "data: folder:" in result.stdout and "train 5 puzzles / 40 grids" in result.stdout


def test_a_task_file_with_bad_grids_still_stops_the_run_naming_the_file(tasks, tmp_path, capsys):
    folder = tmp_path / "bad"
    subprocess.run(["cp", "-r", tasks, str(folder)], check=True)
    bad = folder / "training" / "broken.json"
    bad.write_text(json.dumps({"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": []}))
    code, lines, err = run_main(capsys, "--data-dir", str(folder), "--checkpoint-dir", str(tmp_path / "c"), *TINY)
    assert code == 2 and not lines
    assert err == f"train.py: error: {bad}: train[0].input: ragged rows (lengths [1, 2])\n"
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------- app.py's log

def serve_and_stop(tmp_path, *flags):
    """python app.py on a free port, piped: a few requests (one of them a 404), then SIGTERM; (stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--port", "0", "--checkpoint-dir",
                             str(tmp_path / "c"), "--device", "cpu", *flags], cwd=tmp_path, env=ONE_THREAD,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(120)  # the address line is printed once the server listens
    try:
        assert first and "http://" in first[0], f"no address line: {first}"
        url = first[0].split()[-1]
        assert requests.get(url + "/status", timeout=10).status_code == 200
        assert requests.get(url + "/config", timeout=10).status_code == 200
        assert requests.get(url + "/no-such-page", timeout=10).status_code == 404
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    return first[0] + out, err


def test_the_server_log_has_one_start_line_no_request_lines_and_no_colour_when_piped(tmp_path):
    out, err = serve_and_stop(tmp_path)
    assert out.splitlines() == [out.splitlines()[0]] and re.fullmatch(
        r"ARC Autoencoder Lab: http://127\.0\.0\.1:\d+", out.splitlines()[0]), out
    assert "GET /" not in err and "\x1b[" not in err, err
    assert err.splitlines()[-1] == "no save was in flight", err  # one line per save at exit, here none


def test_access_log_adds_a_plain_line_per_request(tmp_path):
    _, err = serve_and_stop(tmp_path, "--access-log")
    requests_logged = [x for x in err.splitlines() if '"GET /' in x]
    assert [re.search(r'"GET (\S+) HTTP/1.1" (\d+)', x).groups() for x in requests_logged] == \
        [("/status", "200"), ("/config", "200"), ("/no-such-page", "404")], err
    assert "\x1b[" not in err, "Werkzeug colours a 404 unless told the log is not a terminal"
