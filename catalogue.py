"""The checkpoint root on disk: a folder per run, checkpoint ids, listing, run history and recovery.

    ROOT/runs/RUN_ID/run.json                 what the run is: phase, config, start time, parent
    ROOT/runs/RUN_ID/metrics.jsonl            its metric history (the web app keeps it)
    ROOT/runs/RUN_ID/checkpoints/NAME.pth     its checkpoints, each with NAME.json beside it (or NAME.pth.zst,
                                              compressed; a NAME.dcp folder from a multi-process run)
    ROOT/NAME.pth                             a flat folder written by version 0.6.0 or before: the run "legacy"

A run never writes outside its own folder, so no run overwrites or deletes another's checkpoint. A checkpoint's
id is RUN_ID:NAME; a bare NAME means the current run's, else the newest run's that has one, else legacy's.

Everything here reads a folder that anyone may have edited: a symlink is never followed (it is listed as
refused), JSON is read with size and depth limits, and one bad file never hides the others.
"""
import collections
import datetime
import os
import re
import shlex
import stat
import uuid

import checkpoint as ckpt

LEGACY_RUN = "legacy"
RUNS = "runs"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
FOLDER_SUFFIX = ".dcp"  # a multi-process run's checkpoint: a DCP folder (dcp_checkpoint.py)
ID_SEPARATOR = ":"
RUN_ID_RULE = "1 to 64 letters, digits and hyphens, starting with a letter or digit"
_RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
METRICS_LIMIT = 256 << 20  # bytes of metric history read for one run: about a million points
METRICS_LINE_LIMIT = 1 << 16
RUN_TYPES = {"run_id": str, "phase": str, "mode": str, "config": dict, "started_at": str, "parent": dict,
             "project_version": str}

Entry = collections.namedtuple("Entry", "id run_id name path")


# ---------------------------------------------------------------------------------------------- names and places

def new_run_id():
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


def check_run_id(run_id):
    """Return run_id if it names a run folder; ValueError otherwise."""
    if not isinstance(run_id, str) or not _RUN_ID_PATTERN.fullmatch(run_id):
        shown = run_id[:40] if isinstance(run_id, str) else type(run_id).__name__
        raise ValueError(f"invalid run id {shown!r}: use {RUN_ID_RULE}")
    return run_id


def run_folder(root, run_id):
    check_run_id(run_id)
    if run_id == LEGACY_RUN:
        raise ValueError(f"the run {LEGACY_RUN!r} is the flat folder of older versions; it has no run folder")
    return os.path.join(root, RUNS, run_id)


def checkpoint_folder(root, run_id):
    """Where run_id's checkpoints live: its run folder's checkpoints/, or the root itself for the legacy run."""
    return root if check_run_id(run_id) == LEGACY_RUN else os.path.join(run_folder(root, run_id), CHECKPOINTS)


def checkpoint_id(run_id, name):
    return f"{run_id}{ID_SEPARATOR}{name}"


def parse_id(text):
    """(run_id or None, name) of RUN_ID:NAME or a bare NAME; ValueError for anything else."""
    if not isinstance(text, str):
        raise ValueError(f"a checkpoint id must be a string, got {type(text).__name__}")
    run_id, separator, name = text.rpartition(ID_SEPARATOR)
    if separator:
        check_run_id(run_id)
    ckpt.check_name(name, automatic=True)
    return (run_id or None), name


def _real_folder(path):
    """True if path is a folder and not a symlink; False if missing. ValueError if it is a link or a file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(mode):
        raise ValueError(f"{path} is a symbolic link; links inside the checkpoint folder are never followed")
    if not stat.S_ISDIR(mode):
        raise ValueError(f"{path} is not a folder")
    return True


def _folder_chain_is_real(root, run_id):
    """Every folder between the root and run_id's checkpoints is a real folder (or missing), never a link."""
    if run_id == LEGACY_RUN:
        return True
    path = root
    for part in (RUNS, run_id, CHECKPOINTS):
        path = os.path.join(path, part)
        if not _real_folder(path):
            return False
    return True


# ---------------------------------------------------------------------------------------------- runs

def create_run(root, run_id, description):
    """Make run_id's folder and write its run.json, once: an existing run.json is never replaced."""
    folder = run_folder(root, run_id)
    _folder_chain_is_real(root, run_id)  # refuses links before anything is made
    os.makedirs(os.path.join(folder, CHECKPOINTS), exist_ok=True)
    path = os.path.join(folder, RUN_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(ckpt.dumps_strict({"run_id": run_id, **description}, indent=1))
        f.flush()
        os.fsync(f.fileno())


def read_run_file(root, run_id):
    """run_id's run.json, fields of the right type only, with problems naming what was wrong."""
    path = os.path.join(run_folder(root, run_id), RUN_FILE)
    try:
        value = ckpt.read_json(path)
    except FileNotFoundError:
        return {"run_id": run_id, "problems": []}
    except (OSError, ckpt.UnreadableFile) as e:
        return {"run_id": run_id, "problems": [f"{RUN_FILE} unreadable: {_reason(e)}"]}
    if not isinstance(value, dict):
        return {"run_id": run_id, "problems": [f"{RUN_FILE} holds {ckpt.json_kind(value)}, not an object"]}
    run, problems = ckpt.check_types(value, RUN_TYPES)
    return {**run, "run_id": run_id, "problems": problems}  # the folder's name is the run's id


def _run_ids(root):
    """(run ids, refused runs) under ROOT/runs: real folders with valid names; links are refused, not followed."""
    runs_path = os.path.join(root, RUNS)
    try:
        if not _real_folder(runs_path):
            return [], []
    except ValueError as e:
        return [], [{"run_id": RUNS, "refused": True, "error": str(e)}]
    ids, refused = [], []
    try:
        entries = list(os.scandir(runs_path))
    except OSError as e:
        return [], [{"run_id": RUNS, "refused": True, "error": f"{runs_path}: cannot be read ({e.strerror})"}]
    for entry in entries:
        if not _RUN_ID_PATTERN.fullmatch(entry.name) or entry.name == LEGACY_RUN:
            continue
        if entry.is_symlink():
            refused.append({"run_id": entry.name, "refused": True,
                            "error": f"{entry.path} is a symbolic link; never followed"})
        elif entry.is_dir(follow_symlinks=False):
            ids.append(entry.name)
    return ids, refused


def _has_legacy_checkpoints(root):
    try:
        return any(_is_checkpoint_entry(e) for e in os.scandir(root))
    except OSError:
        return False


def list_runs(root):
    """Every run, newest first, each with its parent (the run and checkpoint it resumed or fine-tuned from) and
    its number of checkpoints; the legacy flat folder last, if it holds any checkpoint."""
    ids, refused = _run_ids(root)
    runs = []
    for run_id in ids:
        run = read_run_file(root, run_id)
        run["checkpoints"], problems = _count_checkpoints(root, run_id)
        run["problems"] += problems
        runs.append(run)
    runs.sort(key=lambda r: (r.get("started_at") or "", r["run_id"]), reverse=True)
    if _has_legacy_checkpoints(root):
        runs.append({"run_id": LEGACY_RUN, "legacy": True, "phase": None, "problems": [],
                     "checkpoints": _count_checkpoints(root, LEGACY_RUN)[0],
                     "description": "checkpoints at the top of the folder, written before runs had folders"})
    return runs + refused


def _count_checkpoints(root, run_id):
    """(how many checkpoints run_id holds, problems): a checkpoints/ folder that is a link is never followed."""
    folder = checkpoint_folder(root, run_id)
    try:
        if not _folder_chain_is_real(root, run_id):
            return 0, []
        return len(_checkpoint_entries(folder)[0]), []
    except ValueError as e:
        return 0, [str(e)]
    except OSError as e:
        return 0, [f"{folder}: cannot be read ({e.strerror})"]


def read_run(root, run_id):
    """A run's description and metric points (train and val), or None if there is no such run."""
    if run_id == LEGACY_RUN or not _RUN_ID_PATTERN.fullmatch(run_id):
        return None
    folder = run_folder(root, run_id)
    try:
        if not _real_folder(folder):
            return None
    except ValueError:
        return None
    run = read_run_file(root, run_id)
    points, problems = read_metrics(os.path.join(folder, METRICS_FILE))
    return {**run, "problems": run["problems"] + problems, "train": [p for p in points if "loss" in p],
            "val": [p for p in points if "val_loss" in p]}


def read_metrics(path):
    """(points, problems) of a metrics.jsonl: lines that are JSON objects; cut, huge or deep lines are skipped."""
    try:
        data = ckpt.read_bytes(path, METRICS_LIMIT)
    except FileNotFoundError:
        return [], []
    except (OSError, ckpt.UnreadableFile) as e:
        return [], [f"{METRICS_FILE} unreadable: {_reason(e)}"]
    points, skipped = [], 0
    for line in data.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            if len(line) > METRICS_LINE_LIMIT:
                raise ckpt.UnreadableFile("line too long")
            point = ckpt.loads_bounded(line)
        except ckpt.UnreadableFile:
            skipped += 1  # a line cut short by a crash, or one that is not ours
            continue
        if isinstance(point, dict):
            points.append(point)
        else:
            skipped += 1
    return points, ([f"{METRICS_FILE}: {skipped} unreadable line(s) skipped"] if skipped else [])


# ---------------------------------------------------------------------------------------------- checkpoints

def locate(root, ident, current_run=None):
    """The Entry an id (RUN_ID:NAME) or bare name stands for; FileNotFoundError if no such checkpoint exists.

    A bare name is looked for in the current run, then in every run newest first, then in the legacy folder."""
    run_id, name = parse_id(ident)
    if run_id is None:
        ids, _ = _run_ids(root)
        started = {r: read_run_file(root, r).get("started_at") or "" for r in ids}
        order = sorted(ids, key=lambda r: (started[r], r), reverse=True)
        candidates = ([current_run] if current_run else []) + order + [LEGACY_RUN]
    else:
        candidates = [run_id]
    for candidate in candidates:
        try:
            entry = _entry(root, candidate, name)
        except ValueError:
            if run_id is not None:
                raise
            continue  # a run whose folder is a link is refused; a bare name looks on in the others
        if entry is not None and os.path.lexists(entry.path):
            return entry
    where = f"run {run_id}" if run_id else "any run"
    raise FileNotFoundError(f"no checkpoint {name!r} in {where} under {root}")


def _entry(root, run_id, name):
    """run_id's Entry for name, or None while its folder does not exist yet; ValueError through a link."""
    if not _folder_chain_is_real(root, run_id):
        return None
    return _entry_at(root, run_id, name)


def _entry_at(root, run_id, name):
    """The Entry of the checkpoint name in run_id's folder: its DCP folder where one is there, else its .pth or
    .pth.zst (ckpt.existing_file: the one its sidecar names where both are), else where a .pth would go."""
    folder = os.path.realpath(checkpoint_folder(root, run_id))
    stem = os.path.join(folder, name)
    if os.path.lexists(stem + FOLDER_SUFFIX):
        path = stem + FOLDER_SUFFIX
    else:
        path = ckpt.existing_file(folder, name) or stem + ".pth"
    return Entry(checkpoint_id(run_id, name), run_id, name, path)


def _is_checkpoint_entry(entry):
    """A .pth or .pth.zst file, or a .dcp folder (a link of any of those names too: listed as refused); never a
    dot-file."""
    if entry.name.startswith("."):
        return False
    if entry.name.endswith(ckpt.FILE_SUFFIXES):
        return not entry.is_dir(follow_symlinks=False)  # a folder named x.pth is not a checkpoint
    return entry.name.endswith(FOLDER_SUFFIX) and not entry.is_file(follow_symlinks=False)


def _checkpoint_entries(folder):
    """The checkpoint entries of a folder, one per checkpoint: of a NAME.pth and NAME.pth.zst both there, the one
    ckpt.existing_file reads, the other named in shadowed {listed entry: the other's file name}."""
    entries = [e for e in os.scandir(folder) if _is_checkpoint_entry(e)]
    by_name, kept, shadowed = {}, [], {}
    for entry in entries:
        if entry.name.endswith(ckpt.FILE_SUFFIXES):
            by_name.setdefault(ckpt.name_of(entry.name), []).append(entry)
        else:
            kept.append(entry)
    for name, forms in by_name.items():
        if len(forms) == 1:
            kept.append(forms[0])
            continue
        try:
            chosen = os.path.basename(ckpt.existing_file(folder, name))
        except ValueError:  # a name the rules refuse: both are listed as refused
            kept.extend(forms)
            continue
        kept.extend(e for e in forms if e.name == chosen)
        shadowed[chosen] = [e.name for e in forms if e.name != chosen][0]
    return kept, shadowed


def entry_for(root, run_id, name):
    """The Entry of run_id's checkpoint `name`, existing or not (where a save would write it)."""
    ckpt.check_name(name, automatic=True)
    _folder_chain_is_real(root, run_id)
    return _entry_at(root, run_id, name)


def describe(entry, root=None):
    """One checkpoint's metadata, with its id, run and path (and, given its root, the command that resumes it);
    damaged or refused files say why."""
    meta = ckpt.read_metadata(entry.path)
    described = {**meta, "id": entry.id, "run_id": entry.run_id, "path": entry.path}
    if not meta.get("damaged") and not meta.get("refused"):
        described.update(contents=ckpt.contents_of(meta), compression=meta.get("compression") or "none")
        if root is not None and described["contents"] == "full":  # weights only: fine-tuned from, not resumed
            described["resume_command"] = resume_command(root, entry.id, meta.get("kind"))
    return described


def resume_command(root, ident, kind=None):
    """The CLI line that continues from checkpoint `ident` in `root`: --resume, or for a pretrained encoder the
    main training that starts from it."""
    flag = "--pretrained-encoder" if kind == "pretrained" else "--resume"
    return f"python train.py --checkpoint-dir {shlex.quote(str(root))} {flag} {shlex.quote(ident)}"


def list_checkpoints(root, run=None):
    """Every run's checkpoints (or run's alone), newest first by stored time then step; each with id and run_id.

    Damaged files are listed as damaged, links and unusable names as refused, each with the reason."""
    if run is None:
        run_ids = _run_ids(root)[0] + [LEGACY_RUN]
    else:
        run_ids = [check_run_id(run)]
    metas = []
    for run_id in run_ids:
        metas.extend(_list_run(root, run_id))
    return sorted(metas, key=newest_first, reverse=True)


def newest_first(meta):
    """The sort key that lists checkpoints newest first: stored time, then step."""
    created, step = meta.get("created_at"), meta.get("global_step")
    return (created if isinstance(created, str) else "", step if isinstance(step, int) else 0)


def _list_run(root, run_id):
    try:
        if not _folder_chain_is_real(root, run_id):
            return []
    except ValueError:
        return []  # the run itself is listed as refused by list_runs
    folder = os.path.realpath(checkpoint_folder(root, run_id))
    try:
        entries, shadowed = _checkpoint_entries(folder)
    except OSError:
        return []
    metas = []
    for dir_entry in entries:
        name = ckpt.name_of(dir_entry.name)
        try:
            ckpt.check_name(name, automatic=True)
        except ValueError:
            metas.append({"id": None, "run_id": run_id, "name": name, "file": dir_entry.name, "path": dir_entry.path,
                          "damaged": True, "refused": True, "problems": [],
                          "error": f"its name breaks the naming rules ({ckpt.NAME_RULE}); rename the file"})
            continue
        try:
            meta = describe(Entry(checkpoint_id(run_id, name), run_id, name, dir_entry.path), root)
        except FileNotFoundError:  # deleted (retention, another request) since the folder was scanned
            continue
        if dir_entry.name in shadowed:
            meta["problems"] = list(meta.get("problems") or []) + [
                f"{shadowed[dir_entry.name]} is on disk under the same name, left by an overwrite into the other "
                f"form cut short; {dir_entry.name} (the file its sidecar names) is the checkpoint: delete the other"]
        metas.append(meta)
    return metas


def recover(root):
    """Finish or undo cut-short saves in every run's folder; (removed names, problems). Never raises."""
    removed, problems = [], []
    folders = [root] + [checkpoint_folder(root, r) for r in _run_ids(root)[0]]
    for folder in folders:
        if os.path.isdir(folder) and not os.path.islink(folder):
            gone, trouble = ckpt.recover_folder(folder)
            removed += gone
            problems += trouble
    return removed, problems


def _reason(error):
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)



def run_of_path(path):
    """The run a checkpoint file belongs to, read from where it sits (ROOT/runs/RUN_ID/checkpoints/NAME.pth), or
    None for a file outside that layout."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if len(parts) >= 4 and parts[-2] == CHECKPOINTS and parts[-4] == RUNS and _RUN_ID_PATTERN.fullmatch(parts[-3]):
        return parts[-3]
    return None
