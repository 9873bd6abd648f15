"""A real S3-compatible HTTP server for tests: moto's server in a subprocess.

A subprocess rather than moto's in-process thread, so that Ray workers and other
processes reach the same buckets and the test process's GIL does not pace it.
``start_dying_proxy`` stands in front of it to simulate a server lost mid-upload.

It is moto's own WSGI app (what ``python -m moto.server`` runs) with one fix: moto
checks ``If-None-Match: *`` and then stores the object as two steps, so two
concurrent conditional PUTs could both succeed (seen: 1 race in 60 with 8
clients). S3 makes that check atomic; here conditional requests are serialized.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from urllib.parse import urlsplit

ACCESS_KEY = "testing"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto_server(timeout_s: float = 60.0) -> tuple[str, Callable[[], None]]:
    """Start moto's S3 server (this file as a script) on a free loopback port and wait until it answers.

    The server exits by itself if the process that started it dies without calling ``stop``.

    Args:
        timeout_s: How long to wait for the server to answer before giving up.

    Returns:
        ``(endpoint_url, stop)``; ``stop()`` kills the server (safe to call twice).

    Raises:
        RuntimeError: The server exited or did not answer within ``timeout_s``.
    """
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # Its own session, so a kill takes the server down without touching the test process's group.
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "-H", "127.0.0.1", "-p", str(port),
                             "--parent", str(os.getpid())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}; run `{sys.executable} "
                               f"{os.path.abspath(__file__)} -p {port} --parent 1` to see why "
                               f"(is the test extra, moto[s3] + flask, installed?)")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return endpoint, stop
        except OSError:
            if time.monotonic() > deadline:
                stop()
                raise RuntimeError(f"moto server on {endpoint} did not answer within {timeout_s:.0f}s") from None
            time.sleep(0.1)


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard AWS environment variables that point boto, s3fs and pyarrow at ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": ACCESS_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }


def make_bucket(endpoint: str, name: str) -> None:
    """Create bucket ``name`` on the server at ``endpoint``."""
    import boto3  # a test-only dependency, loaded only by callers that make buckets

    env = s3_env(endpoint)
    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=name)


def start_dying_proxy(endpoint: str, die_after_bytes: int) -> tuple[str, threading.Event, Callable[[], None]]:
    """A TCP proxy to ``endpoint`` that dies once its clients have sent ``die_after_bytes``.

    Dying closes every connection mid-request and stops listening, so clients see
    a server that went away mid-upload, while ``endpoint`` itself stays up for a
    test to inspect what was stored.

    Returns:
        ``(proxy_url, died, stop)``: ``died`` is set once it has died; ``stop()`` kills it now.
    """
    upstream_addr = (urlsplit(endpoint).hostname, urlsplit(endpoint).port)
    listener = socket.create_server(("127.0.0.1", 0))
    died = threading.Event()
    lock = threading.Lock()
    open_socks: list[socket.socket] = [listener]
    sent = 0

    def die() -> None:
        died.set()
        with lock:
            socks = list(open_socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv on it; close alone does not
            except OSError:
                pass
            s.close()

    def pump(src: socket.socket, dst: socket.socket, counted: bool) -> None:
        nonlocal sent
        try:
            while chunk := src.recv(1 << 16):
                if counted:
                    with lock:
                        sent += len(chunk)
                        over = sent > die_after_bytes
                    if over:
                        die()
                        return
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def accept() -> None:
        while not died.is_set():
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(upstream_addr)
            except OSError:
                return
            with lock:
                open_socks.extend([client, upstream])
            threading.Thread(target=pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client, False), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", died, die


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def _serve(host: str, port: int, parent: int) -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    moto_app = DomainDispatcherApplication(create_backend_app)
    conditional = threading.Lock()

    def app(environ, start_response):
        if "HTTP_IF_NONE_MATCH" in environ or "HTTP_IF_MATCH" in environ:
            with conditional:
                return list(moto_app(environ, start_response))  # the whole response inside the lock
        return moto_app(environ, start_response)

    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    run_simple(host, port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="moto's S3 server with atomic conditional writes")
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True, help="exit when this process is gone")
    args = parser.parse_args()
    _serve(args.host, args.port, args.parent)
