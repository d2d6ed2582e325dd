"""Checkpoints in object storage through fsspec (s3fs for s3://), in the layout of a local root:

    URL/runs/RUN_ID/run.json                             what the run is (catalogue.py's run.json)
    URL/runs/RUN_ID/checkpoints/NAME.json                the sidecar, written last: it names the version below
    URL/runs/RUN_ID/checkpoints/NAME.VERSION.pth         the checkpoint's bytes (.pth.zst, or NAME.VERSION.dcp/FILE
                                                         for each file of a DCP folder); VERSION: 16 hex digits of
                                                         its SHA-256

A checkpoint is committed when its sidecar object is written, as a single PUT replaces an object whole. An upload
streams every file under the new version's keys through fsspec's buffered writer (multipart for large files),
hashing as it goes, refuses to complete a file whose SHA-256 is not the sidecar's, then writes the sidecar, and only
then removes the name's other versions. Until that PUT the name's previous version stays listed and whole: an
overwrite cut short at any moment loses nothing, and leaves at most objects no sidecar names, which recover()
removes.

Keys are built only from a checked run id, a checked checkpoint name and file names of a fixed shape, and keys
read from a listing are parsed against that shape: nothing from a request, a sidecar or the server addresses
anything outside the prefix. Credentials come from the standard places (AWS_* variables, AWS_PROFILE, storage
options), never from the URL, and every message passes through redact().
"""
import collections
import concurrent.futures
import hashlib
import os
import re
import threading

import catalogue
import checkpoint as ckpt

PIECE = 8 << 20  # bytes read and written at a time; also the multipart part size
URL_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9 ._-]{0,199}|\.metadata")  # a checkpoint's file or a DCP folder's
SECRET_OPTIONS = ("key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
                  "aws_session_token", "access_key", "secret_key", "session_token")
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
SIDECAR_SUFFIX = ".json"
_FILE_VERSION = re.compile(r"[0-9a-f]{16}\.pth(\.zst)?")  # what follows NAME. in a version's key
_FOLDER_VERSION = re.compile(r"[0-9a-f]{16}\.dcp")
LIST_WORKERS = 32  # sidecars fetched at once when listing


class RemoteError(Exception):
    """An object store refused or could not be reached; the message names the URL, never a secret."""


def is_url(text):
    """Whether text is a URL (s3://..., file://...) rather than a local path."""
    return isinstance(text, str) and URL_PATTERN.match(text) is not None


def check_url(url):
    """url, if it is one fsspec can open and carries no credentials; ValueError naming it otherwise."""
    import fsspec
    if not is_url(url):
        raise ValueError(f"{url!r} is not a URL (expected PROTOCOL://BUCKET/PREFIX, e.g. s3://bucket/checkpoints)")
    protocol, rest = url.split("://", 1)
    if "@" in rest.split("/", 1)[0]:
        raise ValueError("a storage URL must not hold credentials (user:secret@): put them in AWS_* variables, "
                         "AWS_PROFILE or --storage-options")
    if not rest.strip("/"):
        raise ValueError(f"{url!r} names no bucket or folder")
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as e:
        raise ValueError(f"cannot open {protocol}:// URLs: {e}") from None
    return url.rstrip("/")


def parse_storage_options(text):
    """The --storage-options JSON: an object of fsspec options; ValueError naming the problem (never the text)."""
    if not text:
        return {}
    try:
        value = ckpt.loads_bounded(text, what="--storage-options", strict=True)
    except ckpt.UnreadableFile:
        raise ValueError("--storage-options is not valid JSON (its text is not shown: it may hold secrets)") from None
    if not isinstance(value, dict):
        raise ValueError(f"--storage-options must be a JSON object, not {ckpt.json_kind(value)}")
    return value


def split_checkpoint_url(url):
    """(root URL, run id, name) of a checkpoint's URL, ROOT/runs/RUN_ID/checkpoints/NAME.pth (or .pth.zst, .dcp, or
    the sidecar NAME.json); ValueError for a URL of any other shape."""
    url = check_url(url)
    head, marker, tail = url.rpartition(f"/{catalogue.RUNS}/")
    parts = tail.split("/")
    if not marker or not head.split("://", 1)[1] or len(parts) != 3 or parts[1] != catalogue.CHECKPOINTS:
        raise ValueError(f"{url!r} is not a checkpoint's URL (ROOT/runs/RUN_ID/checkpoints/NAME.pth)")
    for suffix in (".pth.zst", ".pth", catalogue.FOLDER_SUFFIX, SIDECAR_SUFFIX):
        if parts[2].endswith(suffix):
            name = ckpt.check_name(parts[2][:-len(suffix)], automatic=True)
            return head, catalogue.check_run_id(parts[0]), name
    raise ValueError(f"{url!r} names no checkpoint file (NAME.pth, NAME.pth.zst or NAME.dcp)")


def fetch_cached(url, folder, storage_options=None):
    """The local path of the checkpoint at a URL, in a root folder: the copy there if it is that checkpoint, else
    downloaded into its run's place."""
    root_url, run_id, name = split_checkpoint_url(url)
    return ObjectRoot(root_url, storage_options).cached(run_id, name, folder)


def _secrets_of(options):
    found = [os.environ.get(v) for v in SECRET_VARIABLES]
    stack = [options]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, str) and k.lower() in SECRET_OPTIONS:
                    found.append(v)
                elif isinstance(v, (dict, list)):
                    stack.append(v)
        elif isinstance(value, list):
            stack.extend(value)
    return sorted({s for s in found if s and len(s) >= 4}, key=len, reverse=True)


class ObjectRoot:
    """One checkpoint root in object storage: upload, list, download, verify and delete checkpoints there."""

    def __init__(self, url, storage_options=None):
        import fsspec
        self.url = check_url(url)
        options = dict(storage_options or {})
        self._secrets = _secrets_of(options)
        protocol = self.url.split("://", 1)[0]
        try:  # the listing cache is fsspec's default; a catalogue must see what is there now
            self.fs = fsspec.filesystem(protocol, skip_instance_cache=True, use_listings_cache=False, **options)
        except TypeError:
            self.fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        except Exception as e:
            raise RemoteError(self._message("cannot open", e)) from None
        self.prefix = self.fs._strip_protocol(self.url).rstrip("/")
        self._sidecars = {}  # key -> (etag or mtime, raw bytes): a listing fetches only sidecars that changed
        self._sidecars_lock = threading.Lock()

    def __repr__(self):
        return f"ObjectRoot({self.url!r})"

    # ---- messages

    def redact(self, text):
        """text with every secret this root knows of replaced by ***."""
        text = str(text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _message(self, doing, error, where=None):
        return self.redact(f"{doing} {where or self.url}: {describe_error(error)}")

    def error(self, doing, error, where=None):
        """A RemoteError for a failure of `doing` at where (default the root's URL), redacted."""
        return RemoteError(self._message(doing, error, where))

    # ---- keys

    def run_prefix(self, run_id):
        return f"{self.prefix}/{catalogue.RUNS}/{catalogue.check_run_id(run_id)}/{catalogue.CHECKPOINTS}"

    def key(self, run_id, file_name, inside=None):
        """The key of a checkpoint's object: FILE, or INSIDE/FILE for a file of a DCP folder; ValueError for a
        name that is not of that shape (.., a slash, an absolute path, odd characters)."""
        for part in (file_name,) if inside is None else (inside, file_name):
            if not isinstance(part, str) or not FILE_NAME.fullmatch(part) or part in (".", ".."):
                raise ValueError(f"refused object name {str(part)[:60]!r}: not a checkpoint file name")
        tail = file_name if inside is None else f"{inside}/{file_name}"
        return f"{self.run_prefix(run_id)}/{tail}"

    def run_file_key(self, run_id):
        return f"{self.prefix}/{catalogue.RUNS}/{catalogue.check_run_id(run_id)}/{catalogue.RUN_FILE}"

    def put_run_file(self, run_id, raw):
        """Upload a run's run.json (what the run is), so that a restored checkpoint keeps its run's history."""
        try:
            self.fs.pipe_file(self.run_file_key(run_id), raw)
        except Exception as e:
            raise self.error("could not upload to", e, self.display(self.run_file_key(run_id))) from None

    def get_run_file(self, run_id):
        """A run's run.json bytes (bounded), or None if the store has none."""
        try:
            raw = self.fs.cat_file(self.run_file_key(run_id), end=ckpt.JSON_LIMIT + 1)
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self.error("could not read", e, self.display(self.run_file_key(run_id))) from None
        return raw if len(raw) <= ckpt.JSON_LIMIT else None

    def sidecar_key(self, run_id, name):
        return self.key(run_id, ckpt.check_name(name, automatic=True) + SIDECAR_SUFFIX)

    def display(self, key):
        """A key as a URL, for messages."""
        return f"{self.url.split('://', 1)[0]}://{key}"

    # ---- start-up

    def check(self):
        """RemoteError, naming the URL without secrets, unless the root can be listed and written: at start-up,
        so that wrong credentials, a missing bucket or an unreachable endpoint stop a run before it trains."""
        bucket = self.prefix.split("/", 1)[0]
        probe = f"{self.prefix}/.probe-{os.getpid()}-{threading.get_ident()}"
        try:
            self.fs.ls(bucket, detail=False)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as e:  # s3fs raises botocore's and aiohttp's types as well as OSError
            raise self.error("cannot use", e) from None

    # ---- upload

    def upload(self, local_path, sidecar, run_id, name, cancel=None):
        """Upload one local checkpoint (a file or a DCP folder) whose checked sidecar is given, as a new version;
        commit it by writing the sidecar object, then remove the name's other versions. RemoteError or
        CheckpointError on any failure, the name's previous version (if any) still listed and whole."""
        files = local_files(local_path, sidecar)
        version = version_name(name, sidecar, local_path)
        side_key = self.sidecar_key(run_id, name)
        try:
            for path, file_name, _, sha256 in files:
                inside = version if os.path.isdir(local_path) else None
                key = self.key(run_id, version if inside is None else file_name, inside)
                self._put(path, key, sha256, cancel)
            ckpt.check_cancel(cancel)
            uploaded = {**remote_sidecar(sidecar), "object": version}
            self.fs.pipe_file(side_key, ckpt.dumps_strict(uploaded, indent=1).encode("utf-8"))
            self._remove_objects(run_id, name, keep=version)
        except (RemoteError, ckpt.CheckpointError):
            raise
        except Exception as e:
            raise self.error("could not upload to", e, self.display(side_key)) from None

    def _put(self, path, key, sha256, cancel, progress=lambda done: None):
        digest, done = hashlib.sha256(), 0
        with os.fdopen(ckpt.open_regular(path), "rb") as source:
            out = self.fs.open(key, "wb", block_size=PIECE)
            try:
                for piece in iter(lambda: source.read(PIECE), b""):
                    ckpt.check_cancel(cancel)
                    digest.update(piece)
                    out.write(piece)
                    done += len(piece)
                    progress(done)
                if digest.hexdigest() != sha256:  # before close(): a multipart upload completes only there
                    raise ckpt.CheckpointError(f"{os.path.basename(path)} changed while it was uploaded (its "
                                               "SHA-256 is not the sidecar's); not committed")
                out.close()
            except BaseException:
                _discard(out)
                raise

    # ---- listing

    def list_checkpoints(self, run=None):
        """Every committed checkpoint (or run's), newest first: one LIST of the prefix, then the sidecars that
        changed since the last listing, fetched concurrently. Each has location "remote"; damaged says an object
        is missing or its size is not the sidecar's (sizes only: listing never downloads a checkpoint)."""
        base = f"{self.prefix}/{catalogue.RUNS}" if run is None else self.run_prefix(run)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return []
        except Exception as e:
            raise self.error("could not list", e) from None
        objects = {}
        for key, info in found.items():
            parsed = self._parse_key(key)
            if parsed is not None:
                objects[parsed] = info
        sidecars = self._fetch_sidecars({k: info for k, info in objects.items() if k[2] == SIDECAR_SUFFIX})
        metas = [self._describe(run_id, name, sidecars[(run_id, name, SIDECAR_SUFFIX)], objects)
                 for run_id, name, kind in objects if kind == SIDECAR_SUFFIX]
        return sorted(metas, key=catalogue.newest_first, reverse=True)

    def _parse_key(self, key):
        """(run_id, name, what) for a key of the layout, what being ".json" (the sidecar), ".VERSION.pth",
        ".VERSION.pth.zst" or ".VERSION.dcp/FILE"; None for anything else (a stray object, a probe, a hostile name).
        Names hold no dot (checkpoint.NAME_RULE), so a key splits at its first one."""
        head = f"{self.prefix}/{catalogue.RUNS}/"
        if not key.startswith(head):
            return None
        parts = key[len(head):].split("/")
        if len(parts) not in (3, 4) or parts[1] != catalogue.CHECKPOINTS:
            return None
        name, _, rest = parts[2].partition(".")
        try:
            catalogue.check_run_id(parts[0])
            ckpt.check_name(name, automatic=True)
        except ValueError:
            return None
        if len(parts) == 3 and (rest == SIDECAR_SUFFIX[1:] or _FILE_VERSION.fullmatch(rest)):
            return parts[0], name, "." + rest
        if len(parts) == 4 and _FOLDER_VERSION.fullmatch(rest) and FILE_NAME.fullmatch(parts[3]):
            return parts[0], name, f".{rest}/{parts[3]}"
        return None

    def _fetch_sidecars(self, infos):
        """{(run_id, name, ".json"): raw bytes or an exception}: changed ones fetched concurrently, bounded."""
        result, wanted = {}, {}
        with self._sidecars_lock:
            for k, info in infos.items():
                tag = info.get("ETag") or info.get("mtime") or info.get("LastModified")
                cached = self._sidecars.get(info["name"])
                if (info.get("size") or 0) > ckpt.JSON_LIMIT:
                    result[k] = ckpt.UnreadableFile(f"sidecar larger than {ckpt.JSON_LIMIT} bytes")
                elif cached is not None and tag is not None and cached[0] == tag:
                    result[k] = cached[1]
                else:
                    wanted[k] = (info["name"], tag)
        with concurrent.futures.ThreadPoolExecutor(LIST_WORKERS) as pool:
            fetched = dict(zip(wanted, pool.map(self._cat_quietly, [key for key, _ in wanted.values()])))
        with self._sidecars_lock:
            for k, raw in fetched.items():
                key, tag = wanted[k]
                if isinstance(raw, bytes) and tag is not None:
                    self._sidecars[key] = (tag, raw)
                result[k] = raw
        return result

    def _cat_quietly(self, key):
        try:
            return self.fs.cat_file(key, end=ckpt.JSON_LIMIT + 1)
        except Exception as e:  # one unreadable sidecar is listed as damaged; the others are still listed
            return e

    def _describe(self, run_id, name, raw, objects):
        identity = {"id": catalogue.checkpoint_id(run_id, name), "run_id": run_id, "name": name,
                    "location": "remote", "url": self.display(self.run_prefix(run_id))}
        sidecar, problem = parse_sidecar(raw)
        if sidecar is None:
            return {**identity, "damaged": True, "size": None, "sha256": None, "problems": [], "error": problem}
        meta = {**sidecar, **identity, "problems": [], "damaged": False, "error": None}
        problem = _missing_object(run_id, name, sidecar, objects)
        if problem:
            meta.update(damaged=True, error=problem)
        return meta

    # ---- reading back

    def read_sidecar(self, run_id, name):
        """The checked sidecar of a committed checkpoint; FileNotFoundError if there is none."""
        key = self.sidecar_key(run_id, name)
        try:
            raw = self.fs.cat_file(key, end=ckpt.JSON_LIMIT + 1)
        except FileNotFoundError:
            raise FileNotFoundError(f"no checkpoint {name!r} of run {run_id} in {self.url}") from None
        except Exception as e:
            raise self.error("could not read", e, self.display(key)) from None
        sidecar, problem = parse_sidecar(raw)
        if sidecar is None:
            raise RemoteError(f"{self.display(key)}: {problem}")
        return sidecar

    def download(self, run_id, name, folder, cancel=None):
        """Fetch a committed checkpoint into the local folder (a run's checkpoint folder), verified against its
        sidecar before anything is put in place; its local path. FileExistsError if the name is taken there."""
        sidecar = self.read_sidecar(run_id, name)
        file_name = sidecar.get("file") or ""
        os.makedirs(folder, exist_ok=True)
        if file_name.endswith(catalogue.FOLDER_SUFFIX):
            return self._download_folder(run_id, name, sidecar, folder, cancel)
        if file_name not in (name + ".pth", name + ".pth.zst"):
            raise RemoteError(f"{self.display(self.sidecar_key(run_id, name))}: its file {file_name[:60]!r} is not "
                              "the checkpoint's")
        [(version, _, size, sha256)] = self._files(run_id, name, sidecar)
        path = os.path.join(folder, file_name)
        _refuse_taken(folder, name)
        temp = ckpt.temp_path(path)
        try:
            self._get(self.key(run_id, version), temp, size, sha256, cancel)
            ckpt.place_file(path, temp, sidecar)
        finally:
            ckpt.remove_quietly(temp)
        return path

    def restore(self, run_id, name, root):
        """Download a checkpoint into a local root, in its run's folder (run.json too, if missing there); its path.
        ValueError if a folder on the way there is a symbolic link: nothing is written through one."""
        catalogue.entry_for(root, run_id, name)  # checks the name, and that no folder on the way is a link
        path = self.download(run_id, name, catalogue.checkpoint_folder(root, run_id))
        run_file = os.path.join(catalogue.run_folder(root, run_id), catalogue.RUN_FILE)
        raw = None if os.path.lexists(run_file) else self.get_run_file(run_id)
        if raw is not None:
            try:
                ckpt.write_durable(run_file, raw)
            except FileExistsError:  # written meanwhile by whoever restored another of the run's checkpoints
                pass
        return path

    def locate(self, ident):
        """(run_id, name) of an id RUN_ID:NAME, or of a bare name: the newest run's that has it committed here;
        FileNotFoundError if none has."""
        run_id, name = catalogue.parse_id(ident)
        if run_id is not None:
            return run_id, name
        for meta in self.list_checkpoints():  # newest first
            if meta["name"] == name and not meta["damaged"]:
                return meta["run_id"], name
        raise FileNotFoundError(f"no checkpoint {name!r} in any run under {self.url}")

    def cached(self, run_id, name, root):
        """The local path of a committed checkpoint in root: the copy there if it is this one (its sidecar holds
        the same SHA-256, and it verifies), else downloaded afresh (a stale copy is deleted first)."""
        sidecar = self.read_sidecar(run_id, name)
        entry = catalogue.entry_for(root, run_id, name)
        if os.path.lexists(entry.path):
            here = ckpt.read_sidecar(entry.path) or {}
            if here.get("sha256") == sidecar.get("sha256") and ckpt.verify(entry.path)[0]:
                return entry.path
            ckpt.delete_checkpoint(entry.path)
        return self.restore(run_id, name, root)

    def _files(self, run_id, name, sidecar):
        """remote_files(), a problem with the sidecar a RemoteError naming it."""
        try:
            return remote_files(name, sidecar)
        except ckpt.CheckpointError as e:
            raise RemoteError(f"{self.display(self.sidecar_key(run_id, name))}: {e}") from None

    def _download_folder(self, run_id, name, sidecar, folder, cancel):
        import dcp_checkpoint
        files = self._files(run_id, name, sidecar)
        _refuse_taken(folder, name)
        staging = dcp_checkpoint.stage(folder, name, sum(size for _, _, size, _ in files))
        try:
            for file_name, version, size, sha256 in files:
                self._get(self.key(run_id, file_name, version), os.path.join(staging.path, file_name), size, sha256,
                          cancel)
            return dcp_checkpoint.place(folder, staging, sidecar)
        finally:
            staging.discard()

    def _get(self, key, path, size, sha256, cancel):
        """Stream one object into a new local file, refusing more bytes than the sidecar recorded or other ones."""
        if not isinstance(size, int) or not isinstance(sha256, str):
            raise RemoteError(f"{self.display(key)}: its sidecar records no size and SHA-256 to check it against")
        digest, done = hashlib.sha256(), 0

        def write(out):
            nonlocal done
            with self.fs.open(key, "rb", block_size=PIECE) as source:
                for piece in iter(lambda: source.read(PIECE), b""):
                    ckpt.check_cancel(cancel)
                    done += len(piece)
                    if done > size:
                        raise RemoteError(f"{self.display(key)} is larger than its sidecar records ({size} bytes)")
                    digest.update(piece)
                    out.write(piece)
        try:
            ckpt.write_durable_with(path, write)
        except (RemoteError, ckpt.CheckpointError):
            raise
        except FileNotFoundError:
            raise RemoteError(f"{self.display(key)}: missing, though its sidecar lists it") from None
        except Exception as e:
            raise self.error("could not download", e, self.display(key)) from None
        if done != size or digest.hexdigest() != sha256:
            raise RemoteError(f"{self.display(key)}: {done} bytes whose SHA-256 does not match its sidecar "
                              "(corrupt or replaced); not restored")

    def verify(self, run_id, name):
        """(ok, reason): every object of the checkpoint streams back with the size and SHA-256 its sidecar holds."""
        sidecar = self.read_sidecar(run_id, name)
        try:
            for file_name, inside, size, sha256 in remote_files(name, sidecar):
                key = self.key(run_id, file_name, inside)
                digest, done = hashlib.sha256(), 0
                with self.fs.open(key, "rb", block_size=PIECE) as source:
                    for piece in iter(lambda: source.read(PIECE), b""):
                        digest.update(piece)
                        done += len(piece)
                if done != size or digest.hexdigest() != sha256:
                    return False, f"{self.display(key)}: size or SHA-256 does not match the sidecar"
        except FileNotFoundError:
            return False, f"{self.display(self.run_prefix(run_id))}: an object of {name!r} is missing"
        except (ValueError, ckpt.CheckpointError) as e:
            return False, str(e)
        except Exception as e:
            raise self.error("could not verify", e) from None
        return True, "every object's size and SHA-256 match"

    # ---- deleting, recovering

    def delete(self, run_id, name):
        """Remove a checkpoint: its sidecar first (it is unlisted at once), then every version of its bytes;
        FileNotFoundError if there was nothing."""
        side_key = self.sidecar_key(run_id, name)
        try:
            had_sidecar = self.fs.exists(side_key)
            if had_sidecar:
                self.fs.rm_file(side_key)
            gone = self._remove_objects(run_id, name)
        except Exception as e:
            raise self.error("could not delete from", e, self.display(side_key)) from None
        if not had_sidecar and not gone:
            raise FileNotFoundError(f"no checkpoint {name!r} of run {run_id} in {self.url}")

    def _objects_of(self, run_id):
        """{(name, what): key} of every object of the run's checkpoints (one LIST)."""
        try:
            found = self.fs.find(self.run_prefix(run_id))
        except FileNotFoundError:
            return {}
        return {(p[1], p[2]): key for key, p in ((k, self._parse_key(k)) for k in found) if p is not None}

    def _remove_objects(self, run_id, name, keep=None):
        """Remove the bytes of every version of name but `keep` (a version name, or None: all); whether any went."""
        doomed = [key for (n, what), key in self._objects_of(run_id).items()
                  if n == name and what != SIDECAR_SUFFIX and (keep is None or _version_of(name, what) != keep)]
        if doomed:
            self.fs.rm(doomed)
        return bool(doomed)

    def recover(self, runs=None):
        """Remove what uploads cut short left in the given runs (default every run): bytes no sidecar names. Only
        call it where no other process is uploading into those runs. The ids of the checkpoints it cleaned."""
        try:
            found = self.fs.find(f"{self.prefix}/{catalogue.RUNS}")
        except FileNotFoundError:
            return []
        except Exception as e:
            raise self.error("could not list", e) from None
        versions = collections.defaultdict(set)  # (run_id, name) -> versions of its bytes present
        committed = set()
        for run_id, name, what in filter(None, map(self._parse_key, found)):
            if runs is None or run_id in runs:
                (committed.add((run_id, name)) if what == SIDECAR_SUFFIX else
                 versions[(run_id, name)].add(_version_of(name, what)))
        cleaned = []
        for run_id, name in sorted(versions):
            keep = None
            if (run_id, name) in committed:
                try:
                    keep = self.read_sidecar(run_id, name).get("object")
                except (FileNotFoundError, RemoteError):
                    continue  # deleted meanwhile, or unreadable: nothing is removed on a guess
            if versions[(run_id, name)] - {keep}:
                self._remove_objects(run_id, name, keep=keep)
                cleaned.append(catalogue.checkpoint_id(run_id, name))
        return cleaned


# ---------------------------------------------------------------------------------------------- helpers

def describe_error(error):
    """One line for an error an object store raised: what went wrong, without a traceback."""
    if isinstance(error, PermissionError):
        return f"access denied ({_first_line(error)})"
    if isinstance(error, FileNotFoundError):
        return f"no such bucket or object ({_first_line(error)})"
    name = type(error).__name__
    if "EndpointConnection" in name or "ClientConnector" in name or isinstance(error, ConnectionError):
        return f"cannot reach the endpoint ({_first_line(error)})"
    return f"{name}: {_first_line(error)}"


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _discard(out):
    """Abort a half-written object: a multipart upload is aborted, so nothing of it appears."""
    try:
        if hasattr(out, "discard"):
            out.discard()
        else:
            out.close()
    except Exception:  # the store is gone, say: the object was never committed; at most an unlisted part is left
        pass
    finally:
        out.closed = True  # else closing it when it is collected would try to finish the upload


def remote_sidecar(sidecar):
    """The sidecar as uploaded: without the local side's mirror state."""
    return {k: v for k, v in sidecar.items() if k != "mirror"}


def parse_sidecar(raw):
    """(checked sidecar, None) or (None, why) for the bytes of a sidecar object (or the error fetching them)."""
    if isinstance(raw, Exception):
        return None, f"sidecar unreadable: {describe_error(raw)}"
    if len(raw) > ckpt.JSON_LIMIT:
        return None, f"sidecar unreadable: larger than {ckpt.JSON_LIMIT} bytes"
    try:
        value = ckpt.loads_bounded(raw.decode("utf-8"), what="sidecar")
    except (ValueError, UnicodeDecodeError, ckpt.UnreadableFile) as e:
        return None, f"sidecar unreadable: {e}"
    if not isinstance(value, dict):
        return None, f"sidecar unreadable: it holds {ckpt.json_kind(value)}, not an object"
    return ckpt.check_sidecar(value)[0], None


def local_files(path, sidecar):
    """[(local path, file name, size, sha256)] of a local checkpoint: the file itself, or each file of a DCP
    folder as its sidecar lists it."""
    if os.path.isdir(path) and not os.path.islink(path):
        import dcp_checkpoint
        files, problem = dcp_checkpoint.listed_files(sidecar)
        if problem:
            raise ckpt.CheckpointError(f"{path}: {problem}")
        return [(os.path.join(path, f["path"]), f["path"], f["size"], f["sha256"]) for f in files]
    if not isinstance(sidecar.get("size"), int) or not isinstance(sidecar.get("sha256"), str):
        raise ckpt.CheckpointError(f"{path}: its sidecar records no size and SHA-256; not uploaded")
    return [(path, os.path.basename(path), sidecar["size"], sidecar["sha256"])]


def version_name(name, sidecar, local_path):
    """The name of a checkpoint's version in the store: NAME.VERSION.pth (or .pth.zst, .dcp), VERSION the first 16
    hex digits of its SHA-256."""
    suffix = next(s for s in (".pth.zst", ".pth", catalogue.FOLDER_SUFFIX) if local_path.endswith(s))
    return f"{name}.{sidecar['sha256'][:16]}{suffix}"


def _version_of(name, what):
    """The version name a parsed key belongs to: NAME.VERSION.pth for ".VERSION.pth" or ".VERSION.dcp/FILE"."""
    return name + what.split("/", 1)[0]


def remote_files(name, sidecar):
    """[(file name, folder or None, size, sha256)] of a committed checkpoint's objects, from its sidecar: the
    version it names (a file, or a folder's files)."""
    version = sidecar.get("object") or ""
    if not version.startswith(name + ".") or not (
            _FILE_VERSION.fullmatch(version[len(name) + 1:]) or _FOLDER_VERSION.fullmatch(version[len(name) + 1:])):
        raise ckpt.CheckpointError(f"its sidecar names the object {version[:60]!r}, not a version of {name!r}")
    if version.endswith(catalogue.FOLDER_SUFFIX):
        import dcp_checkpoint
        files, problem = dcp_checkpoint.listed_files(sidecar)
        if problem:
            raise ckpt.CheckpointError(problem)
        return [(f["path"], version, f["size"], f["sha256"]) for f in files]
    return [(version, None, sidecar.get("size"), sidecar.get("sha256"))]


def _missing_object(run_id, name, sidecar, objects):
    """Why a listed checkpoint's objects do not match its sidecar (sizes from the LIST), or None."""
    try:
        expected = remote_files(name, sidecar)
    except ckpt.CheckpointError as e:
        return str(e)
    for file_name, inside, size, _ in expected:
        what = f"{inside[len(name):]}/{file_name}" if inside else file_name[len(name):]
        info = objects.get((run_id, name, what))
        if info is None:
            return f"{inside + '/' if inside else ''}{file_name} is missing"
        if info.get("size") != size:
            return f"{file_name} is {info.get('size')} bytes, the sidecar recorded {size}"
    return None


def _refuse_taken(folder, name):
    for suffix in (".pth", ".pth.zst", catalogue.FOLDER_SUFFIX):
        if os.path.lexists(os.path.join(folder, name + suffix)):
            raise FileExistsError(f"a checkpoint named {name!r} is already in {folder}; not replaced")
