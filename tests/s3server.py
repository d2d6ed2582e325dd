"""A real S3 server for the tests: moto's standalone server in a process of its own, on a free loopback port, as
s3fs's own suite runs it. The bytes go over HTTP; nothing is mocked in the client. The server can be killed and
started again on the same port (its buckets are then gone, as a store's would be after losing its disk)."""
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid

import requests

ACCESS_KEY, SECRET_KEY = "AKIATESTKEY0000", "test-secret-Zq81-do-not-log"
AUTH_SETUP_ACTIONS = 3  # create_user, create_access_key, put_user_policy: then every request is authenticated
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto_server on 127.0.0.1:port. With auth, only the access key it creates (self.key, self.secret) works, and
    only for what `policy` (an IAM policy document) allows it."""

    def __init__(self, auth=False, policy=ALLOW_ALL):
        self.port, self.auth, self.policy = free_port(), auth, policy
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.key, self.secret = ACCESS_KEY, SECRET_KEY
        self.process = None

    def start(self):
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                   AWS_DEFAULT_REGION="us-east-1")
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(AUTH_SETUP_ACTIONS)
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                         str(self.port)], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{self.endpoint}/moto-api/", timeout=1)
                break
            except requests.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.05)
        if self.auth:
            self._make_user()
        return self

    def _make_user(self):
        import boto3
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
        iam.create_user(UserName="lab")
        key = iam.create_access_key(UserName="lab")["AccessKey"]
        iam.put_user_policy(UserName="lab", PolicyName="lab", PolicyDocument=json.dumps(self.policy))
        self.key, self.secret = key["AccessKeyId"], key["SecretAccessKey"]

    def environment(self):
        """The AWS_* variables that point a client at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.key, aws_secret_access_key=self.secret)

    def new_bucket(self):
        name = f"lab-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket, prefix=""):
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self):
        self.kill()
        self.process = None


class InProcessS3Server:
    """moto's ThreadedMotoServer in this process: stopped and started again on the same port, it keeps its
    buckets (a store that went away and came back), which a killed process cannot."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.key, self.secret = ACCESS_KEY, SECRET_KEY
        self._server = None

    def start(self):
        from moto.server import ThreadedMotoServer
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.stop()
            self._server = None

    kill = stop
    environment, client, new_bucket, keys = (S3Server.environment, S3Server.client, S3Server.new_bucket,
                                             S3Server.keys)


class HoldingProxy:
    """A TCP proxy on a free loopback port in front of a store, passing bytes through untouched, that can hold back
    one request: hold(pattern) arms it, and the first request (or the skip+1-th) whose bytes match the regular
    expression is not passed on until release(). Meanwhile the store never sees it and the client waits for its
    answer, as on a store that hangs; `held` is set then. close() drops what is held, unsent."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.held, self._released, self._closed = threading.Event(), threading.Event(), threading.Event()
        self._pattern, self._skip = None, 0
        self._lock = threading.Lock()
        self._sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self, pattern, skip=0):
        """Hold the request after the first `skip` ones that match pattern (bytes, a regular expression)."""
        with self._lock:
            self._pattern, self._skip = re.compile(pattern), skip

    def release(self):
        self._released.set()

    def close(self):
        self._closed.set()
        self._released.set()
        with self._lock:
            sockets, self._sockets = self._sockets + [self._listener], []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def environment(self, server):
        """server's AWS_* variables, pointed at this proxy."""
        return {**server.environment(), "AWS_ENDPOINT_URL": self.endpoint}

    def _accept(self):
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:  # the store is down: so is the proxy, to the client
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source, sink, inspect):
        tail = b""  # the end of what went before: a request line split across two reads is still found
        try:
            while data := source.recv(1 << 16):
                split = self._match(tail, data) if inspect else None
                tail = (tail + data)[-512:]
                if split is not None:
                    sink.sendall(data[:split])
                    data = data[split:]
                    self.held.set()
                    self._released.wait()
                    if self._closed.is_set():
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _match(self, tail, data):
        """Where in data to stop passing bytes on, if they hold the request to hold; None otherwise."""
        with self._lock:
            if self._pattern is None:
                return None
            for found in self._pattern.finditer(tail + data):
                if found.end() <= len(tail):  # seen with the bytes before
                    continue
                if self._skip:
                    self._skip -= 1
                    continue
                self._pattern = None
                return max(0, found.start() - len(tail))
            return None
