"""Benchmark the Integration API upload against ``cp`` and a raw WSGI sink.

Run from the repository root::

    python bench/upload.py               # 1 GiB file, 3 runs of each case
    python bench/upload.py --size 4      # 4 GiB (the largest file accepted)
    python bench/upload.py --size 0.05 --runs 1   # a quick check (50 MiB)

The script makes a file of random bytes (``os.urandom``, fsynced) in a fresh
temporary folder (``--dir``, default the system's temporary folder; a tmpfs is
refused so that every case hits the same real disk) and moves the same file
three ways, one case after the other in every run, so that drift over time
hits every case alike:

- ``raw sink``: ``curl -F data=@FILE`` to a WSGI app that reads ``wsgi.input``
  in 1 MiB blocks and throws them away, served by ``dais-gateway serve``
  itself with only the WSGI app swapped: the subprocess replaces
  ``dais_wsgi.server.create_server`` by a wrapper that passes the very options
  ``make_server`` builds to ``waitress.server.create_server`` with the sink as
  the app, and ``make_server`` then sets ``StreamingChannel`` and the request
  deadline as usual. The sink is posted to an upload path, so that its body
  streams as an upload's does. Like the upload handler, it reads the body on a thread
  allowed every CPU (``serve`` keeps its other threads on one). No disk, no
  multipart parsing, no hashing: the ceiling of the HTTP stack on these
  settings.
- ``gateway``: ``curl -F data=@FILE`` to
  ``/integration/v1/resources/big/<name>`` of ``dais-gateway serve`` (default
  settings, ``DAIS_LOG_LEVEL=WARNING``), with a key and a prefix grant
  ``big/ -> filemanager://bench/big/`` made through the command line (one key
  per run, so the 1 upload/s throttle never answers 429). The File Manager is
  a folder of the same temporary folder, on the same disk as the source file.
  The answer must be 200 with the file's size and SHA-256.
- ``cp + sync``: ``cp FILE DEST`` then ``sync DEST DEST_FOLDER`` (GNU ``sync``
  with arguments fsyncs those files), on the same disk.
- ``dd direct``: ``dd if=FILE of=DEST bs=1M oflag=direct`` then the same
  ``sync``: the file written past the page cache in 1 MiB blocks, as the
  File Manager writes its staged copies. This is the disk's own pace for a
  durable copy, and no server that keeps the file can beat it.

What the times include. Each time is the wall clock around the client
processes. For the HTTP cases that is curl's whole run: connect, headers, the
``Expect: 100-continue`` round trip (curl's default), the body, and the
answer; for the gateway the answer comes only after the server has parsed the
multipart body, hashed it, written the staged copy, fsynced it, renamed it
into place, fsynced the folder and recorded the publish in SQLite. For
``cp + sync`` and ``dd direct`` it is the copy plus the fsync of the copy and
of its folder, the same durability the gateway gives. The raw sink writes
nothing.

Every case starts from the same state (outside the timing): the source file is
read once, so that it comes from the page cache in every case; ``os.sync()``
flushes what earlier cases left dirty; and the copy the previous writing case
made is deleted only then (a copy made before the first run stands in for
it). So each writing case starts right after one file's worth of page cache
was freed. This matters on virtual machines that hand free memory back to the
host (virtio-balloon free page reporting): there, a page freed a few seconds
ago costs a fault in the host when it is used again, and a writer that
fills the page cache at network pace rather than at ``cp``'s pace pays more of
those faults. Such a machine shows it as a large share of the gateway's time
inside ``write()`` in a profile.

How to read the output. One line per case and run, then a summary with the
median of the runs:

- ``MiB/s``: file bytes (not multipart framing) per second of wall time.
- ``srv CPU`` / ``cli CPU``: CPU seconds of the server process (user +
  system, from ``/proc/PID/stat``) and of the client processes (curl, or
  cp or dd and sync, from ``wait4``). On a small machine client and server
  share the cores. ``oth CPU``: the CPU seconds the rest of the machine was
  busy during the case (``/proc/stat`` minus the two); well above zero means
  other work competed for the cores and the run is noisy.
- ``idle MiB`` / ``peak+ MiB``: the server's ``VmRSS`` before its first
  upload, and how far ``VmHWM`` (the peak resident set, reset before each
  upload through ``/proc/PID/clear_refs`` when the kernel allows it) rose
  above that idle figure during the upload. Each server runs in a process of
  its own.
- ``proc w/B``: bytes the process caused to be written to disk
  (``write_bytes`` of ``/proc/PID/io``, counted when a page is dirtied;
  ``wait4``'s ``ru_oublock`` for cp + sync) divided by the file size: 1.00
  means each byte of the file is written once. ``dev w/B``: sectors written
  to the whole block device during the case (``/sys/dev/block/M:m/stat``)
  divided by the file size; it adds file-system metadata and journal writes
  and anything else the machine wrote meanwhile, so it is only a cross-check.

Then the ratios (gateway / raw sink, gateway / cp + sync, gateway / dd
direct) and the two targets:
the gateway moves at least 0.5 x the raw sink's throughput, and its peak RSS
stays under 64 MiB over idle whatever the size.

Last, the bound this machine sets. After each run the script times, in CPU
seconds of its own process, SHA-256 of the file's size from memory (the
answer must give the digest). Adding the raw sink's own CPU (server and
curl: receiving the body) gives the least CPU any upload server needs;
writing the bytes once costs next to no CPU when it bypasses the page cache,
as the File Manager's staged copies do, so it is left out (``cp + sync``
spends the CPU printed beside it, through the page cache). Spread perfectly
over all cores, with no other cost at all, it still takes that CPU divided
by the cores. ``no upload server here can beat R x the raw sink``
reports the raw sink's time over that. The disk sets a second bound: no
server that stores the file beats ``dd direct``, so the script also prints
dd direct's throughput over the raw sink's. When the smaller of the two is
under 0.5, the throughput target cannot be met on this machine by any
design, only on one with more cores or a faster disk. ``--check`` makes a missed target an exit status of 1; ``--json PATH``
writes every figure.

Bounds: only 127.0.0.1, fixed sizes (at most 4 GiB), ``--time-cap`` seconds
for the whole run (curl gets ``--max-time`` of what is left), every process the
script starts is stopped by its PID, and the temporary folder is removed at
the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from _common import BenchError, Processes, first_line, port_of

HOST = "127.0.0.1"
PROJECT = "bench"
MiB = 2**20
GiB = 2**30
CHUNK = MiB
START_TIMEOUT = 30.0
RSS_TARGET_MIB = 64.0
RATIO_TARGET = 0.5
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: An upload path: only webhook calls and uploads stream their bodies; the
#: server reads any other body whole, up to 1 MiB, before the app sees it.
RAW_SINK_PATH = "/integration/v1/resources/raw"

#: Run as ``python -c RAW_SINK OPTIONS_JSON --home H serve --port 0``: the
#: ``serve`` command with its WSGI app, and nothing else, replaced by a sink.
RAW_SINK = """
import json
import sys

import waitress.server

import dais_wsgi.server
from dais_wsgi.affinity import widened
from dais_wsgi.cli import main

BLOCK = 1 << 20
options_path = sys.argv.pop(1)


def raw_sink(environ, start_response):
    stream = environ["wsgi.input"]
    total = 0
    # As the upload handler does: the body's thread may use every CPU.
    with widened():
        while block := stream.read(BLOCK):
            total += len(block)
    body = json.dumps({"received": total}).encode()
    start_response(
        "200 OK",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
    )
    return [body]


def create_server(application, **options):
    with open(options_path, "w") as out:
        json.dump(options, out, default=repr)
    return waitress.server.create_server(raw_sink, **options)


dais_wsgi.server.create_server = create_server
sys.exit(main(sys.argv[1:]))
"""


# -- time cap ------------------------------------------------------------------


class Deadline:
    """The end of the run's time budget."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.seconds = seconds

    def left(self) -> float:
        """Seconds left; raise once the budget is spent."""
        remaining = self.at - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"the time cap of {self.seconds:.0f} s was reached")
        return remaining


@dataclass
class ChildRun:
    """One client process: its exit status, wall time and CPU time."""

    returncode: int
    wall: float
    cpu: float
    oublock_bytes: int


def run_child(argv: Sequence[str], timeout: float, stdout: IO[str] | None) -> ChildRun:
    """Run a client process to its end; measure it with ``wait4``."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE
    )
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.stderr is not None:
        proc.stderr.close()
    if proc.returncode != 0:
        raise BenchError(f"{argv[0]} exited with {proc.returncode}: {err.strip()}")
    return ChildRun(
        proc.returncode,
        wall,
        usage.ru_utime + usage.ru_stime,
        usage.ru_oublock * 512,
    )


# -- /proc and /sys --------------------------------------------------------------


def status_kib(pid: int, name: str) -> int:
    """Return a ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/PID/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {name} in /proc/{pid}/status")


def reset_peak(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS; return whether the kernel allowed it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def write_bytes(pid: int) -> int:
    """Return ``write_bytes`` of ``/proc/PID/io``."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise BenchError(f"no write_bytes in /proc/{pid}/io")


def cpu_seconds(pid: int) -> float:
    """Return the user + system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def device_stat(path: Path) -> Path | None:
    """Return the ``stat`` file of the block device holding ``path``."""
    dev = path.stat().st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    return stat if stat.exists() else None


def sectors_written(stat: Path | None) -> int | None:
    """Return the sectors (512 bytes) written to a device so far."""
    if stat is None:
        return None
    return int(stat.read_text().split()[6])


def machine_busy() -> float:
    """Return the CPU seconds all processors spent busy since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    # user nice system idle iowait irq softirq steal ...: busy is all but idle.
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def filesystem_of(path: Path) -> tuple[str, str]:
    """Return the mount point and file-system type holding ``path``."""
    real = str(path.resolve())
    best = ("/", "unknown")
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        mount, fstype = parts[1], parts[2]
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[0]):
            best = (mount, fstype)
    return best


# -- the file --------------------------------------------------------------------


def make_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes, fsync them; return their SHA-256."""
    digest = hashlib.sha256()
    with path.open("xb") as out:
        left = size
        while left:
            block = os.urandom(min(CHUNK, left))
            digest.update(block)
            out.write(block)
            left -= len(block)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def prepare(source: Path, previous: Path | None) -> None:
    """Put every case in the same state just before it is timed.

    Read the source file once (so that it is in the page cache whatever the
    kernel reclaimed meanwhile), flush what earlier cases left dirty, and
    delete the previous case's copy only now, so that each writing case
    starts right after one file's worth of page cache was freed.
    """
    buffer = bytearray(CHUNK)
    with source.open("rb", buffering=0) as stream:
        while stream.readinto(buffer):
            pass
    os.sync()
    if previous is not None:
        previous.unlink()


# -- the servers -----------------------------------------------------------------


def server_env() -> dict[str, str]:
    """The environment of the servers: quiet access log, no inherited home."""
    env = dict(os.environ)
    env["DAIS_LOG_LEVEL"] = "WARNING"
    env.pop("DAIS_HOME", None)
    return env


def cli_argv() -> list[str]:
    """The ``dais-gateway`` command of this interpreter's environment."""
    script = Path(sys.executable).parent / "dais-gateway"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "dais_wsgi.cli"]


def dais_cli(home: Path, *args: str) -> str:
    """Run one ``dais-gateway`` admin command and return its output."""
    done = subprocess.run(
        [*cli_argv(), "--home", str(home), *args],
        capture_output=True,
        text=True,
        env=server_env(),
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"{' '.join(args[:2])} failed: {done.stderr.strip()}")
    return done.stdout


def make_keys(home: Path, count: int) -> list[str]:
    """Create ``count`` keys granted ``big/``; return their tokens."""
    tokens = []
    for index in range(count):
        made = json.loads(
            dais_cli(
                home,
                *("keys", "create", "--project", PROJECT),
                *("--label", f"upload-bench-{index}", "--json"),
            )
        )
        dais_cli(
            home,
            *("grants", "add", str(made["id"])),
            *("--resource", "big/", "--to", f"filemanager://{PROJECT}/big/"),
        )
        tokens.append(str(made["key"]))
    return tokens


@dataclass
class Server:
    """A started server process."""

    name: str
    pid: int
    port: int
    argv: list[str]


def start_server(
    procs: Processes, name: str, argv: list[str], deadline: Deadline
) -> Server:
    """Start a server process and read its port from its first line."""
    proc = procs.start(name, argv, server_env())
    line = first_line(proc, min(START_TIMEOUT, deadline.left()))
    if not line:
        raise BenchError(f"{name} did not start:\n" + procs.log_tail(name))
    return Server(name, proc.pid, port_of(line), argv)


# -- measuring ---------------------------------------------------------------------


@dataclass
class Sample:
    """One case of one run."""

    case: str
    run: int
    seconds: float
    mib_s: float
    server_cpu: float | None = None
    client_cpu: float = 0.0
    other_cpu: float = 0.0
    rss_before_kib: int | None = None
    hwm_after_kib: int | None = None
    peak_reset: bool = False
    proc_writes_per_byte: float = 0.0
    device_writes_per_byte: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def curl_argv(
    url: str, source: Path, token: str | None, response: Path, max_time: float
) -> list[str]:
    """``curl -F data=@FILE`` with curl's default ``Expect`` handling."""
    argv = [
        "curl",
        *("--silent", "--show-error", "--noproxy", "*"),
        *("--max-time", f"{max_time:.0f}"),
        *("--output", str(response)),
        *("--write-out", "%{http_code}"),
        *("-F", f"data=@{source}"),
    ]
    if token is not None:
        argv += ["-H", f"Authorization: Bearer {token}"]
    return [*argv, url]


def upload(
    server: Server,
    path: str,
    source: Path,
    token: str | None,
    workdir: Path,
    deadline: Deadline,
    device: Path | None,
    previous: Path | None,
) -> tuple[Sample, dict[str, Any]]:
    """POST the file once with curl; measure the server process around it."""
    pid = server.pid
    prepare(source, previous)
    rss = status_kib(pid, "VmRSS")
    reset = reset_peak(pid)
    io0, cpu0, dev0 = write_bytes(pid), cpu_seconds(pid), sectors_written(device)
    busy0 = machine_busy()
    response = workdir / "response.json"
    code_file = workdir / "status.txt"
    url = f"http://{HOST}:{server.port}{path}"
    with code_file.open("w") as status_out:
        child = run_child(
            curl_argv(url, source, token, response, deadline.left()),
            deadline.left() + 5,
            status_out,
        )
    busy1 = machine_busy()
    io1, cpu1, dev1 = write_bytes(pid), cpu_seconds(pid), sectors_written(device)
    hwm = status_kib(pid, "VmHWM")
    status = code_file.read_text().strip()
    answer_text = response.read_text(errors="replace") if response.exists() else ""
    if status != "200":
        raise BenchError(f"{server.name} answered {status}: {answer_text[:500]}")
    size = source.stat().st_size
    sample = Sample(
        case=server.name,
        run=0,
        seconds=child.wall,
        mib_s=size / MiB / child.wall,
        server_cpu=cpu1 - cpu0,
        client_cpu=child.cpu,
        other_cpu=max(0.0, busy1 - busy0 - (cpu1 - cpu0) - child.cpu),
        rss_before_kib=rss,
        hwm_after_kib=hwm,
        peak_reset=reset,
        proc_writes_per_byte=(io1 - io0) / size,
        device_writes_per_byte=None
        if dev0 is None or dev1 is None
        else (dev1 - dev0) * 512 / size,
    )
    answer: dict[str, Any] = json.loads(answer_text)
    return sample, answer


#: How each copying case writes ``{source}`` to ``{target}``, before ``sync``.
COPIERS = {
    "cp + sync": ["cp", "{source}", "{target}"],
    # Past the page cache in 1 MiB writes, as the File Manager's staged copies.
    "dd direct": [
        "dd",
        "if={source}",
        "of={target}",
        "bs=1M",
        "oflag=direct",
        "status=none",
    ],
}


def copy_with(
    case: str,
    source: Path,
    target: Path,
    deadline: Deadline,
    device: Path | None,
    previous: Path | None,
) -> Sample:
    """Copy the file as ``case`` says, then fsync the copy and its folder."""
    prepare(source, previous)
    argv = [a.format(source=source, target=target) for a in COPIERS[case]]
    dev0 = sectors_written(device)
    busy0 = machine_busy()
    cp = run_child(argv, deadline.left(), None)
    synced = run_child(["sync", str(target), str(target.parent)], deadline.left(), None)
    busy1 = machine_busy()
    dev1 = sectors_written(device)
    size = source.stat().st_size
    seconds = cp.wall + synced.wall
    if target.stat().st_size != size:
        raise BenchError(f"{case} produced a copy of the wrong size")
    return Sample(
        case=case,
        run=0,
        seconds=seconds,
        mib_s=size / MiB / seconds,
        client_cpu=cp.cpu + synced.cpu,
        other_cpu=max(0.0, busy1 - busy0 - cp.cpu - synced.cpu),
        proc_writes_per_byte=(cp.oublock_bytes + synced.oublock_bytes) / size,
        device_writes_per_byte=None
        if dev0 is None or dev1 is None
        else (dev1 - dev0) * 512 / size,
        extra={"copy_seconds": cp.wall, "sync_seconds": synced.wall},
    )


# -- reporting -----------------------------------------------------------------------


def hash_cpu_seconds(size: int) -> float:
    """Return the CPU seconds SHA-256 of ``size`` bytes takes here, flat out.

    Hashed from a buffer in memory, so nothing else is counted: the least
    any upload server must spend on the digest its answer gives.
    """
    block = memoryview(os.urandom(16 * MiB))
    started = time.process_time()
    hasher = hashlib.sha256()
    for offset in range(0, size, len(block)):
        hasher.update(block[: min(len(block), size - offset)])
    return time.process_time() - started


def mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


HEADER = (
    f"{'case':<10} {'run':>3} {'seconds':>7} {'MiB/s':>7} {'srv CPU':>7} "
    f"{'cli CPU':>7} {'oth CPU':>7} {'idle MiB':>8} {'peak+ MiB':>9} "
    f"{'proc w/B':>8} {'dev w/B':>7}"
)


def sample_line(sample: Sample, idle_kib: int | None) -> str:
    peak = (
        None
        if sample.hwm_after_kib is None or idle_kib is None
        else (sample.hwm_after_kib - idle_kib) / 1024
    )
    return (
        f"{sample.case:<10} {sample.run:>3} {sample.seconds:>7.2f} "
        f"{sample.mib_s:>7.1f} {fmt(sample.server_cpu, '.2f'):>7} "
        f"{sample.client_cpu:>7.2f} {sample.other_cpu:>7.2f} {mib(idle_kib):>8} "
        f"{fmt(peak, '.1f'):>9} {sample.proc_writes_per_byte:>8.3f} "
        f"{fmt(sample.device_writes_per_byte, '.3f'):>7}"
    )


@dataclass
class Summary:
    """The median run of a case, and its worst memory figure."""

    case: str
    mib_s: float
    seconds: float
    server_cpu: float | None
    client_cpu: float
    other_cpu: float
    idle_kib: int | None
    peak_over_idle_mib: float | None
    proc_writes_per_byte: float
    device_writes_per_byte: float | None


def summarise(case: str, samples: list[Sample], idle_kib: int | None) -> Summary:
    def median(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    peaks = [s.hwm_after_kib for s in samples if s.hwm_after_kib is not None]
    return Summary(
        case=case,
        mib_s=statistics.median(s.mib_s for s in samples),
        seconds=statistics.median(s.seconds for s in samples),
        server_cpu=median([s.server_cpu for s in samples]),
        client_cpu=statistics.median(s.client_cpu for s in samples),
        other_cpu=statistics.median(s.other_cpu for s in samples),
        idle_kib=idle_kib,
        peak_over_idle_mib=(max(peaks) - idle_kib) / 1024
        if peaks and idle_kib is not None
        else None,
        proc_writes_per_byte=statistics.median(s.proc_writes_per_byte for s in samples),
        device_writes_per_byte=median([s.device_writes_per_byte for s in samples]),
    )


def summary_line(summary: Summary) -> str:
    return (
        f"{summary.case:<10} {'med':>3} {summary.seconds:>7.2f} "
        f"{summary.mib_s:>7.1f} {fmt(summary.server_cpu, '.2f'):>7} "
        f"{summary.client_cpu:>7.2f} {summary.other_cpu:>7.2f} "
        f"{mib(summary.idle_kib):>8} {fmt(summary.peak_over_idle_mib, '.1f'):>9} "
        f"{summary.proc_writes_per_byte:>8.3f} "
        f"{fmt(summary.device_writes_per_byte, '.3f'):>7}"
    )


def tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return "not found"
    words = (done.stdout or done.stderr).split()
    # "curl 7.88.1 (x86_64...) ..." -> "curl 7.88.1"; "cp (GNU coreutils) 9.1".
    for index, word in enumerate(words):
        if any(c.isdigit() for c in word):
            return " ".join(words[: index + 1])
    return " ".join(words[:3])


def environment(workdir: Path) -> dict[str, Any]:
    mount, fstype = filesystem_of(workdir)
    return {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "waitress": metadata.version("waitress"),
        "falcon": metadata.version("falcon"),
        "curl": tool_version(["curl", "--version"]),
        "cp": tool_version(["cp", "--version"]),
        "dd": tool_version(["dd", "--version"]),
        "filesystem": f"{fstype} at {mount}",
    }


# -- the run --------------------------------------------------------------------------


def check_disk(folder: Path, size: int) -> None:
    """Refuse a tmpfs, or a disk without room for the file and one copy."""
    mount, fstype = filesystem_of(folder)
    if fstype in {"tmpfs", "ramfs"}:
        raise BenchError(f"{folder} is on {fstype} ({mount}); use --dir on a disk")
    free = shutil.disk_usage(folder).free
    need = 2 * size + GiB
    if free < need:
        raise BenchError(
            f"{folder} has {free / GiB:.1f} GiB free; {need / GiB:.1f} GiB needed"
        )


@contextlib.contextmanager
def workspace(parent: Path) -> Iterator[Path]:
    """A temporary folder, removed at the end whatever happens."""
    path = Path(tempfile.mkdtemp(prefix="dais-upload-bench-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def bench(args: argparse.Namespace, workdir: Path, deadline: Deadline) -> int:
    size = round(args.size * GiB)
    env = environment(workdir)
    for name, value in env.items():
        print(f"{name:>10}: {value}")
    print(f"{'file':>10}: {size} bytes ({size / MiB:.1f} MiB), {args.runs} runs")
    device = device_stat(workdir)

    source = workdir / "source.bin"
    started = time.perf_counter()
    digest = make_file(source, size)
    print(f"made the file in {time.perf_counter() - started:.1f} s, sha256 {digest}")

    gateway_home, raw_home = workdir / "gateway", workdir / "raw"
    tokens = make_keys(gateway_home, args.runs)
    filemanager = gateway_home / "filemanager"
    cp_folder = workdir / "cp"
    cp_folder.mkdir()
    logs = workdir / "logs"
    logs.mkdir()
    options_file = workdir / "raw-options.json"

    procs = Processes(logs)
    try:
        serve = ["--home", "{home}", "serve", "--host", HOST, "--port", "0"]
        gateway = start_server(
            procs,
            "gateway",
            [*cli_argv(), *(a.format(home=gateway_home) for a in serve)],
            deadline,
        )
        raw = start_server(
            procs,
            "raw sink",
            [
                sys.executable,
                "-c",
                RAW_SINK,
                str(options_file),
                *(a.format(home=raw_home) for a in serve),
            ],
            deadline,
        )
        if not options_file.exists():
            raise BenchError(
                "the raw sink did not go through dais_wsgi.server.create_server; "
                "make_server no longer builds its server the way this script expects"
            )
        raw_options = json.loads(options_file.read_text())
        print(f"waitress options (make_server, both servers): {raw_options}")
        idle = {
            gateway.name: status_kib(gateway.pid, "VmRSS"),
            raw.name: status_kib(raw.pid, "VmRSS"),
        }
        samples: dict[str, list[Sample]] = {raw.name: [], gateway.name: []}
        samples |= {case: [] for case in COPIERS}
        hash_cpu: list[float] = []
        print()
        print(HEADER)
        # The copy the next writing case deletes just before it starts.
        previous: Path | None = cp_folder / "initial.bin"
        shutil.copyfile(source, cp_folder / "initial.bin")
        for run in range(1, args.runs + 1):
            sample, answer = upload(
                raw, RAW_SINK_PATH, source, None, workdir, deadline, device, None
            )
            if answer.get("received", 0) < size:
                raise BenchError(f"the raw sink received only {answer}")
            sample.run = run
            samples[raw.name].append(sample)
            print(sample_line(sample, idle[raw.name]), flush=True)

            name = f"upload-{run}.bin"
            sample, answer = upload(
                gateway,
                f"/integration/v1/resources/big/{name}",
                source,
                tokens[run - 1],
                workdir,
                deadline,
                device,
                previous,
            )
            if answer.get("size") != size or answer.get("sha256") != digest:
                raise BenchError(f"the gateway answered {answer}")
            previous = filemanager / PROJECT / "big" / name
            if previous.stat().st_size != size:
                raise BenchError(f"{previous} has the wrong size")
            sample.run = run
            samples[gateway.name].append(sample)
            print(sample_line(sample, idle[gateway.name]), flush=True)

            for case in COPIERS:
                target = cp_folder / f"{case[:2]}-{name}"
                sample = copy_with(case, source, target, deadline, device, previous)
                previous = target
                sample.run = run
                samples[case].append(sample)
                print(sample_line(sample, None), flush=True)
            hash_cpu.append(hash_cpu_seconds(size))
        leftovers = list((filemanager / ".dais-staging").glob("*"))
        if leftovers:
            raise BenchError(f"staged files left behind: {leftovers}")
    except BenchError as exc:
        tails = "".join(
            f"\n--- {name} log ---\n{procs.log_tail(name)}"
            for name in ("gateway", "raw sink")
        )
        raise BenchError(f"{exc}{tails}") from exc
    finally:
        procs.stop_all()

    summaries = [
        summarise(raw.name, samples[raw.name], idle[raw.name]),
        summarise(gateway.name, samples[gateway.name], idle[gateway.name]),
        *(summarise(case, samples[case], None) for case in COPIERS),
    ]
    raw_s, gw_s, cp_s, dd_s = summaries
    print()
    print("median of the runs (peak+ is the largest of the runs):")
    print(HEADER)
    for summary in summaries:
        print(summary_line(summary))

    everything = [s for v in samples.values() for s in v]
    busy = sum(s.other_cpu for s in everything) / sum(s.seconds for s in everything)
    if busy > 0.1:
        print(
            f"note: other work kept {busy:.0%} of a core busy during the cases; "
            "the figures are noisy (see oth CPU)"
        )
    ratio_raw = gw_s.mib_s / raw_s.mib_s
    ratio_cp = gw_s.mib_s / cp_s.mib_s
    peak = gw_s.peak_over_idle_mib
    resets = all(s.peak_reset for s in samples[gateway.name])
    print()
    print(f"gateway / raw sink  : {ratio_raw:.2f} x")
    print(f"gateway / cp + sync : {ratio_cp:.2f} x")
    print(f"gateway / dd direct : {gw_s.mib_s / dd_s.mib_s:.2f} x")
    print(f"raw sink / cp + sync: {raw_s.mib_s / cp_s.mib_s:.2f} x")
    ok_ratio = ratio_raw >= RATIO_TARGET
    ok_rss = peak is not None and peak < RSS_TARGET_MIB
    print(
        f"target throughput >= {RATIO_TARGET} x raw sink: "
        f"{'met' if ok_ratio else 'MISSED'} ({ratio_raw:.2f} x)"
    )
    print(
        f"target peak RSS < {RSS_TARGET_MIB:.0f} MiB over idle: "
        f"{'met' if ok_rss else 'MISSED'} ({fmt(peak, '.1f')} MiB"
        f"{'' if resets else '; VmHWM could not be reset between runs'})"
    )
    print(
        "writes per byte (gateway process): "
        f"{gw_s.proc_writes_per_byte:.3f} "
        "(1.00 = each byte of the file written to disk once)"
    )
    bound = print_bound(raw_s, cp_s, dd_s, statistics.median(hash_cpu))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "environment": env,
                    "size": size,
                    "runs": args.runs,
                    "waitress_options": raw_options,
                    "samples": [asdict(s) for v in samples.values() for s in v],
                    "summary": [asdict(s) for s in summaries],
                    "ratios": {"gateway_raw": ratio_raw, "gateway_cp": ratio_cp},
                    "targets_met": {"throughput": ok_ratio, "rss": ok_rss},
                    "hash_cpu": hash_cpu,
                    "bound": bound,
                },
                indent=2,
            )
        )
    return 1 if args.check and not (ok_ratio and ok_rss) else 0


def print_bound(
    raw: Summary, cp: Summary, dd: Summary, hash_cpu: float
) -> dict[str, float]:
    """Print the best ratio to the raw sink that this machine allows.

    Any upload server must at least receive the body as the raw sink does
    (its server and curl CPU) and hash every byte. Writing every byte once
    costs the CPU next to nothing past the page cache (``O_DIRECT``), so it
    is not counted; ``cp + sync``, through the cache, is printed beside it.
    Spread perfectly over every core, with no other cost at all (no
    multipart parsing, no Python), that CPU still takes ``floor / cores``
    seconds.

    And every byte must reach the disk: no server that keeps the file can
    store it faster than ``dd`` writes it past the cache and fsyncs it.
    """
    cores = len(os.sched_getaffinity(0))
    receive_cpu = (raw.server_cpu or 0.0) + raw.client_cpu
    floor_cpu = receive_cpu + hash_cpu
    best_seconds = max(raw.seconds, floor_cpu / cores)
    cpu_best = raw.seconds / best_seconds
    disk_best = dd.mib_s / raw.mib_s
    best = min(cpu_best, disk_best)
    print(
        f"least work per file: receiving as the raw sink does {receive_cpu:.2f} "
        f"CPU s (server + curl), SHA-256 {hash_cpu:.2f} CPU s (median); writing "
        f"through the page cache as cp + sync does would add {cp.client_cpu:.2f}"
    )
    print(
        f"bound on {cores} cores: at least {floor_cpu:.2f} CPU s / {cores} = "
        f"{floor_cpu / cores:.2f} s per file, so no upload server here can beat "
        f"{cpu_best:.2f} x the raw sink"
    )
    print(
        f"bound of the disk: dd direct stores {dd.mib_s:.0f} MiB/s, so no upload "
        f"server that keeps the file on this disk can beat {disk_best:.2f} x the "
        "raw sink"
    )
    print(
        f"best ratio this machine allows: {best:.2f} x (target {RATIO_TARGET} x, "
        f"{'within reach' if best >= RATIO_TARGET else 'out of reach here'})"
    )
    return {
        "cores": cores,
        "receive_cpu": receive_cpu,
        "hash_cpu": hash_cpu,
        "cp_write_cpu": cp.client_cpu,
        "cpu_best_ratio": cpu_best,
        "disk_best_ratio": disk_best,
        "best_ratio": best,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Upload a file through the gateway, a raw WSGI sink and cp."
    )
    parser.add_argument(
        "--size",
        type=float,
        default=1.0,
        help="file size in GiB, at most 4 (default 1; 0.05 for a quick run)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each case")
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the temporary folder goes (a real disk, not a tmpfs)",
    )
    parser.add_argument(
        "--time-cap",
        type=float,
        default=1800.0,
        help="seconds the whole run may take (default 1800)",
    )
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a target is missed"
    )
    args = parser.parse_args(argv)
    if not 0 < args.size <= 4:
        parser.error("--size must be more than 0 and at most 4 (GiB)")
    if not 1 <= args.runs <= 20:
        parser.error("--runs must be between 1 and 20")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = Deadline(args.time_cap)
    try:
        check_disk(args.dir, round(args.size * GiB))
        with workspace(args.dir) as workdir:
            return bench(args, workdir, deadline)
    except BenchError as exc:
        print(f"upload bench: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
