"""Benchmark the S3 storage adapter against a plain smart-open copy.

Run from the repository root::

    python bench/s3.py                 # 256 MiB file, 3 runs of each case
    python bench/s3.py --size 1024     # 1 GiB
    python bench/s3.py --size 32 --runs 1   # a quick check

The script makes a file of random bytes in a fresh temporary folder, starts a
moto S3 server on 127.0.0.1 (``tests/moto_server.py``) and moves the same file
into it three ways, one case after the other in every run, so that drift over
time hits every case alike:

- ``smart-open``: ``smart_open.open(uri, "wb")`` with the same client
  settings and part size, the file written in 1 MiB blocks, then ``close()``:
  the ceiling for this transport.
- ``adapter``: :class:`dais_adapters.objectstore.ObjectStorage`
  ``stage`` / ``write`` / ``commit`` / ``release`` of the same blocks, to a
  key that does not exist yet (no backup to take).
- ``adapter, replace``: the same over an existing object of the same size,
  so commit first copies it to the backup key (server-side) and release
  deletes the backup.

Each time is the wall clock from opening the writer to the object being
complete (and, for the adapter, released). Every object is checked for its
size afterwards and deleted before the next case, outside the timing. The
source file is read from the page cache. moto keeps objects in memory and
runs on the same machine, so the figures compare the two clients, not S3.

Output: one line per case and run (MiB/s, CPU seconds of this process), then
the medians and the ratios adapter / smart-open.

Bounds: only 127.0.0.1, sizes up to 4096 MiB, ``--time-cap`` seconds for the
whole run, the moto server stopped by its PID, the temporary folder removed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
import smart_open
from tests.moto_server import MotoServer, aws_environment

from dais_adapters.objectstore import ObjectStorage, ObjectStoreOptions
from dais_core.rules import Location

MiB = 2**20
BLOCK = MiB
MAX_SIZE_MIB = 4096
BUCKET = "dais-bench"


class BenchError(Exception):
    """The benchmark could not run as asked."""


class Deadline:
    """The end of the run's time budget."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.seconds = seconds

    def check(self) -> None:
        """Raise once the budget is spent."""
        if time.monotonic() >= self.at:
            raise BenchError(f"the time cap of {self.seconds:.0f} s was reached")


def make_file(folder: Path, size: int) -> Path:
    """Write ``size`` random bytes to a file in ``folder``."""
    path = folder / "source.bin"
    with path.open("wb") as out:
        for start in range(0, size, BLOCK):
            out.write(os.urandom(min(BLOCK, size - start)))
    return path


def blocks(path: Path) -> Iterator[bytes]:
    """Read a file in 1 MiB blocks."""
    with path.open("rb") as source:
        while block := source.read(BLOCK):
            yield block


def direct_copy(client: Any, path: Path, key: str, part_size: int) -> None:
    """Copy the file with smart-open alone."""
    params = {"client": client, "min_part_size": part_size}
    uri = f"s3://{BUCKET}/{key}"
    with smart_open.open(
        uri, "wb", compression="disable", transport_params=params
    ) as out:
        for block in blocks(path):
            out.write(block)


def adapter_copy(storage: ObjectStorage, path: Path, key: str) -> None:
    """Copy the file through the adapter's stage, write, commit and release."""
    staged = storage.stage(Location("s3", BUCKET, key))
    for block in blocks(path):
        staged.write(block)
    staged.commit()
    staged.release()


def timed(action: Callable[[], None]) -> tuple[float, float]:
    """Run ``action``; return its wall and CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return time.perf_counter() - wall, time.process_time() - cpu


def check_and_delete(client: Any, key: str, size: int) -> None:
    """Check the object's size, then remove it and any backup left."""
    length = client.head_object(Bucket=BUCKET, Key=key)["ContentLength"]
    if length != size:
        raise BenchError(f"{key} holds {length} bytes, not {size}")
    client.delete_object(Bucket=BUCKET, Key=key)
    leftovers = client.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0)
    pending = client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    if leftovers or pending:
        raise BenchError(f"left behind: {leftovers} objects, {len(pending)} uploads")


def run_cases(
    args: argparse.Namespace, path: Path, client: Any, deadline: Deadline
) -> dict[str, list[tuple[float, float]]]:
    """Run every case ``args.runs`` times; return (wall, cpu) per case."""
    size = path.stat().st_size
    part_size = args.part_size * MiB
    storage = ObjectStorage(ObjectStoreOptions(part_size=part_size))
    storage.client()  # built once, at the first stage; not part of any timing
    results: dict[str, list[tuple[float, float]]] = {
        "smart-open": [],
        "adapter": [],
        "adapter, replace": [],
    }
    for run in range(1, args.runs + 1):
        for case in results:
            deadline.check()
            key = f"bench/{uuid.uuid4().hex}.bin"
            if case == "adapter, replace":
                direct_copy(client, path, key, part_size)
            if case == "smart-open":
                figures = timed(partial(direct_copy, client, path, key, part_size))
            else:
                figures = timed(partial(adapter_copy, storage, path, key))
            check_and_delete(client, key, size)
            results[case].append(figures)
            wall, cpu = figures
            print(
                f"run {run}  {case:<17} {size / MiB / wall:8.1f} MiB/s"
                f"  {wall:7.2f} s  cpu {cpu:6.2f} s",
                flush=True,
            )
    return results


def summarise(results: dict[str, list[tuple[float, float]]], size: int) -> None:
    """Print the median of each case and the ratios to smart-open."""
    medians = {
        case: size / MiB / statistics.median(wall for wall, _ in figures)
        for case, figures in results.items()
    }
    print("\nmedian MiB/s")
    for case, rate in medians.items():
        print(f"  {case:<17} {rate:8.1f}")
    base = medians["smart-open"]
    for case in ("adapter", "adapter, replace"):
        print(f"ratio {case} / smart-open: {medians[case] / base:.2f}")


@contextlib.contextmanager
def aws_settings(endpoint: str) -> Iterator[None]:
    """Point the AWS variables of this process at ``endpoint`` for a while."""
    saved = {name: os.environ.get(name) for name in aws_environment(endpoint)}
    for name, value in aws_environment(endpoint).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def bench(args: argparse.Namespace) -> None:
    """Make the file, start moto, run the cases and print the figures."""
    deadline = Deadline(args.time_cap)
    size = int(args.size * MiB)
    with tempfile.TemporaryDirectory(prefix="dais-bench-s3-") as folder:
        path = make_file(Path(folder), size)
        with MotoServer.start() as server, aws_settings(server.endpoint):
            client = boto3.session.Session().client("s3")
            client.create_bucket(Bucket=BUCKET)
            print(
                f"{size / MiB:.0f} MiB file, part size {args.part_size} MiB, "
                f"{args.runs} runs, moto at {server.endpoint}",
                flush=True,
            )
            results = run_cases(args, path, client, deadline)
    summarise(results, size)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", type=float, default=256, help="file size in MiB (default 256)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each case")
    parser.add_argument(
        "--part-size",
        type=int,
        default=ObjectStoreOptions().part_size // MiB,
        help="multipart part size in MiB, for both clients",
    )
    parser.add_argument(
        "--time-cap", type=float, default=900, help="seconds for the whole run"
    )
    args = parser.parse_args(argv)
    if not 0 < args.size <= MAX_SIZE_MIB:
        parser.error(f"--size must be above 0 and at most {MAX_SIZE_MIB} MiB")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        bench(parse_args(argv))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
