"""Checkpoint I/O for one checkpoint: build the record, write it atomically with a verifiable sidecar, read it,
verify it, and lock it while doing so.

A checkpoint is NAME.pth (loads with plain torch.load, weights_only) plus NAME.json, its sidecar: every field
but the tensors, with the .pth's size and SHA-256. Saved with compression "zstd" it is NAME.pth.zst instead (the
same bytes through zstd; its sidecar also holds the decompressed payload's size and SHA-256), read back here
transparently; a name has one checkpoint, in one of the two forms. Its contents are "full" (resumes exactly) or
weights only ("weights", "weights-bf16": no optimizer or RNG state; fine-tunable, not resumable). Where checkpoints live (runs, ids, listing, recovery) is
catalogue.py's business; when to save and what to keep is checkpoint_manager.py's.

Everything read from disk may lie: files are opened without following symlinks, JSON is read with a size and a
nesting limit, and sidecar fields of the wrong type are dropped and reported, never trusted.
"""
import concurrent.futures
import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import math
import mmap
import os
import pickle
import re
import shutil
import stat
import tempfile
import threading
import time
import uuid
import warnings

import torch
import zstandard
from torch.utils.serialization import config as torch_serialization

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# 0.2.0 rebuilt the reconstruction decoder: reconstruction weights written by 0.1.0 no longer fit the model.
# 0.3.0 added the sender's logit normalisation and cosine scoring (config message_norm, scoring); records
# without those settings rebuild as they were (train.SETTINGS_BEFORE).
# 0.4.0 added the reconstruction cell code (config cell_channels); records without it rebuild with none.
# 0.5.0 added the encoder's pattern bag (config pattern_buckets); records without it rebuild with none.
# 0.6.0 added the bag's kinds (config pattern_kinds, "shapes" for new runs); records without it read "exact" windows.
# 0.7.0 put every run in its own folder (catalogue.py) and gave records run_id and checkpoint_manager.
# 0.8.0 added config precision and compile; records without them trained in float32, eager.
PROJECT_VERSION = "0.8.0"
KINDS = ("manual", "best", "top_k", "periodic", "autosave", "pretrained", "interrupted", "error")
NAME_RULE = "1 to 100 characters: letters, digits, spaces, hyphens and underscores"
_NAME_PATTERN = re.compile(r"[A-Za-z0-9 _-]{1,100}")
_RESERVED_PATTERN = re.compile(
    r"best_model|best_k_step_\d+|checkpoint_epoch_\d+|autosave_step_\d+|pretrained_encoder_(binary|selection)"
    r"|interrupted_step_\d+|error_step_\d+")
TEMP_MARK = ".tmp-"  # temporaries: ".NAME.pth.tmp-<random>", never listed, cleaned by catalogue.recover()
PENDING_SIDECAR = ".pending"  # ".NAME.json.pending": version 0.6.0's sidecar of a .pth being renamed into place
LOCK_SUFFIX = ".lock"  # ".NAME.lock": the file each checkpoint is locked through; empty, kept
LOCK_TIMEOUT = 30.0
SPACE_MARGIN = 1.2
JSON_LIMIT = 1 << 20  # bytes: sidecars are a few KB (notes at most 10,000 characters)
JSON_DEPTH = 64  # nesting: a sidecar needs 4
# Config fields copied flat to the top level, so `ckpt["vocab_size"]` works as the guide shows.
FLAT_CONFIG_KEYS = (
    "task_type", "bottleneck_type", "num_distractors", "use_input_output_pairs", "num_colors", "embedding_dim",
    "hidden_dim", "latent_dim", "num_conv_layers", "vocab_size", "max_message_length", "batch_size",
    "learning_rate", "temperature",
)
TENSOR_KEYS = ("model_state_dict", "encoder_state_dict", "optimizer_state_dict", "rng_state")
RANK_RNG_KEY = "rng_states"  # a multi-process record's: every rank's rng_state, in rank order (tensors too)
# The last validation's language analysis (language.analyse: symbol usage, top messages with their grids): plain
# lists and numbers, tens of KB, so it stays in the record and out of the sidecar, which every listing reads.
LANGUAGE_KEY = "language"
RECORD_ONLY_KEYS = (RANK_RNG_KEY, LANGUAGE_KEY)  # beside the tensors, what a sidecar never holds
USER_FIELDS = ("notes", "tags")  # edited after the save; an overwrite carries them to the new sidecar
CONTENTS = ("full", "weights", "weights-bf16")  # a record without "contents" is full
COMPRESSIONS = ("none", "zstd")
ZSTD_SUFFIX = ".pth.zst"
FILE_SUFFIXES = (".pth", ZSTD_SUFFIX)  # the two forms of a single-file checkpoint, in the order ties are read
ZSTD_LEVEL = 3  # zstd's default: about 8% off float32 weights at hundreds of MB/s; higher levels gain little
TRAINING_STATE = ("optimizer_state_dict", "rng_state", RANK_RNG_KEY)  # what only resuming needs
WEIGHT_KEYS = ("model_state_dict", "encoder_state_dict")
FLOAT_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16}
# A checkpoint's tensors shrink by a few % under zstd, never 100 times: a file that decompresses to more than this
# many times its size (and no sidecar says how much to expect) is refused as a zstd bomb.
BOMB_RATIO = 100


class CheckpointError(Exception):
    """A checkpoint could not be written, read or verified; the message says why and what to do."""


class CheckpointBusy(CheckpointError):
    """Another thread or process held the checkpoint's lock for longer than the timeout."""


class CheckpointExists(CheckpointError):
    """A save without overwrite found a checkpoint of that name already there."""


class UnreadableFile(Exception):
    """A file on disk is not what it should be (a symlink, too large, too deep, not JSON); the message says why."""


# ---------------------------------------------------------------------------------------------- names

def check_name(name, automatic=False):
    """Return name if a user may save under it; ValueError saying the rule otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"checkpoint name must be a string, got {type(name).__name__}")
    if not _NAME_PATTERN.fullmatch(name) or name.strip() != name:
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise ValueError(f"invalid checkpoint name {shown!r}: use {NAME_RULE}, with no leading or trailing space")
    if not automatic and _RESERVED_PATTERN.fullmatch(name):
        raise ValueError(f"checkpoint name {name!r} is reserved for the trainer's automatic saves; choose another")
    return name


def checkpoint_path(folder, name, suffix=".pth"):
    """The path of checkpoint `name` inside folder; refuses a name that would leave it, or a symlink there."""
    check_name(name, automatic=True)
    folder = os.path.realpath(folder)
    path = os.path.join(folder, name + suffix)
    if os.path.dirname(os.path.normpath(path)) != folder:
        raise ValueError(f"checkpoint name {name!r} does not stay inside the checkpoint folder")
    if os.path.islink(path):
        raise ValueError(f"{path} is a symbolic link; links inside the checkpoint folder are never followed")
    return path


def is_folder(path):
    """Whether path names a DCP folder checkpoint (NAME.dcp) rather than a .pth."""
    return str(path).endswith(".dcp")


def _folders():
    """dcp_checkpoint, the folder format: it builds on this module, so it is imported when first needed."""
    import dcp_checkpoint
    return dcp_checkpoint


def check_contents(value):
    """Return value if it is one of CONTENTS; ValueError naming it otherwise."""
    if not isinstance(value, str) or value not in CONTENTS:
        raise ValueError(f"contents must be one of {', '.join(CONTENTS)}, got {value!r}")
    return value


def check_compression(value):
    """Return value if it is one of COMPRESSIONS; ValueError naming it otherwise."""
    if not isinstance(value, str) or value not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {value!r}")
    return value


def is_compressed(path):
    return str(path).endswith(ZSTD_SUFFIX)


def suffix_for(compression):
    return ZSTD_SUFFIX if check_compression(compression) == "zstd" else ".pth"


def stem_of(path):
    """path less its checkpoint suffix (.pth.zst, .pth, .dcp): its sidecar and lock are named from it."""
    return str(path)[:-len(ZSTD_SUFFIX)] if is_compressed(path) else os.path.splitext(path)[0]


def name_of(path):
    """The checkpoint name a file or folder on disk stands for."""
    return os.path.basename(stem_of(os.path.normpath(path)))


def sidecar_path(pth_path):
    return stem_of(pth_path) + ".json"


def lock_path(pth_path):
    folder, file = os.path.split(pth_path)
    return os.path.join(folder, "." + name_of(file) + LOCK_SUFFIX)


def form_paths(folder, name):
    """The paths checkpoint `name` may have as a single file in folder: NAME.pth, NAME.pth.zst."""
    stem = os.path.join(os.path.realpath(folder), check_name(name, automatic=True))
    return [stem + suffix for suffix in FILE_SUFFIXES]


def existing_file(folder, name):
    """The file checkpoint `name` is read from, or None: of NAME.pth and NAME.pth.zst, the one on disk; where both
    are (an overwrite into the other form cut short before it removed the old file), the one its sidecar names,
    else NAME.pth."""
    present = [p for p in form_paths(folder, name) if os.path.lexists(p)]
    if len(present) > 1:
        named = (read_sidecar(present[0]) or {}).get("file")
        present.sort(key=lambda p: os.path.basename(p) != named)  # stable: NAME.pth first when it names neither
    return present[0] if present else None


def other_form(path):
    """The path of the same checkpoint in the other single-file form."""
    return stem_of(path) + (".pth" if is_compressed(path) else ZSTD_SUFFIX)


def temp_path(path, tag=""):
    folder, file = os.path.split(path)
    return os.path.join(folder, f".{file}{TEMP_MARK}{tag}{uuid.uuid4().hex[:8]}")


# ---------------------------------------------------------------------------------------------- files that may lie

def open_regular(path, flags=os.O_RDONLY):
    """A file descriptor of the regular file at path; UnreadableFile for a symlink, a folder, a fifo or a device."""
    try:  # O_NONBLOCK: opening a fifo must not hang; it is refused below
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnreadableFile(f"{os.path.basename(path)} is a symbolic link; never followed") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnreadableFile(f"{os.path.basename(path)} is not a regular file")
    os.set_blocking(fd, True)
    return fd


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text):
    """How deeply text's arrays and objects nest; strings are skipped, so brackets inside them do not count."""
    depth = deepest = 0
    for c in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        depth += 1 if c in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def loads_bounded(text, what="JSON", strict=False):
    """json.loads that never recurses past JSON_DEPTH; NaN and Infinity read as None, or are refused when strict.
    UnreadableFile otherwise."""
    depth = json_depth(text)
    if depth > JSON_DEPTH:
        raise UnreadableFile(f"{what} nests {depth} levels deep (at most {JSON_DEPTH} are read)")
    try:
        return json.loads(text, parse_constant=_refuse_constant if strict else lambda constant: None)
    except ValueError as e:
        raise UnreadableFile(f"{what} is not valid JSON ({str(e)[:80]})") from None


def _refuse_constant(constant):
    raise ValueError(f"{constant} is not a number JSON allows")


def read_bytes(path, limit):
    """A regular file's bytes, at most limit; UnreadableFile for a larger file or one that is not regular."""
    with os.fdopen(open_regular(path), "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnreadableFile(f"{os.path.basename(path)} is larger than {limit:,} bytes")
    return data


def read_json(path, limit=JSON_LIMIT):
    """The JSON value in a file, read with the size and depth limits; UnreadableFile or OSError otherwise."""
    data = read_bytes(path, limit)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UnreadableFile(f"{os.path.basename(path)} is not UTF-8 text") from None
    return loads_bounded(text, os.path.basename(path))


def json_safe(value):
    """A copy that strict JSON parsers accept: non-finite floats become None, keys become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps_strict(value, **options):
    """json.dumps of json_safe(value), refusing NaN outright: what every file and response of this project holds."""
    return json.dumps(json_safe(value), allow_nan=False, default=str, **options)


# ---------------------------------------------------------------------------------------------- locks

@contextlib.contextmanager
def checkpoint_lock(pth_path, timeout=LOCK_TIMEOUT, required=True, cancel=None):
    """Hold the checkpoint's lock: saves, edits, verification and deletion of one checkpoint never overlap.

    flock on ".NAME.lock" through an open file description of its own, so it excludes other threads of this
    process as well as other processes (the app, train.py, load_checkpoint.py). With required=False, a folder we
    cannot create the lock file in (read-only) is read unlocked: nobody with our rights can write there either.
    cancel (a threading.Event): a save abandoned while it waits stops waiting (OSError ECANCELED).
    """
    try:
        fd = _open_lock_file(pth_path)
    except OSError as e:
        if required or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
            raise
        yield
        return
    try:
        _flock(fd, pth_path, timeout, cancel)
        yield
    finally:
        os.close(fd)  # closing the description releases the lock


def _open_lock_file(pth_path):
    return os.open(lock_path(pth_path), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def try_lock(pth_path):
    """A locked file descriptor for the checkpoint, or None when someone holds it (close the fd to release)."""
    try:
        fd = _open_lock_file(pth_path)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _flock(fd, pth_path, timeout, cancel=None):
    deadline, pause = time.monotonic() + timeout, 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            check_cancel(cancel)
            if time.monotonic() > deadline:
                raise CheckpointBusy(f"checkpoint {os.path.basename(pth_path)} is busy (another save, edit or "
                                     f"verification held it for {timeout:.0f} s); try again") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


# ---------------------------------------------------------------------------------------------- record

def version_note(record):
    """For errors about weights that do not fit: which project version wrote the record, when not this one."""
    versions = record.get("versions")
    written_by = versions.get("project") if isinstance(versions, dict) else None
    if written_by and written_by != PROJECT_VERSION:
        return (f" (written by version {written_by} of this project, this is {PROJECT_VERSION}: models may have"
                " changed since; its metadata still reads with load_checkpoint.py --info-only)")
    return ""


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def save_full_checkpoint(folder, name, *, kind, config, model_state_dict, encoder_state_dict,
                         optimizer_state_dict, progress, rng_state, dataset, metrics, extra=None,
                         overwrite=False, verify_after_save=False, cancel=None, contents="full", compression="none"):
    """Build the one checkpoint record and write it atomically with its sidecar; return the sidecar dict.

    progress: epoch, batch, global_step, val_loss, val_acc. extra: further plain fields (run_id, num_classes,
    trainer, checkpoint_manager). cancel: see write_checkpoint. contents: one of CONTENTS (see with_contents);
    compression: one of COMPRESSIONS.
    """
    record = build_record(name, kind=kind, config=config, model_state_dict=model_state_dict,
                          encoder_state_dict=encoder_state_dict, optimizer_state_dict=optimizer_state_dict,
                          progress=progress, rng_state=rng_state, dataset=dataset, metrics=metrics, extra=extra,
                          contents=contents)
    return write_checkpoint(folder, record, overwrite=overwrite, verify_after_save=verify_after_save, cancel=cancel,
                            compression=compression)


def build_record(name, *, kind, config, model_state_dict, encoder_state_dict, optimizer_state_dict, progress,
                 rng_state, dataset, metrics, extra=None, contents="full"):
    """The one checkpoint record, every store's: what torch.load gives back for a .pth."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    check_name(name, automatic=kind != "manual")
    return with_contents({
        "format_version": FORMAT_VERSION, "name": name, "kind": kind, "created_at": utc_now(),
        "epoch": progress["epoch"], "batch": progress["batch"], "global_step": progress["global_step"],
        "val_loss": progress.get("val_loss"), "val_acc": progress.get("val_acc"),
        "model_state_dict": model_state_dict, "encoder_state_dict": encoder_state_dict,
        "optimizer_state_dict": optimizer_state_dict,
        **{key: config[key] for key in FLAT_CONFIG_KEYS},
        "config": dict(config), "rng_state": rng_state, "dataset": dataset, "metrics": metrics,
        "versions": {"torch": str(torch.__version__), "project": PROJECT_VERSION},
        **(extra or {}),
    }, contents)


# ---------------------------------------------------------------------------------------------- contents

def contents_of(record):
    """A record's or sidecar's contents: "full" where it does not say."""
    return record.get("contents") or "full"


def without_training_state(fields):
    """A copy of a record (or a snapshot's fields) without what only resuming needs: the optimizer and RNG states.
    The manager drops them before the copy thread clones a weights-only snapshot, build_record again after."""
    return {**{k: v for k, v in fields.items() if k != RANK_RNG_KEY}, "optimizer_state_dict": None,
            "rng_state": None}


def with_contents(record, contents):
    """The record as `contents` holds it: full as it is; weights without the optimizer and RNG states, marked not
    resumable; weights-bf16 the same with its floating weights cast to bfloat16 (see cast_weights)."""
    have = contents_of(record)
    if check_contents(contents) == "full":
        if have != "full":
            raise ValueError(f"the record holds weights only (contents {have}): it cannot be saved as full")
        return record
    if have == "weights-bf16" and contents == "weights":
        raise ValueError("the weights were cast to bfloat16: they cannot be saved as float32 weights again")
    shaped = {**without_training_state(record), "contents": contents, "resumable": False}
    return cast_weights(shaped) if contents == "weights-bf16" else shaped


def check_resumable(record, path):
    """ValueError, in one line, for a record (or sidecar) of weights only: nothing to resume from."""
    contents = contents_of(record)
    if contents != "full" or record.get("resumable") is False:
        raise ValueError(f"{path} holds weights only (contents {contents}: no optimizer or RNG state), so it cannot be "
                         "resumed; fine-tune from it instead (fine_tune_from), or resume from a full checkpoint")


def _recast(state, dtype_of, memo):
    """state with each tensor named by dtype_of cast to its dtype; tensors that shared storage still share it."""
    out = {}
    for key, tensor in state.items():
        dtype = dtype_of(key, tensor)
        if dtype is None or tensor.dtype == dtype:
            out[key] = tensor
            continue
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tuple(tensor.stride()), dtype)
        if identity not in memo:
            memo[identity] = tensor.to(dtype)
        out[key] = memo[identity]
    return out


def cast_weights(record):
    """The record with the floating tensors of its weights cast to bfloat16, and "cast" recording each one's dtype
    before, so that load_checkpoint casts them back."""
    memo, cast, out = {}, {}, dict(record)
    for key in WEIGHT_KEYS:
        state = record.get(key)
        if not isinstance(state, dict):
            continue
        cast[key] = {k: str(t.dtype).replace("torch.", "") for k, t in state.items()
                     if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.bfloat16}
        out[key] = _recast(state, lambda k, t: torch.bfloat16 if k in cast[key] else None, memo)
    out["cast"] = {"dtype": "bfloat16", "from": cast}
    return out


def restore_dtypes(record, path):
    """A weights-bf16 record's weights cast back to the dtypes its "cast" recorded (float32 as trained);
    CheckpointError for a cast record that does not fit the tensors."""
    cast = record.get("cast")
    if cast is None:
        return record
    restored = {k: v for k, v in record.items() if k != "cast"}
    origins = cast.get("from") if isinstance(cast, dict) else None
    if not isinstance(origins, dict):
        raise CheckpointError(f"{path}: its cast record is not an object of dtypes per tensor")
    memo = {}
    for key, dtypes in origins.items():
        state = record.get(key)
        if key not in WEIGHT_KEYS or not isinstance(state, dict) or not isinstance(dtypes, dict):
            raise CheckpointError(f"{path}: its cast record names {str(key)[:60]!r}, not a state dict it holds")
        for name, dtype in dtypes.items():
            if dtype not in FLOAT_DTYPES or not isinstance(state.get(name), torch.Tensor):
                raise CheckpointError(f"{path}: its cast record says {str(name)[:60]!r} was {str(dtype)[:20]!r}: "
                                      "no such floating dtype or tensor")
        restored[key] = _recast(state, lambda k, t: FLOAT_DTYPES[dtypes[k]] if k in dtypes else None, memo)
    return restored


def estimate_size(record):
    """Bytes the record will take on disk: tensor bytes (shared storage counted once) plus a margin."""
    seen, total = set(), 64 * 1024

    def walk(value):
        nonlocal total
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes() + 128
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(record)
    return total


def metadata_of(record):
    """Every field of a record but the tensors and the other large ones: what the sidecar and the listing show."""
    return {k: v for k, v in record.items() if k not in TENSOR_KEYS and k not in RECORD_ONLY_KEYS}


# ---------------------------------------------------------------------------------------------- writing

def check_cancel(cancel):
    """OSError ECANCELED once a save's cancel event is set: the write stops, and its cleanup removes what it wrote."""
    if cancel is not None and cancel.is_set():
        raise OSError(errno.ECANCELED, "the save was abandoned")


class _HashingFile:
    """File wrapper that hashes and counts what torch.save writes, so the file is never read back to hash it.

    Large chunks (the tensors) are hashed in a helper thread while this thread writes them: hashlib and file
    writes both release the GIL, so the hash costs no extra wall time. Each hash finishes before write() returns,
    so the chunks are hashed in order. A tensor is written in pieces of at most PIECE bytes, and a set cancel event
    stops the write before the next piece.
    """

    PARALLEL_FROM = 1 << 20
    PIECE = 8 << 20

    def __init__(self, f, hasher, cancel=None):
        self.f, self.hasher, self.sha256, self.size = f, hasher, hashlib.sha256(), 0
        self.cancel = cancel
        self.error = None  # torch's zip writer hides the OSError behind a vague RuntimeError; keep it

    def write(self, data):
        if len(data) <= self.PIECE:
            return self._write_piece(data)
        view = memoryview(data).cast("B")
        for start in range(0, len(view), self.PIECE):
            self._write_piece(view[start:start + self.PIECE])
        return len(view)

    def _write_piece(self, data):
        try:
            check_cancel(self.cancel)
        except OSError as e:
            self.error = e
            raise
        self.size += len(data)
        hashed = None
        if len(data) >= self.PARALLEL_FROM:
            hashed = self.hasher.submit(self.sha256.update, data)
        else:
            self.sha256.update(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        finally:
            if hashed is not None:
                hashed.result()

    def flush(self):
        self.f.flush()


class _DirectFile:
    """Write-only file that bypasses the page cache (O_DIRECT), fed through two page-aligned staging buffers.

    Why: training on the CPU keeps every core busy, and the kernel's writeback of a checkpoint's dirty pages costs
    it more than copying the bytes into an aligned buffer ourselves. While one buffer is being written (a direct
    write blocks until the device has the data, with the GIL released) the caller fills the other. The length
    O_DIRECT needs is kept by padding the last block with zeros and truncating the file back to its real size.
    open_for_checkpoint() falls back to a buffered file where O_DIRECT is missing or the file system refuses it.
    """

    BLOCK = 4096  # covers the logical block size O_DIRECT requires on Linux file systems
    STAGING = 8 << 20

    def __init__(self, path):
        self.size, self.fill, self.in_flight = 0, 0, None
        self.buffers = [mmap.mmap(-1, self.STAGING) for _ in range(2)]  # anonymous mappings are page-aligned
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError:
            for buffer in self.buffers:
                buffer.close()
            raise
        self.device = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-direct-write")

    def write(self, data):
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            take = min(len(view) - done, self.STAGING - self.fill)
            self.buffers[0][self.fill:self.fill + take] = view[done:done + take]
            self.fill += take
            done += take
            if self.fill == self.STAGING:
                self._hand_over(self.STAGING)
        self.size += len(view)
        return len(view)

    def _hand_over(self, length):
        """Start writing the filled buffer and take the other one, once its own write is done."""
        self._wait()
        self.in_flight = self.device.submit(self._write_buffer, self.buffers[0], length)
        self.buffers.reverse()
        self.fill = 0

    def _wait(self):
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is not None:
            in_flight.result()  # a failed write raises here, in the caller's thread

    def _write_buffer(self, buffer, length):
        view = memoryview(buffer)[:length]
        try:
            written = 0
            while written < length:
                try:
                    written += os.write(self.fd, view[written:])
                except OSError as e:
                    if e.errno != errno.EINVAL or not self._leave_direct_io():
                        raise
        finally:
            view.release()

    def _leave_direct_io(self):
        """Some file systems open with O_DIRECT and refuse the writes (EINVAL): go on through the page cache."""
        import fcntl  # POSIX only, as O_DIRECT is: importing it at the top would stop the module loading on Windows
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        if not flags & os.O_DIRECT:
            return False
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        return True

    def flush(self):
        pass  # nothing is held back but the buffer being filled, written by finish()

    def finish(self):
        """Write the tail, cut the block padding off and make the file durable."""
        tail = self.fill
        if tail:
            padded = -(-tail // self.BLOCK) * self.BLOCK
            self.buffers[0][tail:padded] = bytes(padded - tail)
            self._hand_over(padded)
        self._wait()
        if tail:
            os.ftruncate(self.fd, self.size)
        os.fsync(self.fd)

    def close(self):
        self.device.shutdown(wait=True)  # after an error, a write may still be running on the buffers
        for buffer in self.buffers:
            buffer.close()
        os.close(self.fd)


class _BufferedFile:
    """The same interface over an ordinary buffered file, for where O_DIRECT is not available."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        return self.f.write(data)

    def flush(self):
        self.f.flush()

    def finish(self):
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        self.f.close()


def open_for_checkpoint(path):
    """A new file at path with write(), flush(), finish() (durable on return) and close(): direct where it can be."""
    if hasattr(os, "O_DIRECT"):
        try:
            return _DirectFile(path)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this file system refuses O_DIRECT
                raise
    return _BufferedFile(open(path, "wb"))


class _Crc32Off:
    """torch.save without its per-record CRC32 (the SHA-256 covers the whole file; torch.load never checks the CRC).

    torch keeps the switch in one process-wide setting, so concurrent writers count themselves in and the last
    one out restores what the user had.
    """

    _lock = threading.Lock()
    _depth = 0
    _saved = True

    def __enter__(self):
        with _Crc32Off._lock:
            if _Crc32Off._depth == 0:
                _Crc32Off._saved = torch_serialization.save.compute_crc32
                torch_serialization.save.compute_crc32 = False
            _Crc32Off._depth += 1

    def __exit__(self, *exc):
        with _Crc32Off._lock:
            _Crc32Off._depth -= 1
            if _Crc32Off._depth == 0:
                torch_serialization.save.compute_crc32 = _Crc32Off._saved


def fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path, data):
    """A new file at path holding data (bytes), fsynced; never follows a link or replaces a file."""
    write_durable_with(path, lambda f: f.write(data))


def write_durable_with(path, write):
    """A new file at path that write(file) fills, fsynced; never follows a link or replaces a file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def replace_bytes(path, data):
    """Replace the file at path with data (bytes), atomically (temporary, fsync, rename)."""
    temp = temp_path(path)
    try:
        write_durable(temp, data)
        os.replace(temp, path)
    finally:
        remove_quietly(temp)


def write_json_durable(path, value):
    write_durable(path, dumps_strict(value, indent=1).encode("utf-8"))


def replace_json(path, value):
    replace_bytes(path, dumps_strict(value, indent=1).encode("utf-8"))


def remove_quietly(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def write_checkpoint(folder, record, overwrite=False, verify_after_save=False, cancel=None, compression="none"):
    """Write record as NAME.pth (or, compressed, NAME.pth.zst) + NAME.json, atomically, holding the checkpoint's lock
    throughout.

    CheckpointError on any failure, with the previous pair (if any) intact and nothing left behind. cancel (a
    threading.Event) abandons the save when set while the lock is awaited or the .pth is written (a failure like
    any other); once the file is whole, the save is finished. A checkpoint of the name in the other form is the one
    an overwrite replaces: it is removed once the new pair is in place."""
    name = record["name"]
    try:
        os.makedirs(folder, exist_ok=True)
        path = checkpoint_path(folder, name, suffix_for(compression))
        with checkpoint_lock(path, cancel=cancel):
            return _write_locked(path, record, overwrite, verify_after_save, cancel)
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {name!r}: {e.strerror or e} ({folder})") from e


def _write_locked(path, record, overwrite, verify_after_save, cancel=None):
    name, folder = record["name"], os.path.dirname(path)
    had_old, other = os.path.lexists(path), other_form(path)
    if ((had_old or os.path.lexists(other)) and not overwrite) or os.path.lexists(stem_of(path) + ".dcp"):
        raise CheckpointExists(f"a checkpoint named {name!r} already exists; choose another name")
    needed, free = estimate_size(record) * SPACE_MARGIN, shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"not enough disk space: needs about {needed / 1e6:.1f} MB, "
                                    f"{free / 1e6:.1f} MB free")
    temp = temp_path(path)
    try:
        size, sha256, payload = _write_record(temp, record, cancel, compressed=is_compressed(path))
        old_raw, old_fields = old_sidecar(path)
        carried = {k: old_fields[k] for k in USER_FIELDS if k in old_fields}
        sidecar = {**metadata_of(record), **carried, "file": os.path.basename(path), "size": size,
                   "sha256": sha256, **payload, "verified_at": None}
        _commit(path, temp, sidecar, had_old, old_raw)
    finally:
        remove_quietly(temp)
    _remove_replaced_form(other)
    if verify_after_save:
        ok, reason = _verify_unlocked(path)
        if not ok:
            raise CheckpointError(f"checkpoint {name!r} failed verification right after writing: {reason}")
        sidecar["verified_at"] = utc_now()
        replace_json(sidecar_path(path), sidecar)
    return sidecar


def _remove_replaced_form(other):
    """After an overwrite into the other form: remove the old file. Until then its sidecar names the new file, which
    listing and reading take (existing_file); a link there is left alone, never deleted through."""
    try:
        if stat.S_ISREG(os.lstat(other).st_mode):
            os.remove(other)
            fsync_folder(os.path.dirname(other))
    except FileNotFoundError:
        pass
    except OSError as e:  # the new pair is in place and complete; the old file is only shadowed
        logger.warning("%s: saved in the other form, but the old file could not be removed: %s", other, e.strerror)


def _write_record(temp, record, cancel=None, compressed=False):
    """torch.save the record into temp (through zstd when compressed), durable on return; (size, SHA-256 of what was
    written, and for a compressed file the payload's fields: compression, payload_size, payload_sha256)."""
    files = []
    try:
        with contextlib.closing(open_for_checkpoint(temp)) as raw, _Crc32Off(), \
                concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="checkpoint-hash") as hasher:
            files.append(_HashingFile(raw, hasher, cancel))
            if compressed:
                _save_compressed(record, files, hasher, cancel)
            else:
                torch.save(record, files[0])
            raw.finish()
    except (RuntimeError, zstandard.ZstdError) as e:  # torch's zip writer reports a failed write as RuntimeError
        cause = next((f.error for f in files if f.error is not None), None)
        if cause is not None:
            raise cause from e
        raise OSError(errno.EIO, str(e).strip().splitlines()[0]) from e
    written = files[0]
    if not compressed:
        return written.size, written.sha256.hexdigest(), {}
    payload = files[1]
    return written.size, written.sha256.hexdigest(), {
        "compression": "zstd", "payload_size": payload.size, "payload_sha256": payload.sha256.hexdigest()}


def _save_compressed(record, files, hasher, cancel):
    """torch.save through a zstd stream into files[0], hashing the payload on its way in (appended to files)."""
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(
        files[0], write_size=_HashingFile.PARALLEL_FROM, closefd=False)
    files.append(_HashingFile(compressor, hasher, cancel))
    torch.save(record, files[1])
    compressor.flush(zstandard.FLUSH_FRAME)


def old_sidecar(path):
    """(raw bytes, checked fields) of the sidecar an overwrite replaces: bytes to roll back to, notes to carry."""
    try:
        raw = read_bytes(sidecar_path(path), JSON_LIMIT)
        value = loads_bounded(raw.decode("utf-8"))
    except (OSError, UnreadableFile, UnicodeDecodeError):
        return None, {}
    return raw, (check_sidecar(value)[0] if isinstance(value, dict) else {})


def _commit(path, temp, sidecar, had_old, old_raw):
    """Put the new pair in place, sidecar first, then the .pth; a failure on the way puts the old pair back.

    Between the two renames the sidecar describes the temporary .pth, which is whole and durable: a crash there
    is finished by recover_folder(), which renames that temporary into place."""
    folder, side = os.path.dirname(path), sidecar_path(path)
    side_temp = temp_path(side)
    backup = _backup_link(path) if had_old else None
    renamed = []
    try:
        write_json_durable(side_temp, sidecar)
        fsync_folder(folder)  # both temporaries are durable under their names before anything is replaced
        os.replace(side_temp, side)
        renamed.append(side)
        os.replace(temp, path)
        renamed.append(path)
        fsync_folder(folder)
    except OSError:
        _roll_back(path, renamed, had_old, backup, old_raw)
        raise
    finally:
        remove_quietly(side_temp)
        if backup is not None:
            remove_quietly(backup)


def place_file(path, temp, sidecar):
    """Put a whole, checked temporary file and its sidecar in place as a new checkpoint (a restore), under its lock;
    CheckpointExists if the name is taken."""
    with checkpoint_lock(path):
        if any(os.path.lexists(stem_of(path) + suffix) for suffix in (".pth", ".pth.zst", ".dcp")):
            raise CheckpointExists(f"a checkpoint named {os.path.basename(path)!r} already exists; not replaced")
        fsync_folder(os.path.dirname(path))
        _commit(path, temp, sidecar, False, None)


def _backup_link(path):
    """A hard link to the .pth an overwrite replaces, so a failure after the rename can restore it; None where
    the file system has no hard links (then a failure after the rename keeps the new, complete pair)."""
    backup = temp_path(path, "old-")
    try:
        os.link(path, backup, follow_symlinks=False)
    except OSError:
        return None
    return backup


def _roll_back(path, renamed, had_old, backup, old_raw):
    side = sidecar_path(path)
    try:
        if path in renamed:
            if had_old and backup is None:
                logger.warning("%s: the new pair is in place and complete, but the folder could not be made "
                               "durable; the old file could not be kept", path)
                return
            if backup is not None:
                os.replace(backup, path)
            else:
                os.remove(path)
        if side in renamed:
            if old_raw is not None:
                replace_bytes(side, old_raw)
            else:
                os.remove(side)
        fsync_folder(os.path.dirname(path))
    except OSError as e:  # what is left is repaired by recover_folder() or listed as damaged
        logger.error("could not roll back the failed save of %s: %s", path, e)


# ---------------------------------------------------------------------------------------------- reading

_NUMBER = "number"
SIDECAR_TYPES = {  # what each field a sidecar may hold must be; None is always allowed (not known yet)
    "format_version": int, "name": str, "kind": str, "created_at": str, "epoch": int, "batch": int,
    "global_step": int, "val_loss": _NUMBER, "val_acc": _NUMBER, "config": dict, "dataset": dict, "metrics": dict,
    "versions": dict, "num_classes": int, "trainer": dict, "pretrain_mode": str, "file": str, "size": int,
    "sha256": str, "verified_at": str, "notes": str, "tags": list, "run_id": str, "checkpoint_manager": dict,
    "task_type": str, "bottleneck_type": str, "num_distractors": int, "use_input_output_pairs": bool,
    "num_colors": int, "embedding_dim": int, "hidden_dim": int, "latent_dim": int, "num_conv_layers": int,
    "vocab_size": int, "max_message_length": int, "batch_size": int, "learning_rate": _NUMBER,
    "temperature": _NUMBER, "format": str, "files": list, "dcp": dict, "contents": str, "resumable": bool,
    "cast": dict, "compression": str, "payload_size": int, "payload_sha256": str, "mirror": dict, "object": str,
}
_TYPE_WORDS = {int: "an integer", _NUMBER: "a number", str: "text", bool: "true or false", dict: "an object",
               list: "a list"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def json_kind(value):
    """How JSON would call a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    return {int: "an integer", float: "a number", str: "text", dict: "an object", list: "a list"}.get(
        type(value), type(value).__name__)


def _has_type(value, expected):
    if expected is _NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def check_types(value, types):
    """(the fields of value of the right type, problems): a field whose type differs from types[key] is dropped
    and named in problems; None and fields types does not name are kept."""
    clean, problems = {}, []
    for key, field_value in value.items():
        expected = types.get(key)
        if field_value is None or expected is None or _has_type(field_value, expected):
            clean[key] = field_value
        else:
            problems.append(f"{key}: expected {_TYPE_WORDS[expected]}, found {json_kind(field_value)}; ignored")
    return clean, problems


def check_sidecar(value):
    """(the fields of the right type, problems): a field of the wrong type is dropped and named in problems."""
    clean, problems = check_types(value, SIDECAR_TYPES)
    checks = (("kind", lambda k: k in KINDS, f"one of {', '.join(KINDS)}"),
              ("sha256", lambda s: _SHA256.fullmatch(s), "64 hexadecimal digits"),
              ("payload_sha256", lambda s: _SHA256.fullmatch(s), "64 hexadecimal digits"),
              ("contents", lambda c: c in CONTENTS, f"one of {', '.join(CONTENTS)}"),
              ("compression", lambda c: c in COMPRESSIONS, f"one of {', '.join(COMPRESSIONS)}"),
              ("tags", lambda tags: all(isinstance(t, str) for t in tags), "a list of text"))
    for key, ok, wanted in checks:
        if clean.get(key) is not None and not ok(clean[key]):
            problems.append(f"{key}: expected {wanted}; ignored")
            del clean[key]
    return clean, problems


def inspect_sidecar(path):
    """(the sidecar's checked fields, or None, problems) of the .pth at path; never raises for what is on disk."""
    try:
        value = read_json(sidecar_path(path))
    except FileNotFoundError:
        return None, []
    except (OSError, UnreadableFile) as e:
        return None, [f"sidecar unreadable: {e.strerror if isinstance(e, OSError) else e}"]
    if not isinstance(value, dict):
        return None, [f"sidecar unreadable: it holds {json_kind(value)}, not an object"]
    return check_sidecar(value)


def read_sidecar(path):
    """The sidecar dict of a .pth (its fields of the right type), or None if it has none or it is unreadable."""
    return inspect_sidecar(path)[0]


def file_sha256(path):
    digest = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_lock(path, timeout=LOCK_TIMEOUT):
    """The checkpoint's lock for reading it: only for our checkpoints (those with a sidecar), so that inspecting
    a stray file elsewhere leaves no lock file beside it."""
    if os.path.lexists(sidecar_path(path)):
        return checkpoint_lock(path, timeout=timeout, required=False)
    return contextlib.nullcontext()


def verify(path, mark=False):
    """(ok, reason): does the file match the size and SHA-256 its sidecar recorded? With mark, a match is stamped
    as verified_at in the sidecar, under the same lock, so no save can slip in between."""
    if is_folder(path):
        return _folders().verify(path, mark)
    lock = checkpoint_lock(path) if mark else read_lock(path)
    with lock:
        ok, reason = _verify_unlocked(path)
        if ok and mark:
            update_unlocked(path, {"verified_at": utc_now()})
    return ok, reason


def _verify_unlocked(path, payload=True):
    """verify() under the lock; payload=False skips decompressing a .pth.zst (loading checks its payload anyway)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False, f"{path}: no such file"
    if stat.S_ISLNK(mode):
        return False, f"{path}: a symbolic link; never followed"
    if not stat.S_ISREG(mode):
        return False, f"{path}: not a regular file"
    sidecar, problems = inspect_sidecar(path)
    name = os.path.basename(sidecar_path(path))
    if sidecar is None:
        why = f" ({problems[0]})" if problems else ""
        return False, f"{path}: no sidecar {name} to verify against{why}"
    size, sha256 = sidecar.get("size"), sidecar.get("sha256")
    if size is None or sha256 is None:
        return False, f"{path}: its sidecar {name} records no size and SHA-256 to verify against"
    mismatch = _form_mismatch(path, sidecar)
    if mismatch:
        return False, f"{path}: {mismatch}"
    actual = os.path.getsize(path)
    if actual != size:
        return False, f"{path}: size {actual} bytes, the sidecar recorded {size} (truncated or replaced)"
    try:
        if file_sha256(path) != sha256:
            return False, f"{path}: SHA-256 does not match the sidecar (the file is corrupt)"
        if is_compressed(path) and payload:
            with os.fdopen(open_regular(path), "rb") as source:
                decompress(path, source, _HashOnly(), sidecar)
    except UnreadableFile as e:
        return False, f"{path}: {e}"
    except CheckpointError as e:
        return False, str(e)
    if is_compressed(path):
        return True, "size and SHA-256 match" + (", and so do the decompressed payload's" if payload else
                                                 " (the compressed file's; its payload was not decompressed)")
    return True, "size and SHA-256 match"


def _form_mismatch(path, sidecar):
    """Why a sidecar does not describe the file's form (compressed or plain), or None: it may lie."""
    says = sidecar.get("compression") or "none"
    if is_compressed(path) and says != "zstd":
        return f"a zstd-compressed file, but its sidecar records compression {says!r}"
    if not is_compressed(path) and says != "none":
        return f"a plain .pth, but its sidecar records compression {says!r} (it describes {sidecar.get('file')})"
    if is_compressed(path) and (sidecar.get("payload_size") is None or sidecar.get("payload_sha256") is None):
        return "its sidecar records no payload_size and payload_sha256 to check the decompressed bytes against"
    return None


class _HashOnly:
    """A sink for decompress() that keeps nothing: verification only hashes the payload."""

    def write(self, data):
        return len(data)


def decompress(path, source, sink, sidecar=None):
    """Stream the zstd file open as source into sink.write; (payload size, SHA-256). Never holds more than a chunk:
    at most the sidecar's payload_size bytes come out (or BOMB_RATIO times the file's size where no sidecar says),
    and a payload whose size or SHA-256 differs from the sidecar's is refused. CheckpointError for data that is not
    zstd, cut short, or too large."""
    recorded_size, recorded_sha = (sidecar or {}).get("payload_size"), (sidecar or {}).get("payload_sha256")
    limit = recorded_size if recorded_size is not None else os.fstat(source.fileno()).st_size * BOMB_RATIO + (1 << 20)
    digest, size = hashlib.sha256(), 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=1 << 20)
        for chunk in iter(lambda: reader.read(1 << 20), b""):
            size += len(chunk)
            if size > limit:
                raise CheckpointError(f"{path}: decompresses to more than {limit:,} bytes ("
                                      + ("the size its sidecar recorded" if recorded_size is not None else
                                         f"{BOMB_RATIO} times the file's size") + "); refused as a zstd bomb")
            digest.update(chunk)
            sink.write(chunk)
    except zstandard.ZstdError as e:
        raise CheckpointError(f"{path}: not zstd-compressed data ({str(e)[:100]})") from None
    if recorded_size is not None and size != recorded_size:
        raise CheckpointError(f"{path}: decompresses to {size:,} bytes, its sidecar recorded {recorded_size:,} "
                              "(cut short or replaced)")
    if recorded_sha is not None and digest.hexdigest() != recorded_sha:
        raise CheckpointError(f"{path}: the decompressed payload's SHA-256 does not match the sidecar (corrupt)")
    return size, digest.hexdigest()


@contextlib.contextmanager
def open_payload(path, sidecar=None):
    """The torch file a checkpoint holds, open for reading: the .pth itself (never through a link), or a .pth.zst's
    payload streamed to an anonymous temporary file (bounded: see decompress)."""
    with os.fdopen(open_regular(path), "rb") as f:
        if not is_compressed(path):
            yield f
            return
        with tempfile.TemporaryFile(prefix="checkpoint-payload-") as payload:
            decompress(path, f, payload, sidecar)
            payload.seek(0)
            yield payload


def load_checkpoint(path, verify_file=True, map_location="cpu"):
    """torch.load (weights_only) after verification; CheckpointError with the reason for anything unloadable. A
    DCP folder comes back consolidated: the record a .pth of the same state would hold."""
    if is_folder(path):
        return _folders().load_record(path, verify_file)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    with read_lock(path):
        if verify_file:
            ok, reason = _verify_unlocked(path, payload=False)  # the payload is checked as it is decompressed
            if not ok:
                raise CheckpointError(f"{reason}. Refusing to load; pass skip-verify to salvage it anyway")
        try:
            with open_payload(path, read_sidecar(path) if verify_file else None) as f:
                record = torch_load(path, f, map_location)
        except (OSError, UnreadableFile) as e:
            raise CheckpointError(f"{path}: cannot read it: {e.strerror if isinstance(e, OSError) else e}") from None
    if not isinstance(record, dict) or "model_state_dict" not in record:
        raise CheckpointError(f"{path}: a torch file, but not a checkpoint of this project (no model_state_dict)")
    return restore_dtypes(record, path)


def torch_load(path, source, map_location, mmap=False):
    try:
        with warnings.catch_warnings():  # torch warns before raising; the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "Unsupported" in str(e):  # weights_only met a class or function to call
            raise CheckpointError(f"{path}: not a loadable checkpoint: it holds objects other than tensors and plain "
                                  "data, and loading them would run code from the file; refused") from None
        raise CheckpointError(f"{path}: not a loadable checkpoint (not a torch file: {str(e)[:100]})") from None
    except Exception as e:  # torch raises many types here (zip, runtime, EOF); all mean "not loadable"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first_line[:200]})") from None


def read_metadata(path):
    """Metadata of one .pth: its sidecar's checked fields, else the file's own (mmap, tensors untouched).

    name and file always come from the file's own name on disk. damaged and error say whether it can be trusted;
    problems lists sidecar fields that were ignored. Never raises for what is on disk, only FileNotFoundError."""
    identity = {"name": name_of(path), "file": os.path.basename(path)}
    mode = os.lstat(path).st_mode
    if is_folder(path) and stat.S_ISDIR(mode):
        return _folders().metadata(path, identity)
    if not stat.S_ISREG(mode):
        what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        return {**identity, "damaged": True, "refused": True, "size": None, "sha256": None, "problems": [],
                "error": f"{what}: never followed, read or deleted through; remove it by hand"}
    meta = _metadata_from_sidecar(path, identity)
    if meta.get("damaged") and meta.get("settling"):  # a save may be between its two renames: ask under its lock
        try:
            with checkpoint_lock(path, timeout=5.0, required=False):
                meta = _metadata_from_sidecar(path, identity)
        except CheckpointBusy:
            pass
    meta.pop("settling", None)
    return meta


def _metadata_from_sidecar(path, identity):
    sidecar, problems = inspect_sidecar(path)
    size = os.path.getsize(path)
    if sidecar is not None:
        meta = {**sidecar, **identity, "size": size, "problems": problems, "damaged": False, "error": None}
        if sidecar.get("size") != size:
            meta.update(damaged=True, settling=True, error=f"size {size} bytes, the sidecar recorded "
                                                           f"{sidecar.get('size')} (truncated or replaced)")
        return meta
    try:
        if is_compressed(path):
            with open_payload(path) as payload:
                record = torch_load(path, payload, "cpu")
        else:
            record = torch_load(path, path, "cpu", mmap=True)
        if not isinstance(record, dict) or "model_state_dict" not in record:
            raise CheckpointError("no model_state_dict")
    except Exception as e:  # any failure to read means the file is listed as damaged, never a crash
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return {**identity, "damaged": True, "size": size, "sha256": None, "problems": problems,
                "error": f"unreadable: {reason}"}
    fields, record_problems = check_sidecar(metadata_of(record))
    return {**fields, **identity, "size": size, "sha256": None, "damaged": False, "error": None,
            "problems": problems + record_problems}


# ---------------------------------------------------------------------------------------------- editing, deleting

def update_sidecar(path, changes):
    """Merge plain fields (notes, tags, verified_at) into the sidecar of the .pth at path, under its lock; the
    .pth is never rewritten. Concurrent edits of different fields all land."""
    with checkpoint_lock(path):
        return update_unlocked(path, changes)


def update_unlocked(path, changes):
    if os.path.islink(path) or not (os.path.isdir(path) if is_folder(path) else os.path.isfile(path)):
        raise FileNotFoundError(f"no checkpoint {os.path.basename(path)}")
    sidecar, problems = inspect_sidecar(path)
    if sidecar is None:
        raise FileNotFoundError(f"checkpoint {os.path.basename(path)} has no readable sidecar to edit"
                                + (f" ({problems[0]})" if problems else ""))
    sidecar.update(changes)
    replace_json(sidecar_path(path), sidecar)
    return sidecar


def delete_checkpoint(path):
    """Remove the .pth (or .pth.zst) at path and its sidecar, under its lock. The sidecar goes first: a delete that fails there
    changes nothing, and one cut after it leaves the bare .pth, listed, not lost. Refuses a symlink: nothing is
    ever deleted through one."""
    if is_folder(path):
        return _folders().delete(path)
    with checkpoint_lock(path):
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise FileNotFoundError(f"no checkpoint {os.path.basename(path)}") from None
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"{os.path.basename(path)} is a symbolic link or not a regular file; it is never "
                                  "deleted through: remove it by hand")
        side = sidecar_path(path)
        if os.path.lexists(side):
            os.remove(side)
        os.remove(path)
        _remove_replaced_form(other_form(path))  # a name has one checkpoint: a shadowed old form goes with it
        fsync_folder(os.path.dirname(path))


# ---------------------------------------------------------------------------------------------- recovery

def recover_folder(folder):
    """Finish or undo saves a crash cut short in one folder; return (removed names, problems).

    Only checkpoints whose lock is free are touched, so a save in progress in another process is left alone. Never
    raises for what is on disk: a leftover it cannot repair is named in problems and the rest carries on."""
    removed, problems = [], []
    try:
        entries = [e.name for e in os.scandir(folder) if e.name.startswith(".")]
    except OSError as e:
        return removed, [f"{folder}: cannot be read ({e.strerror})"]
    leftovers = {}
    for entry in entries:
        stem = _leftover_stem(entry)
        if stem is not None:
            leftovers.setdefault(stem, []).append(entry)
    for stem, names in leftovers.items():
        pth = os.path.join(folder, stem + ".pth")
        fd = try_lock(pth)
        if fd is None:
            continue  # in use by a save in progress, or the folder cannot hold a lock: leave it
        try:
            _recover_one(folder, pth, sorted(names), removed, problems)
        except (OSError, UnreadableFile) as e:
            problems.append(f"{stem}: could not recover ({e.strerror if isinstance(e, OSError) else e})")
        finally:
            os.close(fd)
    return removed, problems


def _leftover_stem(entry):
    """The checkpoint name a leftover ".NAME.pth.tmp-...", ".NAME.pth.zst.tmp-...", ".NAME.dcp.tmp-...",
    ".NAME.json.tmp-..." or ".NAME.json.pending" belongs to."""
    for marker in (ZSTD_SUFFIX + TEMP_MARK, ".pth" + TEMP_MARK, ".dcp" + TEMP_MARK, ".json" + TEMP_MARK):
        if marker in entry:
            return entry[1:entry.index(marker)]
    if entry.endswith(".json" + PENDING_SIDECAR):
        return entry[1:-len(".json" + PENDING_SIDECAR)]
    return None


def _recover_one(folder, pth, names, removed, problems):
    sidecar = read_sidecar(pth)
    for entry in names:
        leftover = os.path.join(folder, entry)
        if _folders().is_leftover(entry):
            dcp_path = pth[:-len(".pth")] + _folders().SUFFIX
            if _folders().recover_leftover(folder, dcp_path, entry, read_sidecar(dcp_path)):
                removed.append(entry)
            continue
        target = pth + ".zst" if ZSTD_SUFFIX + TEMP_MARK in entry else pth
        if (".pth" + TEMP_MARK in entry or ZSTD_SUFFIX + TEMP_MARK in entry) and TEMP_MARK + "old-" not in entry \
                and sidecar is not None and _matches(leftover, sidecar) and not _matches(target, sidecar):
            os.replace(leftover, target)  # cut between the sidecar's rename and the .pth's: finish it
            fsync_folder(folder)
            continue
        if entry.endswith(PENDING_SIDECAR):  # version 0.6.0 renamed the .pth first, then this
            try:
                pending = read_json(leftover)
            except (OSError, UnreadableFile) as e:
                problems.append(f"{entry}: unreadable ({e.strerror if isinstance(e, OSError) else e}); removed")
                pending = None
            if isinstance(pending, dict) and _matches(pth, check_sidecar(pending)[0]):
                os.replace(leftover, sidecar_path(pth))
                fsync_folder(folder)
                continue
        os.remove(leftover)
        removed.append(entry)


def _matches(path, sidecar):
    try:
        return os.path.getsize(path) == sidecar.get("size") and file_sha256(path) == sidecar.get("sha256")
    except (OSError, UnreadableFile):
        return False


# ---------------------------------------------------------------------------------------------- comparing

# Batch norm's running figures: state, not parameters (torch names them so in every state dict).
RUNNING_FIGURES = (".running_mean", ".running_var", ".num_batches_tracked")


def parameter_count(state_dict):
    """Floating-point parameters in a state dict: what count_parameters gives for the model it came from."""
    return sum(t.numel() for k, t in state_dict.items() if t.is_floating_point() and not k.endswith(RUNNING_FIGURES))


def compare_records(a, b, state_a=None, state_b=None):
    """Config fields that differ, metrics side by side, parameter counts, per-tensor L2 norm of the change."""
    state_a = a["model_state_dict"] if state_a is None else state_a
    state_b = b["model_state_dict"] if state_b is None else state_b
    config_a, config_b = a.get("config") or {}, b.get("config") or {}
    differ = [{"field": k, "a": config_a.get(k), "b": config_b.get(k)}
              for k in sorted(set(config_a) | set(config_b)) if config_a.get(k) != config_b.get(k)]
    changes = []
    for name, tensor in state_a.items():
        other = state_b.get(name)
        if other is not None and other.shape == tensor.shape and tensor.is_floating_point():
            changes.append({"name": name, "shape": list(tensor.shape),
                            "l2_diff": float(torch.linalg.vector_norm(other.float() - tensor.float())),
                            "l2_a": float(torch.linalg.vector_norm(tensor.float()))})
    return {"a": a.get("name"), "b": b.get("name"), "config_diff": differ,
            "metrics": {"a": a.get("metrics") or {}, "b": b.get("metrics") or {}},
            "parameters": {"a": parameter_count(state_a), "b": parameter_count(state_b)},
            "tensor_changes": changes}
