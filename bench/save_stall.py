"""What a checkpoint save costs the training thread: the real Trainer and CheckpointWriter, a >= 100 MB state.

    python bench/save_stall.py           # 4 rounds x 5 saves on the big model, prototypes, default model (minutes)
    python bench/save_stall.py --quick   # 1 round x 3 saves, default model, no prototypes (about a minute)
    python bench/save_stall.py --dcp-only [--quick] [--strategy fsdp]   # the 2-process DCP row alone
    python bench/save_stall.py --mirror-only [--quick]   # the default model with and without --mirror to S3

One Trainer.train() per scenario, driven between steps from its publish() callback (which runs on the training
thread). Each round runs, in turn: quiet steps (no save); back-to-back asynchronous saves (the next "save" command
is queued as soon as the writer is idle); synchronous saves of the same checkpoint (torch.save to a file + fsync,
in the training thread); a plain write + fsync of the same byte count, once in a background thread while training
goes on and once with training held. Rounds interleave the modes, so load from other processes hits them alike.
Validation is switched off in this bench's Trainer subclass (steps and saves only).

With --mirror-only, the default model runs twice side by side: as above, and with every save also uploaded by a
mirror.Mirror to moto's S3 server (a process of its own on a loopback port, as the tests run it) while training
goes on: (f) compares the two stalls.

Then a 2-process row (DCP folders), in a fresh launch of this script's worker under torchrun (`--dcp-worker OUT`:
`python -m torch.distributed.run --nproc-per-node 2 --standalone`, gloo, 1 thread per process): the big model
under ddp (--strategy), one Trainer per rank built with distributed.from_environment("cpu"), driven from rank 0's
publish() as above. Per round: quiet steps; asynchronous saves through the real path ({"type": "save"} on rank 0's
trainer.commands, broadcast to every rank: Trainer._snapshot -> ShardWriter.start -> dcp.async_save with async
staging, committed by rank 0's writer), the next queued once rank 0's writer is idle; synchronous
torch.distributed.checkpoint.save of the same distributed.sharded_state(model, optimizer) into a fresh folder,
in the training thread between steps (a bench command broadcast like a save). The first save of each kind warms
DCP up and is not counted. Stall per save, two ways: (1) the time each rank's training thread spends in the save
path (the save command, rank 0's wait_for_copies, and wait_staged before optimizer.step; the dcp.save call for a
synchronous one), the larger rank's, as the ranks move in step: the definition of (a), and verdict (e); (2) rank
0's time for the step that served the save (its command, forward, backward, wait_staged, optimizer.step) minus
the median quiet step: what training lost, CPU taken by the save's background threads included; it gets a verdict
too. Beside them: each rank's CPU in those steps over a quiet step's, its training thread's and its other threads'.
"""
import argparse
import contextlib
import errno
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from common import (REPO, LoadWatch, _machine_busy_ticks, add_wait_option, capture_fields, caveat, fmt_ms, header,
                    idle_check, percentile, verdict, wait_for_idle, torchrun_worker)

import torch  # noqa: E402

import catalogue  # noqa: E402
import checkpoint as ckpt  # noqa: E402
import checkpoint_manager  # noqa: E402
import dcp_checkpoint  # noqa: E402
import distributed  # noqa: E402
import mirror  # noqa: E402
import remote  # noqa: E402
import store  # noqa: E402
from checkpoint_manager import CheckpointManager, CheckpointPolicy  # noqa: E402
from data import load_data  # noqa: E402
from model import count_parameters  # noqa: E402
from train import TrainConfig, Trainer  # noqa: E402

BIG = {"latent_dim": 640}  # parameters + two Adam moments: about 134 MB of float32
STALL_RATIO_TARGET, THROUGHPUT_TARGET, WRITE_SPEED_TARGET, DEFAULT_STALL_TARGET = 0.05, 0.95, 0.7, 0.020
CHUNK = 4 << 20

# What install() replaces, by the module the writer threads look each name up in.
_PATCHED = {ckpt: ("_Crc32Off", "_HashingFile", "save_full_checkpoint", "write_checkpoint", "open_for_checkpoint"),
            checkpoint_manager: ("clone_tensors", "CheckpointWriter")}
_original = {name: getattr(module, name) for module, names in _PATCHED.items() for name in names}


class Log:
    """Everything one scenario records; lists of (start, end, ...) in perf_counter seconds."""

    def __init__(self):
        self.copies, self.writes, self.saves, self.waits = [], [], [], []
        self.sync, self.raw_fg, self.raw_bg = [], [], []
        self.blocks = []  # (mode, t_start, t_end, steps)
        self.current_save = None
        self.copy_cpu, self.write_cpu = [], []  # CPU seconds of the copy / write thread per save
        self.mirrored = []  # the mirror's events, with --mirror-only


# ---------------------------------------------------------------------------------------------- instrumentation

def timed_writer_class(log, writer_nice):
    class TimedWriter(_original["CheckpointWriter"]):
        """The real writer; times the training thread's waits and can lower the write thread's priority."""

        def wait_for_copies(self):
            with self._lock:
                pending = bool(self._pending)
            if not pending:
                return super().wait_for_copies()
            started = time.perf_counter()
            super().wait_for_copies()
            log.waits.append((started, time.perf_counter(), log.current_save))

        def _write_loop(self):
            if writer_nice:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), writer_nice)  # this thread only
            super()._write_loop()

    return TimedWriter


# name: (what it is, write function, nice level of the write thread)
VARIANTS = {
    "current": ("current (O_DIRECT, CRC32 off, SHA-256 beside)", "write_checkpoint", 0),
    "buffered": ("buffered write, CRC32 off, SHA-256 beside", "buffered", 0),
    "before": ("buffered, CRC32 on, SHA-256 in the write thread", "before", 0),
    "path": ("torch.save to a path, then hash the file", "path", 0),
    "nice10": ("write thread at nice 10", "write_checkpoint", 10),
}


def install(log, variant):
    """Patch the module functions the writer threads call, so their work is timed; variant picks the write path."""
    def clone_tensors(value):
        started, cpu = time.perf_counter(), time.thread_time()
        out = _original["clone_tensors"](value)
        log.copies.append((started, time.perf_counter()))
        log.copy_cpu.append(time.thread_time() - cpu)
        return out

    def save_full_checkpoint(*args, **kwargs):
        started, cpu = time.perf_counter(), time.thread_time()
        sidecar = _original["save_full_checkpoint"](*args, **kwargs)
        log.writes.append((started, time.perf_counter(), sidecar["size"]))
        log.write_cpu.append(time.thread_time() - cpu)
        return sidecar

    _, write, nice = VARIANTS[variant]
    checkpoint_manager.clone_tensors, ckpt.save_full_checkpoint = clone_tensors, save_full_checkpoint
    checkpoint_manager.CheckpointWriter = timed_writer_class(log, nice)
    ckpt.write_checkpoint = {"path": write_checkpoint_via_path}.get(write, _original["write_checkpoint"])
    if write in ("buffered", "before"):  # through the page cache, as the module wrote before O_DIRECT
        ckpt.open_for_checkpoint = lambda path: ckpt._BufferedFile(open(path, "wb"))
    if write == "before":  # and further back: torch's CRC32 on, every chunk hashed in line
        ckpt._Crc32Off = contextlib.nullcontext
        ckpt._HashingFile = type("SerialHashingFile", (_original["_HashingFile"],), {"PARALLEL_FROM": float("inf")})


def uninstall():
    for module, names in _PATCHED.items():
        for name in names:
            setattr(module, name, _original[name])


# ---------------------------------------------------------------------------------------------- prototypes

def write_checkpoint_via_path(folder, record, overwrite=False, verify_after_save=False):
    """Prototype: torch.save to a path (C++ file writer, no Python per write), then hash the file from page cache;
    the module's lock and commit (sidecar, then .pth) around it."""
    name = record["name"]
    os.makedirs(folder, exist_ok=True)
    path = ckpt.checkpoint_path(folder, name)
    with ckpt.checkpoint_lock(path):
        had_old = os.path.lexists(path)
        if had_old and not overwrite:
            raise ckpt.CheckpointError(f"a checkpoint named {name!r} already exists; choose another name")
        needed = ckpt.estimate_size(record) * ckpt.SPACE_MARGIN
        if shutil.disk_usage(folder).free < needed:
            raise OSError(errno.ENOSPC, "no space")
        temp = ckpt.temp_path(path)
        try:
            torch.save(record, temp)
            fd = os.open(temp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            old_raw, _ = ckpt.old_sidecar(path)
            sidecar = {**ckpt.metadata_of(record), "file": os.path.basename(path), "size": os.path.getsize(temp),
                       "sha256": ckpt.file_sha256(temp), "verified_at": None}
            ckpt._commit(path, temp, sidecar, had_old, old_raw)
        finally:
            ckpt.remove_quietly(temp)
    return sidecar


# ---------------------------------------------------------------------------------------------- baselines

def raw_write(path, buffer):
    """Plain sequential write of buffer in 4 MiB chunks + fsync; returns seconds."""
    started = time.perf_counter()
    view = memoryview(buffer)
    with open(path, "wb") as f:
        for offset in range(0, len(view), CHUNK):
            f.write(view[offset:offset + CHUNK])
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - started


def capture_record(trainer, name):
    """The exact record the writer would save for this step (fields from Trainer._snapshot, built by the module)."""
    fields = capture_fields(trainer, "manual", name)
    ckpt.write_checkpoint = lambda folder, record, **kwargs: record
    try:
        return _original["save_full_checkpoint"](trainer.manager.folder, **fields, overwrite=True)
    finally:
        ckpt.write_checkpoint = current_write[0]


current_write = [None]  # the write_checkpoint a scenario installed, put back after capture_record


# ---------------------------------------------------------------------------------------------- one scenario

class BenchTrainer(Trainer):
    """The real Trainer with save commands timed and validation off (this bench times steps and saves only)."""

    log = None

    def _handle(self, command):
        if command.get("type") != "save":
            return super()._handle(command)
        self.log.current_save = len(self.log.saves)
        started = time.perf_counter()
        super()._handle(command)  # CheckpointManager.on_request: Trainer._snapshot, then submit to the writer
        self.log.saves.append((started, time.perf_counter()))

    def _validate(self, model, loss_fn):
        pass


def run_scenario(data, overrides, rounds, saves_per_round, quiet_steps, variant="current", sync=True, wait_idle=0,
                 mirror_to=None):
    """Train with the round plan on the training thread; returns the Log. mirror_to (a remote.ObjectRoot): every
    save is also uploaded there in the background, as --mirror does."""
    if wait_idle:
        wait_for_idle(wait_idle)
    log = Log()
    watch = LoadWatch()
    config = TrainConfig(**overrides, epochs=100_000)
    folder = tempfile.mkdtemp(prefix="bench-save-")
    trainer = BenchTrainer(config, data, "cpu", folder, publish=lambda e: None)
    trainer.log = log
    uploads = None if mirror_to is None else mirror.Mirror(folder, mirror_to, log.mirrored.append).start()
    checkpoints = catalogue.checkpoint_folder(folder, trainer.run_id)  # the baselines' files go beside its saves
    stamps = []

    def script():
        yield from range(3)  # warm-up steps, not timed
        for r in range(rounds):
            start, n0 = stamps[-1], len(stamps)
            for _ in range(quiet_steps):
                yield
            log.blocks.append(("quiet", start, stamps[-1], len(stamps) - n0))
            start, n0 = stamps[-1], len(stamps)
            for i in range(saves_per_round):
                trainer.commands.put({"type": "save", "name": f"stall-{i % 2}", "overwrite": True})
                yield  # the next step serves the command: snapshot, then the copy overlaps its forward/backward
                while trainer.manager.writer.busy():
                    yield
            log.blocks.append(("async", start, stamps[-1], len(stamps) - n0))
            for i in range(saves_per_round if sync else 0):
                started = time.perf_counter()
                record = capture_record(trainer, "sync")
                with open(os.path.join(checkpoints, "sync.pth"), "wb") as f:
                    torch.save(record, f)
                    f.flush()
                    os.fsync(f.fileno())
                log.sync.append((started, time.perf_counter()))
                del record
                yield
            with open(os.path.join(checkpoints, "stall-0.pth"), "rb") as f:
                buffer = f.read()  # the checkpoint's own bytes: a virtual disk may treat zeros specially
            size = len(buffer)
            for _ in range(2 if sync else 0):
                log.raw_fg.append((raw_write(os.path.join(checkpoints, "raw-fg"), buffer), size))
                yield
            start, n0 = stamps[-1], len(stamps)
            for _ in range(saves_per_round):
                done = []
                thread = threading.Thread(target=lambda: done.append(raw_write(os.path.join(checkpoints, "raw-bg"),
                                                                               buffer)))
                thread.start()
                while thread.is_alive():
                    yield
                log.raw_bg.append((done[0], size))
            log.blocks.append(("plain", start, stamps[-1], len(stamps) - n0))
            buffer = None  # let the next round read its own copy; this one is large
        trainer.commands.put({"type": "stop"})
        while True:
            yield

    steps = script()

    def publish(event):
        if event["type"] == "batch":
            stamps.append(time.perf_counter())
            next(steps)
        elif uploads is not None:
            uploads.follow(event)

    trainer.publish = publish
    install(log, variant)
    current_write[0] = ckpt.write_checkpoint
    try:
        trainer.setup()
        trainer.train()
    finally:
        uninstall()
        if uploads is not None:
            uploads.close(timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
    log.others = watch.read()[1]
    log.params = count_parameters(trainer.model)
    log.state_bytes = trainer.checkpoint_estimate()
    return log


def summarize(log):
    """Per-save stalls, throughput per mode, write speeds."""
    stall, submit_only, wait_total = [], [], []
    for i, (s0, s1) in enumerate(log.saves):
        waited = sum(w1 - w0 for w0, w1, idx in log.waits if idx == i)
        stall.append(s1 - s0 + waited)
        submit_only.append(s1 - s0)
        wait_total.append(waited)
    sync = [t1 - t0 for t0, t1 in log.sync]
    rate, span = {}, {}
    for mode in ("quiet", "async", "plain"):
        blocks = [b for b in log.blocks if b[0] == mode]
        span[mode] = sum(b[2] - b[1] for b in blocks)
        rate[mode] = sum(b[3] for b in blocks) / span[mode]
    writes = [(t1 - t0, size) for t0, t1, size in log.writes]
    speed = sum(size for _, size in writes) / sum(t for t, _ in writes)
    return {
        "stall": stall, "save_call": submit_only, "wait": wait_total, "sync": sync, "rate": rate,
        "write_speed": speed, "write_s": [t for t, _ in writes], "copy_s": [t1 - t0 for t0, t1 in log.copies],
        "size": writes[0][1] if writes else 0, "copy_cpu": log.copy_cpu, "write_cpu": log.write_cpu,
        "writer_cores": (sum(log.copy_cpu) + sum(log.write_cpu)) / span["async"],
        # training seconds lost per save: the back-to-back blocks' time minus what their steps took when quiet
        "lost_per_save": (span["async"] - sum(b[3] for b in log.blocks if b[0] == "async") / rate["quiet"])
        / max(len(log.saves), 1),
        "raw_fg": sum(s for _, s in log.raw_fg) / sum(t for t, _ in log.raw_fg) if log.raw_fg else None,
        "raw_bg": sum(s for _, s in log.raw_bg) / sum(t for t, _ in log.raw_bg) if log.raw_bg else None,
    }


def print_summary(title, log, s):
    p = lambda xs, q: percentile(xs, q)  # noqa: E731
    print(f"-- {title}: {log.params:,} parameters, state with Adam {log.state_bytes / 1e6:.1f} MB, "
          f"checkpoint file {s['size'] / 1e6:.1f} MB, {len(s['stall'])} async + {len(s['sync'])} sync saves; "
          f"other processes used {log.others:.2f} cores meanwhile")
    print(f"   training-thread stall per async save (save command incl. snapshot, submit + wait_for_copies): "
          f"p50 {fmt_ms(p(s['stall'], 50))}  p95 {fmt_ms(p(s['stall'], 95))}  max {fmt_ms(max(s['stall']))}")
    print(f"     of which the save command (Trainer._snapshot: state_dict, rng state; submit): "
          f"p50 {fmt_ms(p(s['save_call'], 50))}  p95 {fmt_ms(p(s['save_call'], 95))};  "
          f"wait_for_copies: p50 {fmt_ms(p(s['wait'], 50))}  "
          f"p95 {fmt_ms(p(s['wait'], 95))}")
    print(f"   synchronous torch.save + fsync of the same record in the training thread: "
          f"p50 {fmt_ms(p(s['sync'], 50))}  p95 {fmt_ms(p(s['sync'], 95))}")
    print(f"   background copy (clone_tensors) per save: p50 {fmt_ms(p(s['copy_s'], 50))}; write thread "
          f"(save_full_checkpoint) per save: p50 {fmt_ms(p(s['write_s'], 50))}  p95 {fmt_ms(p(s['write_s'], 95))}")
    print(f"   CPU per save: copy thread p50 {fmt_ms(p(s['copy_cpu'], 50))}, write thread p50 "
          f"{fmt_ms(p(s['write_cpu'], 50))} (thread CPU time); the writer threads kept {s['writer_cores']:.2f} cores "
          f"busy during the back-to-back blocks")
    print(f"   steps/s: quiet {s['rate']['quiet']:.3f}, saves back to back {s['rate']['async']:.3f} "
          f"(if training lost only the writer's CPU share: {s['rate']['quiet'] * (1 - s['writer_cores'] / 2):.3f}); "
          f"training time lost per save {s['lost_per_save'] * 1000:.0f} ms; beside plain writes + fsync of the same "
          f"bytes back to back {s['rate']['plain']:.3f} ({s['rate']['plain'] / s['rate']['quiet']:.3f} of quiet)")
    raw = f"{s['raw_bg'] / 1e6:.0f}" if s["raw_bg"] else "n/a"
    held = f"{s['raw_fg'] / 1e6:.0f}" if s["raw_fg"] else "n/a"
    print(f"   write speed: checkpoint writer {s['write_speed'] / 1e6:.0f} MB/s; plain write + fsync of the same "
          f"bytes {raw} MB/s in a background thread while training ({len(log.raw_bg)} writes), {held} MB/s with "
          f"training held ({len(log.raw_fg)} writes)")


# ---------------------------------------------------------------------------------------------- GIL probe

PROBE = """
import json, sys, time
end, lags = time.perf_counter() + float(sys.argv[1]), []
while time.perf_counter() < end:
    t0 = time.perf_counter()
    time.sleep(0.0005)
    lags.append(time.perf_counter() - t0 - 0.0005)
print(json.dumps(lags))
"""


def _probe_thread(seconds, lags):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        time.sleep(0.0005)
        lags.append(time.perf_counter() - t0 - 0.0005)


def gil_probe(data, seconds):
    """Does the write thread hold the GIL? Two probes sleep 0.5 ms in a loop at the same time: a thread of this
    process (needs the GIL to wake) and a separate process (needs only a CPU). Lateness the thread sees beyond the
    process's is GIL waiting. No training runs: idle, then the writer saving the big record back to back."""
    trainer = Trainer(TrainConfig(**BIG), data, "cpu", tempfile.mkdtemp(prefix="bench-gil-"), lambda e: None)
    trainer.setup()
    manager = CheckpointManager(trainer.checkpoint_dir, trainer.run_id, CheckpointPolicy(), lambda e: None,
                                trainer._snapshot)
    trainer.manager = manager
    manager.start({"phase": "training", "config": trainer.config.to_dict(), "started_at": ckpt.utc_now()})
    results = {}
    for label, write in (("idle", None), ("writer: current", _original["write_checkpoint"]),
                         ("writer: torch.save to path", write_checkpoint_via_path)):
        ckpt.write_checkpoint = write or _original["write_checkpoint"]
        other = subprocess.Popen([sys.executable, "-c", PROBE, str(seconds)], stdout=subprocess.PIPE, text=True)
        lags = []
        thread = threading.Thread(target=_probe_thread, args=(seconds, lags))
        thread.start()
        while thread.is_alive():
            if write:
                manager.on_request("gil", overwrite=True)
                manager.writer.flush()
            else:
                time.sleep(0.05)
        thread.join()
        results[label] = (lags, json.loads(other.communicate()[0]))
    ckpt.write_checkpoint = _original["write_checkpoint"]
    manager.close()
    shutil.rmtree(trainer.checkpoint_dir, ignore_errors=True)
    return results


# ---------------------------------------------------------------------------------------------- 2 processes: DCP

DCP_PROCESSES, DCP_LAUNCH_TIMEOUT = 2, 900
WARM = "warm"  # the first save of each kind: DCP's first call sets up what later ones reuse; not counted


def plan(quick):
    """(rounds, saves per round, quiet steps per round) of both the one-process scenarios and the DCP row."""
    return (1, 3, 4) if quick else (4, 5, 8)


class DcpLog:
    """What one rank records, in perf_counter seconds: its save commands and synchronous saves (name, start, end),
    its training thread's waits on a save's copy (start, end, index of the save in `saves`), the calls of the
    save path it times (part, start, end), and at each step boundary (global_step, process CPU s, training-thread
    CPU s)."""

    def __init__(self):
        self.saves, self.sync, self.staged, self.waits, self.parts, self.ticks = [], [], [], [], [], []
        self.current_save = None


def timed_part(log, part, function):
    """function, its calls recorded in log.parts as (part, start, end)."""
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            log.parts.append((part, started, time.perf_counter()))
    return timed


class TimedShardWriter(dcp_checkpoint.ShardWriter):
    """The real ShardWriter; times the training thread's wait for a save's staging (before optimizer.step)."""

    log = None

    def start(self, state, path, staging=None):
        return timed_part(self.log, "start", super().start)(state, path, staging)

    def wait_staged(self):
        if not self.staging_pending():
            return super().wait_staged()
        started = time.perf_counter()
        super().wait_staged()
        self.log.staged.append((started, time.perf_counter(), self.log.current_save))


class DcpBenchTrainer(Trainer):
    """The real Trainer on every rank, its save commands timed, plus a bench command for the synchronous dcp.save
    (broadcast from rank 0 as a save is); validation off."""

    log = None

    def _serve_commands(self):
        self.log.ticks.append((self.global_step, time.process_time(), time.thread_time()))
        return super()._serve_commands()

    def _handle(self, command):
        kind = command.get("type")
        if kind == "bench_sync_save":
            self._sync_save(command)
        elif kind == "save":
            self.log.current_save = len(self.log.saves)
            started = time.perf_counter()
            super()._handle(command)  # _decide: rank 0's manager -> _snapshot -> _start_folder_save; the others join
            self.log.saves.append((command["name"], started, time.perf_counter()))
        else:
            super()._handle(command)

    def _sync_save(self, command):
        """The baseline: the same sharded state, saved by dcp.save in this thread on every rank into a new folder."""
        from torch.distributed.checkpoint import FileSystemWriter, save
        started = time.perf_counter()
        save(distributed.sharded_state(self.model, self.optimizer), storage_writer=FileSystemWriter(command["path"]),
             process_group=self.dist.checkpoint_groups[0])
        self.log.sync.append((command["name"], started, time.perf_counter()))

    def _validate(self, model, loss_fn):
        pass


def folder_bytes(path):
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())


def measure_dcp(context, data, folder, strategy, rounds, saves_per_round, quiet_steps, warmup=2):
    """Every rank: the big model trained through the plan that rank 0's publish() drives; on rank 0, the figures
    of every rank (else None)."""
    log = DcpLog()
    TimedShardWriter.log = DcpBenchTrainer.log = log
    dcp_checkpoint.ShardWriter = TimedShardWriter  # what Trainer.__init__ builds its shard_writer from
    checkpoint_manager.CheckpointWriter = timed_writer_class(log, 0)  # rank 0's wait_for_copies, timed
    distributed.sharded_state = timed_part(log, "state", distributed.sharded_state)  # get_state_dict, in the save
    for method in ("broadcast", "gather_objects"):  # the save's decisions and RNG states, on the training's group
        setattr(distributed.DistributedContext, method,
                timed_part(log, "collectives", getattr(distributed.DistributedContext, method)))
    store.FolderStore.stage = timed_part(log, "stage", store.FolderStore.stage)
    config = TrainConfig(**BIG, strategy=strategy, epochs=100_000, checkpoint_every_epochs=0, autosave_minutes=0.0,
                         save_on_stop=False)
    sync_root = os.path.join(folder, "sync")
    gaps, labels, last, requests = {}, {}, [None], iter(range(10**6))

    def async_save(name, kind):
        trainer.commands.put({"type": "save", "name": name, "request_id": f"bench-{next(requests)}",
                              "overwrite": True})
        yield kind  # the next step serves it: snapshot, staging begun, wait_staged before its optimizer.step
        while trainer.manager.writer.busy():  # every rank's part written, then rank 0's commit (record, hashes)
            yield None if kind is None else "in flight"

    def sync_save(name, kind):
        trainer.commands.put({"type": "bench_sync_save", "name": name, "path": os.path.join(sync_root, name)})
        yield kind

    def script():  # yields what the coming step holds: its label, None for a step not counted
        for _ in range(warmup):
            yield None
        yield from async_save(WARM, None)
        yield from sync_save(WARM, None)
        for r in range(rounds):
            for _ in range(quiet_steps):
                yield "quiet"
            for i in range(saves_per_round):
                yield from async_save(f"stall-{i % 2}", "async")
            for i in range(saves_per_round):
                yield from sync_save(f"sync-{r}-{i}", "sync")
        trainer.commands.put({"type": "stop"})
        while True:
            yield None

    steps = script()

    def publish(event):  # rank 0's only (the others' is dropped); batch events come from the training thread
        if event["type"] == "batch":
            now, step = time.perf_counter(), event["global_step"]
            if labels.get(step) is not None:
                gaps.setdefault(labels[step], []).append(now - last[0])
            last[0], labels[step + 1] = now, next(steps)

    trainer = DcpBenchTrainer(config, data, context.device, folder, publish, dist=context)
    trainer.setup()
    trainer.train()
    ranks = context.gather_objects({"saves": log.saves, "sync": log.sync, "staged": log.staged, "waits": log.waits,
                                    "parts": log.parts, "ticks": log.ticks})
    if not context.is_primary:
        return None
    run_folder = catalogue.checkpoint_folder(folder, trainer.run_id)
    return {"world_size": context.world_size, "strategy": context.strategy(strategy),
            "threads": torch.get_num_threads(), "params": count_parameters(trainer.raw_model),
            "state_bytes": trainer.checkpoint_estimate(), "ranks": ranks, "gaps": gaps, "labels": labels,
            "folder_bytes": folder_bytes(dcp_checkpoint.folder_path(run_folder, "stall-0")),
            "sync_bytes": folder_bytes(os.path.join(sync_root, f"sync-{rounds - 1}-0"))}


def dcp_worker(args):
    """One rank of the DCP row, under torchrun; rank 0 writes every rank's figures to args.dcp_worker."""
    torchrun_worker(args.dcp_worker, 1, "bench-dcp-", lambda context, data, folder: measure_dcp(
        context, data, folder, args.strategy, *plan(args.quick)))


def _ticks_with_children():
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15])  # utime, stime, and those of the children waited for


def launch_dcp(quick, strategy, wait_idle):
    """launch_dcp_once(), tried a second time after a failure, whose telling lines are printed (as scaling.py)."""
    for attempt in (1, 2):
        if wait_idle:
            wait_for_idle(wait_idle)
        try:
            return launch_dcp_once(quick, strategy)
        except RuntimeError as e:
            if attempt == 2:
                raise
            lines = str(e).splitlines()
            clues = [line.strip() for line in lines if any(w in line for w in ("terminate", "Error", "exitcode"))]
            print(f"note: {lines[0]} launched again; it said: {' | '.join(clues[-4:])}", flush=True)


def launch_dcp_once(quick, strategy):
    """The DCP row in fresh processes: rank 0's figures, the launch's wall time and other processes' load."""
    with tempfile.TemporaryDirectory(prefix="bench-dcp-out-") as out_folder:
        out = os.path.join(out_folder, "dcp.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(DCP_PROCESSES),
                   "--standalone", os.path.abspath(__file__), "--dcp-worker", out, "--strategy", strategy]
        command += ["--quick"] if quick else []
        hz, t0 = os.sysconf("SC_CLK_TCK"), time.monotonic()
        machine0, own0 = _machine_busy_ticks(), _ticks_with_children()
        done = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=DCP_LAUNCH_TIMEOUT)
        wall = time.monotonic() - t0
        if done.returncode != 0:
            raise RuntimeError(f"the DCP row failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n"
                               f"{done.stderr[-4000:]}")
        others = max(0.0, (_machine_busy_ticks() - machine0 - (_ticks_with_children() - own0)) / hz / wall)
        with open(out, encoding="utf-8") as f:
            return {**json.load(f), "wall": wall, "others": others}


def cpu_by_label(rank, labels):
    """{label: [(training-thread CPU s, other threads' CPU s)]} of one rank's steps (from its step boundaries)."""
    ticks = {step: (process, thread) for step, process, thread in rank["ticks"]}
    out = {}
    for step, label in labels.items():
        if label is not None and step in ticks and step - 1 in ticks:
            (p0, t0), (p1, t1) = ticks[step - 1], ticks[step]
            out.setdefault(label, []).append((t1 - t0, p1 - p0 - (t1 - t0)))
    return out


def cpu_excess(rank, labels, label):
    """(training thread, other threads): median CPU s of a `label` step over the median quiet step, one rank."""
    cpu = cpu_by_label(rank, labels)
    return tuple(statistics.median(x[i] for x in cpu[label]) - statistics.median(x[i] for x in cpu["quiet"])
                 for i in (0, 1))


def summarize_dcp(result):
    """Per-save stalls, the slower rank's (the ranks move in step), and the step-time view of the same saves."""
    def counted(rank):  # [(save command s, waits s)] of the counted saves of one rank
        return [(t1 - t0, sum(w1 - w0 for w0, w1, index in rank["staged"] + rank["waits"] if index == i))
                for i, (name, t0, t1) in enumerate(rank["saves"]) if name != WARM]

    def parts(rank, part):  # seconds of `part` inside each counted save command of one rank
        return [sum(p1 - p0 for name, p0, p1 in rank["parts"] if name == part and t0 <= p0 and p1 <= t1)
                for name, t0, t1 in rank["saves"] if name != WARM]

    per_rank = [counted(rank) for rank in result["ranks"]]
    sync = [[t1 - t0 for name, t0, t1 in rank["sync"] if name != WARM] for rank in result["ranks"]]
    gaps = result["gaps"]
    quiet = statistics.median(gaps["quiet"])
    in_flight = gaps.get("in flight", [])
    labels = {int(step): label for step, label in result["labels"].items()}
    return {
        "cpu_async": [cpu_excess(rank, labels, "async") for rank in result["ranks"]],
        "cpu_sync": [cpu_excess(rank, labels, "sync") for rank in result["ranks"]],
        "stall": [max(c + w for c, w in parts) for parts in zip(*per_rank)],
        "command": [max(c for c, _ in parts) for parts in zip(*per_rank)],
        "wait": [max(w for _, w in parts) for parts in zip(*per_rank)],
        "command_by_rank": [[c for c, _ in rank] for rank in per_rank],
        "state_by_rank": [parts(rank, "state") for rank in result["ranks"]],
        "start_by_rank": [parts(rank, "start") for rank in result["ranks"]],
        "collectives_by_rank": [parts(rank, "collectives") for rank in result["ranks"]],
        "stage_by_rank": [parts(rank, "stage") for rank in result["ranks"]],
        "sync": [max(parts) for parts in zip(*sync)],
        "quiet": quiet, "quiet_p95": percentile(gaps["quiet"], 95),
        "step_async": [g - quiet for g in gaps["async"]], "step_sync": [g - quiet for g in gaps["sync"]],
        "in_flight_steps": len(in_flight) / len(gaps["async"]),
        # what the steps while uploads and commits ran lost against quiet ones, per save
        "lost_in_flight": (sum(in_flight) - len(in_flight) * quiet) / len(gaps["async"]),
    }


def print_dcp(r, s):
    p = lambda xs, q: percentile(xs, q)  # noqa: E731
    ranks = len(r["ranks"])
    print(f"-- {ranks} processes (torchrun --nproc-per-node {ranks} --standalone, gloo, {r['threads']} thread each), "
          f"big model under {r['strategy']}: {r['params']:,} parameters, state with Adam {r['state_bytes'] / 1e6:.1f} "
          f"MB, DCP folder {r['folder_bytes'] / 1e6:.1f} MB (sync save's {r['sync_bytes'] / 1e6:.1f} MB), "
          f"{len(s['stall'])} async + {len(s['sync'])} sync saves; launch {r['wall']:.0f} s, other processes used "
          f"{r['others']:.2f} cores meanwhile")
    print(f"   training-thread stall per async save (save command: Trainer._snapshot, FolderStore.stage, "
          f"ShardWriter.start, RNG gather; + wait_staged, wait_for_copies; the slower rank): "
          f"p50 {fmt_ms(p(s['stall'], 50))}  p95 {fmt_ms(p(s['stall'], 95))}  max {fmt_ms(max(s['stall']))}")
    print(f"     of which the save command: p50 {fmt_ms(p(s['command'], 50))}  p95 {fmt_ms(p(s['command'], 95))} ("
          + ", ".join(f"rank {i} p50 {fmt_ms(p(c, 50))}" for i, c in enumerate(s["command_by_rank"]))
          + f");  waits for the staging copy: p50 {fmt_ms(p(s['wait'], 50))}  p95 {fmt_ms(p(s['wait'], 95))}")
    print("     in the save command, p50 per rank: distributed.sharded_state (get_state_dict) "
          + ", ".join(fmt_ms(p(x, 50)) for x in s["state_by_rank"]) + "; ShardWriter.start (dcp.async_save's call) "
          + ", ".join(fmt_ms(p(x, 50)) for x in s["start_by_rank"]) + "; broadcasts and the RNG gather "
          + ", ".join(fmt_ms(p(x, 50)) for x in s["collectives_by_rank"]) + "; FolderStore.stage (rank 0) "
          + fmt_ms(p(s["stage_by_rank"][0], 50)))
    print(f"   synchronous dcp.save of the same sharded_state in the training thread (the slower rank): "
          f"p50 {fmt_ms(p(s['sync'], 50))}  p95 {fmt_ms(p(s['sync'], 95))}")
    print(f"   rank 0's step time minus the median quiet step ({fmt_ms(s['quiet'])}, quiet p95 "
          f"{fmt_ms(s['quiet_p95'])}): the step serving an async save p50 {fmt_ms(p(s['step_async'], 50))}  "
          f"p95 {fmt_ms(p(s['step_async'], 95))}; a sync save p50 {fmt_ms(p(s['step_sync'], 50))}  "
          f"p95 {fmt_ms(p(s['step_sync'], 95))}; the {s['in_flight_steps']:.1f} steps per save while its upload "
          f"and commit ran lost {s['lost_in_flight'] * 1000:.0f} ms per save in all")
    cpu = lambda pairs: ", ".join(f"rank {i} {t * 1000:+.0f} / {o * 1000:+.0f} ms"  # noqa: E731
                                  for i, (t, o) in enumerate(pairs))
    print(f"   CPU of a step over a quiet one's (median; training thread / the process's other threads): serving an "
          f"async save {cpu(s['cpu_async'])}; a sync save {cpu(s['cpu_sync'])}")
    print(f"   {f'{ranks} processes, DCP':<44}{'stall p50':>11}{'stall p95':>11}{'step +p50':>11}{'step +p95':>11}")
    for what, stall, step in (("async: the real path (dcp.async_save)", s["stall"], s["step_async"]),
                              ("sync: dcp.save in the training thread", s["sync"], s["step_sync"])):
        print(f"   {what:<44}{fmt_ms(p(stall, 50)):>11}{fmt_ms(p(stall, 95)):>11}{fmt_ms(p(step, 50)):>11}"
              f"{fmt_ms(p(step, 95)):>11}")


# ---------------------------------------------------------------------------------------------- main

def print_targets(big, s, small, d):
    """Verdicts (a)-(d): the one-process scenarios."""
    stall_ratio = percentile(s["stall"], 95) / percentile(s["sync"], 95)
    throughput_ratio = s["rate"]["async"] / s["rate"]["quiet"]
    write_ratio = s["write_speed"] / s["raw_bg"]
    print(f"  (a) p95 stall async / p95 sync = {fmt_ms(percentile(s['stall'], 95))} / "
          f"{fmt_ms(percentile(s['sync'], 95))} = {stall_ratio:.4f}  target <= {STALL_RATIO_TARGET}: "
          f"{verdict(stall_ratio <= STALL_RATIO_TARGET)}   "
          f"(p50 ratio {percentile(s['stall'], 50) / percentile(s['sync'], 50):.4f})"
          f"{caveat(big.others)}")
    print(f"  (b) steps/s with saves back to back / without = {s['rate']['async']:.3f} / {s['rate']['quiet']:.3f} = "
          f"{throughput_ratio:.3f}  target >= {THROUGHPUT_TARGET}: {verdict(throughput_ratio >= THROUGHPUT_TARGET)}"
          f"   (beside plain writes + fsync of the same bytes, no checkpoint code: "
          f"{s['rate']['plain'] / s['rate']['quiet']:.3f}){caveat(big.others)}")
    print(f"  (c) writer MB/s / plain write+fsync MB/s (both beside training) = {s['write_speed'] / 1e6:.0f} / "
          f"{s['raw_bg'] / 1e6:.0f} = {write_ratio:.3f}  target >= {WRITE_SPEED_TARGET}: "
          f"{verdict(write_ratio >= WRITE_SPEED_TARGET)}   (vs plain write with training held: "
          f"{s['write_speed'] / s['raw_fg']:.3f}){caveat(big.others)}")
    p95 = percentile(d["stall"], 95)
    print(f"  (d) default model stall per save p50 {fmt_ms(percentile(d['stall'], 50))}, p95 {fmt_ms(p95)}  "
          f"target < {DEFAULT_STALL_TARGET * 1000:.0f} ms: {verdict(p95 < DEFAULT_STALL_TARGET)}{caveat(small.others)}")


def print_dcp_target(folders, f):
    """Verdict (e): the DCP row, by the training thread's time in the save path; the step-time view beside it."""
    ratio = percentile(f["stall"], 95) / percentile(f["sync"], 95)
    step_ratio = percentile(f["step_async"], 95) / percentile(f["step_sync"], 95)
    print(f"  (e) {DCP_PROCESSES} processes ({folders['strategy']}, DCP folders), p95 stall async / p95 sync "
          f"dcp.save = {fmt_ms(percentile(f['stall'], 95))} / {fmt_ms(percentile(f['sync'], 95))} = {ratio:.4f}  "
          f"target <= {STALL_RATIO_TARGET}: {verdict(ratio <= STALL_RATIO_TARGET)}   (p50 ratio "
          f"{percentile(f['stall'], 50) / percentile(f['sync'], 50):.4f}){caveat(folders['others'])}")
    print(f"      by step time over the quiet median, p95 async / p95 sync = {fmt_ms(percentile(f['step_async'], 95))}"
          f" / {fmt_ms(percentile(f['step_sync'], 95))} = {step_ratio:.4f}  target <= {STALL_RATIO_TARGET}: "
          f"{verdict(step_ratio <= STALL_RATIO_TARGET)}{caveat(folders['others'])}")


def measure_mirror(data, rounds, per_round, quiet, wait_idle):
    """(f): the default model's stall without and with every save mirrored to a moto S3 server, side by side."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from s3server import S3Server
    server = S3Server().start()
    try:
        os.environ.update(server.environment())
        target = remote.ObjectRoot(f"s3://{server.new_bucket()}/bench")
        plain = run_scenario(data, {}, rounds, per_round, quiet, wait_idle=wait_idle)
        mirrored = run_scenario(data, {}, rounds, per_round, quiet, wait_idle=wait_idle, mirror_to=target)
    finally:
        server.stop()
    p, m = summarize(plain), summarize(mirrored)
    print_summary("default model, no mirror", plain, p)
    print_summary("default model, --mirror to moto_server", mirrored, m)
    uploaded = [e for e in mirrored.mirrored if e["type"] == "checkpoint_mirrored"]
    failed = [e for e in mirrored.mirrored if e["type"] == "mirror_error"]
    print(f"   mirror: {len(uploaded)} uploads done ({sum(e['size'] for e in uploaded) / 1e6:.0f} MB), "
          f"{len(failed)} failed attempts")
    without, with_mirror = percentile(p["stall"], 95), percentile(m["stall"], 95)
    print(f"  (f) default model stall per save p95 with --mirror {fmt_ms(with_mirror)} / without {fmt_ms(without)} = "
          f"{with_mirror / without:.2f}; with --mirror < {DEFAULT_STALL_TARGET * 1000:.0f} ms: "
          f"{verdict(with_mirror < DEFAULT_STALL_TARGET)}{caveat(mirrored.others)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, 3 saves, no prototypes: about a minute")
    parser.add_argument("--dcp-only", action="store_true",
                        help=f"the {DCP_PROCESSES}-process DCP row alone: no one-process scenario, no prototypes")
    parser.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp"),
                        help=f"what the {DCP_PROCESSES}-process DCP row trains under")
    parser.add_argument("--mirror-only", action="store_true",
                        help="the default model with and without --mirror to a moto S3 server, side by side (f)")
    add_wait_option(parser)
    parser.add_argument("--dcp-worker", default="", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dcp_worker:
        return dcp_worker(args)
    rounds, per_round, quiet = plan(args.quick)
    if args.mirror_only:
        header("checkpoint save stall with --mirror, real Trainer + CheckpointWriter + Mirror")
        print(f"before start: other processes kept {idle_check():.2f} cores busy")
        return measure_mirror(load_data("arcagi"), rounds, per_round, quiet, args.wait_idle)
    one_process = not args.dcp_only
    header("checkpoint save stall, real Trainer + CheckpointWriter")
    print("targets: " + (f"(a) p95 stall ratio async/sync <= {STALL_RATIO_TARGET}; (b) steps/s with saves back to "
                         f"back / without >= {THROUGHPUT_TARGET}; (c) writer MB/s / plain write MB/s >= "
                         f"{WRITE_SPEED_TARGET}; (d) default model stall < {DEFAULT_STALL_TARGET * 1000:.0f} ms; "
                         if one_process else "")
          + f"(e) {DCP_PROCESSES} processes, DCP folders: p95 stall ratio async/sync <= {STALL_RATIO_TARGET}")
    print("plan: " + (f"big model TrainConfig({', '.join(f'{k}={v}' for k, v in BIG.items())}), {rounds} round(s) "
                      f"x ({quiet} quiet steps, {per_round} async saves back to back, {per_round} sync saves, 2 plain "
                      f"writes); then the default model the same way; then " if one_process else "")
          + f"the big model in {DCP_PROCESSES} processes under {args.strategy}, {rounds} round(s) x ({quiet} quiet "
          f"steps, {per_round} async saves, {per_round} sync dcp.save)"
          + ("; then write-path prototypes" if one_process and not args.quick else ""))
    print(f"before start: other processes kept {idle_check():.2f} cores busy")
    started = time.perf_counter()
    data = load_data("arcagi") if one_process else None
    watch = LoadWatch()

    if one_process:
        big = run_scenario(data, BIG, rounds, per_round, quiet, wait_idle=args.wait_idle)
        s = summarize(big)
        print_summary("big model, current writer", big, s)
        small = run_scenario(data, {}, rounds, per_round, quiet, wait_idle=args.wait_idle)
        d = summarize(small)
        print_summary("default model, current writer", small, d)
        print(watch.line())
    folders = launch_dcp(args.quick, args.strategy, args.wait_idle)  # its own load figure: its processes excluded
    f = summarize_dcp(folders)
    print_dcp(folders, f)

    print()
    print("targets (big model, %.0f MB state):" % (folders["state_bytes"] / 1e6))
    if one_process:
        print_targets(big, s, small, d)
    print_dcp_target(folders, f)

    if one_process and not args.quick:
        watch.start()  # from here: the probe and the prototypes (the DCP row's processes would count as others)
        print()
        print("GIL probe (no training; 0.5 ms sleeps): lateness of a thread here (GIL + CPU) vs a separate process "
              "(CPU only)")
        for label, (here, apart) in gil_probe(data, 3.0).items():
            print(f"  {label:<28} thread: p50 {fmt_ms(percentile(here, 50))}  p99 {fmt_ms(percentile(here, 99))}  "
                  f"max {fmt_ms(max(here))}   process: p50 {fmt_ms(percentile(apart, 50))}  "
                  f"p99 {fmt_ms(percentile(apart, 99))}  max {fmt_ms(max(apart))}")
        print()
        print("write-path prototypes on the big model (2 rounds x 3 saves back to back, 5 quiet steps, 3 plain "
              "background writes per round; each row normalised by its own quiet steps; write CPU = write thread "
              "CPU seconds per save, p50):")
        print(f"  {'variant':<40}{'stall p95':>10}{'steps/s ratio':>15}{'lost/save':>11}{'plain steps':>12}"
              f"{'write s p50':>13}{'write CPU':>11}{'writer MB/s':>13}{'plain MB/s':>12}{'write ratio':>13}"
              f"{'others':>8}")
        for variant, (what, _, _) in VARIANTS.items():
            run = run_scenario(data, BIG, 2, 3, 5, variant=variant, sync=False, wait_idle=args.wait_idle)
            v = summarize(run)
            print(f"  {what:<40}{fmt_ms(percentile(v['stall'], 95)):>10}"
                  f"{v['rate']['async'] / v['rate']['quiet']:>15.3f}{v['lost_per_save'] * 1000:>9.0f}ms"
                  f"{v['rate']['plain'] / v['rate']['quiet']:>12.3f}"
                  f"{percentile(v['write_s'], 50):>12.2f}s{percentile(v['write_cpu'], 50):>10.2f}s"
                  f"{v['write_speed'] / 1e6:>13.0f}{v['raw_bg'] / 1e6:>12.0f}{v['write_speed'] / v['raw_bg']:>13.3f}"
                  f"{run.others:>8.2f}{caveat(run.others)}")
        print(watch.line())
    print(f"total bench time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
