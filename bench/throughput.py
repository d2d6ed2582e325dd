"""Training throughput of the default model through the real Trainer: every task and bottleneck in precision 32 and
bf16-mixed, eager and compiled, side by side in one run, against the machine's matmul peak measured in the same run.

    python bench/throughput.py           # 4 modes x 6 task/bottlenecks, 10 + 40 steps a row (about 43 minutes:
                                         # each compiled row spends 76-102 s compiling)
    python bench/throughput.py --quick   # eager rows (32, bf16-mixed) of reconstruction and selection with the
                                         # message, 3 + 10 steps (under a minute)
    python bench/throughput.py --tasks selection --bottlenecks communication   # one pair, all 4 modes

Each row runs in a process of its own (so that its peak resident memory is its own, and each compile starts from
an empty inductor cache, as a user's first run does): one Trainer(config, data, "cpu", tmp, publish).train() with
max_steps. A step's time is the gap between two consecutive "batch" events (everything the loop does per step);
gaps holding a validation, or a step in which dynamo compiled a new graph, are left out. Batch building is timed
by wrapping the trainer's train_batches.batch and _to_device.

GFLOP per example: torch.utils.flop_counter.FlopCounterMode around whole eager training steps (forward, backward,
Adam) of 4 batches before the timed run; a compiled row does the same arithmetic and is given its eager twin's
figure. Achieved GFLOP/s = GFLOP per example x examples/s. The peak is a 2048 x 2048 matmul in float32 and in
bfloat16 on this process's threads, best of 5, measured before the rows and again after them.

Where the time goes: an eager row's profile (torch.profiler over 5 steps) gives the share of its time spent in
oneDNN's convolutions and matmuls, the kernels inductor calls unchanged on CPU, and so the rate inside them. Compile
can only shrink the rest, so 1 / that share bounds what it can gain ("compile's ceiling"). The profiler's cost per op
inflates the small ops, so the share is a lower bound, and the ceiling and the rate inside the kernels upper bounds.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from common import LoadWatch, add_wait_option, caveat, header, idle_check, percentile, verdict, wait_for_idle

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from data import load_data  # noqa: E402
from model import BOTTLENECK_TYPES, TASK_TYPES, count_parameters  # noqa: E402
from train import TrainConfig, Trainer  # noqa: E402

MODES = (("32", False), ("bf16-mixed", False), ("32", True), ("bf16-mixed", True))
BF16_TARGET = 1.8  # bf16-mixed examples/s over 32's, on reconstruction and selection
PEAK_SHARE_TARGET = 0.40  # the best mode's achieved GFLOP/s over the bf16 matmul peak
COMPILE_TARGET = 1.2  # compiled examples/s over the eager twin's
OLD_TARGETS = {"reconstruction": 200.0, "selection": 100.0}  # examples/s at precision 32, an earlier round's
BUILD_SHARE_TARGET = 0.05
FLOP_BATCHES = 4
PROFILE_STEPS = 5
# The kernels inductor hands to oneDNN unchanged on CPU: what compiling cannot make faster.
LIBRARY_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::mm", "aten::addmm", "aten::bmm",
               "aten::_convolution", "aten::cudnn_convolution", "aten::linear_backward")


def mode_name(precision, compiled):
    return precision + ("+compile" if compiled else "")


# ---------------------------------------------------------------------------------------------- the machine's peak

def matmul_peak(dtype, device="cpu", repeats=5):
    """GFLOP/s of the best of `repeats` square matmuls in dtype: 2048 wide on a CPU, 8192 on a GPU (a smaller one
    leaves a large GPU's cores idle)."""
    size = 8192 if device == "cuda" else 2048
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    torch.mm(a, b)  # warm-up: oneDNN or cuBLAS picks its kernel on the first call
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best / 1e9


def sync(device):
    """Wait for the GPU's queued work, so that a clock read after it has seen it done."""
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- one row (a child)

def flops_per_example(trainer):
    """FLOPs of whole eager training steps on the first FLOP_BATCHES batches, per example."""
    loss_fn, flops, examples = trainer.task.loss, 0, 0
    for index in range(FLOP_BATCHES):
        batch = trainer._to_device(trainer.train_batches.batch(0, index))
        with FlopCounterMode(display=False) as counter:
            trainer._train_step(trainer.model, loss_fn, batch)
        flops += counter.get_total_flops()
        examples += len(next(iter(batch.values())))
    return flops / examples


def library_share(trainer):
    """Share of PROFILE_STEPS training steps' CPU time spent in LIBRARY_OPS (their own time, not their children's).
    The profiler's cost per op inflates the many small ops around the kernels, so this is a lower bound of the
    kernels' share (and 1 / share an upper bound of what compiling the rest can gain)."""
    loss_fn = trainer.task.loss
    batches = [trainer._to_device(trainer.train_batches.batch(0, i)) for i in range(PROFILE_STEPS)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for batch in batches:
            trainer._train_step(trainer.model, loss_fn, batch)
    events = profile.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in LIBRARY_OPS) / total


def memory_mb(device, peak):
    """This process's resident memory on a CPU, or the GPU memory it allocated; now or at its peak."""
    if device == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2 ** 20
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def graphs_compiled():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def measure(data, task, bottleneck, precision, compiled, warmup, steps, device):
    """Train warmup + steps optimizer steps in one mode; return the figures of the timed steps."""
    config = TrainConfig(task_type=task, bottleneck_type=bottleneck, precision=precision, compile=compiled,
                         max_steps=warmup + steps, device=device)
    stamps, validations, sizes, build, compile_events = [], [], {}, {}, []
    state = {"step": None}
    watch = LoadWatch()  # from the last warm-up step: compiling runs in worker processes, which are not "others"

    def publish(event):
        if event["type"] == "batch":
            sync(device)
            stamps.append((time.perf_counter(), event["global_step"], graphs_compiled()))
            if event["global_step"] == warmup:
                watch.start()
        elif event["type"] == "validation":
            validations.append(time.perf_counter())
        elif event["type"] == "compile":
            compile_events.append(event)

    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as folder:
        trainer = Trainer(config, data, device, folder, publish)
        trainer.setup()
        flops = None if compiled else flops_per_example(trainer)
        setup_mb = memory_mb(device, peak=False)
        real_batch, real_to_device = trainer.train_batches.batch, trainer._to_device

        def timed_batch(epoch, index):
            started = time.perf_counter()
            batch = real_batch(epoch, index)
            step = trainer.global_step + 1  # the step this batch is for
            build[step] = time.perf_counter() - started
            sizes[step] = len(next(iter(batch.values())))
            state["step"] = step
            return batch

        def timed_to_device(batch):
            started = time.perf_counter()
            moved = real_to_device(batch)
            if state["step"] is not None:  # only the training batch just built, not validation batches
                build[state["step"]] += time.perf_counter() - started
                state["step"] = None
            return moved

        trainer.train_batches.batch, trainer._to_device = timed_batch, timed_to_device
        trainer.train()
        others = watch.read()[1]
        peak_mb = memory_mb(device, peak=True)
        trainer.train_batches.batch, trainer._to_device = real_batch, real_to_device
        trainer.manager = None  # closed with the run; the profiled steps below save nothing
        share = None if compiled or device == "cuda" else library_share(trainer)

    gaps, compiling = [], 0  # (seconds, step) of timed steps; timed steps in which a new graph was compiled
    for (t0, _, graphs0), (t1, step, graphs1) in zip(stamps, stamps[1:]):
        if step <= warmup or any(t0 < v < t1 for v in validations):
            continue
        if graphs1 > graphs0:
            compiling += 1
            continue
        gaps.append((t1 - t0, step))
    seconds = sum(g for g, _ in gaps)
    done = [e for e in compile_events if e["compiled"]]
    return {
        "task": task, "bottleneck": bottleneck, "precision": precision, "compiled": compiled,
        "params": count_parameters(trainer.model), "steps": len(gaps), "compiling_steps": compiling,
        "rate": sum(sizes[s] for _, s in gaps) / seconds,
        "median_rate": config.batch_size / percentile([g for g, _ in gaps], 50),
        "build_share": sum(build[s] for _, s in gaps) / seconds,
        "flops_per_example": flops, "library_share": share,
        "compile_seconds": done[0]["seconds"] if done else None,
        "fell_back": [e["reason"] for e in compile_events if not e["compiled"]],
        "graphs": graphs_compiled() if compiled else None,
        "setup_mb": setup_mb, "peak_mb": peak_mb, "others": others,
    }


def run_row(args):
    task, bottleneck, precision, compiled = args.row
    torch.set_num_threads(args.threads)
    data = load_data("arcagi")
    result = measure(data, task, bottleneck, precision, compiled == "compile", args.warmup, args.steps, args.device)
    print("ROW " + json.dumps(result), flush=True)


def row_in_child(task, bottleneck, precision, compiled, warmup, steps, threads, device):
    """One row in a fresh process with an empty inductor cache of its own."""
    with tempfile.TemporaryDirectory(prefix="bench-inductor-") as cache:
        command = [sys.executable, os.path.abspath(__file__), "--row", task, bottleneck, precision,
                   "compile" if compiled else "eager", "--warmup", str(warmup), "--steps", str(steps),
                   "--threads", str(threads), "--device", device]
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"row {task}/{bottleneck}/{mode_name(precision, compiled)} failed: {tail[0]}")
    return json.loads(lines[-1][4:])


# ---------------------------------------------------------------------------------------------- the table

def print_rows(rows, peaks):
    print(f"{'task':<22}{'bottleneck':<14}{'mode':<20}{'examples/s':>11}{'x 32':>7}{'GFLOP/step':>11}"
          f"{'GFLOP/s':>9}{'of peak':>8}{'of bf16':>8}{'peak MB':>9}{'+ train MB':>11}{'build':>7}"
          f"{'compile':>9}{'others':>7}")
    for r in rows:
        base = twin(rows, r, "32", False)
        flops = r["flops"]
        gflops = flops * r["rate"] / 1e9
        peak = peaks["bf16" if r["precision"] == "bf16-mixed" else "32"]
        compile_s = f"{r['compile_seconds']:.0f}s" if r["compile_seconds"] is not None else \
            ("eager!" if r["fell_back"] else "-")
        print(f"{r['task']:<22}{r['bottleneck']:<14}{mode_name(r['precision'], r['compiled']):<20}"
              f"{r['rate']:>11.1f}{r['rate'] / base['rate']:>6.2f}x{flops * 64 / 1e9:>11.2f}{gflops:>9.1f}"
              f"{gflops / peak:>8.1%}{gflops / peaks['bf16']:>8.1%}{r['peak_mb']:>9.0f}"
              f"{r['peak_mb'] - r['setup_mb']:>11.0f}{r['build_share']:>7.1%}{compile_s:>9}{r['others']:>7.2f}")
    print("(examples/s = examples / summed step time of the timed steps; x 32 = over the same task/bottleneck at "
          "precision 32, eager; GFLOP/step = FlopCounterMode GFLOP per example x batch 64 (a compiled row: its eager "
          "twin's); of peak = achieved over the matmul peak of the row's dtype, of bf16 = over the bf16 peak; peak "
          "MB = the row's process's peak resident memory, + train MB = its rise after setup; build = batch building's "
          "share of step time; compile = seconds to compile and run the first step; others = cores other processes "
          "used during the timed steps)")


def twin(rows, row, precision, compiled):
    return next(r for r in rows if (r["task"], r["bottleneck"], r["precision"], r["compiled"]) ==
                (row["task"], row["bottleneck"], precision, compiled))


def print_targets(rows, peaks):
    print("\ntargets:")
    for task in ("reconstruction", "selection"):
        pairs = [(r, twin(rows, r, "32", False)) for r in rows
                 if r["task"] == task and r["precision"] == "bf16-mixed" and not r["compiled"]]
        if not pairs:
            continue
        shown = ", ".join(f"{r['bottleneck']} {r['rate'] / base['rate']:.2f}x" for r, base in pairs)
        ok = all(r["rate"] / base["rate"] >= BF16_TARGET for r, base in pairs)
        print(f"  bf16-mixed >= {BF16_TARGET}x the examples/s of 32, {task}: {shown}: {verdict(ok)}"
              f"{caveat(max(r['others'] for r, _ in pairs))}")
    best = max(rows, key=lambda r: r["flops"] * r["rate"])
    share = best["flops"] * best["rate"] / 1e9 / peaks["bf16"]
    print(f"  best mode >= {PEAK_SHARE_TARGET:.0%} of the bf16 matmul peak ({peaks['bf16']:.0f} GFLOP/s): "
          f"{best['task']}/{best['bottleneck']}/{mode_name(best['precision'], best['compiled'])} at {share:.1%}: "
          f"{verdict(share >= PEAK_SHARE_TARGET)}")
    for r in rows:
        if not r["compiled"] and r["library_share"]:
            print(f"    why, {r['task']}/{r['bottleneck']}/{r['precision']}: {kernel_line(r, peaks)}")


def kernel_line(row, peaks):
    """Where an eager row's time goes: its convs' and matmuls' share of the step, and the rate inside them."""
    # FlopCounterMode counts convs' and matmuls' FLOPs alone; with the share a lower bound, this is an upper bound
    inside = row["flops"] * row["rate"] / row["library_share"] / 1e9
    peak = peaks["bf16" if row["precision"] == "bf16-mixed" else "32"]
    return (f"oneDNN convs and matmuls hold {row['library_share']:.0%} of the step and run at {inside:.0f} GFLOP/s "
            f"inside ({inside / peak:.0%} of the {row['precision']} peak); the other {1 - row['library_share']:.0%} "
            f"is casts, elementwise ops, softmax, Adam and the loop")
    compiled = [r for r in rows if r["compiled"]]
    if not compiled:
        print(f"  compile >= {COMPILE_TARGET}x its eager twin: not measured (no compiled rows in this run)")
    for r in compiled:
        eager = twin(rows, r, r["precision"], False)
        gain = r["rate"] / eager["rate"]
        share = eager["library_share"]
        why = "" if share is None else (f"; oneDNN convs and matmuls hold {share:.0%} of the eager step, so "
                                        f"compile's ceiling is {1 / share:.2f}x")
        print(f"  compile >= {COMPILE_TARGET}x its eager twin, {r['task']}/{r['bottleneck']}/{r['precision']}: "
              f"{gain:.2f}x: {verdict(gain >= COMPILE_TARGET)}{why}; {r['graphs']} graphs, "
              f"{r['compiling_steps']} timed steps compiled anew (left out)")
    for task, goal in OLD_TARGETS.items():
        measured = [r for r in rows if r["task"] == task and r["precision"] == "32" and not r["compiled"]]
        if not measured:
            continue
        shown = ", ".join(f"{r['bottleneck']} {r['rate']:.1f}/s" for r in measured)
        print(f"  an earlier round's: {task} at 32 >= {goal:.0f} examples/s: {shown}: "
              f"{verdict(all(r['rate'] >= goal for r in measured))}")
    worst = max(rows, key=lambda r: r["build_share"])
    print(f"  batch building < {BUILD_SHARE_TARGET:.0%} of step time: worst {worst['build_share']:.2%}: "
          f"{verdict(worst['build_share'] < BUILD_SHARE_TARGET)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="eager rows only, fewer steps: under a minute")
    parser.add_argument("--tasks", nargs="+", choices=TASK_TYPES, default=None,
                        help="default: every task (--quick: reconstruction, selection)")
    parser.add_argument("--bottlenecks", nargs="+", choices=BOTTLENECK_TYPES, default=None,
                        help="default: both (--quick: communication)")
    parser.add_argument("--row", nargs=4, help=argparse.SUPPRESS)  # TASK BOTTLENECK PRECISION eager|compile
    parser.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the rows train; on cuda, memory is the GPU's peak allocation")
    add_wait_option(parser)
    args = parser.parse_args()
    if args.row:
        return run_row(args)
    warmup, steps = (3, 10) if args.quick else (10, 40)
    args.tasks = args.tasks or (["reconstruction", "selection"] if args.quick else list(TASK_TYPES))
    args.bottlenecks = args.bottlenecks or (["communication"] if args.quick else list(BOTTLENECK_TYPES))
    modes = [m for m in MODES if not (args.quick and m[1])]
    header("training throughput by precision and compile, default TrainConfig, ARC-AGI-1, real Trainer path")
    print(f"targets: bf16-mixed >= {BF16_TARGET}x 32 (reconstruction, selection); best mode >= "
          f"{PEAK_SHARE_TARGET:.0%} of the bf16 matmul peak; compile >= {COMPILE_TARGET}x its eager twin or a "
          f"measured reason why not")
    print(f"plan: {len(modes)} modes ({', '.join(mode_name(*m) for m in modes)}) x {len(args.tasks)} tasks x "
          f"{len(args.bottlenecks)} bottlenecks, each row a process of its own: {warmup} warm-up + {steps} timed "
          f"steps, batch_size {TrainConfig().batch_size}, {args.threads} threads"
          + ("; --quick leaves out the compiled rows (each spends about a minute compiling)" if args.quick else ""))
    print(f"before start: other processes kept {idle_check():.2f} cores busy")
    started = time.perf_counter()
    peaks = {"32": matmul_peak(torch.float32, args.device), "bf16": matmul_peak(torch.bfloat16, args.device)}
    rows = []
    for task in args.tasks:
        for bottleneck in args.bottlenecks:
            for precision, compiled in modes:
                if args.wait_idle:
                    wait_for_idle(args.wait_idle)
                rows.append(row_in_child(task, bottleneck, precision, compiled, warmup, steps, args.threads,
                                         args.device))
                row = rows[-1]
                eager = row if not compiled else twin(rows, row, precision, False)
                row["flops"] = eager["flops_per_example"]
                print(f"# {task}/{bottleneck}/{mode_name(precision, compiled)}: {rows[-1]['rate']:.1f} examples/s",
                      file=sys.stderr, flush=True)
    after = {"32": matmul_peak(torch.float32, args.device), "bf16": matmul_peak(torch.bfloat16, args.device)}
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} threads"
    print(f"\nmatmul peak, best of 5, {where}: float32 {peaks['32']:.1f} GFLOP/s, "
          f"bfloat16 {peaks['bf16']:.1f} GFLOP/s (after the rows: {after['32']:.1f} / {after['bf16']:.1f})\n")
    print_rows(rows, peaks)
    busiest = max(rows, key=lambda r: r["others"])
    print(f"load: other processes kept at most {busiest['others']:.2f} cores busy during a row"
          f"{caveat(busiest['others'])}")
    print_targets(rows, peaks)
    print(f"total bench time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
