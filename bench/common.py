"""Shared helpers for the benches: repo on sys.path, headers, verdicts, percentiles, and a CPU-load watch.

The machine has 2 cores and other work may run on it; every bench prints how busy the rest of the machine was
while it measured, so a figure taken under load can be told from one taken on an idle machine.
"""
import logging
import os
import platform
import shlex
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

logging.disable(logging.CRITICAL)  # the benches print their own figures; library warnings would interleave

import torch  # noqa: E402  (after the sys.path insertion on purpose)

from checkpoint_manager import CheckpointManager, CheckpointPolicy  # noqa: E402


def header(title, argv=None):
    """Print the bench title, the exact command line and the machine it runs on."""
    argv = sys.argv if argv is None else argv
    print(f"== {title}")
    print(f"command: python {shlex.join(argv)}   (cwd {os.getcwd()})")
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"Python {platform.python_version()}")


def verdict(ok):
    return "MET" if ok else "NOT MET"


def caveat(others, threshold=0.25):
    """Suffix for a verdict measured while other processes used `others` cores."""
    if others < threshold:
        return ""
    return f"  [UNRELIABLE: other processes used {others:.2f} cores meanwhile; re-run on an idle machine]"


def percentile(values, q):
    """q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _machine_busy_ticks():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle


def _own_ticks():
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime of every thread of this process


class LoadWatch:
    """Cores kept busy by other processes (and by this one) between start() and report()."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start()

    def start(self):
        self.t0, self.busy0, self.own0 = time.monotonic(), _machine_busy_ticks(), _own_ticks()

    def read(self):
        wall = max(time.monotonic() - self.t0, 1e-9)
        own = (_own_ticks() - self.own0) / self.hz / wall
        others = max(0.0, (_machine_busy_ticks() - self.busy0) / self.hz / wall - own)
        return own, others

    def line(self):
        own, others = self.read()
        note = "" if others < 0.15 else "  <-- the machine was shared: absolute figures are pessimistic"
        return (f"load while measuring: this bench {own:.2f} cores, other processes {others:.2f} cores "
                f"(of {os.cpu_count()}){note}")


def idle_check(seconds=1.0):
    """Cores used by other processes over a short sample before a bench starts."""
    watch = LoadWatch()
    time.sleep(seconds)
    return watch.read()[1]


def wait_for_idle(max_seconds, threshold=0.25):
    """Wait (up to max_seconds) until other processes use under `threshold` cores; return (waited s, their load)."""
    started, others = time.monotonic(), idle_check(0.5)
    while others >= threshold and time.monotonic() - started < max_seconds:
        others = idle_check(1.0)
    return time.monotonic() - started, others


def add_wait_option(parser):
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each measurement, wait up to SECONDS for other processes to leave the cores idle")


def fmt_ms(seconds):
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def capture_fields(trainer, kind, name):
    """The save_full_checkpoint keyword arguments Trainer._snapshot builds for this step (tensors still live)."""
    if trainer.manager is not None:  # during a run: the record carries the run's own policy state
        return trainer._snapshot(kind, name)
    # Outside a run the snapshot still needs a manager's state; this one is never started, so it writes nothing.
    trainer.manager = CheckpointManager(trainer.checkpoint_dir, trainer.run_id, CheckpointPolicy(),
                                        trainer.publish, trainer._snapshot)
    try:
        return trainer._snapshot(kind, name)
    finally:
        trainer.manager = None


def torchrun_worker(out_path, threads, prefix, measure):
    """One rank of a bench's torchrun launch: join the group, run measure(context, data, folder) on the bundled
    data in a temporary folder, rank 0 writes its result as JSON to out_path; then leave as train.py does."""
    import json
    import tempfile

    import distributed
    from data import load_data
    torch.set_num_threads(threads)
    context = distributed.from_environment("cpu")
    try:
        data = load_data("arcagi", None)
        with tempfile.TemporaryDirectory(prefix=prefix) as folder:
            result = measure(context, data, folder)
        if context.is_primary:
            with open(out_path, "w", encoding="utf-8") as f:
                json.dump(result, f)
    finally:
        context.close()
    distributed.leave(0)
