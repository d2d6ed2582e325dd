"""Checkpoints of a multi-process run: Distributed Checkpoint (DCP) folders, NAME.dcp/ beside a NAME.json sidecar.

A folder holds what torch.distributed.checkpoint writes for {"model", "optimizer"} (a .distcp file per rank that
wrote, and .metadata, written last by DCP's coordinator) and record.pth, rank 0's plain torch.save of the rest of
the record (config, progress, every rank's RNG state, metrics, the policy's state). Its sidecar holds what a .pth's
does, and `files`: every file of the folder with its size and SHA-256, the manifest verification checks.

Writing, every rank together: rank 0 makes a temporary folder .NAME.dcp.tmp-XXXXXXXX holding a writer's lock that
recovery respects; each rank's dcp.async_save writes its part there; rank 0's save completes only after every
rank's has (DCP gathers each rank's result before it writes .metadata); then rank 0 adds record.pth, hashes every
file and commits under the checkpoint's lock: the sidecar first, then the folder renamed into place, as
checkpoint.py commits a .pth. A process killed at any moment leaves at most a temporary folder, never listed, which
catalogue.recover() removes (or, cut between the two renames, finishes).

Optimizer state in a folder is keyed by parameter name (DCP's form, independent of world size and wrapper); a
consolidated record (load_record) has torch.optim's own form, keyed by position, as a one-process .pth does.
"""
import contextlib
import errno
import fcntl
import hashlib
import io
import os
import pickle
import shutil
import stat
import tarfile

import torch

import checkpoint as ckpt

SUFFIX = ".dcp"
RECORD_FILE = "record.pth"
WRITER_LOCK = ".writer.lock"  # inside a temporary folder while a save writes into it
SHARD_KEYS = ("model_state_dict", "optimizer_state_dict", "encoder_state_dict")
MAX_FILES = 4096  # a folder's manifest: one shard per rank, .metadata and record.pth


def is_folder_checkpoint(path):
    return str(path).endswith(SUFFIX)


def folder_path(folder, name):
    return ckpt.checkpoint_path(folder, name, suffix=SUFFIX)


# ---------------------------------------------------------------------------------------------- writing

class Staging:
    """A temporary folder that one save's ranks write into, locked by its writer until committed or discarded."""

    def __init__(self, path, name):
        self.path, self.name = path, name
        os.mkdir(self.path, 0o755)
        self._lock_fd = os.open(os.path.join(self.path, WRITER_LOCK),
                                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)

    def discard(self):
        """Remove the folder and what was written into it (a failed or abandoned save)."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._release()

    def _release(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def stage(folder, name, needed_bytes):
    """Rank 0, before the save starts: a Staging for checkpoint `name` of folder, after the name and space checks."""
    path = folder_path(folder, name)
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed_bytes * ckpt.SPACE_MARGIN:
        raise OSError(errno.ENOSPC, f"not enough disk space: needs about "
                                         f"{needed_bytes * ckpt.SPACE_MARGIN / 1e6:.1f} MB, {free / 1e6:.1f} MB free")
    return Staging(ckpt.temp_path(path), name)


def commit(folder, staging, record, overwrite=False, verify_after_save=False, cancel=None):
    """Rank 0, once every rank's part is written: add record.pth (the record less its shards), hash every file and
    put the folder and its sidecar in place; the sidecar. CheckpointError on any failure, the staging discarded and
    a checkpoint the name had before intact."""
    name = record["name"]
    path = folder_path(folder, name)
    try:
        ckpt.check_cancel(cancel)
        rest = {k: v for k, v in record.items() if k not in SHARD_KEYS}
        ckpt.write_durable_with(os.path.join(staging.path, RECORD_FILE), lambda f: torch.save(rest, f))
        files = manifest(staging.path)
        ckpt.fsync_folder(staging.path)
        with ckpt.checkpoint_lock(path, cancel=cancel):
            sidecar = _commit_locked(path, staging, record, files, overwrite)
            if verify_after_save:
                ok, reason = _verify_unlocked(path)
                if not ok:
                    raise ckpt.CheckpointError(f"checkpoint {name!r} failed verification right after writing: "
                                               f"{reason}")
                sidecar["verified_at"] = ckpt.utc_now()
                ckpt.replace_json(ckpt.sidecar_path(path), sidecar)
        return sidecar
    except OSError as e:
        raise ckpt.CheckpointError(f"could not write checkpoint {name!r}: {e.strerror or e} ({folder})") from e
    finally:
        staging.discard()  # once renamed into place its path is empty: this only releases the lock


def _commit_locked(path, staging, record, files, overwrite):
    name = record["name"]
    had_old = os.path.lexists(path)
    if (had_old and not overwrite) or any(os.path.lexists(path[:-len(SUFFIX)] + suffix)
                                          for suffix in ckpt.FILE_SUFFIXES):
        raise ckpt.CheckpointExists(f"a checkpoint named {name!r} already exists; choose another name")
    if had_old and (os.path.islink(path) or not os.path.isdir(path)):
        raise ckpt.CheckpointError(f"{path} is a symbolic link or not a folder; it is never replaced through")
    old_raw, old_sidecar = ckpt.old_sidecar(path)
    carried = {k: old_sidecar[k] for k in ckpt.USER_FIELDS if k in old_sidecar}
    sidecar = {**ckpt.metadata_of(record), **carried, "file": os.path.basename(path), "format": "dcp",
               "size": sum(f["size"] for f in files), "sha256": manifest_digest(files), "files": files,
               "verified_at": None}
    os.remove(os.path.join(staging.path, WRITER_LOCK))  # under the checkpoint's lock: recovery waits for it
    _put_in_place(path, staging.path, sidecar, had_old, old_raw)
    return sidecar


def place(folder, staging, sidecar):
    """Put a staged folder whose files match the given sidecar's manifest in place as a new checkpoint (a restore);
    its path. CheckpointExists if the name is taken, CheckpointError if the files do not match."""
    path = folder_path(folder, staging.name)
    files = manifest(staging.path)
    if files != sidecar.get("files") or manifest_digest(files) != sidecar.get("sha256"):
        raise ckpt.CheckpointError(f"{path}: the fetched files do not match the sidecar's list; not restored")
    ckpt.fsync_folder(staging.path)
    with ckpt.checkpoint_lock(path):
        if os.path.lexists(path) or os.path.lexists(path[:-len(SUFFIX)] + ".pth"):
            raise ckpt.CheckpointExists(f"a checkpoint named {staging.name!r} already exists; not replaced")
        os.remove(os.path.join(staging.path, WRITER_LOCK))
        _put_in_place(path, staging.path, {**sidecar, "file": os.path.basename(path)}, False, None)
    return path


def _put_in_place(path, temp, sidecar, had_old, old_raw):
    """The sidecar, then the folder; the old folder (an overwrite) moved aside first and removed last. A failure
    on the way puts the old pair back; a crash is finished or undone by recover_leftover()."""
    folder, side = os.path.dirname(path), ckpt.sidecar_path(path)
    side_temp, backup = ckpt.temp_path(side), ckpt.temp_path(path, "old-") if had_old else None
    done = []
    try:
        ckpt.write_json_durable(side_temp, sidecar)
        ckpt.fsync_folder(folder)
        if backup:
            os.rename(path, backup)
            done.append("backup")
        os.replace(side_temp, side)
        done.append("sidecar")
        os.rename(temp, path)
        done.append("folder")
        ckpt.fsync_folder(folder)
    except OSError:
        _roll_back(path, temp, backup, done, old_raw)
        raise
    finally:
        ckpt.remove_quietly(side_temp)
    if backup:
        shutil.rmtree(backup, ignore_errors=True)


def _roll_back(path, temp, backup, done, old_raw):
    side = ckpt.sidecar_path(path)
    try:
        if "folder" in done:
            os.rename(path, temp)
        if "backup" in done:
            os.rename(backup, path)
        if "sidecar" in done:
            if old_raw is not None:
                ckpt.replace_bytes(side, old_raw)
            else:
                os.remove(side)
        ckpt.fsync_folder(os.path.dirname(path))
    except OSError as e:  # what is left is repaired by recover_leftover() or listed as damaged
        ckpt.logger.error("could not roll back the failed save of %s: %s", path, e)


def manifest(path):
    """[{"path", "size", "sha256"}] of every regular file in the folder at path, by name; refuses anything else."""
    files = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.name == WRITER_LOCK:
            continue
        if not entry.is_file(follow_symlinks=False):
            raise ckpt.CheckpointError(f"{entry.path}: not a regular file (a link or a folder); refused")
        files.append({"path": entry.name, "size": entry.stat(follow_symlinks=False).st_size,
                      "sha256": ckpt.file_sha256(entry.path)})
    return files


def manifest_digest(files):
    """One SHA-256 for the whole folder: of its manifest's lines, so that two folders with one digest hold the same
    bytes under the same names."""
    lines = "".join(f"{f['path']}\t{f['size']}\t{f['sha256']}\n" for f in files)
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------- reading

def check_folder(path):
    """None if path is a real folder (not a link), else why not."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return f"{path}: no such checkpoint"
    if stat.S_ISLNK(mode):
        return f"{path}: a symbolic link; never followed"
    if not stat.S_ISDIR(mode):
        return f"{path}: not a folder"
    return None


def listed_files(sidecar):
    """The sidecar's manifest, checked: (files, problem). Names are plain file names; nothing leaves the folder."""
    files = sidecar.get("files")
    if not isinstance(files, list) or not files or len(files) > MAX_FILES:
        return None, "its sidecar lists no files to verify against"
    for f in files:
        ok = isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int) \
            and isinstance(f.get("sha256"), str)
        if not ok or f["path"] in ("", ".", "..") or "/" in f["path"] or "\0" in f["path"]:
            return None, "its sidecar's file list is malformed"
    return files, None


def _verify_unlocked(path, hash_files=True):
    """(ok, reason): every file the sidecar lists is there with its size (and SHA-256), and nothing else is."""
    why = check_folder(path)
    if why:
        return False, why
    sidecar, problems = ckpt.inspect_sidecar(path)
    if sidecar is None:
        return False, f"{path}: no sidecar {os.path.basename(ckpt.sidecar_path(path))} to verify against" + (
            f" ({problems[0]})" if problems else "")
    files, problem = listed_files(sidecar)
    if problem:
        return False, f"{path}: {problem}"
    if sidecar.get("sha256") != manifest_digest(files):
        return False, f"{path}: its file list does not match the sidecar's SHA-256 (the sidecar was edited)"
    present = {e.name: e for e in os.scandir(path)}
    for f in files:
        entry = present.pop(f["path"], None)
        if entry is None:
            return False, f"{path}: {f['path']} is missing"
        if not entry.is_file(follow_symlinks=False):
            return False, f"{path}: {f['path']} is a symbolic link or not a regular file; never followed"
        size = entry.stat(follow_symlinks=False).st_size
        if size != f["size"]:
            return False, f"{path}: {f['path']} is {size} bytes, the sidecar recorded {f['size']} (truncated?)"
        if hash_files and ckpt.file_sha256(entry.path) != f["sha256"]:
            return False, f"{path}: {f['path']}'s SHA-256 does not match the sidecar (the file is corrupt)"
    if present:
        return False, f"{path}: holds files its sidecar does not list ({', '.join(sorted(present)[:3])})"
    return True, "every file's size and SHA-256 match"


def verify(path, mark=False):
    """(ok, reason), as checkpoint.verify for a .pth: under the checkpoint's lock; mark stamps verified_at."""
    with ckpt.checkpoint_lock(path) if mark else ckpt.read_lock(path):
        ok, reason = _verify_unlocked(path)
        if ok and mark:
            ckpt.update_unlocked(path, {"verified_at": ckpt.utc_now()})
    return ok, reason


def metadata(path, identity):
    """The listing's fields of a folder (the sidecar's, checked); damaged when a listed file is missing or its size
    differs (sizes only: listing never hashes)."""
    sidecar, problems = ckpt.inspect_sidecar(path)
    if sidecar is None:
        error = "no sidecar: not a checkpoint, or a save was cut short" + (f" ({problems[0]})" if problems else "")
        return {**identity, "damaged": True, "size": None, "sha256": None, "problems": problems, "error": error}
    ok, reason = _verify_unlocked(path, hash_files=False)
    return {**sidecar, **identity, "problems": problems, "damaged": not ok, "error": None if ok else reason}


def read_record(path, verify_file=True):
    """The folder's record without its shards (record.pth): config, progress, RNG states, metrics."""
    with ckpt.read_lock(path):
        _check_loadable(path, verify_file)
        return _read_rest(path)


def _check_loadable(path, verify_file):
    why = check_folder(path)
    if why:
        raise ckpt.CheckpointError(why)
    if verify_file:
        ok, reason = _verify_unlocked(path)
        if not ok:
            raise ckpt.CheckpointError(f"{reason}. Refusing to load; pass skip-verify to salvage it anyway")
    check_metadata(path)


# What DCP's .metadata may name: DCP reads it with pickle.load, which would run whatever a hostile file names.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}
METADATA_LIMIT = 64 << 20  # bytes: a few hundred per tensor


class _MetadataOnly(pickle.Unpickler):
    def find_class(self, module, name):
        allowed = _METADATA_CLASSES.get(module, ())
        if name in allowed or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                                                   torch.dtype))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def check_metadata(path):
    """Refuse a folder whose .metadata names anything but DCP's own metadata classes, before DCP unpickles it."""
    file = os.path.join(path, ".metadata")
    try:
        _MetadataOnly(io.BytesIO(ckpt.read_bytes(file, METADATA_LIMIT))).load()
    except pickle.UnpicklingError as e:
        raise ckpt.CheckpointError(f"{path}: not a loadable checkpoint: its .metadata names {e}, not DCP's "
                                   "metadata, and loading it would run code from the file; refused") from None
    except (OSError, ckpt.UnreadableFile, EOFError, ValueError, TypeError, AttributeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise ckpt.CheckpointError(f"{path}: its .metadata is unreadable ({reason[:200]})") from None


def _read_rest(path):
    file = os.path.join(path, RECORD_FILE)
    try:
        with os.fdopen(ckpt.open_regular(file), "rb") as f:
            rest = ckpt.torch_load(file, f, "cpu")
    except (OSError, ckpt.UnreadableFile) as e:
        raise ckpt.CheckpointError(f"{path}: cannot read its {RECORD_FILE}: "
                                   f"{e.strerror if isinstance(e, OSError) else e}") from None
    if not isinstance(rest, dict) or not isinstance(rest.get("dcp"), dict):
        raise ckpt.CheckpointError(f"{path}: its {RECORD_FILE} is not a record of this project")
    return rest


def load_record(path, verify_file=True):
    """The whole record, consolidated into one process's form: what torch.load gives for a .pth of the same run."""
    import distributed  # the shards' optimizer state is keyed by name; a .pth's by position
    with ckpt.read_lock(path):
        _check_loadable(path, verify_file)
        rest = _read_rest(path)
        shards = load_shards(path)
    model_state, optimizer_state = shards["model"], distributed.by_position(shards["optimizer"])
    prefix = rest["dcp"].get("encoder_prefix") or ""
    encoder = {k[len(prefix):]: v for k, v in model_state.items() if prefix and k.startswith(prefix)}
    return {**rest, "model_state_dict": model_state, "optimizer_state_dict": optimizer_state,
            "encoder_state_dict": encoder}


def load_shards(path):
    """{"model", "optimizer"} of the folder, whole, in this process: DCP's own loader with no planner state (as
    torch.distributed.checkpoint.format_utils.dcp_to_torch_save reads one)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    check_metadata(path)
    state = {}
    try:
        _load_state_dict(state, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    except (Exception, CheckpointException) as e:  # DCP's own is a BaseException; every one means "not loadable"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ckpt.CheckpointError(f"{path}: its shards do not load ({first})") from None
    if not isinstance(state.get("model"), dict) or not isinstance(state.get("optimizer"), dict):
        raise ckpt.CheckpointError(f"{path}: a DCP folder, but not a checkpoint of this project")
    return state


# ---------------------------------------------------------------------------------------------- one process

def write_record(out_path, record):
    """A one-process record (torch.optim's form) as a folder at out_path (ending .dcp) with its sidecar: the reverse
    of load_record, for load_checkpoint.py. Atomic, and never replaces anything."""
    import distributed
    from torch.distributed.checkpoint import FileSystemWriter, save
    folder, name = os.path.dirname(os.path.abspath(out_path)), os.path.basename(out_path)[:-len(SUFFIX)]
    staging = stage(folder, name, ckpt.estimate_size(record))
    try:
        names = [k for k in record["model_state_dict"] if not k.endswith(ckpt.RUNNING_FIGURES)]
        shards = {"model": record["model_state_dict"],
                  "optimizer": distributed.by_name(record["optimizer_state_dict"], _trainable(record, names))}
        with _quiet_single_process():
            save(shards, storage_writer=FileSystemWriter(staging.path), no_dist=True)
        prefix = _encoder_prefix(record)
        rest = {**record, "dcp": {"world_size": 1, "strategy": None, "encoder_prefix": prefix}}
        return commit(folder, staging, rest)
    except BaseException:
        staging.discard()
        raise


def _trainable(record, names):
    """The names of the parameters the optimizer steps, in its order: with a frozen encoder, not the encoder's."""
    count = sum(len(g["params"]) for g in record["optimizer_state_dict"]["param_groups"])
    if count == len(names):
        return names
    prefix = _encoder_prefix(record)
    trainable = [n for n in names if not n.startswith(prefix)]
    if len(trainable) != count:
        raise ckpt.CheckpointError("its optimizer steps parameters that cannot be told apart by name: "
                                   f"{count} of {len(names)}")
    return trainable


def _encoder_prefix(record):
    return "encoder." if record.get("kind") == "pretrained" or "pretrain_mode" in record else \
        "example_encoder.encoder."


@contextlib.contextmanager
def _quiet_single_process():
    import warnings
    with warnings.catch_warnings():  # DCP warns that it assumes one process, which is what is meant here
        warnings.simplefilter("ignore", UserWarning)
        yield


# ---------------------------------------------------------------------------------------------- deleting, recovering

def delete(path):
    """Remove the folder and its sidecar, under its lock: the sidecar first (a cut after it leaves an unlisted
    folder, which recovery cannot tell from a cut save and removes), then the folder, moved aside and removed."""
    with ckpt.checkpoint_lock(path):
        why = check_folder(path)
        if why and not os.path.lexists(path):
            raise FileNotFoundError(f"no checkpoint {os.path.basename(path)}")
        if why:
            raise ckpt.CheckpointError(f"{os.path.basename(path)} is a symbolic link or not a folder; it is never "
                                       "deleted through: remove it by hand")
        ckpt.remove_quietly(ckpt.sidecar_path(path))
        doomed = ckpt.temp_path(path, "del-")
        os.rename(path, doomed)
        ckpt.fsync_folder(os.path.dirname(path))
        shutil.rmtree(doomed, ignore_errors=True)


def is_leftover(entry_name):
    return (SUFFIX + ckpt.TEMP_MARK) in entry_name


def recover_leftover(folder, path, entry_name, sidecar):
    """One temporary folder of checkpoint `path` whose lock is held by the caller: finish the commit a crash cut
    between its two renames, leave one a live save still writes, else remove it. True if it was removed."""
    leftover = os.path.join(folder, entry_name)
    if os.path.islink(leftover) or not os.path.isdir(leftover):
        os.remove(leftover)
        return True
    if _being_written(leftover):
        return False
    if sidecar is not None and not os.path.lexists(path) and _matches(leftover, sidecar):
        os.rename(leftover, path)
        ckpt.fsync_folder(folder)
        return False
    shutil.rmtree(leftover)
    return True


def _being_written(leftover):
    try:
        fd = os.open(os.path.join(leftover, WRITER_LOCK), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _matches(leftover, sidecar):
    files, problem = listed_files(sidecar)
    if problem or sidecar.get("sha256") != manifest_digest(files):
        return False
    try:
        return manifest(leftover) == files
    except (OSError, ckpt.CheckpointError, ckpt.UnreadableFile):
        return False


# ---------------------------------------------------------------------------------------------- archive

def open_archive(path):
    """The folder as one uncompressed tar stream (NAME.dcp/FILE...): (its length in bytes, a generator of its
    chunks). Its files are opened (never through a link) and checked against the manifest under the lock, so a
    delete or overwrite after this returns cannot change what is sent."""
    with ckpt.read_lock(path):
        why = check_folder(path)
        if why:
            raise ckpt.CheckpointError(why)
        sidecar = ckpt.read_sidecar(path) or {}
        files, problem = listed_files(sidecar)
        if problem:
            raise ckpt.CheckpointError(f"{path}: {problem}")
        opened = []
        try:
            for f in files:
                fd = ckpt.open_regular(os.path.join(path, f["path"]))
                opened.append((f, os.fdopen(fd, "rb")))
                if os.fstat(fd).st_size != f["size"]:
                    raise ckpt.CheckpointError(f"{path}: {f['path']} does not have its recorded size (damaged)")
        except BaseException:
            for _, handle in opened:
                handle.close()
            raise
    top = os.path.basename(path)
    headers = [_header(top, 0, tarfile.DIRTYPE)] + [_header(f"{top}/{f['path']}", f["size"]) for f, _ in opened]
    length = sum(map(len, headers)) + sum(f["size"] + _padding(f["size"]) for f, _ in opened) + 2 * tarfile.BLOCKSIZE
    return length, _tar_chunks(headers, opened)


def _header(name, size, kind=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode = kind, size, 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info.tobuf(tarfile.PAX_FORMAT)


def _padding(size):
    return -size % tarfile.BLOCKSIZE


def _tar_chunks(headers, opened, piece=1 << 20):
    """The tar stream of open_archive: the folder's header, then each member's header, its bytes read in pieces
    and its padding to a 512-byte block, then the two zero blocks that end an archive."""
    try:
        yield headers[0]
        for header, (f, handle) in zip(headers[1:], opened):
            yield header
            remaining = f["size"]
            while remaining:
                data = handle.read(min(piece, remaining))
                if not data:
                    raise ckpt.CheckpointError(f"{f['path']} ended early while being sent")
                remaining -= len(data)
                yield data
            yield tarfile.NUL * _padding(f["size"])
        yield tarfile.NUL * (2 * tarfile.BLOCKSIZE)
    finally:
        for _, handle in opened:
            handle.close()


# ---------------------------------------------------------------------------------------------- every rank's part

class ShardedSave:
    """One save as every rank sees it: where it writes (staging, rank 0's; else None) and DCP's futures, or the
    error that kept it from starting."""

    def __init__(self, staging=None, response=None, error=None):
        self.staging, self.response, self.error = staging, response, error

    def wait_staged(self):
        if self.response is not None:
            self.response.staging_completion.result()

    def wait_uploaded(self):
        """Block until every rank's part is written; CheckpointError for what failed (this rank's or another's),
        caused by the OSError (disk full, say) when one was the reason."""
        if self.error is not None:
            raise self.error
        try:
            self.response.upload_completion.result()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # DCP's CheckpointException is a BaseException, with every rank's failure
            causes = list(getattr(e, "failures", {}).values()) or [e]
            cause = next((c for c in causes if isinstance(c, OSError)), causes[0])
            text = str(cause).strip().splitlines()
            raise ckpt.CheckpointError(f"the ranks could not write their parts: {text[0][:200] if text else e!r}"
                                       ) from (cause if isinstance(cause, Exception) else None)

    def discard(self):
        if self.staging is not None:
            self.staging.discard()


class ShardWriter:
    """One rank's side of its run's folder saves: dcp.async_save of its part, copied to host memory in the
    background (while the next forward and backward run) and written after that.

    As many saves as there are groups are in flight, each in a slot of its own: its own process group for DCP's collectives
    (never the training's), so that two saves' collectives never interleave on one group, and its own stager,
    whose staging buffers a later save would otherwise reuse while the earlier one still writes from them. Every
    rank starts the same saves in the same order, so each slot's group sees the same sequence on every rank."""

    def __init__(self, groups, device):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        cuda = torch.device(device).type == "cuda"
        # pinned host memory and non-blocking copies only where there is a GPU to copy from
        options = StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=True,
                                 use_non_blocking_copy=cuda)
        self._slots = [{"group": group, "stager": DefaultStager(options), "save": None} for group in groups]
        self._started = 0

    def start(self, state, path, staging=None):
        """Begin saving state ({"model", "optimizer"} of sharded_state) into the folder at path; waits only for the
        save that last used this save's slot."""
        from torch.distributed.checkpoint import FileSystemWriter, async_save
        slot = self._slots[self._started % len(self._slots)]
        self._started += 1
        _wait_quietly(slot)
        response = async_save(state, storage_writer=FileSystemWriter(path), process_group=slot["group"],
                              async_stager=slot["stager"])
        slot["save"] = ShardedSave(staging, response)
        return slot["save"]

    def staging_pending(self):
        """Whether a save's copy of the state is still being made (wait_staged() would wait)."""
        return any(slot["save"] is not None and slot["save"].response is not None
                   and not slot["save"].response.staging_completion.done() for slot in self._slots)

    def wait_staged(self):
        """Before the parameters change: every save's copy of them must be complete."""
        for slot in self._slots:
            if slot["save"] is not None:
                slot["save"].wait_staged()

    def wait_uploaded(self):
        """Every save's writing done, on every rank; a failure is rank 0's to report, so it is not raised here."""
        for slot in self._slots:
            _wait_quietly(slot)

    def close(self):
        self.wait_uploaded()
        for slot in self._slots:
            slot["stager"].close()


def _wait_quietly(slot):
    save, slot["save"] = slot["save"], None
    if save is not None:
        try:
            save.wait_uploaded()
        except ckpt.CheckpointError as e:  # rank 0 reports it as the save's checkpoint_error
            ckpt.logger.debug("a folder save failed: %s", e)
