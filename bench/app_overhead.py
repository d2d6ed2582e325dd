"""What serving the page costs training: throughput under the app with 10 SSE clients vs. headless, side by side,
and the delay from the worker publishing an event to a client receiving it.

    python bench/app_overhead.py            # 3 rounds of 150 steps each way
    python bench/app_overhead.py --quick    # 1 round of 40 steps each way
"""
import argparse
import logging
import os
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import requests  # noqa: E402
import torch  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

from app import create_app  # noqa: E402
from data import load_data  # noqa: E402
from train import Trainer, TrainConfig  # noqa: E402

CLIENTS = 10


class StepClock:
    """publish() that timestamps batch events; steps/s over the run, skipping the first steps (warm-up)."""

    def __init__(self, publish=None, skip=5):
        self.times, self.publish, self.skip = [], publish, skip

    def __call__(self, event):
        if event["type"] == "batch":
            self.times.append(time.perf_counter())
        if self.publish is not None:
            self.publish(event)

    def rate(self):
        t = self.times[self.skip:]
        return (len(t) - 1) / (t[-1] - t[0])


def headless(config, data, folder):
    clock = StepClock()
    Trainer(config, data, "cpu", folder, clock).train()
    return clock.rate()


class Client(threading.Thread):
    """Reads /events over a plain socket (HTTP/1.0, so no chunk framing) and notes when each event id arrived.

    A plain socket because the bench must hang up at once: closing a requests stream from another thread waits
    for the reader, which waits for the next heartbeat.
    """

    def __init__(self, url):
        super().__init__(daemon=True)
        host, port = url.rsplit("/", 1)[-1].split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=120)
        self.sock.sendall(b"GET /events HTTP/1.0\r\nHost: " + host.encode() + b"\r\n\r\n")
        self.arrivals = {}

    def run(self):
        with self.sock.makefile("rb") as stream:
            try:
                for line in stream:
                    if line.startswith(b"id: "):
                        self.arrivals[int(line[4:])] = time.perf_counter()
            except OSError:
                pass  # hang_up() shut the socket under the reader

    def hang_up(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.join(5)
        self.sock.close()


def with_app(config, data, folder):
    app = create_app({"CHECKPOINT_DIR": folder, "DATA": data, "TRAIN_DEFAULTS": config.to_dict()})
    worker, bus = app.extensions["trainer"], app.extensions["trainer"].bus
    clock = StepClock(worker.publish)
    worker.publish = clock  # the trainer is built with worker.publish at run start, so this sees every batch
    published = {}
    real_publish = bus.publish

    def timed_publish(event, data_):
        event_id = real_publish(event, data_)
        published[event_id] = time.perf_counter()
        return event_id

    bus.publish = timed_publish
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    clients = [Client(url) for _ in range(CLIENTS)]
    for c in clients:
        c.start()
    requests.post(url + "/start_training", json={}, timeout=10).raise_for_status()
    while requests.get(url + "/status", timeout=10).json()["phase"] != "finished":
        time.sleep(0.2)
    time.sleep(0.5)
    delays = [(c.arrivals[i] - t) * 1000 for c in clients for i, t in published.items() if i in c.arrivals]
    for c in clients:
        c.hang_up()
    server.shutdown()
    worker.shutdown()
    return clock.rate(), delays


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    rounds, steps = (1, 40) if args.quick else (3, 150)
    torch.set_num_threads(2)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request drowns the figures
    data = load_data("arcagi")
    import tempfile
    folder = tempfile.mkdtemp(prefix="app-overhead-")
    config = TrainConfig.from_dict({"max_steps": steps, "epochs": 1000, "checkpoint_every_epochs": 0,
                                    "device": "cpu", "checkpoint_dir": folder})
    print(f"command: python bench/app_overhead.py{' --quick' if args.quick else ''}")
    print(f"default model, reconstruction/communication, batch {config.batch_size}, {steps} steps, "
          f"{rounds} round(s) of headless then app with {CLIENTS} SSE clients")
    plain, served, delays = [], [], []
    for r in range(rounds):
        plain.append(headless(config, data, folder))
        rate, d = with_app(config, data, folder)
        served.append(rate)
        delays += d
        print(f"round {r + 1}: headless {plain[-1]:.2f} steps/s, app {served[-1]:.2f} steps/s")
    ratio = statistics.median(served) / statistics.median(plain)
    median_delay = statistics.median(delays)
    print(f"throughput ratio app/headless: {ratio:.3f} (target >= 0.95: {'MET' if ratio >= 0.95 else 'NOT MET'})")
    print(f"publish -> client delay: median {median_delay:.1f} ms, p95 {sorted(delays)[int(0.95 * len(delays))]:.1f} ms "
          f"over {len(delays)} deliveries (target median < 50 ms: {'MET' if median_delay < 50 else 'NOT MET'})")


if __name__ == "__main__":
    main()
