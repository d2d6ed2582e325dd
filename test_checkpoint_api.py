"""Talk to a running ARC Autoencoder Lab from the terminal: status, save, periodic saves, list.

    python test_checkpoint_api.py                     # interactive menu
    python test_checkpoint_api.py --status
    python test_checkpoint_api.py --save "before lr change"     # waits, then prints where it is
    python test_checkpoint_api.py --save ""                     # named by its position when saved
    python test_checkpoint_api.py --every 60 --count 10         # one line per save's outcome
    python test_checkpoint_api.py --list | head

This is a user script, not a pytest module (pytest collects tests/ only).
"""
import argparse
import os
import sys
import time

import requests

DEFAULT_URL = "http://127.0.0.1:5002"
SAVE_WAIT_SECONDS = 300.0


class ApiError(Exception):
    """The server is down or answered an error; the message is one line for the user."""


class LabClient:
    def __init__(self, url, token=None):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _call(self, method, path, body=None, timeout=10):
        try:
            response = requests.request(method, self.url + path, json=body, headers=self.headers, timeout=timeout)
        except requests.RequestException as e:
            raise ApiError(f"cannot reach the server at {self.url} ({type(e).__name__}); is `python app.py` running?")
        try:
            payload = response.json()
        except ValueError:
            raise ApiError(f"{method} {path}: HTTP {response.status_code}, not a JSON answer") from None
        if response.status_code >= 400:
            raise ApiError(f"{method} {path}: HTTP {response.status_code}: {payload.get('error', payload)}")
        return payload

    def status(self):
        return self._call("GET", "/status")

    def save(self, name=None, wait_seconds=SAVE_WAIT_SECONDS):
        """Ask for a save and wait until it is written: its outcome (path, size, sha256, position, seconds)."""
        body = {"wait": True, "timeout": wait_seconds, **({"name": name} if name else {})}
        answer = self._call("POST", "/save_checkpoint", body, timeout=wait_seconds + 10)
        if answer.get("timed_out"):
            raise ApiError(f"save {answer.get('name') or answer['request_id']} is still {answer['state']} after "
                           f"{wait_seconds:g} s; ask again with GET /save_requests/{answer['request_id']}")
        return answer

    def list(self):
        return self._call("GET", "/list_checkpoints")["checkpoints"]


def show_status(client):
    s = client.status()
    val = s.get("val") or {}
    train = s.get("train") or {}
    print(f"phase {s['phase']}{' (paused)' if s.get('paused') else ''}  epoch {s['epoch']}/{s.get('epochs')}  "
          f"batch {s['batch']}/{s.get('batches_per_epoch')}  step {s['global_step']}  "
          f"loss {_num(train.get('loss'))}  val_loss {_num(val.get('loss'))}  val_acc {_num(val.get('acc'))}")


def save(client, name=None):
    answer = client.save(name)
    print(f"saved {answer['id']} at epoch {answer['epoch']}, batch {answer['batch']}, step {answer['global_step']} "
          f"in {answer['seconds']:.2f} s: {answer['path']} ({answer['size'] / 1e6:.2f} MB, "
          f"sha256 {answer['sha256'][:12]}...)", flush=True)
    return answer


def show_list(client):
    rows = client.list()
    if not rows:
        print("no checkpoints yet")
        return
    print(f"{'run':22} {'name':32} {'kind':9} {'epoch':>5} {'batch':>5} {'val_loss':>9} {'size MB':>8}  created")
    for r in rows:
        flag = "  REFUSED" if r.get("refused") else "  DAMAGED" if r.get("damaged") else ""
        print(f"{str(r.get('run_id'))[:22]:22} {r['name'][:32]:32} {str(r.get('kind')):9} {str(r.get('epoch')):>5} "
              f"{str(r.get('batch')):>5} {_num(r.get('val_loss')):>9} {(r.get('size') or 0) / 1e6:8.2f}  "
              f"{r.get('created_at')}{flag}")


def save_every(client, seconds, count):
    """count saves, one every `seconds`; each outcome is one line, a failed one does not stop the rest."""
    failed = 0
    for i in range(count):
        if i:
            time.sleep(seconds)
        try:
            save(client, None)
        except ApiError as e:
            failed += 1
            print(f"save {i + 1}/{count} failed: {e}", flush=True)
    if failed:
        raise ApiError(f"{failed} of {count} saves failed")


def _num(x):
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"


MENU = "[s]tatus  save [n]ow  [p]eriodic saves  [l]ist  [q]uit > "


def interactive(client):
    while True:
        try:
            choice = input(MENU).strip().lower()
        except EOFError:
            return 0
        try:
            if choice == "s":
                show_status(client)
            elif choice == "n":
                save(client, input("name (empty for the default): ").strip() or None)
            elif choice == "p":
                save_every(client, float(input("every how many seconds? ")), int(input("how many saves? ")))
            elif choice == "l":
                show_list(client)
            elif choice == "q":
                return 0
        except ApiError as e:
            print(f"error: {e}")
        except ValueError:
            print("error: expected a number")


def main(argv=None):
    p = argparse.ArgumentParser(description="Status, saves and listing against a running ARC Autoencoder Lab")
    p.add_argument("--url", default=DEFAULT_URL)
    p.add_argument("--token", default=os.environ.get("ARC_LAB_TOKEN"), help="access token, if the server has one")
    p.add_argument("--status", action="store_true", help="print the status and exit")
    p.add_argument("--save", metavar="NAME", help="save a checkpoint with this name (\"\" names it by its position) "
                   "and wait until it is written")
    p.add_argument("--list", action="store_true", help="list checkpoints")
    p.add_argument("--every", type=float, metavar="SECONDS", help="save every SECONDS seconds (with --count)")
    p.add_argument("--count", type=int, default=1, help="how many periodic saves")
    args = p.parse_args(argv)
    if args.every is not None and (args.every <= 0 or args.count < 1):
        p.error("--every needs a positive number of seconds and --count at least 1")
    client = LabClient(args.url, args.token)
    try:
        code = _run(args, client)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not as a traceback at exit
        return code
    except BrokenPipeError:  # `--list | head`: the reader left; nothing more to say, and no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(args, client):
    try:
        if not (args.status or args.save is not None or args.list or args.every):
            return interactive(client)
        if args.status:
            show_status(client)
        if args.save is not None:
            save(client, args.save or None)
        if args.every:
            save_every(client, args.every, args.count)
        if args.list:
            show_list(client)
    except ApiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
