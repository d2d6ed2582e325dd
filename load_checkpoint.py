"""Inspect, verify, list, compare and export checkpoints; rebuild a checkpoint's model and run it once.

    python load_checkpoint.py PATH.pth                    # metadata, lineage, model check, resume hint
    python load_checkpoint.py PATH.pth --info-only --json
    python load_checkpoint.py PATH.pth --verify
    python load_checkpoint.py --list checkpoints          # every run's checkpoints, and the runs' lineage
    python load_checkpoint.py --list checkpoints --run RUN_ID
    python load_checkpoint.py --compare A.pth B.pth
    python load_checkpoint.py PATH.pth --export-weights best.safetensors
    python load_checkpoint.py PATH.dcp --consolidate OUT.pth  # a multi-process run's folder -> one file
    python load_checkpoint.py PATH.pth --to-dcp OUT.dcp       # and back
    python load_checkpoint.py PATH.pth --export OUT.pth.zst --contents weights --compression zstd
    python load_checkpoint.py PATH.pth.zst --decompress OUT.pth  # the plain file: loads with plain torch.load
    python load_checkpoint.py s3://bucket/prefix/runs/RUN_ID/checkpoints/NAME.pth --verify   # any of the above
    python load_checkpoint.py --list s3://bucket/prefix       # what a mirror or remote root holds
    python load_checkpoint.py --restore RUN_ID:NAME --mirror s3://bucket/prefix --checkpoint-dir checkpoints

PATH is a file (checkpoints/runs/RUN_ID/checkpoints/NAME.pth or NAME.pth.zst, or any copy of one; a .pth.zst
reads as the .pth it compresses) or a multi-process run's DCP folder (NAME.dcp, beside its NAME.json); a folder
reads as the one record it consolidates to. PATH (and --list, --compare) may be an fsspec URL: a checkpoint there
is downloaded into a temporary folder, verified, and read as a local one. --restore fetches a checkpoint missing
locally from a mirror into its run's folder.

Files are read with torch.load(weights_only=True) only, after their size and SHA-256 match the sidecar;
--skip-verify loads a file that fails verification (salvage). Exit codes: 0 fine, 1 refused or failed, 2 bad usage.
"""
import argparse
import contextlib
import json
import os
import shlex
import sys
import tempfile
import uuid
import warnings

import torch

import catalogue
import checkpoint as ckpt
import dcp_checkpoint
import language
import remote
from data import NUM_COLORS, PAD
from model import GRID_SIZE, count_parameters
from train import TrainConfig, build_encoder, build_model

PROG = "load_checkpoint.py"
LISTED = ("id", "kind", "epoch", "batch", "global_step", "val_loss", "val_acc", "size", "created_at", "damaged")
SAMPLE_GRID = ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 0, 1))  # a 3x4 ARC grid, padded to 30x30 with PAD


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = _Parser(prog=PROG, description="Inspect, verify, list, compare and export checkpoints.")
    parser.add_argument("path", nargs="?", metavar="PATH", help="a checkpoint .pth or .pth.zst file or .dcp folder")
    parser.add_argument("--info-only", action="store_true", help="metadata only; do not rebuild the model (a "
                        "folder's shards are not read: their names, shapes and types come from DCP's metadata)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--verify", action="store_true", help="check size and SHA-256 against the sidecar, print it")
    parser.add_argument("--skip-verify", action="store_true",
                        help="load a file that fails verification anyway (salvage)")
    parser.add_argument("--list", metavar="FOLDER", help="table of every run's checkpoints in FOLDER (a checkpoint "
                        "root), and each run's lineage")
    parser.add_argument("--run", metavar="RUN_ID", help="with --list: that run's checkpoints only")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two checkpoint files")
    parser.add_argument("--export-weights", metavar="OUT", help="write PATH's model_state_dict to OUT (safetensors)")
    parser.add_argument("--consolidate", metavar="OUT.pth", help="write PATH (a .dcp folder) as one ordinary "
                        "checkpoint file, with its sidecar: it loads with plain torch.load and resumes anywhere")
    parser.add_argument("--to-dcp", metavar="OUT.dcp", help="write PATH (a .pth) as a DCP folder, with its sidecar: "
                        "what a multi-process run saves")
    parser.add_argument("--export", metavar="OUT", help="write PATH as a new checkpoint OUT (OUT.pth, or OUT.pth.zst "
                        "with --compression zstd), with its sidecar, holding --contents")
    parser.add_argument("--contents", help=f"with --export: {', '.join(ckpt.CONTENTS)} (default: PATH's own); "
                        "weights holds no optimizer state (fine-tunable, not resumable), weights-bf16 casts it to "
                        "bfloat16")
    parser.add_argument("--compression", help=f"with --export: {', '.join(ckpt.COMPRESSIONS)} (default none)")
    parser.add_argument("--decompress", metavar="OUT.pth", help="write PATH (a .pth.zst) as the plain OUT.pth, with "
                        "its sidecar: it loads with plain torch.load")
    parser.add_argument("--force", action="store_true", help="let --export-weights, --consolidate, --export or "
                        "--decompress replace an existing OUT")
    parser.add_argument("--restore", metavar="ID", help="fetch checkpoint RUN_ID:NAME from --mirror into its run's "
                        "folder under --checkpoint-dir (verified before it is put in place)")
    parser.add_argument("--mirror", metavar="URL", help="with --restore: the mirror's fsspec URL")
    parser.add_argument("--checkpoint-dir", metavar="FOLDER", help="with --restore: the local checkpoint root")
    parser.add_argument("--storage-options", default="", metavar="JSON", help="fsspec options for URLs; credentials "
                        "otherwise come from AWS_* variables or AWS_PROFILE")
    return parser


def check_usage(parser, args):
    """Exactly one of PATH, --list, --compare; every other flag only where it means something."""
    modes = [name for name, given in (("PATH", args.path), ("--list", args.list), ("--compare", args.compare),
                                      ("--restore", args.restore)) if given is not None]
    if len(modes) != 1:
        parser.error("give exactly one of PATH, --list FOLDER, --compare A B, --restore ID" +
                     (f" (got {', '.join(modes)})" if modes else ""))
    if (args.restore is None) != (args.mirror is None) or (args.restore is None) != (args.checkpoint_dir is None):
        parser.error("--restore ID needs --mirror URL and --checkpoint-dir FOLDER, and they only apply to it")
    for flag, given in (("--info-only", args.info_only), ("--verify", args.verify),
                        ("--export-weights", args.export_weights), ("--consolidate", args.consolidate),
                        ("--to-dcp", args.to_dcp), ("--export", args.export), ("--decompress", args.decompress)):
        if given and args.path is None:
            parser.error(f"{flag} needs PATH")
    folder = args.path is not None and dcp_checkpoint.is_folder_checkpoint(os.path.normpath(args.path))
    if args.consolidate and not (folder and args.consolidate.endswith(".pth")):
        parser.error("--consolidate turns a .dcp folder into OUT.pth: give PATH ending .dcp and OUT ending .pth")
    if args.to_dcp and (folder or not args.to_dcp.endswith(dcp_checkpoint.SUFFIX)):
        parser.error("--to-dcp turns a .pth into OUT.dcp: give PATH ending .pth and OUT ending .dcp")
    if args.run is not None and args.list is None:
        parser.error("--run only applies to --list")
    if args.skip_verify and args.list is not None:
        parser.error("--skip-verify does not apply to --list (listing never loads tensors)")
    if args.force and not (args.export_weights or args.consolidate or args.export or args.decompress):
        parser.error("--force only applies to --export-weights, --consolidate, --export and --decompress")
    if (args.contents is not None or args.compression is not None) and not args.export:
        parser.error("--contents and --compression only apply to --export")
    if args.decompress and (folder or not ckpt.is_compressed(args.path) or not args.decompress.endswith(".pth")):
        parser.error("--decompress turns a .pth.zst into OUT.pth: give PATH ending .pth.zst and OUT ending .pth")
    if args.export and folder:
        parser.error("--export reads a file: turn a .dcp folder into one with --consolidate first")


def check_export_options(args):
    """ValueError, naming the value, for --contents or --compression outside their choices, or an OUT whose name
    does not say its compression."""
    if args.contents is not None:
        ckpt.check_contents(args.contents)
    compression = ckpt.check_compression(args.compression or "none")
    if not args.export.endswith(ckpt.suffix_for(compression)) or \
            (compression == "none" and args.export.endswith(ckpt.ZSTD_SUFFIX)):
        raise ValueError(f"--export {args.export!r} with compression {compression}: its name must end "
                         f"{ckpt.suffix_for(compression)}")


# ---------------------------------------------------------------------------------------------- formatting

def shown(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(ckpt.json_safe(value))
    return str(value)


def human_size(size):
    if not isinstance(size, int):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def flatten(mapping, prefix=""):
    """Nested dicts -> [(dotted key, value)], in their stored order."""
    rows = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            rows.extend(flatten(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def key_value_table(rows):
    width = max((len(key) for key, _ in rows), default=0)
    return "\n".join(f"{key:<{width}}  {shown(value)}" for key, value in rows)


def column_table(header, rows):
    cells = [list(header)] + [[shown(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


# ---------------------------------------------------------------------------------------------- one file

def load(path, skip_verify):
    """The record at path, verified unless skip_verify; CheckpointError otherwise."""
    with warnings.catch_warnings():
        # torch warns about a foreign pickle before refusing it; the refusal alone is the one line to show.
        warnings.simplefilter("ignore", UserWarning)
        return ckpt.load_checkpoint(path, verify_file=not skip_verify)


def verification(path, skip_verify):
    """--verify: {"ok", "reason"}; a failure is an error unless --skip-verify."""
    ok, reason = ckpt.verify(path)
    if not ok and not skip_verify:
        raise ckpt.CheckpointError(f"{reason}. Refusing to load; pass --skip-verify to salvage it anyway")
    return {"ok": ok, "reason": reason}


def metadata(path, record):
    """Every field but the tensors, plus what only the sidecar knows (file, size, sha256, verified_at, notes), and
    the run the file sits in with that run's parent (its lineage), when it sits in a run's folder."""
    sidecar = ckpt.read_sidecar(path) or {}
    info = {**{k: v for k, v in sidecar.items() if k not in record}, **ckpt.metadata_of(record)}
    info.setdefault("size", os.path.getsize(path))
    info.pop("files", None)  # a folder's manifest: --verify checks it; the listing shows its total size
    name = ckpt.name_of(path)
    if info.get("name") != name:  # a renamed copy: the file's name is its name, as listings show it
        info.update(name=name, saved_as=info.get("name"))
    info["lineage"] = lineage_of(path)
    return info


def lineage_of(path):
    """[this file's run, its parent, the parent's parent, ...] as far as the run folders beside it tell; [] for a
    file outside a checkpoint root's layout."""
    run_id = catalogue.run_of_path(path)
    if run_id is None:
        return []
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path)))))
    chain, seen = [], set()
    while run_id and run_id not in seen and len(chain) < 100:
        seen.add(run_id)
        run = catalogue.read_run_file(root, run_id) if run_id != catalogue.LEGACY_RUN else {"run_id": run_id}
        parent = run.get("parent") if isinstance(run.get("parent"), dict) else None
        chain.append({"run_id": run_id, "phase": run.get("phase"), "started_at": run.get("started_at"),
                      "parent": parent})
        run_id = parent.get("run_id") if parent else None
    return chain


def state_dict(path, record, key):
    """record[key] as a dict of tensors; CheckpointError for a file that only looks like a checkpoint."""
    value = record.get(key)
    if not isinstance(value, dict) or not all(isinstance(t, torch.Tensor) for t in value.values()):
        raise ckpt.CheckpointError(f"{path}: its {key} is not a dict of tensors")
    return value


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def rebuild(path, record):
    """The model a record describes, with its weights loaded, in eval mode."""
    config = record.get("config")
    if not isinstance(config, dict):
        raise ckpt.CheckpointError(f"{path}: no config to rebuild its model from")
    try:
        if record.get("kind") == "pretrained":
            model = build_encoder(config)
            model.load_state_dict(state_dict(path, record, "encoder_state_dict"))
        else:
            model = build_model(config, record.get("num_classes", 0))
            model.load_state_dict(state_dict(path, record, "model_state_dict"))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a config or weights that lie
        raise ckpt.CheckpointError(f"{path}: cannot rebuild the model it describes: {first_line(e)}"
                                   f"{ckpt.version_note(record)}") from None
    return model.eval()


def sample_grids(count):
    """(count, 30, 30) colour ids: SAMPLE_GRID with its colours shifted by i, padded with PAD."""
    grids = torch.full((count, GRID_SIZE, GRID_SIZE), PAD, dtype=torch.long)
    grid = torch.tensor(SAMPLE_GRID)
    for i in range(count):
        grids[i, :grid.shape[0], :grid.shape[1]] = (grid + i) % NUM_COLORS
    return grids


@torch.no_grad()
def forward_once(model, record):
    """One forward pass on a sample grid (eval mode); returns (input shapes, outputs)."""
    config = record["config"]
    if record.get("kind") == "pretrained":
        grids = sample_grids(1)  # (1, 30, 30)
        return {"grids": grids.shape}, {"latent": model(grids)}
    g = 2 if config["use_input_output_pairs"] else 1
    if config["task_type"] == "selection":
        k = config["num_distractors"]
        candidates = sample_grids((k + 1) * g).view(1, k + 1, g, GRID_SIZE, GRID_SIZE)
        target_index = torch.tensor([0])
        return ({"candidates": candidates.shape, "target_index": target_index.shape},
                model(candidates=candidates, target_index=target_index))
    examples = sample_grids(g).view(1, g, GRID_SIZE, GRID_SIZE)
    return {"examples": examples.shape}, model(examples)


def model_check(path, record):
    """Rebuild, count parameters, run once: a plain dict report."""
    model = rebuild(path, record)
    try:
        inputs, outputs = forward_once(model, record)
    except (KeyError, RuntimeError) as e:
        raise ckpt.CheckpointError(f"{path}: the rebuilt model failed on a sample grid: {first_line(e)}") from None
    report = {"class": type(model).__name__, "parameters": count_parameters(model),
              "inputs": {k: list(shape) for k, shape in inputs.items()},
              "outputs": {k: None if v is None else list(v.shape) for k, v in outputs.items()}}
    if outputs.get("symbols") is not None:
        report["message"] = outputs["symbols"][0].argmax(-1).tolist()
    return report


def data_flags(config):
    """CLI flags naming the data a run used, so a command rebuilds the same splits and classes."""
    if config.get("data_dir"):
        return f" --data-dir {shlex.quote(config['data_dir'])}"
    dataset = config.get("dataset", TrainConfig().dataset)
    return "" if dataset == TrainConfig().dataset else f" --dataset {dataset}"


def resume_hint(path, record):
    """Example code to carry on from this file: resume (main training) or fine-tune (pretrained encoder)."""
    config = record["config"]
    data_call = f"load_data({config.get('dataset', TrainConfig().dataset)!r}, {config.get('data_dir') or None!r})"
    flags = data_flags(config)
    if record.get("kind") == "pretrained":
        dims = {k: config[k] for k in ("embedding_dim", "hidden_dim", "latent_dim", "num_conv_layers")}
        flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in dims.items()) + flags
        heading = "Fine-tune from this pretrained encoder (the encoder sizes must match):"
        command = f"python train.py --pretrained-encoder {shlex.quote(path)}{flags} [--freeze-encoder true]"
        values = {"pretrained_encoder": path, **dims, **{k: config[k] for k in ("data_dir",) if config.get(k)}}
        last = "trainer.train()"
    else:
        heading = "Resume training exactly where this checkpoint left off:"
        command = f"python train.py --resume {shlex.quote(path)}{flags}"
        values = {"checkpoint_dir": config.get("checkpoint_dir", "checkpoints")}
        last = f"trainer.resume({path!r})  # takes the checkpoint's task, architecture and position\n" \
               f"    trainer.train()"
    return (f"{heading}\n    {command}\nor in Python:\n"
            f"    from data import load_data\n"
            f"    from train import Trainer, TrainConfig\n"
            f"    events = []  # every event the run publishes\n"
            f"    config = TrainConfig.from_dict({values!r})\n"
            f"    trainer = Trainer(config, {data_call}, 'cpu', config.checkpoint_dir, events.append)\n"
            f"    {last}")


def folder_metadata(path, skip_verify):
    """--info-only of a folder: its record.pth and DCP's own metadata of the shards, no tensor read."""
    from torch.distributed.checkpoint import FileSystemReader
    record = dcp_checkpoint.read_record(path, verify_file=not skip_verify)
    shards = FileSystemReader(path).read_metadata().state_dict_metadata
    record["shards"] = {key: {"shape": list(meta.size), "dtype": str(meta.properties.dtype).replace("torch.", "")}
                        for key, meta in shards.items() if hasattr(meta, "size")}
    return record


def consolidate(record, path, out, force):
    """--consolidate: the folder's whole record as OUT.pth + OUT.json, written atomically (checkpoint.py)."""
    name = _output_name(out, ".pth")
    if os.path.realpath(os.path.dirname(os.path.abspath(out))) == os.path.realpath(os.path.dirname(path)) \
            and name == os.path.basename(path)[:-len(dcp_checkpoint.SUFFIX)]:
        raise ckpt.CheckpointError(f"{out} would take the name of the folder itself; choose another name")
    sidecar = ckpt.write_checkpoint(os.path.dirname(os.path.abspath(out)), {**record, "name": name},
                                    overwrite=force)
    return {"path": out, "size": sidecar["size"], "sha256": sidecar["sha256"]}


def to_folder(record, out):
    """--to-dcp: the record as a DCP folder OUT.dcp + OUT.json; never replaces anything."""
    name = _output_name(out, dcp_checkpoint.SUFFIX)
    sidecar = dcp_checkpoint.write_record(out, {**record, "name": name})
    return {"path": out, "size": sidecar["size"], "sha256": sidecar["sha256"]}


def export(record, path, out, contents, compression, force):
    """--export and --decompress: the record as a new checkpoint OUT with `contents` (the record's own when None)
    and compression, and its sidecar, written atomically (checkpoint.py); never the file it was read from."""
    name = _output_name(out, ckpt.suffix_for(compression))
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.realpath(folder) == os.path.realpath(os.path.dirname(os.path.abspath(path))) \
            and name == ckpt.name_of(path) and not force:
        raise ckpt.CheckpointError(f"{out} would replace the checkpoint {ckpt.name_of(path)!r} itself (a name has one "
                                   "checkpoint, in one form); choose another name, or pass --force to convert it")
    try:
        shaped = ckpt.with_contents({**record, "name": name}, contents or ckpt.contents_of(record))
    except ValueError as e:
        raise ckpt.CheckpointError(f"{path}: {e}") from None
    sidecar = ckpt.write_checkpoint(folder, shaped, overwrite=force, compression=compression)
    return {"path": os.path.join(folder, sidecar["file"]), "size": sidecar["size"], "sha256": sidecar["sha256"]}


def _output_name(out, suffix):
    """OUT's checkpoint name (its file name less suffix), under the naming rules: it names the sidecar too."""
    name = os.path.basename(os.path.normpath(out))[:-len(suffix)]
    try:
        return ckpt.check_name(name, automatic=True)
    except ValueError as e:
        raise ckpt.CheckpointError(f"{out}: {e}") from None


def export_weights(record, path, out, force):
    """Write model_state_dict as safetensors (tensors only, nothing to unpickle); returns the tensor count."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    if os.path.realpath(out) == os.path.realpath(path):
        raise ckpt.CheckpointError(f"{out} is the checkpoint itself; choose another output file")
    if os.path.exists(out) and not force:
        raise ckpt.CheckpointError(f"{out} already exists; pass --force to overwrite it")
    # Cloned: safetensors refuses tensors that share storage.
    tensors = {k: v.detach().clone().contiguous() for k, v in state_dict(path, record, "model_state_dict").items()}
    described = {"name": record.get("name"), "kind": record.get("kind"), "global_step": record.get("global_step"),
                 "config": record.get("config")}
    folder = os.path.dirname(os.path.abspath(out))
    temp = os.path.join(folder, f".{os.path.basename(out)}{ckpt.TEMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        save_file(tensors, temp, metadata={k: json.dumps(ckpt.json_safe(v)) for k, v in described.items()})
        os.replace(temp, out)
    except SafetensorError as e:  # safetensors reports I/O failures (missing folder, disk full) as its own type
        raise ckpt.CheckpointError(f"could not write {out}: {e}") from None
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    return len(tensors)


def language_of(record):
    """The record's emergent-language figures (language.summary), or what is wrong with them: they are shown, never
    trusted."""
    try:
        return language.summary(record.get(ckpt.LANGUAGE_KEY))
    except ValueError as e:
        return {"unreadable": str(e)}


def print_language(summary):
    if "unreadable" in summary:
        print(f"\nlanguage: unreadable: {summary['unreadable']}")
        return
    figures = {k: v for k, v in summary.items() if k != "top_messages"}
    print(f"\nlanguage (the validation split, at the checkpoint's last validation):\n{key_value_table(figures.items())}")
    for top in summary["top_messages"]:
        print(f"  message {' '.join(map(str, top['message']))}: {top['count']}")


def inspect_file(args):
    """PATH mode: verify (if asked), load, show metadata, check the model, export (if asked)."""
    report = {"path": args.path, "verify": None, "metadata": None, "model": None, "exported": None}
    if args.verify:
        report["verify"] = verification(args.path, args.skip_verify)
    skip = args.skip_verify or args.verify  # --verify has just hashed it
    folder_info = args.info_only and dcp_checkpoint.is_folder_checkpoint(os.path.normpath(args.path))
    record = folder_metadata(args.path, skip) if folder_info else load(args.path, skip_verify=skip)
    report["metadata"] = metadata(args.path, record)
    report["language"] = language_of(record)
    if not args.info_only:
        report["model"] = model_check(args.path, record)
    if args.export_weights:
        count = export_weights(record, args.path, args.export_weights, args.force)
        report["exported"] = {"path": args.export_weights, "tensors": count}
    if args.consolidate:
        report["converted"] = consolidate(record, args.path, args.consolidate, args.force)
    if args.to_dcp:
        report["converted"] = to_folder(record, args.to_dcp)
    if args.export:
        report["converted"] = export(record, args.path, args.export, args.contents, args.compression or "none",
                                     args.force)
    if args.decompress:
        report["converted"] = export(record, args.path, args.decompress, None, "none", args.force)
    if args.json:
        print(json.dumps(ckpt.json_safe(report), indent=1, default=str))
    else:
        print_inspection(report, record)
    return 0


def print_inspection(report, record):
    if report["verify"] is not None:
        print(f"verify: {'OK' if report['verify']['ok'] else 'FAILED'}: {report['verify']['reason']}\n")
    # The flat config keys repeat config.*; show them once, under config.
    info = {k: v for k, v in report["metadata"].items() if k not in ckpt.FLAT_CONFIG_KEYS and k != "lineage"}
    print(f"checkpoint {report['path']}\n{key_value_table(flatten(info))}")
    if report["metadata"]["lineage"]:
        print("\nlineage:\n" + "\n".join(f"  {lineage_line(run)}" for run in report["metadata"]["lineage"]))
    if report["language"] is not None:
        print_language(report["language"])
    model = report["model"]
    if model is not None:
        print(f"\nmodel: {model['class']}, {model['parameters']:,} parameters, weights loaded, eval mode")
        for name, shape in {**model["inputs"], **model["outputs"]}.items():
            print(f"  {'input ' if name in model['inputs'] else 'output'} {name}: {shape_text(shape)}")
        if "message" in model:
            print(f"  message for the sample grid: {model['message']}")
        print("\n" + resume_hint(report["path"], record))
    if report["exported"] is not None:
        print(f"\nexported {report['exported']['tensors']} tensors of model_state_dict to {report['exported']['path']}")
    if report.get("converted"):
        done = report["converted"]
        print(f"\nwrote {done['path']} ({human_size(done['size'])}, sha256 {done['sha256'][:12]}...) and its "
              f"sidecar {os.path.basename(ckpt.sidecar_path(done['path']))}")


def shape_text(shape):
    if shape is None:
        return "None (no message: autoencoder bottleneck)"
    return str(tuple(shape))


# ---------------------------------------------------------------------------------------------- many files

def lineage_line(run):
    parent = run.get("parent")
    origin = f"{parent.get('relation')} of {parent.get('id') or parent.get('path')} at step " \
             f"{parent.get('global_step')}" if parent else "a fresh run"
    return f"run {run['run_id']} ({run.get('phase') or 'phase unknown'}, started {run.get('started_at') or '?'}): {origin}"


def list_folder(folder, run, as_json):
    if not os.path.isdir(folder):
        raise ckpt.CheckpointError(f"{folder}: no such folder")
    try:
        metas = catalogue.list_checkpoints(folder, run=run)
    except ValueError as e:
        raise ckpt.CheckpointError(str(e)) from None
    runs = [r for r in catalogue.list_runs(folder) if run is None or r["run_id"] == run]
    if as_json:
        print(json.dumps(ckpt.json_safe({"checkpoints": metas, "runs": runs}), indent=1, default=str))
        return 0
    if not metas:
        print(f"no checkpoints in {folder}" + (f" for run {run}" if run else ""))
    else:
        rows = [[human_size(m.get(k)) if k == "size" else m.get(k) if k != "id" else m.get("id") or m.get("name")
                 for k in LISTED] for m in metas]
        print(column_table(LISTED, rows))
    for meta in metas:
        if meta.get("damaged"):
            print(f"{'refused' if meta.get('refused') else 'damaged'}: {meta.get('id') or meta.get('path')}: "
                  f"{meta.get('error')}")
        for problem in meta.get("problems") or []:
            print(f"ignored in {meta.get('id')}: {problem}")
    if runs:
        print("\nruns, newest first:\n" + "\n".join(
            f"  {lineage_line(r)}" if not r.get("refused") and not r.get("legacy") else
            f"  run {r['run_id']}: {r.get('error') or r.get('description')}" for r in runs))
    return 0


def compare(paths, skip_verify, as_json):
    a, b = (load(p, skip_verify) for p in paths)
    result = ckpt.compare_records(a, b, *(state_dict(p, r, "model_state_dict") for p, r in zip(paths, (a, b))))
    if as_json:
        print(json.dumps(ckpt.json_safe(result), indent=1, default=str))
    else:
        print_comparison(result, paths)
    return 0


def print_comparison(result, paths):
    print(f"A: {paths[0]} ({result['a']})\nB: {paths[1]} ({result['b']})\n")
    if result["config_diff"]:
        print(column_table(("config field", "A", "B"), [[d["field"], d["a"], d["b"]] for d in result["config_diff"]]))
    else:
        print("config: identical")
    metrics_a, metrics_b = dict(flatten(result["metrics"]["a"])), dict(flatten(result["metrics"]["b"]))
    keys = list(dict.fromkeys([*metrics_a, *metrics_b]))
    print("\n" + column_table(("metric", "A", "B"), [[k, metrics_a.get(k), metrics_b.get(k)] for k in keys]))
    print(f"\nparameters: A {result['parameters']['a']:,}, B {result['parameters']['b']:,}")
    if result["tensor_changes"]:
        rows = [[c["name"], "x".join(map(str, c["shape"])), c["l2_diff"], c["l2_a"]] for c in result["tensor_changes"]]
        print("\n" + column_table(("tensor", "shape", "L2(B - A)", "L2(A)"), rows))
    else:
        print("no tensors of the same name and shape to compare")


# ---------------------------------------------------------------------------------------------- main

def restore(args, options):
    run_id, name = catalogue.parse_id(args.restore)
    if run_id is None:
        raise ValueError(f"--restore needs a full id RUN_ID:NAME, not {args.restore!r}")
    path = remote.ObjectRoot(args.mirror, options).restore(run_id, name, args.checkpoint_dir)
    print(f"restored {catalogue.checkpoint_id(run_id, name)} from {args.mirror} to {path} (verified)")
    print(f"resume: {catalogue.resume_command(args.checkpoint_dir, catalogue.checkpoint_id(run_id, name))}")
    return 0


def list_remote(url, run, options, as_json):
    metas = remote.ObjectRoot(url, options).list_checkpoints(run=run)
    if as_json:
        print(json.dumps(ckpt.json_safe({"checkpoints": metas}), indent=1, default=str))
        return 0
    if not metas:
        print(f"no checkpoints in {url}" + (f" for run {run}" if run else ""))
        return 0
    print(column_table(LISTED, [[human_size(m.get(k)) if k == "size" else m.get(k) for k in LISTED] for m in metas]))
    for meta in metas:
        if meta.get("damaged"):
            print(f"damaged: {meta.get('id')}: {meta.get('error')}")
    return 0


def local_paths(args, options, stack):
    """PATH and --compare's paths with every URL among them downloaded into a temporary root (removed at exit)."""
    def local(path):
        if not remote.is_url(path):
            return path
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="load_checkpoint-"))
        return remote.fetch_cached(path, folder, options)
    if args.path is not None:
        args.path = local(args.path)
    if args.compare is not None:
        args.compare = [local(p) for p in args.compare]


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_usage(parser, args)
    if args.export:
        try:
            check_export_options(args)
        except ValueError as e:
            print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
            return 2
    try:
        options = remote.parse_storage_options(args.storage_options)
        if args.restore is not None:
            return restore(args, options)
        if args.list is not None and remote.is_url(args.list):
            return list_remote(args.list, args.run, options, args.json)
        with contextlib.ExitStack() as stack:
            local_paths(args, options, stack)
            if args.list is not None:
                return list_folder(args.list, args.run, args.json)
            if args.compare is not None:
                return compare(args.compare, args.skip_verify, args.json)
            return inspect_file(args)
    except (ckpt.CheckpointError, OSError, ValueError, remote.RemoteError) as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 1


def one_line(error):
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
