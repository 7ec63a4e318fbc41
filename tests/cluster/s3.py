"""A real S3 API on loopback for tests: moto in server mode, started and stopped by the test."""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

BIN = pathlib.Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def moto_server(bucket: str = "vlrlhf"):
    """Yields the environment (AWS_ENDPOINT_URL & co.) under which s3://BUCKET/... reaches
    the server, for this process and every process it starts; the bucket exists."""
    port = free_port()
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        from pyarrow import fs

        s3 = fs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], scheme="http", access_key="testing",
                             secret_key="testing", region="us-east-1", allow_bucket_creation=True)
        s3.create_dir(bucket)
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    finally:
        server.terminate()
        server.wait(timeout=10)
