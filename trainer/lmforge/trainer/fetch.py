"""`python -m lmforge.trainer fetch --uri U --dest D`: the init container that downloads
a model (hf://) or files (s3://) into the job's cache volume before training.

Every pod of a multi-node job runs it against the same volume: each downloads into
its own temporary folder and renames it into place; the first complete copy wins
and later pods find it (the marker file) and skip the download.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

MARKER = ".lmforge-fetched"


class FetchError(RuntimeError):
    """The location cannot be fetched; the message names it and says why."""


def parse_hf(uri: str) -> tuple[str, str | None]:
    """hf://org/name[@revision] -> (repo id, revision)."""
    ref = uri.removeprefix("hf://")
    repo, _, revision = ref.partition("@")
    return repo, revision or None


def fetch(uri: str, dest: Path) -> Path:
    """Download `uri` into `dest` once; returns `dest`."""
    if (dest / MARKER).exists():
        return dest
    staging = dest.parent / f".{dest.name}.{socket.gethostname()}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if uri.startswith("hf://"):
            _fetch_hf(uri, staging)
        elif uri.startswith("s3://"):
            _fetch_s3(uri, staging)
        else:
            raise FetchError(f"{uri}: only hf:// and s3:// locations are fetched")
        (staging / MARKER).write_text(uri + "\n")
        try:
            staging.rename(dest)
        except OSError:  # another pod finished first
            if not (dest / MARKER).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _fetch_hf(uri: str, into: Path) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, revision = parse_hf(uri)
    try:
        snapshot_download(
            repo, revision=revision, local_dir=into, token=os.environ.get("HF_TOKEN") or None
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise FetchError(f"{uri}: download from the Hugging Face Hub failed: {err}") from None


def _fetch_s3(uri: str, into: Path) -> None:
    try:
        import boto3
    except ImportError:
        raise FetchError(f"{uri}: s3:// needs boto3 in the trainer image") from None
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3")
    found = False
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            key = item["Key"]
            relative = key[len(prefix) :].lstrip("/") or Path(key).name
            target = into / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, key, str(target))
            found = True
    if not found:
        raise FetchError(f"{uri}: no objects under that prefix")
