"""Load on a live server: a burst of save requests from many threads, and SSE clients that come and go."""
import collections
import concurrent.futures
import os
import statistics
import threading
import time

import pytest
import requests

from conftest import EventReader, wait_for


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.mark.slow
def test_500_save_requests_from_20_threads_each_end_in_exactly_one_event(live_server):
    url = live_server.url
    reader = EventReader(url)
    assert requests.post(url + "/start_training", json={"epochs": 1000}, timeout=5).status_code == 202
    wait_for(lambda: requests.get(url + "/status", timeout=5).json()["global_step"] > 0, what="training")
    answers, status_times = collections.Counter(), []
    accepted, lock = [], threading.Lock()
    done = threading.Event()

    def poll_status():
        with requests.Session() as session:
            while not done.is_set():
                started = time.perf_counter()
                assert session.get(url + "/status", timeout=5).status_code == 200
                status_times.append(time.perf_counter() - started)
                time.sleep(0.02)

    def hammer(thread):
        with requests.Session() as session:
            for i in range(25):
                body = {"name": f"t{thread} r{i}"} if i % 2 else {}
                response = session.post(url + "/save_checkpoint", json=body, timeout=10)
                with lock:
                    answers[response.status_code] += 1
                    if response.status_code == 202:
                        accepted.append(response.json()["request_id"])
                time.sleep(0.3)  # 20 threads x 25 requests spread over about 10 s

    poller = threading.Thread(target=poll_status)
    poller.start()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        list(pool.map(hammer, range(20)))
    elapsed = time.monotonic() - started
    done.set()
    poller.join()
    requests.post(url + "/stop", json={}, timeout=5)
    reader.wait("training_stopped", timeout=60)

    def results():
        events = reader.named("checkpoint_saved") + reader.named("checkpoint_error")
        return collections.Counter(e["request_id"] for e in events if e.get("request_id") in set(accepted))

    wait_for(lambda: len(results()) == len(accepted), timeout=60, what="a result for every accepted save")
    assert sum(answers.values()) == 500 and set(answers) <= {202, 409, 503}, answers
    assert answers[202] > 0
    assert all(count == 1 for count in results().values()), "a request was answered twice"
    p99 = percentile(status_times, 0.99)
    print(f"\n500 saves in {elapsed:.1f} s: {dict(answers)}; GET /status median "
          f"{statistics.median(status_times) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms over {len(status_times)}")
    assert p99 < 0.2, f"/status p99 {p99 * 1000:.0f} ms"
    reader.close()


def thread_count():
    return threading.active_count()


def rss_bytes():
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_sse_clients_that_come_and_go_free_what_they_held(live_server):
    url = live_server.url
    bus = live_server.app.extensions["trainer"].bus
    assert requests.post(url + "/start_training", json={"epochs": 1000}, timeout=5).status_code == 202
    wait_for(lambda: requests.get(url + "/status", timeout=5).json()["global_step"] > 0, what="training")
    time.sleep(1)
    threads_before, rss_before = thread_count(), rss_bytes()
    deadline, rounds = time.monotonic() + float(os.environ.get("SSE_CHURN_SECONDS", "60")), 0
    while time.monotonic() < deadline:
        clients = [requests.get(url + "/events", stream=True, timeout=10) for _ in range(50)]
        for client in clients:
            next(client.iter_lines())  # read something, then vanish without saying goodbye
        for client in clients:
            client.close()
        rounds += 1
    # A closed client is noticed at the next event it is sent: status events come 4 times a second.
    wait_for(lambda: bus.client_count() == 0, timeout=30, what="every vanished client to be dropped")
    wait_for(lambda: thread_count() <= threads_before + 2, timeout=30, what="server threads to end")
    threads_after, rss_after = thread_count(), rss_bytes()
    print(f"\n{rounds} rounds of 50 clients; threads {threads_before} -> {threads_after}; "
          f"RSS {rss_before / 1e6:.0f} -> {rss_after / 1e6:.0f} MB")
    assert rss_after - rss_before < 100e6
    requests.post(url + "/stop", json={}, timeout=5)
