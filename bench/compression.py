"""What each save option costs and saves: size, write and read speed, and the training thread's stall per save.

    python bench/compression.py           # 4 saves per option, the default model and the 135 MB one (minutes)
    python bench/compression.py --quick   # 2 saves per option (under a minute)

One Trainer.train() per model (the default config, and save_stall.py's BIG one: about 134 MB of weights and Adam
moments), driven between steps from its publish() callback as save_stall.py drives it: after 3 warm-up steps,
for each option (contents x compression) in turn, back-to-back saves through the real path ({"type": "save"} on
trainer.commands: Trainer._snapshot, the CheckpointManager, the writer's copy and write threads), the next queued
once the writer is idle. The two names of each option alternate, overwriting, so every save replaces a file as a
manual save with overwrite does.

Per option: the file's size relative to full (uncompressed); write MB/s, the uncompressed record's bytes over the
seconds the writer thread spent in ckpt.save_full_checkpoint (build the record, cast, torch.save through zstd,
hash, fsync, commit); read MB/s, the same bytes over the seconds ckpt.load_checkpoint takes on one of its files
(verification, decompression and torch.load; the page cache is warm); the stall per save, as save_stall.py
measures it: the time the training thread spends in the save command plus its waits for the snapshot's copy
(median over the saves).
"""
import argparse
import os
import shutil
import statistics
import tempfile
import time

from common import LoadWatch, header

import checkpoint as ckpt  # noqa: E402
import checkpoint_manager  # noqa: E402
from data import load_data  # noqa: E402
from model import count_parameters  # noqa: E402
from save_stall import BIG, BenchTrainer, Log, timed_writer_class  # noqa: E402
from train import TrainConfig  # noqa: E402

OPTIONS = [(contents, compression) for contents in ckpt.CONTENTS for compression in ckpt.COMPRESSIONS]
MODELS = (("default model", {}), ("135 MB model (save_stall.py's BIG)", BIG))


def option_label(contents, compression):
    return contents + (" + zstd" if compression == "zstd" else "")


def timed_writes(writes):
    """ckpt.save_full_checkpoint timed: the writer thread looks it up on the module at each save."""
    original = ckpt.save_full_checkpoint

    def save_full_checkpoint(*args, **kwargs):
        started = time.perf_counter()
        sidecar = original(*args, **kwargs)
        writes.append((kwargs.get("contents", "full"), kwargs.get("compression", "none"),
                       time.perf_counter() - started, sidecar))
        return sidecar
    return original, save_full_checkpoint


def run_model(data, overrides, saves_per_option):
    """Train with the save plan; (per-option figures, parameters, the run's folder to remove)."""
    log, writes = Log(), []
    folder = tempfile.mkdtemp(prefix="bench-compression-")
    trainer = BenchTrainer(TrainConfig(**overrides, epochs=100_000, checkpoint_every_epochs=0), data, "cpu", folder,
                           publish=lambda e: None)
    trainer.log = log
    saves_of = {}  # option -> indices into log.saves

    def script():
        yield from range(3)  # warm-up steps
        for contents, compression in OPTIONS:
            for i in range(saves_per_option):
                saves_of.setdefault((contents, compression), []).append(len(log.saves))
                trainer.commands.put({"type": "save", "name": f"{contents} {compression} {i % 2}", "overwrite": True,
                                      "contents": contents, "compression": compression})
                yield  # the next step serves it
                while trainer.manager.writer.busy():
                    yield
        trainer.commands.put({"type": "stop"})
        while True:
            yield

    steps = script()
    trainer.publish = lambda event: next(steps) if event["type"] == "batch" else None
    original_writer = checkpoint_manager.CheckpointWriter
    original_save, timed = timed_writes(writes)
    checkpoint_manager.CheckpointWriter, ckpt.save_full_checkpoint = timed_writer_class(log, 0), timed
    try:
        trainer.setup()
        trainer.train()
    finally:
        checkpoint_manager.CheckpointWriter, ckpt.save_full_checkpoint = original_writer, original_save
    return figures(log, writes, saves_of, trainer), count_parameters(trainer.model), folder


def figures(log, writes, saves_of, trainer):
    """Per option: size, payload (uncompressed) bytes, write and read seconds, median stall."""
    stalls = [s1 - s0 + sum(w1 - w0 for w0, w1, idx in log.waits if idx == i) for i, (s0, s1) in enumerate(log.saves)]
    out = {}
    for option in OPTIONS:
        mine = [(seconds, sidecar) for contents, compression, seconds, sidecar in writes
                if (contents, compression) == option]
        sidecar = mine[-1][1]
        path = os.path.join(trainer.manager.folder, sidecar["file"])
        payload = sidecar.get("payload_size", sidecar["size"])
        started = time.perf_counter()
        ckpt.load_checkpoint(path)
        out[option] = {"size": sidecar["size"], "payload": payload,
                       "write_speed": payload * len(mine) / sum(seconds for seconds, _ in mine),
                       "read_speed": payload / (time.perf_counter() - started),
                       "stall": statistics.median(stalls[i] for i in saves_of[option])}
    return out


def print_table(models):
    """One row per option, the models side by side."""
    width = 52
    print(f"\n{'option':<22}" + "".join(f"{'| ' + name:<{width}}" for name, _, _ in models))
    print(f"{'':<22}" + f"{'| size (vs full)':<21}{'write':>10}{'read':>10}{'stall':>9}  " * len(models))
    for option in OPTIONS:
        cells = []
        for _, _, result in models:
            r, full = result[option], result[("full", "none")]["size"]
            size = f"{r['size'] / 1e6:.2f} MB ({r['size'] / full:.2f})"
            cells.append(f"| {size:<19}{r['write_speed'] / 1e6:>5.0f} MB/s{r['read_speed'] / 1e6:>5.0f} MB/s"
                         f"{r['stall'] * 1000:>6.1f} ms")
        print(f"{option_label(*option):<22}" + "".join(f"{c:<{width}}" for c in cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 saves per option instead of 4 (under a minute)")
    args = parser.parse_args()
    header("checkpoint contents and compression: size, write/read speed, training stall per save")
    print("write and read MB/s count the uncompressed record's bytes; stall: median per save, training thread")
    data = load_data("arcagi", None)
    watch, models = LoadWatch(), []
    for name, overrides in MODELS:
        result, params, folder = run_model(data, overrides, 2 if args.quick else 4)
        shutil.rmtree(folder, ignore_errors=True)
        models.append((f"{name}, {params / 1e6:.1f} M parameters", overrides, result))
    print_table(models)
    print(watch.line())


if __name__ == "__main__":
    main()
