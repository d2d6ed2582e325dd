"""How long checkpoint.list_checkpoints takes for a folder of 200 checkpoints, with and without sidecars.

    python bench/list_speed.py           # 200 checkpoints, 20 timed listings (+ 5 without sidecars)
    python bench/list_speed.py --quick   # 200 checkpoints, 5 timed listings (+ 3 without sidecars)

The checkpoints are real records of a tiny selection model, written by checkpoint.save_full_checkpoint with the
fields Trainer._save builds. Without sidecars, listing falls back to torch.load(mmap=True) of every file.
"""
import argparse
import os
import shutil
import tempfile
import time

from common import LoadWatch, capture_fields, caveat, header, idle_check, percentile, verdict

import checkpoint as ckpt  # noqa: E402
from data import load_data  # noqa: E402
from model import count_parameters  # noqa: E402
from train import TrainConfig, Trainer  # noqa: E402

COUNT = 200
TARGET = 0.100  # seconds to list 200 checkpoints with sidecars
TINY = dict(task_type="selection", embedding_dim=4, hidden_dim=8, latent_dim=8, num_conv_layers=3, vocab_size=4,
            max_message_length=2)


def make_folder(folder, data):
    """COUNT checkpoints of a tiny model, with sidecars; returns (parameters, bytes per .pth)."""
    trainer = Trainer(TrainConfig(**TINY), data, "cpu", folder, publish=lambda e: None)
    trainer.setup()
    fields = capture_fields(trainer, "manual", "x")
    for i in range(COUNT):
        kind = ("manual", "periodic", "autosave", "best")[i % 4]
        name = {"manual": f"run {i}", "periodic": f"checkpoint_epoch_{i}", "autosave": f"autosave_step_{i}",
                "best": f"best {i}"}[kind]
        progress = {**fields["progress"], "global_step": i, "epoch": i // 10}
        sidecar = ckpt.save_full_checkpoint(folder, **{**fields, "name": name, "kind": kind, "progress": progress})
    return count_parameters(trainer.model), sidecar["size"]


def time_listing(folder, repeats):
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = ckpt.list_checkpoints(folder)
        times.append(time.perf_counter() - started)
    return times, result


def show(label, times, metas):
    damaged = sum(1 for m in metas if m.get("damaged"))
    steps = [m["global_step"] for m in metas]
    newest_first = steps == sorted(steps, reverse=True)
    print(f"  {label:<38} {len(metas)} listed, {damaged} damaged, newest first: {newest_first}; "
          f"min {min(times) * 1000:.1f} ms  median {percentile(times, 50) * 1000:.1f} ms  "
          f"max {max(times) * 1000:.1f} ms  ({len(times)} runs; {percentile(times, 50) / len(metas) * 1e6:.0f} us "
          f"per checkpoint)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed listings: under a minute")
    args = parser.parse_args()
    repeats, fallback_repeats = (5, 3) if args.quick else (20, 5)
    header("checkpoint.list_checkpoints on 200 checkpoints")
    print(f"target: list {COUNT} checkpoints with sidecars in under {TARGET * 1000:.0f} ms (median of the timed runs)")
    print(f"before start: other processes kept {idle_check():.2f} cores busy")
    started = time.perf_counter()
    data = load_data("arcagi")
    watch = LoadWatch()
    folder = tempfile.mkdtemp(prefix="bench-list-")
    try:
        t0 = time.perf_counter()
        params, size = make_folder(folder, data)
        print(f"wrote {COUNT} checkpoints + sidecars ({params:,}-parameter selection model, {size / 1e3:.0f} kB "
              f"per .pth) in {time.perf_counter() - t0:.1f} s, folder {folder}")
        with_sidecars, metas = time_listing(folder, repeats)
        for entry in os.scandir(folder):
            if entry.name.endswith(".json"):
                os.remove(entry.path)
        without, bare = time_listing(folder, fallback_repeats)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("list_checkpoints:")
    show("with sidecars (reads NAME.json)", with_sidecars, metas)
    show("sidecars removed (torch.load mmap)", without, bare)
    print(watch.line())
    others = watch.read()[1]
    median = percentile(with_sidecars, 50)
    print()
    print("targets:")
    print(f"  with sidecars: median {median * 1000:.1f} ms for {COUNT}, target < {TARGET * 1000:.0f} ms: "
          f"{verdict(median < TARGET)}   (max {max(with_sidecars) * 1000:.1f} ms: "
          f"{verdict(max(with_sidecars) < TARGET)})"
          f"{caveat(others)}")
    fallback = percentile(without, 50)
    print(f"  without sidecars (fallback, no target of its own): median {fallback * 1000:.1f} ms = "
          f"{fallback / median:.1f}x the sidecar path; under {TARGET * 1000:.0f} ms too: {verdict(fallback < TARGET)}")
    print(f"total bench time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
