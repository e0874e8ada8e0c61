"""A real S3 API on localhost for tests and benchmarks: moto's server in a thread.

:class:`S3Server` is ``moto.server.ThreadedMotoServer`` on a free port of 127.0.0.1, with its WSGI app
wrapped to count requests (method and path) and, optionally, to add a fixed latency to each one.
:class:`LatencyProxy` is a TCP proxy that delays every request passing through it (used by
``benchmarks/remote_read.py`` to emulate a store far away).

``python tests/s3_server.py BUCKET [LATENCY_S]`` runs the server in a process of its own (which a
test can pause with SIGSTOP: a store that stops answering), creates ``BUCKET``, prints its endpoint on
one line and serves until killed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-not-real",
                     "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server(ThreadedMotoServer):
    """moto's S3 server on 127.0.0.1 (a free port), counting requests; ``latency_s`` added to each."""

    def __init__(self, *, latency_s: float = 0.0):
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.latency_s = latency_s
        self.requests: collections.Counter = collections.Counter()  # (method, path) -> count
        self._count_lock = threading.Lock()
        logging.getLogger("werkzeug").setLevel(logging.ERROR)

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)

        def counted(environ, start_response):
            with self._count_lock:
                self.requests[(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""))] += 1
            if self.latency_s:
                time.sleep(self.latency_s)
            return app(environ, start_response)

        self._server = make_server(self._ip_address, self._port, counted, True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def endpoint(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"

    def count(self, method: str, path_part: str = "") -> int:
        with self._count_lock:
            return sum(n for (m, path), n in self.requests.items() if m == method and path_part in path)

    def create_bucket(self, name: str) -> None:
        _client(self.endpoint).create_bucket(Bucket=name)


def _client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def client():
    """A boto3 client of the server that ``AWS_ENDPOINT_URL`` names (to look at and damage objects)."""
    return _client(os.environ["AWS_ENDPOINT_URL"])


@contextlib.contextmanager
def s3_environment(endpoint: str):
    """Dummy credentials and ``AWS_ENDPOINT_URL`` for this process and its children; no user config read."""
    values = {**DUMMY_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
              "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    removed = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3")
    saved = {key: os.environ.get(key) for key in (*values, *removed)}
    os.environ.update(values)
    for key in removed:
        os.environ.pop(key, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class LatencyProxy:
    """A TCP proxy on 127.0.0.1 that holds every chunk from the client for ``latency_s`` before passing
    it on (in order), so each HTTP request arrives that much later: a store ``latency_s`` away."""

    def __init__(self, target_port: int, *, latency_s: float):
        self.target_port, self.latency_s = target_port, latency_s
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LatencyProxy":
        self._thread.start()
        self._ready.wait()
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, client_reader, client_writer) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(self._pipe(client_reader, server_writer, delay=True),
                             self._pipe(server_reader, client_writer, delay=False))

    async def _pipe(self, reader, writer, *, delay: bool) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        async def forward():
            while (item := await queue.get()) is not None:
                due, data = item
                if delay and (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(forward())
        try:
            while data := await reader.read(1 << 16):
                queue.put_nowait((loop.time() + self.latency_s, data))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait(None)
        with contextlib.suppress(ConnectionError, OSError):
            await sender


if __name__ == "__main__":
    import sys

    server = S3Server(latency_s=float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
    server.start()
    server.create_bucket(sys.argv[1])
    print(server.endpoint, flush=True)
    threading.Event().wait()  # until killed
