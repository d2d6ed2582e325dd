"""The web app: adapts HTTP to the training worker and the checkpoint folder. No training logic lives here.

    python app.py                      # http://127.0.0.1:5002, bundled ARC-AGI-1
    python app.py --data-dir my_tasks --checkpoint-dir runs/ckpt --port 5003
"""
import argparse
import dataclasses
import errno
import hmac
import ipaddress
import logging
import os
import re
import shutil
import sys
import urllib.parse

from flask import Blueprint, Flask, Response, current_app, jsonify, render_template, request, send_file
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

import catalogue
import dcp_checkpoint
import mirror
import remote
import checkpoint as ckpt
import shutdown
from events import EventBus
from train import PRESETS, OneLineParser, TrainConfig, check_local_root, retries_flag
from worker import MAX_PROCESSES, SAVE_REQUESTS_KEPT, Busy, Conflict, TrainingWorker, check_processes

logger = logging.getLogger(__name__)
bp = Blueprint("lab", __name__)

CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
STATE_CHANGING = ("POST", "PATCH", "PUT", "DELETE")
OPEN_ENDPOINTS = ("lab.index", "lab.vendor_plotly", "lab.login", "static")  # the page shell asks for the token
TOKEN_COOKIE = "arc_lab_token"  # set by POST /login: EventSource cannot send an Authorization header
PATCHABLE = {"notes": str, "tags": list}
FAILED_SAVE_STATUS = {"exists": 409, "not_served": 409, "busy": 503, "abandoned": 503, "failed": 500}
SAVE_WAIT_SECONDS = 300.0  # how long "wait": true waits unless the request's timeout says otherwise
MAX_SAVE_WAIT_SECONDS = 3600.0
# An OSError of the machine, not of the request: the status that fits it.
OS_ERROR_STATUS = {errno.ENOSPC: 507, errno.EDQUOT: 507, errno.EACCES: 403, errno.EPERM: 403, errno.EROFS: 403,
                   errno.ENOENT: 404}


class StrictJSONProvider(DefaultJSONProvider):
    """Every response is strict JSON: NaN and Infinity (a loss before the first validation) become null."""

    def dumps(self, obj, **kwargs):
        return ckpt.dumps_strict(obj, sort_keys=False)


def create_app(config=None, trainer=None):
    """App factory. config keys: CHECKPOINT_DIR, DATASET, DATA_DIR, DEVICE, TOKEN, TRAIN_DEFAULTS, DATA, START_WORKER,
    BIND_HOST and ALLOWED_HOSTS (the Host names answered besides loopback's), MAX_MEMORY_GB, SHUTDOWN_TIMEOUT,
    PROCESSES (a run's default number of processes: 1 trains in the worker thread, more as a process group), MIRROR
    (a mirror.Mirror, not started, that uploads every checkpoint to object storage)."""
    app = Flask(__name__)
    app.json = StrictJSONProvider(app)
    app.config.from_mapping(CHECKPOINT_DIR="checkpoints", DATASET="arcagi", DATA_DIR="", DEVICE="auto", TOKEN=None,
                            TRAIN_DEFAULTS={}, DATA=None, START_WORKER=True, MAX_CONTENT_LENGTH=1 << 20,
                            BIND_HOST=None, ALLOWED_HOSTS=(), MAX_MEMORY_GB=None, SHUTDOWN_TIMEOUT=30.0,
                            PROCESSES=1, MIRROR=None)
    app.config.update(config or {})
    defaults = {"dataset": app.config["DATASET"], "data_dir": app.config["DATA_DIR"], **app.config["TRAIN_DEFAULTS"]}
    TrainConfig.from_dict(defaults)  # bad server defaults fail at start-up, not at the first request
    if trainer is None:
        trainer = TrainingWorker(app.config["CHECKPOINT_DIR"], EventBus(), device=app.config["DEVICE"],
                                 dataset=app.config["DATASET"], data_dir=app.config["DATA_DIR"],
                                 train_defaults=defaults, data=app.config["DATA"],
                                 max_memory_gb=app.config.get("MAX_MEMORY_GB"), processes=app.config["PROCESSES"],
                                 mirror=app.config["MIRROR"])
        if app.config["START_WORKER"]:
            trainer.start_thread()
    app.extensions["trainer"] = trainer
    app.url_map.merge_slashes = False  # "/checkpoints//etc" must reach the name check, not be redirected
    app.register_blueprint(bp)
    app.register_error_handler(Exception, _error_response)
    app.before_request(_check_request)
    app.after_request(_secure_headers)
    return app


def _worker():
    return current_app.extensions["trainer"]


def _folder():
    return current_app.extensions["trainer"].checkpoint_dir


def _entry(ident):
    """The checkpoint an id (RUN_ID:NAME) or bare name in a URL stands for: a bare name is the current run's, else
    the newest run's. 400 for a malformed id, 404 for none."""
    return catalogue.locate(_folder(), ident, current_run=_worker().status()["run_id"])


# ---------------------------------------------------------------------------------------------- plumbing

def _error_response(error):
    if isinstance(error, Conflict):
        return jsonify(error=str(error)), 409
    if isinstance(error, (Busy, ckpt.CheckpointBusy)):
        return jsonify(error=str(error)), 503, {"Retry-After": "1"}
    if isinstance(error, FileNotFoundError) and error.filename is None:  # ours: the message names what is missing
        return jsonify(error=str(error.args[0] if error.args else error)), 404
    if isinstance(error, OSError):
        logger.warning("%s %s: %s", request.method, request.path, error)
        return jsonify(error=f"the server's file system refused: {error.strerror or error}"
                             f"{f' ({error.filename})' if error.filename else ''}"), OS_ERROR_STATUS.get(error.errno, 503)
    if isinstance(error, (ValueError, ckpt.CheckpointError)):
        return jsonify(error=str(error)), 400
    if isinstance(error, HTTPException):
        return jsonify(error=f"{error.name}: {error.description}"), error.code
    logger.exception("unexpected error on %s %s", request.method, request.path)
    return jsonify(error=f"internal error ({type(error).__name__}); see the server log"), 500


def _check_request():
    """Every request: a Host this server answers to (DNS rebinding), the token where one is set; every state
    change: proof that it comes from this server's own page (JSON content type, same origin)."""
    return _check_host() or _check_token() or (_check_same_origin() if request.method in STATE_CHANGING else None)


def _check_host():
    host = request.host
    name = (urllib.parse.urlsplit("//" + host).hostname or "") if host else ""
    allowed = {*LOOPBACK_NAMES, current_app.config["BIND_HOST"], *current_app.config["ALLOWED_HOSTS"]}
    if name in {h.lower().strip("[]") for h in allowed if h}:
        return None
    return jsonify(error=f"this server does not answer to the host {host[:100]!r} (a guard against DNS "
                         f"rebinding); if you reach it by that name, start it with --allowed-host "
                         f"{name[:100] or 'NAME'}"), 403


def _check_token():
    token = current_app.config["TOKEN"]
    if not token or request.endpoint in OPEN_ENDPOINTS:
        return None
    sent = request.headers.get("Authorization", "")
    cookie = request.cookies.get(TOKEN_COOKIE, "")
    if hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()) or \
            hmac.compare_digest(cookie.encode(), token.encode()):
        return None
    return jsonify(error="missing or wrong access token: send Authorization: Bearer TOKEN, or POST /login "
                         "{\"token\": TOKEN} once for a cookie"), 401


def _check_same_origin():
    """A browser sends a cross-site POST without asking only for form and text content types: demanding JSON
    forces a preflight this server never approves. Origin and Sec-Fetch-Site then name the page that sent it."""
    if request.mimetype != "application/json":
        return jsonify(error="send Content-Type: application/json with every POST, PATCH and DELETE, with or "
                             "without a body (it shows the request comes from this server's own page)"), 415
    own = f"{request.scheme}://{request.host}".lower()
    origin = request.headers.get("Origin")
    if origin is not None and origin.lower() != own:
        return jsonify(error=f"cross-site request refused: it came from {origin[:100]!r}, not from this "
                             f"server's own page ({own})"), 403
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return jsonify(error=f"cross-site request refused (Sec-Fetch-Site: {fetch_site[:40]}): use this "
                             "server's own page"), 403
    return None


def _secure_headers(response):
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _body():
    """The JSON object sent, {} when there is no body; 400 for anything else, however deep or malformed."""
    data = request.get_data(cache=True)
    if not data:
        return {}
    try:
        body = ckpt.loads_bounded(data.decode("utf-8"), "the body", strict=True)
    except UnicodeDecodeError:
        raise ValueError("the body is not UTF-8 text") from None
    except ckpt.UnreadableFile as e:
        raise ValueError(str(e)) from None
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body


def _take_name(body, key, skip_verify):
    """A checkpoint named in a start request (id or name), refused up front if it fails verification (unless
    salvaging)."""
    value = body.pop(key, None)
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a checkpoint id or name (a string)")
    try:
        path = _entry(value).path
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    ok, reason = ckpt.verify(path)
    if not ok and not skip_verify:
        raise ValueError(f"{key} {value!r} fails verification: {reason}; send skip_verify: true to salvage it anyway")
    return path


# ---------------------------------------------------------------------------------------------- pages

@bp.get("/")
def index():
    return render_template("index.html")


@bp.get("/vendor/plotly.min.js")
def vendor_plotly():
    import plotly  # served from the installed package: the page works offline
    path = os.path.join(os.path.dirname(plotly.__file__), "package_data", "plotly.min.js")
    response = send_file(path, mimetype="text/javascript", max_age=86400)
    response.headers["Cache-Control"] = "public, max-age=86400"
    return response


@bp.post("/login")
def login():
    """Trade the token for a cookie the page's requests and its event stream then carry (HttpOnly, same site)."""
    token = current_app.config["TOKEN"]
    sent = _body().get("token")
    if not token:
        return jsonify(ok=True, auth_required=False)
    if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), token.encode()):
        return jsonify(error="wrong access token"), 401
    response = jsonify(ok=True, auth_required=True)
    response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", secure=request.is_secure)
    return response


@bp.get("/config")
def config_fields():
    fields = [{"name": f.name, "type": f.type.__name__, "default": f.default, "choices": f.metadata["choices"],
               "low": f.metadata["low"], "high": f.metadata["high"], "help": f.metadata["help"]}
              for f in dataclasses.fields(TrainConfig)]
    worker = _worker()
    defaults = TrainConfig.from_dict(worker.train_defaults).to_dict()
    # What this server fixes or chose at start-up, so a form that sends every field sends these values.
    defaults.update(checkpoint_dir=worker.checkpoint_dir, device=worker.device)
    presets = [{"name": name, "title": p.title, "description": p.description, "values": dict(p.values)}
               for name, p in PRESETS.items()]
    return jsonify(fields=fields, defaults=defaults, presets=presets,
                   processes={"default": worker.processes, "low": 1, "high": min(MAX_PROCESSES, os.cpu_count() or 1)})


@bp.get("/status")
def status():
    return jsonify({**_worker().status(), "checkpoint_dir": _folder(), "auth_required": bool(current_app.config["TOKEN"]),
                    "disk_free_bytes": _disk_free()})


@bp.get("/samples")
def samples():
    """The latest samples of each split of the current or last run: {"train": event or null, "val": ...}, and its
    latest language analysis ("language": the language event or null)."""
    latest = _worker().samples()
    return jsonify(train=latest.get("train"), val=latest.get("val"), language=latest.get("language"))


def _disk_free():
    try:
        return shutil.disk_usage(_folder()).free
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- run control

@bp.post("/start_pretraining")
def start_pretraining():
    body = _body()
    mode = body.pop("mode", None)
    if mode is not None:
        body["pretrain_mode"] = mode
    processes = body.pop("processes", None)
    config = _worker().config_from(body)
    return jsonify(run_id=_worker().start("pretraining", config, mode=config.pretrain_mode,
                                          processes=processes)), 202


@bp.post("/start_training")
def start_training():
    body = _body()
    processes = body.pop("processes", None)
    skip_verify = body.pop("skip_verify", False)
    if not isinstance(skip_verify, bool):
        raise ValueError("skip_verify must be true or false")
    pretrained = _take_name(body, "pretrained_encoder", skip_verify)
    resume_from = _take_name(body, "resume_from", skip_verify)
    if resume_from:  # refused here, not in the run: its sidecar says so without a tensor read
        ckpt.check_resumable(ckpt.read_sidecar(resume_from) or {}, os.path.basename(resume_from))
    fine_tune_from = _take_name(body, "fine_tune_from", skip_verify)
    if resume_from and (fine_tune_from or pretrained):
        raise ValueError("resume_from continues a run exactly; it cannot be combined with fine_tune_from "
                         "or pretrained_encoder")
    config = _worker().config_from({**body, **({"pretrained_encoder": pretrained} if pretrained else {})})
    run_id = _worker().start("training", config, resume_from=resume_from, fine_tune_from=fine_tune_from,
                             verify_files=not skip_verify, processes=processes)
    return jsonify(run_id=run_id), 202


@bp.post("/stop")
def stop():
    _body()
    _worker().stop()
    return jsonify(ok=True), 202


@bp.post("/pause")
def pause():
    _body()
    _worker().pause(True)
    return jsonify(ok=True), 202


@bp.post("/resume_training")
def resume_training():
    _body()
    _worker().pause(False)
    return jsonify(ok=True), 202


# ---------------------------------------------------------------------------------------------- checkpoints

@bp.post("/save_checkpoint")
def save_checkpoint():
    """Queue a save (202 with its request_id); with "wait": true, answer once it is saved or failed."""
    body = _body()
    unknown = set(body) - {"name", "overwrite", "wait", "timeout", "contents", "compression"}
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}; "
                         "send name, overwrite, contents, compression, wait and timeout only")
    name, overwrite, wait = body.get("name"), body.get("overwrite", False), body.get("wait", False)
    contents = ckpt.check_contents(body.get("contents", "full"))
    compression = ckpt.check_compression(body.get("compression", "none"))
    if name is not None and not isinstance(name, str):
        raise ValueError("name must be a string")
    for key, value in (("overwrite", overwrite), ("wait", wait)):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
    timeout = _wait_timeout(body.get("timeout", SAVE_WAIT_SECONDS))
    request_id, name = _worker().request_save(name or None, overwrite=overwrite, contents=contents,
                                              compression=compression)
    if not wait:
        return jsonify(request_id=request_id, name=name, state="queued"), 202
    return _save_answer(_worker().wait_for_save(request_id, timeout))


def _wait_timeout(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_SAVE_WAIT_SECONDS:
        raise ValueError(f"timeout must be a number of seconds above 0 and at most {MAX_SAVE_WAIT_SECONDS}, "
                         f"got {value!r}")
    return float(value)


def _save_answer(state):
    """A save request's state as an HTTP answer: 200 saved, 202 still on its way, or the failure's own status."""
    if state["state"] == "saved":
        return jsonify(state), 200
    if state["state"] != "failed":
        return jsonify({**state, "timed_out": True}), 202
    return jsonify(state), _failed_save_status(state.get("reason"))


def _failed_save_status(reason):
    """exists / not served: 409; busy / abandoned: 503; an errno name (ENOSPC): as the file system error it is."""
    if reason in FAILED_SAVE_STATUS:
        return FAILED_SAVE_STATUS[reason]
    code = getattr(errno, reason, None) if isinstance(reason, str) and reason.startswith("E") else None
    return OS_ERROR_STATUS.get(code, 503) if isinstance(code, int) else 500


@bp.get("/save_requests/<request_id>")
def save_request(request_id):
    """A save request's state: queued, copying, writing, saved (with the outcome) or failed (with the error)."""
    state = _worker().save_request(request_id)
    if state is None:
        return jsonify(error=f"no save request {request_id!r} (the server keeps the last "
                             f"{SAVE_REQUESTS_KEPT} finished ones)"), 404
    return jsonify(state)


LISTED = ("id", "run_id", "name", "kind", "file", "path", "size", "created_at", "epoch", "batch", "global_step",
          "val_loss", "val_acc", "task_type", "bottleneck_type", "sha256", "damaged", "refused", "error", "problems",
          "verified_at", "notes", "tags", "resume_command", "contents", "compression", "mirror", "location")


@bp.get("/list_checkpoints")
def list_checkpoints():
    """Every run's checkpoints, newest first; ?run=RUN_ID for one run's. With a mirror, those only there too
    (location "mirror"), and mirror_error if it could not be listed."""
    run = request.args.get("run") or None
    rows = [{key: meta.get(key) for key in LISTED} for meta in catalogue.list_checkpoints(_folder(), run=run)]
    uploads = _worker().mirror
    if uploads is None:
        return jsonify(checkpoints=rows)
    try:
        remote_only = [{**{key: meta.get(key) for key in LISTED}, "location": "mirror", "path": None,
                        "resume_command": None}
                       for meta in uploads.target.list_checkpoints(run=run)
                       if meta["id"] not in {r["id"] for r in rows}]
    except remote.RemoteError as e:
        return jsonify(checkpoints=rows, mirror_error=str(e))
    return jsonify(checkpoints=rows + remote_only, mirror_error=None)


@bp.post("/checkpoints/<path:ident>/restore")
def checkpoint_restore(ident):
    """Fetch a checkpoint that is only on the mirror back into its run's folder, in the mirror's thread."""
    _body()
    uploads = _worker().mirror
    if uploads is None:
        raise ValueError("this server has no mirror to restore from (start it with --mirror URL)")
    run_id, name = catalogue.parse_id(ident)
    if run_id is None:
        raise ValueError(f"restore needs a full id RUN_ID:NAME, not {ident!r}")
    if os.path.lexists(catalogue.entry_for(_folder(), run_id, name).path):
        return jsonify(error=f"{ident} is already here; nothing to restore"), 409
    uploads.restore(run_id, name)
    return jsonify(restoring=catalogue.checkpoint_id(run_id, name)), 202


@bp.get("/checkpoints/<path:ident>")
def checkpoint_info(ident):
    return jsonify(catalogue.describe(_entry(ident), _folder()))


@bp.get("/checkpoints/<path:ident>/download")
def checkpoint_download(ident):
    entry = _entry(ident)
    if ckpt.is_folder(entry.path):  # a multi-process run's DCP folder: one tar stream of its files
        length, chunks = dcp_checkpoint.open_archive(entry.path)
        return Response(chunks, mimetype="application/x-tar", headers={
            "Content-Length": str(length),
            "Content-Disposition": f'attachment; filename="{os.path.basename(entry.path)}.tar"'})
    try:
        f = os.fdopen(ckpt.open_regular(entry.path), "rb")  # never through a link
    except ckpt.UnreadableFile as e:
        raise ValueError(f"{entry.id}: {e}") from None
    return send_file(f, as_attachment=True, download_name=os.path.basename(entry.path),
                     mimetype="application/octet-stream")


@bp.delete("/checkpoints/<path:ident>")
def checkpoint_delete(ident):
    entry = _entry(ident)
    ckpt.delete_checkpoint(entry.path)
    _worker().publish({"type": "checkpoint_deleted", "id": entry.id, "run_id": entry.run_id, "name": entry.name,
                       "reason": "deleted by the user"})  # the mirror, if any, follows
    return jsonify(deleted=entry.id)


@bp.patch("/checkpoints/<path:ident>")
def checkpoint_patch(ident):
    entry = _entry(ident)
    body = _body()
    if not body or set(body) - set(PATCHABLE):
        raise ValueError("send notes (a string) and/or tags (a list of strings); nothing else can be edited")
    if "notes" in body and (not isinstance(body["notes"], str) or len(body["notes"]) > 10_000):
        raise ValueError("notes must be a string of at most 10,000 characters")
    if "tags" in body and (not isinstance(body["tags"], list) or len(body["tags"]) > 50
                           or not all(isinstance(t, str) and 0 < len(t) <= 100 for t in body["tags"])):
        raise ValueError("tags must be a list of at most 50 strings of 1-100 characters")
    sidecar = ckpt.update_sidecar(entry.path, body)
    return jsonify({**sidecar, "id": entry.id, "run_id": entry.run_id, "name": entry.name})


@bp.post("/checkpoints/<path:ident>/verify")
def checkpoint_verify(ident):
    entry = _entry(ident)
    _body()
    ok, reason = ckpt.verify(entry.path, mark=True)
    return jsonify(id=entry.id, name=entry.name, ok=ok, reason=reason)


@bp.get("/compare")
def compare():
    idents = request.args.get("a"), request.args.get("b")
    if not all(idents):
        raise ValueError("give two checkpoint ids: /compare?a=ID&b=ID")
    # Reads two files, never the live model: the training thread still alone owns that.
    entries = [_entry(i) for i in idents]
    a, b = (ckpt.load_checkpoint(e.path) for e in entries)
    return jsonify({**ckpt.compare_records(a, b), "a_id": entries[0].id, "b_id": entries[1].id})


# ---------------------------------------------------------------------------------------------- runs and events

@bp.get("/runs")
def runs():
    return jsonify(runs=catalogue.list_runs(_folder()))


@bp.get("/runs/<run_id>/metrics")
def run_metrics(run_id):
    catalogue.check_run_id(run_id)
    run = catalogue.read_run(_folder(), run_id)
    if run is None:
        raise FileNotFoundError(f"no run {run_id!r}")
    return jsonify(run)


@bp.get("/events")
def events():
    last = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    last = int(last) if last and last.isdigit() else None
    stream = _worker().bus.stream(last_event_id=last)
    return Response(stream, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------------------------------------- serving

def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def positive_gb(text):
    """argparse type of --max-memory-gb: a positive, finite number of gigabytes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of GB, got {text!r}")
    return value


def processes_flag(text):
    try:
        return check_processes(int(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if text.strip().lstrip("-").isdigit() else
                                         f"expected a whole number of processes, got {text!r}") from None


def build_parser():
    p = OneLineParser(prog="app.py", description="ARC Autoencoder Lab web app")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; other than loopback needs --token")
    p.add_argument("--port", type=int, default=5002)
    p.add_argument("--checkpoint-dir", default="checkpoints", metavar="FOLDER",
                   help="the local folder every run's checkpoints go into (--mirror uploads them elsewhere)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--dataset", default="arcagi", choices=("arcagi", "arcagi2"))
    data.add_argument("--data-dir", default="", help="folder of ARC task JSON files")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--nproc-per-node", type=processes_flag, default=1, metavar="N", help="a run's default number of "
                   "processes (the page's processes field): 1 trains in the server's worker thread; more launch a "
                   "process group (torch.distributed, as torchrun does), one process per GPU or CPU share")
    p.add_argument("--token", default=os.environ.get("ARC_LAB_TOKEN"),
                   help="access token required for changes and downloads (or ARC_LAB_TOKEN)")
    p.add_argument("--allowed-host", dest="allowed_hosts", action="append", default=[], metavar="NAME",
                   help="a host name the server answers to, besides its own address (repeatable; default: none)")
    p.add_argument("--max-memory-gb", type=positive_gb, default=None, metavar="GB",
                   help="refuse runs estimated to need more memory than this (default: what is free)")
    p.add_argument("--shutdown-timeout", type=shutdown.seconds, default=shutdown.DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="on SIGTERM or SIGINT, the saves in flight get this long to finish; those still unwritten "
                        "then are abandoned (nothing partial is left)")
    p.add_argument("--mirror", default="", metavar="URL", help="also upload every checkpoint, once durable here, "
                   "to this fsspec URL (e.g. s3://bucket/prefix), in the background")
    p.add_argument("--mirror-retention", choices=mirror.RETENTION_CHOICES, default="both",
                   help="what retention or a delete removes here it removes on the mirror too (both), or not (local)")
    p.add_argument("--mirror-retries", type=retries_flag, default=mirror.RETRIES, metavar="N",
                   help=f"a failed upload, delete or restore is tried again up to N times (0-{mirror.MAX_RETRIES}), "
                   f"after {mirror.FIRST_BACKOFF:g} s, then twice as long each time, at most {mirror.MAX_BACKOFF:g} "
                   f"s; then it waits for the next start (default {mirror.RETRIES})")
    p.add_argument("--storage-options", default="", metavar="JSON", help="fsspec options for --mirror's store; "
                   "credentials otherwise come from AWS_* variables or AWS_PROFILE")
    p.add_argument("--access-log", action="store_true", help="log a line per request (off: the log keeps to "
                   "start-up, warnings and errors, and the saves at exit)")
    return p


def open_mirror(args):
    """--mirror's Mirror, checked at start-up (RemoteError: wrong credentials, no bucket, no endpoint), or None."""
    if not args.mirror:
        return None
    target = remote.ObjectRoot(args.mirror, remote.parse_storage_options(args.storage_options))
    target.check()
    return mirror.Mirror(args.checkpoint_dir, target, publish=None, retention=args.mirror_retention,
                         attempts=args.mirror_retries + 1)


def main(argv=None):
    from werkzeug.serving import make_server
    args = build_parser().parse_args(argv)
    if not is_loopback(args.host) and not args.token:
        print(f"app.py: error: refusing to listen on {args.host} without an access token: anyone on the network "
              "could start runs and read checkpoints. Pass --token or set ARC_LAB_TOKEN.", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    requests_log = logging.getLogger("werkzeug")
    if not args.access_log:
        requests_log.setLevel(logging.WARNING)  # Werkzeug's errors still show; a line per request does not
    if not sys.stderr.isatty():
        colour = re.compile(r"\x1b\[[0-9;]*m")

        def without_colour(record):  # Werkzeug colours a request line by its status, even into a file or a pipe
            record.msg, record.args = colour.sub("", record.getMessage()), None
            return True
        requests_log.addFilter(without_colour)
    try:
        check_local_root(args.checkpoint_dir)
        uploads = open_mirror(args)
    except (ValueError, remote.RemoteError) as e:
        print(f"app.py: error: {e}", file=sys.stderr)
        return 2
    app = create_app({"CHECKPOINT_DIR": args.checkpoint_dir, "DATASET": args.dataset, "DATA_DIR": args.data_dir,
                      "DEVICE": args.device, "TOKEN": args.token, "BIND_HOST": args.host,
                      "ALLOWED_HOSTS": tuple(args.allowed_hosts),
                      "MAX_MEMORY_GB": args.max_memory_gb, "SHUTDOWN_TIMEOUT": args.shutdown_timeout,
                      "PROCESSES": args.nproc_per_node, "MIRROR": uploads})
    # Werkzeug's threaded server (no debugger, no reloader): a thread per connection, so streams never starve.
    server = make_server(args.host, args.port, app, threaded=True)
    worker, timeout = app.extensions["trainer"], app.config["SHUTDOWN_TIMEOUT"]
    since = []  # the last event id when the signal came: the save outcomes after it are reported

    def stop():  # in the signal watcher's thread, as server.shutdown() must be (serve_forever runs in this one)
        since.append(worker.bus.last_id)
        server.shutdown()

    doing = f"stopping the server, and training at the next step; the saves in flight get up to {timeout:g} s to finish"
    print(f"ARC Autoencoder Lab: http://{args.host}:{server.server_port}", flush=True)
    with shutdown.SignalWatcher("app.py", doing, stop) as signals:
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # where signals could not be watched (main() run outside the main thread)
            pass
        finally:
            worker.shutdown(timeout)
        if signals.received:
            for line in shutdown.save_lines(worker.save_outcomes(since[0] if since else worker.bus.last_id)):
                print(line, file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
