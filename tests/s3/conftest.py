"""A real S3-compatible server for these tests: moto's server mode (`moto[server]`, the `s3` extra), started here on
127.0.0.1 with a free port, in a thread of the test process. The CLI under test, in this process or in a child,
talks to it over HTTP exactly as it would to AWS S3: credentials and endpoint from the standard environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL), which pyarrow and boto3 both read.
Run with `make test-s3`."""

from __future__ import annotations

import os
import secrets

import pytest

try:  # optional extra: the s3 extra (make test-s3); without it these tests are skipped, never errors
    import boto3
    from moto import server as moto_server
except ImportError:
    boto3 = moto_server = None

ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class Server:
    """A moto S3 server on 127.0.0.1:<free port>. `stop()` makes the store go away (connections refused);
    `restart()` brings up a new server (on a new port) over the same in-process data."""

    def __init__(self):
        self._server = None
        self.start()

    def start(self):
        self._server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        os.environ["AWS_ENDPOINT_URL"] = self.endpoint

    def stop(self):
        self._server.stop()

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        r = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for o in r.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server():
    if moto_server is None:
        pytest.skip("needs the s3 extra (boto3, moto[server]): make test-s3")
    old = {k: os.environ.get(k) for k in (*ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(ENV)
    server = Server()
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh, empty bucket per test."""
    name = f"runs-{secrets.token_hex(4)}"
    s3_server.client().create_bucket(Bucket=name)
    return name
