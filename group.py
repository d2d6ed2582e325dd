"""A web-app run on several processes: the worker thread launches a process group with torch.distributed's own
launcher (elastic_launch, what torchrun runs), relays its commands to rank 0 and brings rank 0's events back.

    worker thread                                  process group (torch.distributed.launcher, c10d on 127.0.0.1)
    commands queue --relay--> channel --------->   rank 0: Trainer.commands -> broadcast at each step boundary
    publish()      <--------- channel <--------    rank 0: Trainer.publish (the other ranks publish nothing)

The channel is multiprocessing.connection over loopback with a random key, one connection from rank 0. The ranks
run this file (`python group.py SPEC`), where SPEC (a file only this user can read) says the run and the channel.
A crash of any rank (an exception, a signal, the kernel's OOM killer) ends the group, never the server: the
launcher reports which rank failed and how, and the worker publishes that as the run's training_error.
"""
import json
import logging
import multiprocessing.connection
import os
import queue
import secrets
import signal
import sys
import tempfile
import threading

logger = logging.getLogger(__name__)

RELAY_POLL = 0.2  # seconds the relay waits on the command queue before it looks whether the run is over


# ---------------------------------------------------------------------------------------------- the worker's side

class GroupRun:
    """One run on `processes` processes, supervised from the worker thread; run() blocks until the group ends."""

    def __init__(self, spec, processes, commands, publish, max_restarts=0):
        self.spec, self.processes, self.max_restarts = spec, processes, max_restarts
        self.commands, self.publish = commands, publish
        self.key = secrets.token_bytes(32)
        self.listener = multiprocessing.connection.Listener(("127.0.0.1", 0), authkey=self.key)
        self.connected = threading.Event()
        self.ended = threading.Event()
        self.rank_error = None  # what rank 0 said failed it: {"error", "final_checkpoint"}
        self._connection = None

    def run(self):
        """Launch, relay, wait; raises GroupFailed naming the ranks that failed and how, and what rank 0 said."""
        spec_file = self._write_spec()
        threads = [threading.Thread(target=self._receive, name="group-events", daemon=True),
                   threading.Thread(target=self._relay, name="group-commands", daemon=True)]
        for t in threads:
            t.start()
        try:
            self._launch(spec_file)
        finally:
            self.ended.set()
            if not self.connected.is_set():  # wake the accept() that no rank 0 answered
                try:
                    multiprocessing.connection.Client(self.listener.address, authkey=self.key).close()
                except OSError:
                    pass
            for t in threads:
                t.join(10)
            self.listener.close()
            os.remove(spec_file)

    def _write_spec(self):
        fd, path = tempfile.mkstemp(prefix="arc-group-", suffix=".json")  # mode 0600: the key is in it
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({**self.spec, "channel": list(self.listener.address), "key": self.key.hex()}, f)
        return path

    def _launch(self, spec_file):
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=self.processes, rdzv_backend="c10d",
                              rdzv_endpoint="127.0.0.1:0", run_id=self.spec["run_id"],
                              max_restarts=self.max_restarts, monitor_interval=0.1, start_method="spawn")
        try:
            elastic_launch(config, sys.executable)(os.path.abspath(__file__), spec_file)
        except ChildFailedError as e:
            raise GroupFailed(e.failures, self.rank_error) from None

    def _receive(self):
        """Rank 0's events, in order, into the worker's publish()."""
        try:
            self._connection = self.listener.accept()
        except OSError:
            return
        self.connected.set()
        while True:
            try:
                event = self._connection.recv()
            except (EOFError, OSError):
                return
            if event.get("type") == "rank_error":  # the worker's one training_error names it with the failures
                self.rank_error = event
            else:
                self.publish(event)

    def _relay(self):
        """The worker's commands (save, pause, resume, stop) to rank 0, which broadcasts them to the others at its
        next step boundary. Commands the group can no longer take stay queued for the worker to answer."""
        while not self.ended.is_set():
            try:
                command = self.commands.get(timeout=RELAY_POLL)
            except queue.Empty:
                continue
            while not self.connected.wait(RELAY_POLL):
                if self.ended.is_set():
                    self.commands.put(command)
                    return
            try:
                self._connection.send(command)
            except (OSError, ValueError):
                self.commands.put(command)
                return


class GroupFailed(Exception):
    """Ranks of a process group failed: {rank: torch's ProcessFailure (exitcode, signal, pid)}, and the error rank 0
    reported, if it lived to report one."""

    def __init__(self, failures, rank_error=None):
        self.failures, self.rank_error = failures, rank_error or {}
        how = "; ".join(describe_failure(rank, f) for rank, f in sorted(failures.items()))
        super().__init__(f"{self.rank_error['error']} ({how})" if self.rank_error.get("error")
                         else f"the process group failed: {how}")

    @property
    def final_checkpoint(self):
        return self.rank_error.get("final_checkpoint")

    def as_list(self):
        return [{"rank": rank, "exitcode": f.exitcode, "signal": f.signal_name() if f.exitcode < 0 else None,
                 "pid": f.pid} for rank, f in sorted(self.failures.items())]


def describe_failure(rank, failure):
    if failure.exitcode < 0:
        return f"rank {rank} (pid {failure.pid}) was killed by {failure.signal_name()}"
    return f"rank {rank} (pid {failure.pid}) exited with code {failure.exitcode}"


# ---------------------------------------------------------------------------------------------- every rank's side

def main(spec_path):
    """One rank of the group: join it, build the run's Trainer and drive it; rank 0 talks to the worker."""
    import distributed
    import worker
    from data import load_data
    from train import TrainConfig, Trainer
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at the server's terminal is the server's to handle
    config = TrainConfig.from_dict(spec["config"])
    context = distributed.from_environment(config.device)
    channel = _connect(spec) if context.is_primary else None
    commands = queue.Queue()
    try:
        publish = _sender(channel) if channel is not None else (lambda event: None)
        trainer = Trainer(config, load_data(config.dataset, config.data_dir or None), context.device,
                          spec["checkpoint_dir"], publish, commands, run_id=spec["run_id"], dist=context)
        if channel is not None:
            threading.Thread(target=_take_commands, args=(channel, commands), name="group-commands",
                             daemon=True).start()
        try:
            worker.drive(trainer, spec)
        except Exception as e:
            if channel is not None:
                publish({"type": "rank_error", "error": f"{type(e).__name__}: {e}",
                         "final_checkpoint": trainer.final_checkpoint})
            raise
    finally:
        if channel is not None:
            channel.close()
        context.close()


def _connect(spec):
    host, port = spec["channel"]
    return multiprocessing.connection.Client((host, port), authkey=bytes.fromhex(spec["key"]))


def _sender(channel):
    """publish() for rank 0: the training thread and the checkpoint writer's both send; one message at a time."""
    lock = threading.Lock()

    def send(event):
        with lock:
            channel.send(event)
    return send


def _take_commands(channel, commands):
    """The worker's commands onto the Trainer's queue; if the server goes away, the run stops (and saves)."""
    from train import stop_command
    while True:
        try:
            commands.put(channel.recv())
        except (EOFError, OSError):
            commands.put(stop_command(30))
            return


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1])
    import distributed
    distributed.leave(0)
