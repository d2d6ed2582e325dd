"""Server-sent events: a formatter, a broadcaster that gives every client every event, and the stream generator."""
import collections
import itertools
import json
import queue
import threading

from checkpoint import dumps_strict

HEARTBEAT_SECONDS = 15.0
RETRY_MILLISECONDS = 2000


def format_sse(data, event=None, id=None):
    """One SSE message; data is JSON-encoded (one line, so no field splitting is needed)."""
    lines = []
    if id is not None:
        lines.append(f"id: {id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.append("data: " + dumps_strict(data, separators=(",", ":")))  # strict: the page's JSON.parse
    return "\n".join(lines) + "\n\n"


def parse_sse(message):
    """(id, event, data) of one message format_sse wrote."""
    fields = dict(line.split(": ", 1) for line in message.strip("\n").split("\n") if ": " in line)
    event_id = fields.get("id")
    return int(event_id) if event_id else None, fields.get("event"), json.loads(fields["data"])


class Subscription:
    """One client's bounded queue. `dropped` is set when the client fell too far behind: it must reconnect."""

    def __init__(self, size):
        self.messages = queue.Queue(maxsize=size)
        self.dropped = threading.Event()


class EventBus:
    """Fan-out to every subscriber, plus a bounded history for clients that reconnect with Last-Event-ID.

    publish() never blocks: a client whose queue is full is dropped (its stream ends, the browser reconnects and
    catches up from the history), so the training thread never waits for the web side.
    """

    def __init__(self, history=20_000, client_queue_size=2_000):
        self._lock = threading.Lock()
        self._history = collections.deque(maxlen=history)  # (id, message)
        self._subscribers = set()
        self._ids = itertools.count(1)
        self._client_queue_size = client_queue_size
        self.last_id = 0

    def publish(self, event, data):
        with self._lock:
            event_id = next(self._ids)
            message = format_sse(data, event=event, id=event_id)
            self._history.append((event_id, message))
            self.last_id = event_id
            for sub in list(self._subscribers):
                try:
                    sub.messages.put_nowait(message)
                except queue.Full:
                    sub.dropped.set()
                    self._subscribers.discard(sub)
        return event_id

    def subscribe(self, last_event_id=None):
        """A new subscription, pre-filled with the events after last_event_id still in the history."""
        sub = Subscription(self._client_queue_size + self._history.maxlen)
        with self._lock:
            if last_event_id is not None:
                for event_id, message in self._history:
                    if event_id > last_event_id:
                        sub.messages.put_nowait(message)
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub):
        with self._lock:
            self._subscribers.discard(sub)

    def client_count(self):
        with self._lock:
            return len(self._subscribers)

    def stream(self, last_event_id=None, heartbeat=HEARTBEAT_SECONDS, first=None):
        """Generator of SSE text for one client; a heartbeat comment when idle; unsubscribes however it ends."""
        sub = self.subscribe(last_event_id)
        try:
            yield f"retry: {RETRY_MILLISECONDS}\n\n"
            if first is not None:
                yield first
            while not sub.dropped.is_set():
                try:
                    yield sub.messages.get(timeout=heartbeat)
                except queue.Empty:
                    yield ": heartbeat\n\n"
        finally:
            self.unsubscribe(sub)
