"""Checkpoint I/O: build the record, write it atomically with a verifiable sidecar, read, list, verify.

A checkpoint is NAME.pth (loads with plain torch.load, weights_only) plus NAME.json, its sidecar: every field
but the tensors, with the .pth's size and SHA-256. Writes go to a temporary file in the same folder, are fsynced
and renamed into place, so a crash leaves either the old state or the complete new one.
"""
import concurrent.futures
import contextlib
import datetime
import errno
import hashlib
import json
import logging
import mmap
import os
import pickle
import queue
import re
import shutil
import threading
import uuid
import warnings

import torch
from torch.utils.serialization import config as torch_serialization

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# 0.2.0 rebuilt the reconstruction decoder: reconstruction weights written by 0.1.0 no longer fit the model.
# 0.3.0 added the sender's logit normalisation and cosine scoring (config message_norm, scoring); records
# without those settings rebuild as they were (train.SETTINGS_BEFORE).
# 0.4.0 added the reconstruction cell code (config cell_channels); records without it rebuild with none.
# 0.5.0 added the encoder's pattern bag (config pattern_buckets); records without it rebuild with none.
# 0.6.0 added the bag's kinds (config pattern_kinds, "shapes" for new runs); records without it read "exact" windows.
PROJECT_VERSION = "0.6.0"
KINDS = ("manual", "best", "periodic", "autosave", "pretrained")
NAME_RULE = "1 to 100 characters: letters, digits, spaces, hyphens and underscores"
_NAME_PATTERN = re.compile(r"[A-Za-z0-9 _-]{1,100}")
_RESERVED_PATTERN = re.compile(
    r"best_model|best_k_step_\d+|checkpoint_epoch_\d+|autosave_step_\d+|pretrained_encoder_(binary|selection)")
TEMP_MARK = ".tmp-"  # temporary files: ".NAME.pth.tmp-<random>", never listed, removed at start-up
PENDING_SIDECAR = ".pending"  # ".NAME.json.pending": the sidecar of a .pth being renamed into place
SPACE_MARGIN = 1.2
# Config fields copied flat to the top level, so `ckpt["vocab_size"]` works as the guide shows.
FLAT_CONFIG_KEYS = (
    "task_type", "bottleneck_type", "num_distractors", "use_input_output_pairs", "num_colors", "embedding_dim",
    "hidden_dim", "latent_dim", "num_conv_layers", "vocab_size", "max_message_length", "batch_size",
    "learning_rate", "temperature",
)
TENSOR_KEYS = ("model_state_dict", "encoder_state_dict", "optimizer_state_dict", "rng_state")


class CheckpointError(Exception):
    """A checkpoint could not be written, read or verified; the message says why and what to do."""


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


def checkpoint_path(checkpoint_dir, name, suffix=".pth"):
    """The path of checkpoint `name` inside checkpoint_dir; refuses anything that would leave the folder."""
    check_name(name, automatic=True)
    folder = os.path.realpath(checkpoint_dir)
    path = os.path.realpath(os.path.join(folder, name + suffix))
    if os.path.dirname(path) != folder:
        raise ValueError(f"checkpoint name {name!r} does not stay inside the checkpoint folder")
    return path


def sidecar_path(pth_path):
    return os.path.splitext(pth_path)[0] + ".json"


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


def save_full_checkpoint(checkpoint_dir, name, *, kind, config, model_state_dict, encoder_state_dict,
                         optimizer_state_dict, progress, rng_state, dataset, metrics, extra=None,
                         overwrite=False, verify_after_save=False):
    """Build the one checkpoint record and write it atomically with its sidecar; return the sidecar dict.

    progress: epoch, batch, global_step, val_loss, val_acc. extra: further plain fields (num_classes, trainer).
    """
    assert kind in KINDS, f"kind must be one of {KINDS}"
    check_name(name, automatic=kind != "manual")
    record = {
        "format_version": FORMAT_VERSION, "name": name, "kind": kind, "created_at": utc_now(),
        "epoch": progress["epoch"], "batch": progress["batch"], "global_step": progress["global_step"],
        "val_loss": progress.get("val_loss"), "val_acc": progress.get("val_acc"),
        "model_state_dict": model_state_dict, "encoder_state_dict": encoder_state_dict,
        "optimizer_state_dict": optimizer_state_dict,
        **{key: config[key] for key in FLAT_CONFIG_KEYS},
        "config": dict(config), "rng_state": rng_state, "dataset": dataset, "metrics": metrics,
        "versions": {"torch": str(torch.__version__), "project": PROJECT_VERSION},
        **(extra or {}),
    }
    return write_checkpoint(checkpoint_dir, record, overwrite=overwrite, verify_after_save=verify_after_save)


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
    """Every field of a record but the tensors: what the sidecar and the listing show."""
    return {k: v for k, v in record.items() if k not in TENSOR_KEYS}


class _HashingFile:
    """File wrapper that hashes and counts what torch.save writes, so the file is never read back to hash it.

    Large chunks (the tensors) are hashed in a helper thread while this thread writes them: hashlib and file
    writes both release the GIL, so the hash costs no extra wall time. Each hash finishes before write() returns,
    so the chunks are hashed in order.
    """

    PARALLEL_FROM = 1 << 20

    def __init__(self, f, hasher):
        self.f, self.hasher, self.sha256, self.size = f, hasher, hashlib.sha256(), 0
        self.error = None  # torch's zip writer hides the OSError behind a vague RuntimeError; keep it

    def write(self, data):
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


def _fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path, obj):
    temp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + TEMP_MARK + uuid.uuid4().hex[:8])
    try:
        with open(temp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def write_checkpoint(checkpoint_dir, record, overwrite=False, verify_after_save=False):
    """Write record as NAME.pth + NAME.json, atomically; CheckpointError on any failure, with nothing left behind."""
    name = record["name"]
    path = checkpoint_path(checkpoint_dir, name)
    folder = os.path.dirname(path)
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"a checkpoint named {name!r} already exists; choose another name")
    temp = os.path.join(folder, f".{name}.pth{TEMP_MARK}{uuid.uuid4().hex[:8]}")
    pending = os.path.join(folder, f".{name}.json{PENDING_SIDECAR}")
    hashing, renamed = None, False
    try:
        os.makedirs(folder, exist_ok=True)
        needed = estimate_size(record) * SPACE_MARGIN
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise OSError(errno.ENOSPC, f"not enough disk space: needs about {needed / 1e6:.1f} MB, "
                                        f"{free / 1e6:.1f} MB free")
        with contextlib.closing(open_for_checkpoint(temp)) as raw, _Crc32Off(), \
                concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-hash") as hasher:
            hashing = _HashingFile(raw, hasher)
            torch.save(record, hashing)
            raw.finish()
        sidecar = {**metadata_of(record), "file": os.path.basename(path), "size": hashing.size,
                   "sha256": hashing.sha256.hexdigest(), "verified_at": None}
        # The sidecar is durable before the .pth is renamed, so recovery can always pair them (see recover()).
        _write_json_atomic(pending, sidecar)
        os.replace(temp, path)
        renamed = True
        _fsync_folder(folder)
        os.replace(pending, sidecar_path(path))
        _fsync_folder(folder)
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {name!r}: {e.strerror or e} ({folder})") from e
    except RuntimeError as e:  # torch's zip writer reports a failed write (e.g. disk full) as RuntimeError
        cause = hashing.error if hashing is not None and hashing.error is not None else None
        reason = (cause.strerror or str(cause)) if cause else str(e).strip().splitlines()[0]
        raise CheckpointError(f"could not write checkpoint {name!r}: {reason} ({folder})") from e
    finally:
        if os.path.exists(temp):
            os.remove(temp)
        if os.path.exists(pending):
            if renamed:  # the new .pth is in place: its sidecar must follow, or it is paired with the old one
                try:
                    os.replace(pending, sidecar_path(path))
                except OSError:
                    logger.warning("sidecar of %s left pending; recover() finishes it", path)
            else:
                os.remove(pending)
    if verify_after_save:
        ok, reason = verify(path)
        if not ok:
            raise CheckpointError(f"checkpoint {name!r} failed verification right after writing: {reason}")
        sidecar["verified_at"] = utc_now()
        _write_json_atomic(sidecar_path(path), sidecar)
    return sidecar


# ---------------------------------------------------------------------------------------------- reading

def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_sidecar(path):
    """The sidecar dict of a .pth, or None if it has none or it is unreadable."""
    try:
        with open(sidecar_path(path), encoding="utf-8") as f:
            sidecar = json.load(f)
    except (OSError, ValueError):
        return None
    return sidecar if isinstance(sidecar, dict) else None


def verify(path):
    """(ok, reason): does the file match the size and SHA-256 its sidecar recorded?"""
    if not os.path.isfile(path):
        return False, f"{path}: no such file"
    sidecar = read_sidecar(path)
    if sidecar is None or "sha256" not in sidecar:
        return False, f"{path}: no sidecar {os.path.basename(sidecar_path(path))} to verify against"
    size = os.path.getsize(path)
    if size != sidecar.get("size"):
        return False, f"{path}: size {size} bytes, the sidecar recorded {sidecar.get('size')} (truncated or replaced)"
    if file_sha256(path) != sidecar["sha256"]:
        return False, f"{path}: SHA-256 does not match the sidecar (the file is corrupt)"
    return True, "size and SHA-256 match"


def load_checkpoint(path, verify_file=True, map_location="cpu"):
    """torch.load (weights_only) after verification; CheckpointError with the reason for anything unloadable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if verify_file:
        ok, reason = verify(path)
        if not ok:
            raise CheckpointError(f"{reason}. Refusing to load; pass skip-verify to salvage it anyway")
    try:
        with warnings.catch_warnings():  # torch warns before raising; the error below says it all
            warnings.simplefilter("ignore")
            record = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "Unsupported" in str(e):  # weights_only met a class or function to call
            raise CheckpointError(f"{path}: not a loadable checkpoint: it holds objects other than tensors and plain "
                                  "data, and loading them would run code from the file; refused") from None
        raise CheckpointError(f"{path}: not a loadable checkpoint (not a torch file: {str(e)[:100]})") from None
    except Exception as e:  # torch raises many types here (zip, runtime, EOF); all mean "not loadable"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first_line[:200]})") from None
    if not isinstance(record, dict) or "model_state_dict" not in record:
        raise CheckpointError(f"{path}: a torch file, but not a checkpoint of this project (no model_state_dict)")
    return record


def read_metadata(path):
    """Metadata of one .pth: from its sidecar, else from the file itself (mmap, tensors untouched)."""
    sidecar = read_sidecar(path)
    if sidecar is not None:
        size = os.path.getsize(path)
        if size != sidecar.get("size"):
            return {**sidecar, "damaged": True,
                    "error": f"size {size} bytes, the sidecar recorded {sidecar.get('size')} (truncated or replaced)"}
        return {**sidecar, "damaged": False}
    try:
        record = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(record, dict) or "model_state_dict" not in record:
            raise CheckpointError("no model_state_dict")
    except Exception as e:  # any failure to read means the file is listed as damaged, never a crash
        name = os.path.splitext(os.path.basename(path))[0]
        return {"name": name, "file": os.path.basename(path), "damaged": True, "size": os.path.getsize(path),
                "error": f"unreadable: {str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}"}
    return {**metadata_of(record), "file": os.path.basename(path), "size": os.path.getsize(path),
            "sha256": None, "damaged": False}


def _sort_key(meta):
    return (meta.get("created_at") or "", meta.get("global_step") or 0)


def list_checkpoints(checkpoint_dir):
    """Metadata of every checkpoint in the folder, newest first; damaged files are listed as damaged."""
    if not os.path.isdir(checkpoint_dir):
        return []
    metas = []
    for entry in os.scandir(checkpoint_dir):
        if entry.name.endswith(".pth") and not entry.name.startswith(".") and entry.is_file():
            try:
                meta = read_metadata(entry.path)
            except FileNotFoundError:  # deleted (retention, another request) since the folder was scanned
                continue
            meta.setdefault("name", entry.name[:-4])
            metas.append(meta)
    return sorted(metas, key=_sort_key, reverse=True)


def recover(checkpoint_dir):
    """At start-up: finish an interrupted sidecar rename, remove temporaries. Returns the names of removed files."""
    removed = []
    if not os.path.isdir(checkpoint_dir):
        return removed
    for entry in os.scandir(checkpoint_dir):
        if entry.name.startswith(".") and entry.name.endswith(".json" + PENDING_SIDECAR):
            pth = os.path.join(checkpoint_dir, entry.name[1:-len(".json" + PENDING_SIDECAR)] + ".pth")
            try:
                with open(entry.path, encoding="utf-8") as f:
                    pending = json.load(f)
                matches = os.path.isfile(pth) and os.path.getsize(pth) == pending.get("size") \
                    and file_sha256(pth) == pending.get("sha256")
            except (OSError, ValueError):
                matches = False
            if matches:  # the .pth was renamed into place; its sidecar rename was cut short
                os.replace(entry.path, sidecar_path(pth))
                continue
        if entry.name.startswith(".") and (TEMP_MARK in entry.name or entry.name.endswith(PENDING_SIDECAR)):
            os.remove(entry.path)
            removed.append(entry.name)
    return removed


def delete_checkpoint(checkpoint_dir, name):
    """Remove NAME.pth and its sidecar (sidecar last, so a half-done delete is listed as a bare .pth, not lost)."""
    path = checkpoint_path(checkpoint_dir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint named {name!r}")
    os.remove(path)
    if os.path.exists(sidecar_path(path)):
        os.remove(sidecar_path(path))
    _fsync_folder(os.path.dirname(path))


def update_sidecar(checkpoint_dir, name, changes):
    """Merge plain fields (notes, tags, verified_at) into a sidecar; the .pth is never rewritten."""
    path = checkpoint_path(checkpoint_dir, name)
    sidecar = read_sidecar(path)
    if sidecar is None:
        raise FileNotFoundError(f"checkpoint {name!r} has no sidecar to edit")
    sidecar.update(changes)
    _write_json_atomic(sidecar_path(path), sidecar)
    return sidecar


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


# ---------------------------------------------------------------------------------------------- async writer

def clone_tensors(value):
    """Deep copy of nested dicts/lists, cloning tensors; storages shared before stay shared after."""
    clones = {}

    def walk(v):
        if isinstance(v, torch.Tensor):
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
            if key not in clones:
                clones[key] = v.detach().to("cpu", copy=True)
            return clones[key]
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(walk(x) for x in v)
        return v

    return walk(value)


class SaveJob:
    """One save: what to write (tensors still live until copied), where, and who asked."""

    def __init__(self, fields, request_id=None, overwrite=False, verify_after_save=False, on_saved=None):
        self.fields = fields  # keyword arguments of save_full_checkpoint, tensors not yet copied
        self.request_id = request_id
        self.overwrite, self.verify_after_save = overwrite, verify_after_save
        self.on_saved = on_saved  # called in the writer thread with the sidecar after a durable write
        self.copied = threading.Event()


class CheckpointWriter:
    """Copies snapshots and writes them in the background, in order.

    The training thread submits a job right after optimizer.step(); the copy thread clones its tensors while the
    next forward/backward runs; the training thread calls wait_for_copies() before its next optimizer.step().
    The write thread serializes, fsyncs and publishes checkpoint_saved / checkpoint_error.
    """

    def __init__(self, checkpoint_dir, publish):
        self.checkpoint_dir, self.publish = checkpoint_dir, publish
        self._to_copy, self._to_write = queue.Queue(), queue.Queue()
        self._pending = []  # jobs submitted and not yet copied, oldest first
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._unfinished = 0
        self._threads = [
            threading.Thread(target=self._copy_loop, name="checkpoint-copy", daemon=True),
            threading.Thread(target=self._write_loop, name="checkpoint-write", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def submit(self, job):
        with self._lock:
            self._pending.append(job)
            self._unfinished += 1
        self._to_copy.put(job)

    def wait_for_copies(self):
        """Block until every submitted snapshot is copied: only then may the parameters change."""
        with self._lock:
            pending = list(self._pending)
        for job in pending:
            job.copied.wait()

    def busy(self):
        with self._lock:
            return self._unfinished > 0

    def flush(self, timeout=None):
        """Wait until every submitted job is written (or failed)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout)

    def close(self):
        """Write what is pending, then end both threads. They must be gone before the interpreter exits: a daemon
        thread still freeing a snapshot's tensors then is killed inside torch, which aborts the process."""
        self.flush()
        self._to_copy.put(None)
        for thread in self._threads:
            thread.join()

    def _copy_loop(self):
        while (job := self._to_copy.get()) is not None:
            try:
                job.fields = clone_tensors(job.fields)
            finally:
                job.copied.set()
                with self._lock:
                    self._pending.remove(job)
            self._to_write.put(job)
        self._to_write.put(None)

    def _write_loop(self):
        while (job := self._to_write.get()) is not None:
            name = job.fields["name"]
            try:
                sidecar = save_full_checkpoint(self.checkpoint_dir, **job.fields, overwrite=job.overwrite,
                                               verify_after_save=job.verify_after_save)
            except (CheckpointError, ValueError) as e:
                logger.warning("checkpoint %s failed: %s", name, e)
                self.publish({"type": "checkpoint_error", "request_id": job.request_id, "name": name,
                              "kind": job.fields["kind"], "error": str(e)})
            else:
                self.publish({"type": "checkpoint_saved", "request_id": job.request_id, "name": name,
                              "kind": sidecar["kind"], "path": os.path.join(self.checkpoint_dir, sidecar["file"]),
                              "epoch": sidecar["epoch"], "batch": sidecar["batch"],
                              "global_step": sidecar["global_step"], "size": sidecar["size"],
                              "sha256": sidecar["sha256"], "verified": sidecar["verified_at"] is not None})
                if job.on_saved is not None:
                    job.on_saved(sidecar)
            finally:
                job.fields = None  # the snapshot's copies are written: free them now, not when the next job comes
                with self._idle:
                    self._unfinished -= 1
                    self._idle.notify_all()
