"""Does resuming cost the same whatever the step? Trainer.resume + the first batch, early vs. very late.

    python bench/resume_seek.py           # 10 timed resumes of each checkpoint
    python bench/resume_seek.py --quick   # 3 of each

A real default-model selection run saves a checkpoint at step 3 (epoch 0). A copy of it is written claiming
epoch 50,000 (the position fields and the sampler state changed, everything else the same), as if the run had
gone on for 50,000 epochs. Each resume builds a Trainer, calls resume() and builds the batch training would
take next. The data order of an epoch is drawn from (seed, epoch), so nothing is replayed: the two should take
the same time.
"""
import argparse
import copy
import os
import tempfile
import time

from common import LoadWatch, header, idle_check, percentile, verdict

import catalogue  # noqa: E402
import checkpoint as ckpt  # noqa: E402
from data import load_data  # noqa: E402
from train import TrainConfig, Trainer  # noqa: E402

LATE_EPOCH = 50_000
TARGET_SECONDS, TARGET_RATIO = 1.0, 1.5


def early_checkpoint(folder, data):
    """Train the default selection model to step 3 and save 'early' there; returns its path."""
    config = TrainConfig(task_type="selection", max_steps=3, checkpoint_every_epochs=0, device="cpu",
                         checkpoint_dir=folder)
    trainer = Trainer(config, data, "cpu", folder, publish=lambda e: None)

    def publish(event):
        if event["type"] == "batch" and event["global_step"] == 3:
            trainer.commands.put({"type": "save", "name": "early", "request_id": "bench"})

    trainer.publish = publish
    trainer.train()
    return os.path.join(catalogue.checkpoint_folder(folder, trainer.run_id), "early.pth")


def late_copy(early_path, batches_per_epoch):
    """The early checkpoint as if taken LATE_EPOCH epochs later, beside it in its run's folder."""
    record = copy.deepcopy(ckpt.load_checkpoint(early_path))
    record.update(name="late", epoch=LATE_EPOCH, global_step=LATE_EPOCH * batches_per_epoch + record["batch"])
    record["rng_state"]["sampler"]["epoch"] = LATE_EPOCH
    folder = os.path.dirname(early_path)
    ckpt.write_checkpoint(folder, record)
    return os.path.join(folder, "late.pth")


def timed_resume(path, config, data, folder):
    started = time.perf_counter()
    trainer = Trainer(config, data, "cpu", folder, publish=lambda e: None)
    trainer.resume(path)
    trainer.train_batches.batch(trainer.epoch, trainer.batch)
    return time.perf_counter() - started, trainer.epoch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed resumes of each checkpoint")
    args = parser.parse_args()
    repeats = 3 if args.quick else 10
    header("resume: early vs. late checkpoint")
    print(f"targets: resume + first batch under {TARGET_SECONDS:.0f} s; late / early time <= {TARGET_RATIO}")
    print(f"before start: other processes kept {idle_check():.2f} cores busy")
    data = load_data("arcagi")
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as folder:
        early = early_checkpoint(folder, data)
        config = TrainConfig(task_type="selection", checkpoint_every_epochs=0, device="cpu", checkpoint_dir=folder,
                             epochs=LATE_EPOCH + 10)
        probe = Trainer(config, data, "cpu", folder, publish=lambda e: None)
        probe.setup()
        late = late_copy(early, len(probe.train_batches))
        times = {"early": [], "late": []}
        watch = LoadWatch()
        timed_resume(early, config, data, folder)  # warm-up: caches, first allocations
        for _ in range(repeats):  # interleaved, so load from elsewhere hits both alike
            for label, path in (("early", early), ("late", late)):
                seconds, epoch = timed_resume(path, config, data, folder)
                assert epoch == (LATE_EPOCH if label == "late" else 0), f"{label} resumed at epoch {epoch}"
                times[label].append(seconds)
        for label in times:
            print(f"  {label:<6} p50 {percentile(times[label], 50) * 1000:.0f} ms  "
                  f"max {max(times[label]) * 1000:.0f} ms  ({repeats} resumes)")
        print(watch.line())
    early_p50, late_p50 = percentile(times["early"], 50), percentile(times["late"], 50)
    ratio = late_p50 / early_p50
    print()
    print("targets:")
    print(f"  resume at epoch {LATE_EPOCH:,} + first batch: p50 {late_p50 * 1000:.0f} ms, under "
          f"{TARGET_SECONDS:.0f} s: {verdict(late_p50 < TARGET_SECONDS)}")
    print(f"  late / early = {late_p50 * 1000:.0f} / {early_p50 * 1000:.0f} ms = {ratio:.2f}, "
          f"<= {TARGET_RATIO}: {verdict(ratio <= TARGET_RATIO)}")


if __name__ == "__main__":
    main()
