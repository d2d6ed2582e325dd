"""Fault tolerance as torchrun does it: with --max-restarts K, torchrun restarts the whole process group when a
rank fails, running the same command again; the restarted group continues the run the first one started, from
that run's latest good checkpoint.

The first attempt writes its launch (torchrun's rendezvous id, and rank 0's agent: host and process) into the
run's run.json; a restarted one (TORCHELASTIC_RESTART_COUNT above 0) finds the run with the same launch, decided
on rank 0 and broadcast. A plain `python train.py` has no launch and never restarts.
"""
import os
import socket

import catalogue
import checkpoint as ckpt

NOT_RESUMABLE = ("error", "pretrained")  # an error checkpoint fails again the same way; an encoder is no run


def launch():
    """This process's launch under torchrun ({"rendezvous", "agent"}), or None outside it."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    return {"rendezvous": os.environ.get("TORCHELASTIC_RUN_ID", "none"),
            "agent": f"{socket.gethostname()}:{os.getppid()}"}


def is_restart():
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def _same_launch(theirs, ours):
    # torchrun's --standalone and --rdzv-id give every launch its own rendezvous id; a static launch (--master-addr,
    # "none") keeps rank 0 on the same agent across restarts
    if not isinstance(theirs, dict) or theirs.get("rendezvous") != ours["rendezvous"]:
        return False
    return ours["rendezvous"] != "none" or theirs.get("agent") == ours["agent"]


def find_run(root, ours):
    """The newest run of this launch under root, or None."""
    for run in catalogue.list_runs(root):
        if not run.get("legacy") and not run.get("refused") and \
                _same_launch(catalogue.read_run_file(root, run["run_id"]).get("launch"), ours):
            return run["run_id"]
    return None


def latest_good_checkpoint(root, run_id):
    """The path of the run's checkpoint with the most steps that verifies (newest first among equals), or None."""
    rows = [r for r in catalogue.list_checkpoints(root, run=run_id)
            if not r.get("damaged") and r.get("kind") not in NOT_RESUMABLE and isinstance(r.get("global_step"), int)
            and r.get("contents", "full") == "full"]  # weights only: not resumable
    rows.sort(key=lambda r: (r["global_step"], r.get("created_at") or ""), reverse=True)
    for row in rows:
        if ckpt.verify(row["path"])[0]:
            return row["path"]
    return None


def continuation(root, context):
    """After torchrun restarted the group: (the run's id, the checkpoint to resume from or None); else (None, None).
    Every rank calls it; rank 0 looks, and broadcasts what it found."""
    if not is_restart():
        return None, None
    found = (None, None)
    if context.is_primary:
        run_id = find_run(root, launch())
        found = (run_id, latest_good_checkpoint(root, run_id) if run_id else None)
    return tuple(context.broadcast(found))
