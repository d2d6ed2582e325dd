"""Scaling on one machine: 1 process of 2 threads against 2 processes of 1 thread (DDP, FSDP2), one global batch.

    python bench/scaling.py           # 5 rounds of the 3 rows, 5 warm-up + 30 timed steps each (about 4-5 minutes)
    python bench/scaling.py --quick   # 1 round, 3 warm-up + 8 timed steps (under a minute)

Each row is a fresh launch of this script's worker (`--worker`): plain python for 1 process, torchrun
(`python -m torch.distributed.run --nproc-per-node 2`, gloo) for 2. The worker goes through the Trainer's public
API: Trainer(config, data, "cpu", tmp, publish, dist=distributed.from_environment("cpu")), setup(), train(), with
the sync meters below set on trainer.model between setup() and train(), and a stop put on trainer.commands; the
config is the default TrainConfig (the ~2 M-parameter reconstruction/communication model, batch 64 = the global
batch of every row) on ARC-AGI-1, with periodic, autosave and final saves off. A step's time is the gap between two
consecutive "batch" events on rank 0 (everything the loop does per step); after the last timed step rank 0 queues a
"stop", so no validation and no checkpoint falls inside or after the timing. Rows of a round run one after another
(their order rotates between rounds) so that load from other processes hits them alike; figures are medians over
the rounds in which other processes kept under 0.25 cores busy (all rounds if none was), and "vs (a)" is the median
of those rounds' ratios; every round is printed too.

Gradient sync, measured during the timed steps of the 2-process rows (every rank; rank 0's shown):
  ddp: a DDP comm hook (model.register_comm_hook) wrapping default_hooks.allreduce_hook: payload = the bytes of
       each bucket's buffer; time = from launching a bucket's all-reduce to its future completing (gloo runs it
       on its own thread, so this may overlap the rest of backward), overlapping buckets counted once.
  fsdp: FSDPModule.set_custom_all_gather / set_custom_reduce_scatter with comms that call the same
       dist.all_gather_single / dist.reduce_scatter_single as FSDP2's defaults do, timed around the call
       (FSDP2 makes both calls blocking here: one parameter group, no prefetch); payload = the unsharded tensor
       each covers (the all-gather's output, the reduce-scatter's input).
Both times include waiting for the other rank to reach the collective. What a rank sends for a payload of B bytes
over 2 ranks: an all-reduce about B (ring: 2(N-1)/N B); an all-gather and a reduce-scatter B/2 each, though gloo
runs a CPU reduce-scatter as an all-reduce of the whole input (seen in torch.profiler traces), about B.
Not counted: the Trainer's own small collectives (pooled metrics, batch-norm statistics, the command broadcast).
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from common import (REPO, _machine_busy_ticks, add_wait_option, caveat, header, idle_check, percentile, verdict,
                    wait_for_idle, torchrun_worker)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model import count_parameters  # noqa: E402
from train import TrainConfig, Trainer  # noqa: E402

TARGET = 0.85  # 2 processes of 1 thread: at least this share of 1 process of 2 threads' examples/s
ROWS = (  # (label, processes, threads per process, strategy)
    ("(a) 1 process x 2 threads", 1, 2, "auto"),
    ("(b) 2 processes x 1 thread, ddp", 2, 1, "ddp"),
    ("(c) 2 processes x 1 thread, fsdp", 2, 1, "fsdp"),
)
LAUNCH_TIMEOUT = 600
QUIET = 0.25  # cores other processes may use during a round that counts


# ---------------------------------------------------------------------------------------------- the worker

class SyncMeter:
    """Gradient-sync collectives of the timed steps: (kind, payload bytes, start, end) each."""

    def __init__(self, trainer, first_step, last_step):
        self.trainer, self.first_step, self.last_step = trainer, first_step, last_step
        self.calls = []

    def timing(self):
        """Whether the step under way is timed (global_step counts the steps already done)."""
        return self.first_step <= self.trainer.global_step < self.last_step

    def summary(self, steps):
        spans = sorted((start, end) for _, _, start, end in self.calls)
        busy, reach = 0.0, None  # the union of the spans: buckets in flight at once count once
        for start, end in spans:
            if reach is None or start > reach:
                busy, reach = busy + end - start, end
            elif end > reach:
                busy, reach = busy + end - reach, end
        kinds = {}
        for kind, nbytes, start, end in self.calls:
            entry = kinds.setdefault(kind, {"calls": 0, "bytes": 0, "seconds": 0.0})
            entry["calls"] += 1
            entry["bytes"] += nbytes
            entry["seconds"] += end - start
        return {"seconds_per_step": busy / steps, "bytes_per_step": sum(c[1] for c in self.calls) / steps,
                "calls_per_step": len(self.calls) / steps,
                "kinds": {k: {n: v / steps for n, v in e.items()} for k, e in kinds.items()}}


def ddp_hook(meter):
    """DDP's own all-reduce of a bucket, its payload and its launch-to-completion time recorded."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(process_group, bucket):
        timed, nbytes, started = meter.timing(), bucket.buffer().nbytes, time.perf_counter()
        future = allreduce_hook(process_group, bucket)

        def done(f):
            if timed:
                meter.calls.append(("all_reduce", nbytes, started, time.perf_counter()))
            return f.value()

        return future.then(done)

    return hook


class TimedAllGather:
    """FSDP2's parameter all-gather through dist.all_gather_single, timed (duck-types fsdp's AllGather)."""

    def __init__(self, meter):
        self.meter = meter

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        started = time.perf_counter()
        work = dist.all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)
        if work is not None:
            work.wait()  # timed to completion; FSDP2 asks for a blocking one here anyway (no prefetch)
        if self.meter.timing():
            self.meter.calls.append(("all_gather", output_tensor.nbytes, started, time.perf_counter()))
        return work


class TimedReduceScatter(TimedAllGather):
    """FSDP2's gradient reduce-scatter through dist.reduce_scatter_single, timed (fsdp's ReduceScatter)."""

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        started = time.perf_counter()
        work = dist.reduce_scatter_single(output=output_tensor, input=input_tensor, op=op, group=group,
                                          async_op=async_op)
        if work is not None:
            work.wait()
        if self.meter.timing():
            self.meter.calls.append(("reduce_scatter", input_tensor.nbytes, started, time.perf_counter()))
        return work


def measure(context, data, strategy, warmup, steps, checkpoint_dir):
    """warmup + steps optimizer steps through the Trainer; rank 0's step times, every rank's sync figures."""
    config = TrainConfig(device="cpu", strategy=strategy, max_steps=warmup + steps + 1, checkpoint_every_epochs=0,
                         autosave_minutes=0.0, save_on_stop=False)
    stamps = {}

    def publish(event):  # rank 0's only
        if event["type"] == "batch":
            stamps[event["global_step"]] = time.perf_counter()
            if event["global_step"] == warmup + steps:
                trainer.commands.put({"type": "stop"})

    trainer = Trainer(config, data, context.device, checkpoint_dir, publish, dist=context)
    trainer.setup()
    if warmup + steps >= len(trainer.train_batches):
        raise ValueError(f"{warmup + steps} steps would reach the end of an epoch "
                         f"({len(trainer.train_batches)} batches) and its validation")
    meter = SyncMeter(trainer, warmup, warmup + steps)
    if context.world_size > 1 and strategy == "ddp":
        trainer.model.register_comm_hook(state=None, hook=ddp_hook(meter))
    elif context.world_size > 1:
        trainer.model.set_custom_all_gather(TimedAllGather(meter))
        trainer.model.set_custom_reduce_scatter(TimedReduceScatter(meter))
    trainer.train()
    sync = context.gather_objects(meter.summary(steps) if context.world_size > 1 else None)
    if not context.is_primary:
        return None
    gaps = [stamps[s] - stamps[s - 1] for s in range(warmup + 1, warmup + steps + 1)]
    return {"world_size": context.world_size, "threads": torch.get_num_threads(), "strategy": strategy,
            "params": count_parameters(trainer.raw_model), "batch_size": config.batch_size, "steps": steps,
            "seconds": sum(gaps), "rate": config.batch_size * steps / sum(gaps),
            "median_rate": config.batch_size / percentile(gaps, 50), "sync": sync}


def worker(args):
    torchrun_worker(args.out, args.threads, "bench-scaling-", lambda context, data, folder: measure(
        context, data, args.strategy, args.warmup, args.steps, folder))


# ---------------------------------------------------------------------------------------------- the driver

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ticks_with_children():
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15])  # utime, stime, and those of the children waited for


def launch(row, warmup, steps, folder):
    """One row in fresh processes; rank 0's figures, the launch's wall time and other processes' load meanwhile."""
    label, processes, threads, strategy = row
    out = os.path.join(folder, f"{strategy}-{processes}-{time.monotonic_ns()}.json")
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--strategy", strategy, "--threads",
               str(threads), "--warmup", str(warmup), "--steps", str(steps), "--out", out]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
                        "127.0.0.1", "--master-port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    hz, t0, machine0, own0 = os.sysconf("SC_CLK_TCK"), time.monotonic(), _machine_busy_ticks(), _ticks_with_children()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    wall = time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    others = max(0.0, (_machine_busy_ticks() - machine0 - (_ticks_with_children() - own0)) / hz / wall)
    with open(out, encoding="utf-8") as f:
        return {**json.load(f), "wall": wall, "others": others}


def launch_once_more(row, warmup, steps, folder, wait_idle):
    """launch(), tried a second time after a failure, whose telling lines are printed (nothing is hidden)."""
    for attempt in (1, 2):
        if wait_idle:
            wait_for_idle(wait_idle)
        try:
            return launch(row, warmup, steps, folder)
        except RuntimeError as e:
            if attempt == 2:
                raise
            lines = str(e).splitlines()
            clues = [line.strip() for line in lines if any(w in line for w in ("terminate", "Error", "exitcode"))]
            print(f"note: {lines[0]} launched again; it said: {' | '.join(clues[-4:])}", flush=True)


def fmt_bytes(n):
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of fewer steps: under a minute")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the 3 rows (default 5; --quick 1)")
    add_wait_option(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=30, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    warmup, steps = (3, 8) if args.quick else (5, 30)
    rounds = args.rounds or (1 if args.quick else 5)
    header("scaling on one machine: 1 process x 2 threads vs 2 processes x 1 thread (ddp, fsdp), real Trainer")
    print(f"target: 2 processes >= {TARGET:.2f}x the examples/s of 1 process, at the same global batch")
    print(f"plan: {rounds} round(s) of the {len(ROWS)} rows, each a fresh launch: {warmup} warm-up steps "
          f"(not timed) + {steps} timed steps, default TrainConfig (batch {TrainConfig().batch_size}), ARC-AGI-1")
    print(f"before start: other processes kept {idle_check():.2f} cores busy")
    started = time.perf_counter()
    results = {row[0]: [] for row in ROWS}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as folder:
        for r in range(rounds):
            for row in ROWS[r % len(ROWS):] + ROWS[:r % len(ROWS)]:
                results[row[0]].append(launch_once_more(row, warmup, steps, folder, args.wait_idle))

    # Rounds in which another process kept a core busy make 2 threads look worse than they are: the table and
    # the verdicts take the quiet rounds alone when there are any (every round is listed below it).
    quiet = [r for r in range(rounds) if max(results[row[0]][r]["others"] for row in ROWS) < QUIET]
    kept = quiet or list(range(rounds))
    base = [results[ROWS[0][0]][r] for r in kept]
    print()
    print(f"{'row':<34}{'examples/s':>11}{'(median step)':>15}{'vs (a)':>8}{'(median)':>10}{'sync/step':>11}"
          f"{'of step':>9}{'payload/step':>14}{'launch':>8}{'others':>8}")
    verdicts = []
    for label, processes, _, _ in ROWS:
        runs = [results[label][r] for r in kept]
        rate = statistics.median(r["rate"] for r in runs)
        median_rate = statistics.median(r["median_rate"] for r in runs)
        ratio = statistics.median(r["rate"] / b["rate"] for r, b in zip(runs, base))
        median_ratio = statistics.median(r["median_rate"] / b["median_rate"] for r, b in zip(runs, base))
        timed = [r for r in runs if r["sync"][0]]
        seconds = statistics.median(r["sync"][0]["seconds_per_step"] for r in timed) if timed else None
        share = statistics.median(r["sync"][0]["seconds_per_step"] * r["steps"] / r["seconds"] for r in timed) \
            if timed else None
        payload = statistics.median(r["sync"][0]["bytes_per_step"] for r in timed) if timed else None
        others = max(r["others"] for r in runs)
        print(f"{label:<34}{rate:>11.1f}{median_rate:>15.1f}{ratio:>7.2f}x{median_ratio:>9.2f}x"
              f"{'-' if seconds is None else f'{seconds * 1000:.1f} ms':>11}"
              f"{'-' if share is None else f'{share:.0%}':>9}{fmt_bytes(payload):>14}"
              f"{statistics.median(r['wall'] for r in runs):>7.1f}s{others:>8.2f}")
        if processes > 1:
            verdicts.append((label, ratio, others))
    which = (f"the {len(quiet)} of {rounds} round(s) with other processes under {QUIET} cores" if quiet else
             f"all {rounds} round(s), none of them quiet")
    print(f"(examples/s = global examples of the timed steps / their summed time on rank 0, median over "
          f"{which}; 'median step' = batch / median step time; 'vs (a)' = median of each round's ratio "
          f"to row (a), '(median)' the same of the median steps (less moved by a burst of outside load); "
          f"sync/step and payload/step = gradient-sync collectives of a timed step, rank 0, as the "
          f"docstring says, 'of step' its share of the step time; 'launch' = wall time of the whole launch, "
          f"start-up included; 'others' = cores other processes used meanwhile, the most of any round)")
    if rounds > 1:
        print("every round, examples/s (other processes' cores) and ratio to (a):")
        for label, *_ in ROWS:
            print(f"  {label:<34}" + "   ".join(f"{r['rate']:.1f} ({r['others']:.2f}) {r['rate'] / b['rate']:.2f}x"
                                              for r, b in zip(results[label], results[ROWS[0][0]])))
    print()
    for label, *_ in ROWS[1:]:
        first = results[label][kept[0]]
        for rank, sync in enumerate(first["sync"]):
            parts = ", ".join(f"{kind} {e['calls']:.0f} call(s) {fmt_bytes(e['bytes'])} {e['seconds'] * 1000:.1f} ms"
                              for kind, e in sync["kinds"].items())
            print(f"{label} round {kept[0] + 1} rank {rank}: per step {parts}")
    params = base[0]["params"]
    print(f"model: {params:,} parameters = {fmt_bytes(params * 4)} of float32 (whole gradients once)")
    print()
    print("targets:")
    for label, ratio, others in verdicts:
        print(f"  {label}: {ratio:.2f}x of (a); >= {TARGET:.2f}x: {verdict(ratio >= TARGET)}{caveat(others)}")
    print(f"total bench time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
