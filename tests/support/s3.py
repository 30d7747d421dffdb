"""A local S3 for tests: moto's server on a free localhost port (real HTTP), with the standard AWS_*
variables pointing every client (boto3, s3fs through `storage_options`) at it."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class LocalS3:
    """The running server: its endpoint, the AWS_* variables set for it, and a boto3 client to arrange and
    read back objects."""

    endpoint: str
    client: Any
    env: dict[str, str]

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Key -> content of every object under `prefix`."""
        listed = self.client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents") or []
        return {o["Key"]: self.client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


@contextlib.contextmanager
def local_s3(*buckets: str) -> Iterator[LocalS3]:
    """Start moto's ThreadedMotoServer with `buckets` created; the AWS_* variables are restored after."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield LocalS3(env["AWS_ENDPOINT_URL"], client, env)
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
