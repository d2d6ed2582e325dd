"""Graceful shutdown on SIGTERM and SIGINT, for app.py and train.py alike.

The first signal runs the program's on_signal() in a watcher thread of its own, never inside whatever the main
thread was doing (which may hold a lock on_signal needs), so it may take locks and put commands on queues; a
second signal exits at once with status 130. The signals reach the watcher through signal.set_wakeup_fd: Python's
C-level handler writes each signal's number to a pipe the watcher reads, whatever thread the signal interrupted.
The Python-level handlers do nothing, so no KeyboardInterrupt is ever raised in the middle of a step or a save.
"""
import argparse
import logging
import math
import os
import signal
import sys
import threading

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_AT_ONCE = 130  # a second signal: 128 + SIGINT, what shells report for an interrupted program
DEFAULT_TIMEOUT = 30.0  # seconds the saves in flight get to finish


def seconds(text):
    """argparse type of --shutdown-timeout: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more seconds, got {text!r}")
    return value


def _ignore(signum, frame):
    """The Python-level handler: the watcher thread does the work."""


class SignalWatcher:
    """While entered: the first SIGTERM or SIGINT prints what happens now and calls on_signal() in the watcher
    thread; a second one exits at once (130). `received` names the first signal, None before one. then() changes
    what a first signal does, for a program whose stages stop differently (training, then uploads).

    Signals can only be caught in the main thread; entered in another, it changes nothing."""

    def __init__(self, prog, doing, on_signal):
        self.prog = prog
        self._action = (doing, on_signal)  # one tuple, so the watcher thread never sees half a change
        self.received = None
        self._installed = False

    def then(self, doing, on_signal):
        """From now on a first signal says `doing` and calls on_signal()."""
        self._action = (doing, on_signal)

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # set_wakeup_fd needs it: a signal handler never blocks
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)  # before the handlers
        self._previous = {s: signal.signal(s, _ignore) for s in SIGNALS}
        self._thread = threading.Thread(target=self._watch, name="signal-watcher", daemon=True)
        self._thread.start()
        self._installed = True
        return self

    def __exit__(self, *exc):
        if not self._installed:
            return
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write)  # the watcher reads end-of-file and ends
        self._thread.join(5)
        os.close(self._read)
        self._installed = False

    def _watch(self):
        while data := os.read(self._read, 64):
            for number in data:
                if number in SIGNALS:
                    self._received(signal.Signals(number).name)

    def _received(self, name):
        if self.received is not None:
            print(f"{self.prog}: {name}, a second signal: exiting at once (status {EXIT_AT_ONCE}); a save cut short "
                  "leaves only temporary files, which the next start removes", file=sys.stderr, flush=True)
            os._exit(EXIT_AT_ONCE)
        self.received = name
        doing, on_signal = self._action
        print(f"{self.prog}: {name}: {doing}; send SIGTERM or SIGINT again to exit at once (status "
              f"{EXIT_AT_ONCE})", file=sys.stderr, flush=True)
        try:
            on_signal()
        except Exception:  # the top of this thread: it must live on to serve a second signal
            logger.exception("shutdown on %s failed", name)


def save_lines(events):
    """One line per save that ended during a shutdown, from its checkpoint_saved / checkpoint_error events:
    "saved RUN_ID:NAME at step S" or "abandoned RUN_ID:NAME: reason"; one line saying so when there was none."""
    lines = {}
    for event in events:
        ident = event.get("id") or f"{event.get('run_id')}:{event.get('name')}"
        key = (ident, event.get("request_id"))
        if event["type"] == "checkpoint_saved":
            lines[key] = f"saved {ident} at step {event.get('global_step')}"
        elif event["type"] == "checkpoint_error" and not lines.get(key, "").startswith("saved "):
            lines[key] = f"abandoned {ident}: {event.get('error')}"  # an error after the save: retention failed
    return list(lines.values()) or ["no save was in flight"]
