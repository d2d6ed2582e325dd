"""How long catalogue.list_checkpoints takes for 200 checkpoints in 10 runs, with and without sidecars.

    python bench/list_speed.py           # 200 checkpoints, 20 timed listings (+ 5 without sidecars, + remote)
    python bench/list_speed.py --quick   # 200 checkpoints, 5 timed listings (+ 3 without sidecars, + remote)

The checkpoint root holds RUNS runs, each a folder made by catalogue.create_run (its run.json) with PER_RUN
checkpoints in ROOT/runs/RUN_ID/checkpoints/: real records of a tiny selection model, written by
checkpoint.save_full_checkpoint with the fields Trainer._snapshot builds. Each listing is one
catalogue.list_checkpoints(root) over every run. Without sidecars, listing falls back to torch.load(mmap=True)
of every file.

The remote row uploads the same 200 checkpoints to moto's S3 server (a process of its own on a loopback port, as
the tests run it) and times remote.ObjectRoot.list_checkpoints: one LIST of the prefix plus the sidecars, fetched
concurrently; cold (a new ObjectRoot: every sidecar fetched) and warm (the same one again: only sidecars whose ETag
changed are fetched, here none).
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

from common import LoadWatch, capture_fields, caveat, header, idle_check, percentile, verdict

import catalogue  # noqa: E402
import checkpoint as ckpt  # noqa: E402
from data import load_data  # noqa: E402
from model import count_parameters  # noqa: E402
from train import TrainConfig, Trainer  # noqa: E402

RUNS, PER_RUN = 10, 20
REMOTE_TARGET = 1.0  # seconds to list 200 checkpoints in object storage
COUNT = RUNS * PER_RUN
TARGET = 0.100  # seconds to list 200 checkpoints with sidecars
TINY = dict(task_type="selection", embedding_dim=4, hidden_dim=8, latent_dim=8, num_conv_layers=3, vocab_size=4,
            max_message_length=2)


def make_root(root, data):
    """RUNS run folders of PER_RUN checkpoints each, with sidecars; returns (run ids, parameters, bytes per .pth)."""
    config = TrainConfig(**TINY)
    trainer = Trainer(config, data, "cpu", root, publish=lambda e: None)
    trainer.setup()
    fields = capture_fields(trainer, "manual", "x")
    run_ids = []
    for r in range(RUNS):
        run_id = catalogue.new_run_id()
        catalogue.create_run(root, run_id, {"phase": "training", "mode": None, "config": config.to_dict(),
                                            "started_at": ckpt.utc_now(), "parent": None,
                                            "project_version": ckpt.PROJECT_VERSION})
        folder = catalogue.checkpoint_folder(root, run_id)
        for j in range(PER_RUN):
            i = r * PER_RUN + j  # global_step grows across runs too, so newest first is one order by step
            kind = ("manual", "periodic", "autosave", "best")[i % 4]
            name = {"manual": f"run {i}", "periodic": f"checkpoint_epoch_{i}", "autosave": f"autosave_step_{i}",
                    "best": f"best {i}"}[kind]
            progress = {**fields["progress"], "global_step": i, "epoch": i // 10}
            extra = {**fields["extra"], "run_id": run_id}
            sidecar = ckpt.save_full_checkpoint(folder, **{**fields, "name": name, "kind": kind,
                                                           "progress": progress, "extra": extra})
        run_ids.append(run_id)
    return run_ids, count_parameters(trainer.model), sidecar["size"]


def remove_sidecars(root, run_ids):
    """Delete every checkpoint's NAME.json (run.json sits one folder up and stays)."""
    for run_id in run_ids:
        for entry in os.scandir(catalogue.checkpoint_folder(root, run_id)):
            if entry.name.endswith(".json"):
                os.remove(entry.path)


def time_listing(root, repeats):
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = catalogue.list_checkpoints(root)
        times.append(time.perf_counter() - started)
    return times, result


def show(label, times, metas):
    damaged = sum(1 for m in metas if m.get("damaged"))
    runs = len({m["run_id"] for m in metas})
    steps = [m["global_step"] for m in metas]
    newest_first = steps == sorted(steps, reverse=True)
    print(f"  {label:<38} {len(metas)} listed in {runs} runs, {damaged} damaged, newest first: {newest_first}; "
          f"min {min(times) * 1000:.1f} ms  median {percentile(times, 50) * 1000:.1f} ms  "
          f"max {max(times) * 1000:.1f} ms  ({len(times)} listings; {percentile(times, 50) / len(metas) * 1e6:.0f} us "
          f"per checkpoint)")


def time_remote(root, run_ids, repeats):
    """(cold times, warm times, listed) of listing the root's checkpoints uploaded to a moto S3 server."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import remote
    from s3server import S3Server
    server = S3Server().start()
    try:
        os.environ.update(server.environment())
        url = f"s3://{server.new_bucket()}/bench"
        uploader = remote.ObjectRoot(url)
        t0 = time.perf_counter()
        for run_id in run_ids:
            for meta in catalogue.list_checkpoints(root, run=run_id):
                uploader.upload(meta["path"], ckpt.read_sidecar(meta["path"]), run_id, meta["name"])
        print(f"uploaded {COUNT} checkpoints to moto_server in {time.perf_counter() - t0:.1f} s")
        cold, warm, listed = [], [], None
        for _ in range(repeats):
            target = remote.ObjectRoot(url)
            for times in (cold, warm):
                started = time.perf_counter()
                listed = target.list_checkpoints()
                times.append(time.perf_counter() - started)
        return cold, warm, listed
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed listings: under a minute")
    args = parser.parse_args()
    repeats, fallback_repeats = (5, 3) if args.quick else (20, 5)
    header(f"catalogue.list_checkpoints on {COUNT} checkpoints in {RUNS} runs")
    print(f"target: list {COUNT} checkpoints ({RUNS} runs x {PER_RUN}) with sidecars in under {TARGET * 1000:.0f} ms "
          f"(median of the timed listings)")
    print(f"before start: other processes kept {idle_check():.2f} cores busy")
    started = time.perf_counter()
    data = load_data("arcagi")
    watch = LoadWatch()
    root = tempfile.mkdtemp(prefix="bench-list-")
    try:
        t0 = time.perf_counter()
        run_ids, params, size = make_root(root, data)
        print(f"wrote {COUNT} checkpoints + sidecars in {RUNS} runs of {PER_RUN} ({params:,}-parameter selection "
              f"model, {size / 1e3:.0f} kB per .pth) in {time.perf_counter() - t0:.1f} s, root {root}")
        with_sidecars, metas = time_listing(root, repeats)
        cold, warm, listed = time_remote(root, run_ids, repeats)
        remove_sidecars(root, run_ids)
        without, bare = time_listing(root, fallback_repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("list_checkpoints:")
    show("with sidecars (reads NAME.json)", with_sidecars, metas)
    show("sidecars removed (torch.load mmap)", without, bare)
    show("S3, cold (every sidecar fetched)", cold, listed)
    show("S3, warm (unchanged sidecars cached)", warm, listed)
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
    for label, times in (("cold", cold), ("warm", warm)):
        remote_median = percentile(times, 50)
        print(f"  S3 ({label}): median {remote_median * 1000:.1f} ms for {COUNT} = {remote_median / median:.1f}x the "
              f"local listing, target < {REMOTE_TARGET * 1000:.0f} ms: {verdict(remote_median < REMOTE_TARGET)}")
    print(f"total bench time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
