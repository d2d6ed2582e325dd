"""load_checkpoint.py: every flag and every error path through the real CLI (a subprocess), details in-process.

The CLI runs are started together by one fixture (each costs about 1.7 s of importing torch) and the tests
read their results.
"""
import concurrent.futures
import json
import os
import pickle
import queue
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import catalogue
import checkpoint as ckpt
import load_checkpoint
from conftest import tiny_config, write_task_folder
from data import load_data
from model import count_parameters
from train import Trainer, build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "load_checkpoint.py")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


class Exploit:
    """Unpickling this runs a shell command that creates `marker`: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def headless_run(checkpoint_dir, tasks, saves=(), pretrain=None, **changes):
    """A tiny run (4 steps) on the task folder; returns {name: path} of what it saved.

    saves: names of manual saves, served before the first step.
    """
    events, commands = [], queue.Queue()
    for name in saves:
        commands.put({"type": "save", "name": name, "request_id": name})
    config = tiny_config(checkpoint_dir, data_dir=tasks["folder"], **changes)
    trainer = Trainer(config, tasks["data"], "cpu", str(checkpoint_dir), events.append, commands)
    if pretrain:
        trainer.pretrain(pretrain)
    else:
        trainer.train()
    assert not [e for e in events if e["type"] == "checkpoint_error"], events
    return {e["name"]: e["path"] for e in events if e["type"] == "checkpoint_saved"}


def forge_sidecar(path):
    """A sidecar matching the file's bytes: verification passes, so only the loader itself stands in the way."""
    with open(ckpt.sidecar_path(str(path)), "w") as f:
        json.dump({"size": os.path.getsize(path), "sha256": ckpt.file_sha256(str(path))}, f)


def copy_with_sidecar(source, target, data=None):
    """Copy a checkpoint (or write `data` in its place) with the source's sidecar, renamed to the target."""
    sidecar = {**ckpt.read_sidecar(source), "name": target.stem, "file": target.name}
    with open(ckpt.sidecar_path(str(target)), "w") as f:
        json.dump(sidecar, f)
    if data is None:
        shutil.copyfile(source, target)
    else:
        target.write_bytes(data)
    return str(target)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A small folder of ARC tasks (8 puzzles) and its data: validation takes milliseconds."""
    folder = write_task_folder(str(tmp_path_factory.mktemp("tasks")))
    return {"folder": folder, "data": load_data(data_dir=folder)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tasks):
    """One folder with best_model (step 4), a manual save (step 0) and a pretrained encoder; other model kinds."""
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = headless_run(folder, tasks, saves=("before training",))
    paths.update(headless_run(folder, tasks, pretrain="binary"))
    other = tmp_path_factory.mktemp("other")
    paths["selection"] = headless_run(other / "selection", tasks, task_type="selection",
                                      use_input_output_pairs=True, bottleneck_type="autoencoder")["best_model"]
    paths["classification"] = headless_run(other / "classification", tasks,
                                           task_type="puzzle_classification")["best_model"]
    return {"folder": str(folder), **paths}


@pytest.fixture(scope="module")
def bad(tmp_path_factory, saved):
    """Every kind of file the CLI must refuse, each next to what it needs (a sidecar or none)."""
    folder = tmp_path_factory.mktemp("bad")
    good = saved["best_model"]
    data = open(good, "rb").read()
    files = {"folder": str(folder), "marker": str(folder / "exploit-ran"), "missing": str(folder / "nope.pth")}
    (folder / "notes.txt").write_text("not a checkpoint\n")
    files["text"] = str(folder / "notes.txt")
    torch.save(torch.zeros(3), folder / "tensor.pth")
    files["tensor"] = str(folder / "tensor.pth")
    files["truncated"] = copy_with_sidecar(good, folder / "truncated.pth", data[:len(data) // 2])
    middle = len(data) // 2
    files["corrupt"] = copy_with_sidecar(good, folder / "corrupt.pth",
                                         data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1:])
    shutil.copyfile(good, folder / "no_sidecar.pth")
    files["no_sidecar"] = str(folder / "no_sidecar.pth")
    torch.save({"model_state_dict": Exploit(files["marker"])}, folder / "exploit.pth")
    forge_sidecar(folder / "exploit.pth")
    files["exploit"] = str(folder / "exploit.pth")
    (folder / "exploit.pkl").write_bytes(pickle.dumps(Exploit(files["marker"])))
    files["exploit_pickle"] = str(folder / "exploit.pkl")
    record = torch.load(good)
    record["config"] = {**record["config"], "hidden_dim": 32}  # the weights no longer fit the described model
    torch.save(record, folder / "lying.pth")
    forge_sidecar(folder / "lying.pth")
    files["lying"] = str(folder / "lying.pth")
    for name in ("existing", "existing_forced"):
        (folder / f"{name}.safetensors").write_bytes(b"keep me")
        files[name] = str(folder / f"{name}.safetensors")
    return files


def error_cases(saved, bad):
    """name: (arguments, fragment of the one stderr line); every one must exit 1."""
    good = saved["best_model"]
    return {
        "missing file": ([bad["missing"]], "no such checkpoint file"),
        "text file, skip-verify": ([bad["text"], "--skip-verify"], "not a loadable checkpoint"),
        "torch file holding a tensor": ([bad["tensor"], "--skip-verify"], "not a checkpoint of this project"),
        "no sidecar": ([bad["no_sidecar"]], "no sidecar no_sidecar.json"),
        "truncated": ([bad["truncated"]], "truncated or replaced"),
        "corrupt": ([bad["corrupt"]], "SHA-256 does not match the sidecar"),
        "corrupt, verify": ([bad["corrupt"], "--verify"], "SHA-256 does not match the sidecar"),
        "exploit with a matching sidecar": ([bad["exploit"]], "not a loadable checkpoint"),
        "exploit as a plain pickle": ([bad["exploit_pickle"], "--skip-verify", "--info-only"],
                                      "not a loadable checkpoint"),
        "weights that do not fit the config": ([bad["lying"]], "cannot rebuild the model it describes"),
        "list a missing folder": (["--list", bad["missing"]], "no such folder"),
        "compare with a corrupt file": (["--compare", good, bad["corrupt"]], "SHA-256 does not match"),
        "export over an existing file": ([good, "--info-only", "--export-weights", bad["existing"]],
                                         "already exists; pass --force to overwrite it"),
        "export into a missing folder": ([good, "--export-weights", os.path.join(bad["missing"], "w.safetensors")],
                                         "could not write"),
    }


def usage_cases(saved):
    """name: (arguments, fragment of argparse's error); every one must exit 2."""
    good = saved["best_model"]
    return {
        "no arguments": ([], "give exactly one of PATH, --list FOLDER, --compare A B"),
        "unknown flag": ([good, "--frobnicate"], "unrecognized arguments: --frobnicate"),
    }


def success_cases(saved, bad):
    return {
        "inspect": [saved["best_model"]],
        "info json verify export": [saved["best_model"], "--info-only", "--json", "--verify",
                                    "--export-weights", bad["existing_forced"], "--force"],
        "salvage without sidecar": [bad["no_sidecar"], "--skip-verify", "--info-only"],
        "list": ["--list", saved["folder"]],
        "compare": ["--compare", saved["before training"], saved["best_model"]],
    }


def run_cli(args, cwd):
    # One thread each: several runs share 2 cores.
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **ONE_THREAD})


@pytest.fixture(scope="module")
def cli(saved, bad, tmp_path_factory):
    """Every CLI case run at once: {name: CompletedProcess}."""
    cases = {**{k: a for k, (a, _) in error_cases(saved, bad).items()},
             **{k: a for k, (a, _) in usage_cases(saved).items()},
             **success_cases(saved, bad)}
    cwd = str(tmp_path_factory.mktemp("cwd"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {name: pool.submit(run_cli, [str(a) for a in args], cwd) for name, args in cases.items()}
        results = {name: future.result() for name, future in futures.items()}
    assert os.listdir(cwd) == [], "the CLI wrote into its working folder"
    return results


# ---------------------------------------------------------------------------------------------- errors: one line

ERROR_NAMES = ["missing file", "text file, skip-verify", "torch file holding a tensor", "no sidecar",
               "truncated", "corrupt", "corrupt, verify", "exploit with a matching sidecar",
               "exploit as a plain pickle", "weights that do not fit the config", "list a missing folder",
               "compare with a corrupt file", "export over an existing file", "export into a missing folder"]


@pytest.mark.parametrize("case", ERROR_NAMES)
def test_each_bad_input_is_one_clear_line_and_exit_1(cli, saved, bad, case):
    _, fragment = error_cases(saved, bad)[case]
    result = cli[case]
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("load_checkpoint.py: error: ") and fragment in lines[0], lines[0]


def test_error_case_names_cover_the_table(saved, bad):
    assert sorted(ERROR_NAMES) == sorted(error_cases(saved, bad))


def test_a_hostile_pickle_never_runs(cli, bad, tmp_path):
    assert cli["exploit with a matching sidecar"].returncode == 1
    assert cli["exploit as a plain pickle"].returncode == 1
    assert not os.path.exists(bad["marker"]), "unpickling the exploit ran its command"
    # Control: the same kind of file does run its command when unpickled without weights_only.
    marker = tmp_path / "control-ran"
    torch.save({"model_state_dict": Exploit(str(marker))}, tmp_path / "control.pth")
    torch.load(tmp_path / "control.pth", weights_only=False)
    assert marker.exists()


def test_refused_export_leaves_the_existing_file_alone(cli, bad):
    assert open(bad["existing"], "rb").read() == b"keep me"


@pytest.mark.parametrize("case", ["no arguments", "unknown flag"])
def test_bad_usage_exits_2_with_argparse_usage(cli, saved, case):
    _, fragment = usage_cases(saved)[case]
    result = cli[case]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("usage: load_checkpoint.py") and fragment in result.stderr, result.stderr


@pytest.mark.parametrize("argv, fragment", [
    (["a.pth", "--list", "x"], "(got PATH, --list)"),
    (["a.pth", "--force"], "--force only applies to --export-weights"),
    (["--info-only", "--list", "x"], "--info-only needs PATH"),
    (["--verify", "--compare", "a", "b"], "--verify needs PATH"),
    (["--export-weights", "o.safetensors", "--list", "x"], "--export-weights needs PATH"),
    (["--skip-verify", "--list", "x"], "--skip-verify does not apply to --list"),
    (["--compare", "a"], "expected 2 arguments"),
])
def test_flags_that_do_not_apply_are_refused(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        load_checkpoint.main(argv)
    assert exit_info.value.code == 2 and fragment in capsys.readouterr().err


def test_a_state_dict_that_is_not_tensors_is_refused(tmp_path, capsys):
    path = tmp_path / "odd.pth"
    torch.save({"model_state_dict": {"w": 5}, "config": {}}, path)
    out = tmp_path / "o.safetensors"
    assert load_checkpoint.main([str(path), "--skip-verify", "--info-only", "--export-weights", str(out)]) == 1
    assert "model_state_dict is not a dict of tensors" in capsys.readouterr().err and not out.exists()
    torch.save({"model_state_dict": {}}, path)
    assert load_checkpoint.main([str(path), "--skip-verify"]) == 1
    assert "no config to rebuild its model from" in capsys.readouterr().err


def test_a_truncated_file_cannot_be_salvaged(bad, capsys):
    assert load_checkpoint.main([bad["truncated"], "--skip-verify"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a loadable checkpoint" in err


def test_export_onto_the_checkpoint_itself_is_refused(saved, capsys):
    before = ckpt.file_sha256(saved["best_model"])
    assert load_checkpoint.main([saved["best_model"], "--export-weights", saved["best_model"], "--force"]) == 1
    assert "is the checkpoint itself" in capsys.readouterr().err
    assert ckpt.file_sha256(saved["best_model"]) == before


# ---------------------------------------------------------------------------------------------- the CLI working

def test_inspect_prints_metadata_model_and_resume_code(cli, saved, tasks):
    result = cli["inspect"]
    assert result.returncode == 0 and result.stderr == "", result.stderr
    record = torch.load(saved["best_model"])
    parameters = count_parameters(build_model(record["config"], record["num_classes"]))
    out = result.stdout
    assert f"model: ARCAutoencoder, {parameters:,} parameters, weights loaded, eval mode" in out
    for line in ("input  examples: (1, 1, 30, 30)", "output colors: (1, 1, 10, 30, 30)",
                 "output sizes: (1, 1, 2, 30)", "output symbols: (1, 5, 10)",
                 f"python train.py --resume {shlex.quote(saved['best_model'])} --data-dir {tasks['folder']}",
                 f"trainer.resume({saved['best_model']!r})"):
        assert line in out, line
    assert ["global_step", str(record["global_step"])] in [line.split() for line in out.splitlines()]


def test_info_only_json_verify_export_is_one_json_document(cli, saved, bad):
    result = cli["info json verify export"]
    assert result.returncode == 0 and result.stderr == ""
    report = json.loads(result.stdout)
    assert report["verify"] == {"ok": True, "reason": "size and SHA-256 match"}
    assert report["model"] is None
    sidecar = ckpt.read_sidecar(saved["best_model"])
    lineage = report["metadata"].pop("lineage")
    assert [run["run_id"] for run in lineage] == [sidecar["run_id"]] and lineage[0]["parent"] is None
    assert report["metadata"] == json.loads(json.dumps(sidecar))
    assert not set(ckpt.TENSOR_KEYS) & set(report["metadata"])
    # --force replaced the file that was there with the weights.
    weights, record = load_file(bad["existing_forced"]), torch.load(saved["best_model"])
    assert report["exported"] == {"path": bad["existing_forced"], "tensors": len(record["model_state_dict"])}
    assert set(weights) == set(record["model_state_dict"])
    assert all(torch.equal(weights[k], v) for k, v in record["model_state_dict"].items())


def test_skip_verify_salvages_a_file_without_sidecar(cli):
    result = cli["salvage without sidecar"]
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["name", "no_sidecar"] in rows and ["saved_as", "best_model"] in rows  # a copy goes by its file name


def test_list_shows_every_checkpoint_newest_first(cli, saved):
    result = cli["list"]
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == list(load_checkpoint.LISTED)
    ids = [line.split("  ")[0].strip() for line in lines[1:] if line.strip()][:3]
    expected = [m["id"] for m in catalogue.list_checkpoints(saved["folder"])]
    assert ids == expected
    assert {i.split(":")[1] for i in ids} == {"best_model", "before training", "pretrained_encoder_binary"}
    assert "runs, newest first:" in result.stdout and "a fresh run" in result.stdout


def test_compare_prints_each_tensor_change(cli):
    result = cli["compare"]
    assert result.returncode == 0 and "config: identical" in result.stdout
    assert "L2(B - A)" in result.stdout and "example_encoder.encoder.to_latent.weight" in result.stdout


def test_export_writes_a_new_file_and_says_so(saved, tmp_path, capsys):
    out = tmp_path / "best.safetensors"
    assert load_checkpoint.main([saved["best_model"], "--info-only", "--export-weights", str(out)]) == 0
    record = torch.load(saved["best_model"])
    assert f"exported {len(record['model_state_dict'])} tensors of model_state_dict to {out}" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        described = {k: json.loads(v) for k, v in f.metadata().items()}
    assert described == {"name": "best_model", "kind": "best", "global_step": record["global_step"],
                         "config": record["config"]}
    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"], "a temporary file was left behind"


# ---------------------------------------------------------------------------------------------- details in-process

EXPECTED_OUTPUTS = {
    "best_model": ("ARCAutoencoder", {"examples": [1, 1, 30, 30]},
                   {"colors": [1, 1, 10, 30, 30], "sizes": [1, 1, 2, 30], "symbols": [1, 5, 10],
                    "cell_symbols": [1, 8 * 15 * 15, 10]}),  # the default cell code: 8 symbols per 2x2 block
    "selection": ("ARCAutoencoder", {"candidates": [1, 4, 2, 30, 30], "target_index": [1]},
                  {"scores": [1, 4], "symbols": None}),
    "classification": ("ARCAutoencoder", {"examples": [1, 1, 30, 30]}, {"logits": [1, 8], "symbols": [1, 5, 10]}),
    "pretrained_encoder_binary": ("ARCEncoder", {"grids": [1, 30, 30]}, {"latent": [1, 16]}),
}


@pytest.mark.parametrize("which", list(EXPECTED_OUTPUTS))
def test_every_kind_of_checkpoint_is_rebuilt_and_run_once(saved, capsys, which):
    assert load_checkpoint.main([saved[which], "--json"]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    cls, inputs, outputs = EXPECTED_OUTPUTS[which]
    record = ckpt.load_checkpoint(saved[which])
    rebuilt = load_checkpoint.rebuild(saved[which], record)
    assert (model["class"], model["inputs"], model["outputs"]) == (cls, inputs, outputs)
    assert model["parameters"] == count_parameters(rebuilt) and not rebuilt.training
    state = record["encoder_state_dict" if which.startswith("pretrained") else "model_state_dict"]
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in state.items())


def test_the_table_shows_every_metadata_field(saved, capsys):
    assert load_checkpoint.main([saved["best_model"], "--info-only"]) == 0
    out = capsys.readouterr().out.splitlines()
    info = {k: v for k, v in load_checkpoint.metadata(saved["best_model"], torch.load(saved["best_model"])).items()
            if k not in ckpt.FLAT_CONFIG_KEYS and k != "lineage"}
    for key, value in load_checkpoint.flatten(info):
        assert any(line.split()[:1] == [key] and line.rstrip().endswith(load_checkpoint.shown(value))
                   for line in out), key
    assert "config.vocab_size" in "\n".join(out) and "rng_state" not in "\n".join(out)
    assert any(line.strip().startswith("run ") and "a fresh run" in line for line in out)  # the lineage


def test_the_printed_python_resumes(saved, capsys, tmp_path):
    assert load_checkpoint.main([saved["best_model"]]) == 0
    out = capsys.readouterr().out
    code = out.split("or in Python:\n", 1)[1]
    code = "\n".join(line[4:] for line in code.splitlines()).replace("trainer.train()", "print(trainer.global_step)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ROOT, **ONE_THREAD})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == str(torch.load(saved["best_model"])["global_step"])


def test_compare_json_has_config_diff_metrics_parameters_and_l2(saved, capsys):
    a_path, b_path = saved["best_model"], saved["classification"]
    assert load_checkpoint.main(["--compare", a_path, b_path, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    a, b = torch.load(a_path), torch.load(b_path)
    assert {"field": "task_type", "a": "reconstruction", "b": "puzzle_classification"} in result["config_diff"]
    assert result["metrics"] == {"a": a["metrics"], "b": b["metrics"]}
    assert result["parameters"] == {"a": count_parameters(build_model(a["config"], 0)),
                                    "b": count_parameters(build_model(b["config"], b["num_classes"]))}
    same = [k for k, v in a["model_state_dict"].items()
            if k in b["model_state_dict"] and b["model_state_dict"][k].shape == v.shape and v.is_floating_point()]
    assert [c["name"] for c in result["tensor_changes"]] == same
    for change in result["tensor_changes"]:
        name = change["name"]
        expected = torch.linalg.vector_norm(b["model_state_dict"][name] - a["model_state_dict"][name])
        assert change["l2_diff"] == pytest.approx(float(expected))
    assert any(c["l2_diff"] > 0 for c in result["tensor_changes"])


def test_list_marks_damaged_files(saved, tmp_path, capsys):
    folder = tmp_path / "listed"
    folder.mkdir()
    data = open(saved["best_model"], "rb").read()
    copy_with_sidecar(saved["best_model"], folder / "best_model.pth")
    copy_with_sidecar(saved["best_model"], folder / "cut.pth", data[:1000])
    assert load_checkpoint.main(["--list", str(folder)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.startswith("legacy:")}
    assert rows["legacy:best_model"].endswith("no") and rows["legacy:cut"].endswith("yes")
    assert "damaged: legacy:cut: size 1000 bytes" in out
    assert load_checkpoint.main(["--list", str(folder), "--json"]) == 0
    listed = {m["name"]: m["damaged"] for m in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert listed == {"best_model": False, "cut": True}
    (tmp_path / "empty").mkdir()
    assert load_checkpoint.main(["--list", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out.strip() == f"no checkpoints in {tmp_path / 'empty'}"


def test_json_output_is_strict_json(tmp_path, saved, capsys):
    record = torch.load(saved["before training"])
    assert record["trainer"]["best_val_loss"] is None  # saved before the first validation: no Infinity in records
    assert load_checkpoint.main([saved["before training"], "--info-only", "--json"]) == 0
    report = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert report["metadata"]["trainer"]["best_val_loss"] is None
