"""Benchmark the project gateway: HTTP throughput and the cost of one decision.

Run from the repository root::

    python bench/gateway.py                  # both parts, 5000 POSTs per path
    python bench/gateway.py --rounds 3       # each path 3 times, median kept
    python bench/gateway.py --status 200     # upstream answers 200, keep-alive
    python bench/gateway.py --skip-core      # HTTP part only
    python bench/gateway.py --skip-http      # decision cost only

Everything listens on 127.0.0.1 and lives in a temporary folder that is
removed at the end; every process the script starts is stopped by its PID.

**Part 1, HTTP.** A trivial upstream (a WSGI app answering ``204`` to any
request, served by waitress with 8 threads in its own process) gets the same
fixed number of small POSTs (``--requests``, default 5000) along each path:

- ``direct``: straight at the upstream;
- ``gateway``: through ``dais-gateway serve`` (its own process, default
  settings, so its threads keep to one CPU unless ``--cpu-affinity off``;
  ``DAIS_LOG_LEVEL=WARNING``) at
  ``/project-gateway/webhooks/bench/lineage-version/latest/echo/api/webhook/ping``
  with a real key, permission and service set up with the ``dais-gateway``
  command line;
- ``nginx``: through an nginx reverse proxy (one worker, keep-alive to the
  upstream), only when ``nginx`` is installed.

The load generator is ``wrk`` when installed (closed loop, ``--connections``
connections; a Lua script stops it at the request count, give or take the
few responses already in flight, and req/s counts what completed), otherwise
a Python client: ``--processes`` processes, each with one ``http.client``
connection, sending requests back to back. Each path gets a warm-up first (a
tenth of the count, at least 100); ``--rounds N`` measures the paths N times,
interleaved, and keeps the median round per path. Every run is bounded by the
request count and by ``--time-cap`` seconds.

Reading the output: one row per path with requests/s, p50/p99 latency,
requests with an unexpected status or a socket error (both should be 0), and
the CPU time each server process used per request (from ``/proc``; it shows
where the cost is: the gateway's own Python work vs. the upstream's). Then the
throughput ratios gateway/direct (target >= 0.5) and gateway/nginx. The load
generator, the gateway and the upstream share the machine's cores, so on a
small machine the ratios also measure CPU contention. Waitress closes the
connection after every 204 (it sends no length, so it does not keep the
connection), on the upstream and on the gateway alike; ``--status 200`` makes
the upstream answer ``200`` with ``Content-Length: 0`` to see every hop kept
alive.

**Part 2, decision cost.** In this process, one thread, the script times the
per-request work of the gateway before forwarding, wired as ``serve`` wires
it: ``dais_core.usecases.authenticate`` (bearer key through the in-process
key cache, constant-time hash check), ``dais_core.gateway.parse_gateway_path``,
``dais_core.usecases.authorise_call`` (service list through the registry
cache, permission match) and ``Throttler.check`` on ``MemoryThrottleState``,
over the real ``SqliteStore`` on disk, filled with 1,000 keys / 10,000
permissions and with 100,000 keys / 1,000,000 permissions (10 permissions per
key in both, 1,000 projects with 15 services each; the call matches the key's
last permission). The same decision on a cache miss, which reads the store
every time (what happens once per key per cache TTL), is timed too.
The 100 measured keys are real (``new_key``); filler keys carry fake hashes.
The sizes are timed in interleaved rounds (``--core-rounds``).

Reading the output: microseconds per decision (mean, p50, p99) for each size
and the ratio largest/smallest; a ratio near 1 means the cost does not grow
with the store (the mean is more sensitive than the p50 to load from
elsewhere on the machine). The target is under 50 us per decision. A
breakdown follows, each step timed alone (so the parts need not add up
exactly): the decision on a cache miss, the SQLite reads inside
``authenticate`` and ``authorise_call``, a ``load`` of random keys from the
whole store (cold rows), and ``record_forward``, the SQLite write transaction
that records a forwarded call (``serve`` batches these off the request path).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import multiprocessing
import os
import platform
import queue
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from _common import BenchError, Processes, first_line, port_of

from dais_adapters.cache import CachedKeyStore, CachedRegistry
from dais_adapters.memory import MemoryThrottleState
from dais_adapters.sqlite import SqliteStore
from dais_core.gateway import parse_gateway_path
from dais_core.keys import new_key
from dais_core.policies import RatePolicy, Throttler
from dais_core.usecases import authenticate, authorise_call
from dais_core.values import ForwardRecord

HOST = "127.0.0.1"
PROJECT = "bench"
SERVICE = "echo"
ROUTE = "/api/webhook/ping"
GATEWAY_PATH = (
    f"/project-gateway/webhooks/{PROJECT}/lineage-version/latest/{SERVICE}{ROUTE}"
)
BODY = b'{"event": "ping", "at": "2026-12-04T00:00:00Z", "n": 1}'
START_TIMEOUT = 30.0

UPSTREAM_SNIPPET = """
import sys
from waitress.server import create_server

STATUS = {"204": "204 No Content", "200": "200 OK"}[sys.argv[1]]
# A 200 declares its empty body; a 204 must not (RFC 9110, section 8.6).
HEADERS = [] if STATUS.startswith("204") else [("Content-Length", "0")]

def app(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length:
        environ["wsgi.input"].read(length)
    start_response(STATUS, HEADERS)
    return []

server = create_server(
    app, host="127.0.0.1", port=0, threads=8, ident="bench-upstream"
)
print(f"upstream on http://127.0.0.1:{server.effective_port}", flush=True)
server.run()
"""

NGINX_CONF = """
worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream bench_upstream {{
        server 127.0.0.1:{upstream};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"

local budgets = {{{budgets}}}
local threads = {{}}

function setup(thread)
    local index = #threads + 1
    thread:set("budget", budgets[index])
    threads[index] = thread
end

count = 0
wrong = 0

function response(status, headers, body)
    count = count + 1
    if status ~= {status} then
        wrong = wrong + 1
    end
    if count == budget then
        io.write("DAIS-STOP\\n")
        io.flush()
        wrk.thread:stop()
    end
end

function done(summary, latency, requests)
    local seen, bad = 0, 0
    for _, thread in ipairs(threads) do
        seen = seen + thread:get("count")
        bad = bad + thread:get("wrong")
    end
    local e = summary.errors
    io.write(string.format(
        "DAIS-BENCH %.0f %.0f %.0f %.0f %.0f %.0f %.0f\\n",
        summary.requests, summary.duration, seen, bad,
        e.connect + e.read + e.write + e.timeout,
        latency:percentile(50), latency:percentile(99)))
end
"""


def free_port() -> int:
    """Return a port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[str], timeout: float) -> None:
    """Wait until something accepts connections on the port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"PID {proc.pid} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 1):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on {HOST}:{port} after {timeout} s")


def post_once(port: int, path: str, headers: dict[str, str]) -> int:
    """Send one POST and return its status."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("POST", path, body=BODY, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


# -- the servers --------------------------------------------------------------


def start_upstream(procs: Processes, status: int) -> int:
    """Start the trivial upstream answering ``status``; return its port."""
    argv = [sys.executable, "-c", UPSTREAM_SNIPPET, str(status)]
    proc = procs.start("upstream", argv)
    line = first_line(proc, START_TIMEOUT)
    if not line:
        raise BenchError("the upstream did not start:\n" + procs.log_tail("upstream"))
    return port_of(line)


def gateway_env() -> dict[str, str]:
    """The environment of the gateway: quiet access log, no inherited home."""
    env = dict(os.environ)
    env["DAIS_LOG_LEVEL"] = "WARNING"
    env.pop("DAIS_HOME", None)
    return env


def dais_cli(home: Path, *args: str) -> str:
    """Run one ``dais-gateway`` admin command and return its output."""
    argv = [sys.executable, "-m", "dais_wsgi.cli", "--home", str(home), *args]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=gateway_env(),
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"{' '.join(args[:2])} failed: {done.stderr.strip()}")
    return done.stdout


def start_gateway(
    procs: Processes,
    home: Path,
    upstream: int,
    workers: int = 1,
    cpu_affinity: str = "auto",
    lane: bool = True,
) -> tuple[int, str]:
    """Set up a key, a permission and a service, then serve; return port, key."""
    made = json.loads(
        dais_cli(
            home, "keys", "create", "--project", PROJECT, "--label", "bench", "--json"
        )
    )
    key_id, token = str(made["id"]), str(made["key"])
    dais_cli(
        home,
        "permissions",
        "add",
        key_id,
        "--project",
        PROJECT,
        "--service",
        SERVICE,
        "--prefix",
        "/api/webhook",
    )
    dais_cli(
        home,
        "services",
        "add",
        "--project",
        PROJECT,
        "--lineage-version",
        "1",
        "--service",
        SERVICE,
        "--url",
        f"http://{HOST}:{upstream}",
    )
    argv = [sys.executable, "-m", "dais_wsgi.cli", "--home", str(home)]
    # One key drives every connection: lift the per-key cap on calls in flight.
    argv += ["serve", "--host", HOST, "--port", "0", "--gateway-in-flight", "0"]
    argv += ["--cpu-affinity", cpu_affinity]
    if not lane:
        argv += ["--no-gateway-lane"]
    if workers > 1:
        # Several processes share one throttle in Redis (127.0.0.1:6379).
        argv += ["--workers", str(workers), "--throttle", "redis://127.0.0.1:6379/0"]
    proc = procs.start("gateway", argv, env=gateway_env())
    line = first_line(proc, START_TIMEOUT)
    if not line:
        raise BenchError("the gateway did not start:\n" + procs.log_tail("gateway"))
    return port_of(line), token


def start_nginx(procs: Processes, workdir: Path, upstream: int) -> int:
    """Start nginx in front of the upstream; return its port."""
    nginx = shutil.which("nginx")
    if nginx is None:
        raise BenchError("nginx is not installed")
    folder = workdir / "nginx"
    folder.mkdir()
    port = free_port()
    conf = folder / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=folder, upstream=upstream, port=port))
    argv = [nginx, "-p", str(folder), "-c", str(conf), "-e", str(folder / "error.log")]
    proc = procs.start("nginx", [*argv, "-g", "daemon off;"])
    wait_listening(port, proc, START_TIMEOUT)
    return port


# -- load generators ----------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    """One measured run along one path."""

    path: str
    asked: int
    completed: int
    seconds: float
    p50_ms: float
    p99_ms: float
    wrong_status: int
    socket_errors: int
    #: CPU microseconds per completed request, per server process tree.
    cpu_us: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    @property
    def capped(self) -> bool:
        """Whether the time cap stopped the run before the request count."""
        return self.completed < self.asked


@dataclass(frozen=True)
class Load:
    """How to drive a path."""

    generator: str
    status: int
    connections: int
    wrk_threads: int
    processes: int
    time_cap: float


def run_wrk(
    label: str, port: int, path: str, token: str, count: int, load: Load, folder: Path
) -> LoadResult:
    """Drive ``count`` POSTs with wrk and read its summary line.

    wrk only knows durations: the Lua script stops each thread after its share
    of the requests and says so on standard output, and the script then
    interrupts wrk (SIGINT to its PID) so that it reports at once; wrk's own
    duration then spans the requests sent, not the ``-d`` cap.
    """
    threads = max(1, min(load.wrk_threads, load.connections, count))
    budgets = [count // threads + (i < count % threads) for i in range(threads)]
    script = folder / f"wrk-{label}.lua"
    script.write_text(
        WRK_SCRIPT.format(
            body=BODY.decode("ascii"),
            token=token,
            status=load.status,
            budgets=", ".join(str(b) for b in budgets),
        )
    )
    argv = ["wrk", "-t", str(threads), "-c", str(max(threads, load.connections))]
    argv += ["-d", f"{math.ceil(load.time_cap)}s", "--timeout", "10s"]
    argv += ["-s", str(script), f"http://{HOST}:{port}{path}"]
    with (folder / f"wrk-{label}.log").open("w") as errors_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors_file,
            text=True,
        )
    try:
        output = _wrk_output(proc, threads, load.time_cap + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    found = re.search(r"^DAIS-BENCH ([\d ]+)$", output, re.MULTILINE)
    if proc.returncode != 0 or found is None:
        log = (folder / f"wrk-{label}.log").read_text(errors="replace").strip()
        raise BenchError(f"wrk failed ({proc.returncode}): {log}")
    requests, duration_us, _seen, wrong, errors, p50_us, p99_us = (
        int(x) for x in found[1].split()
    )
    return LoadResult(
        label,
        count,
        requests,
        duration_us / 1e6,
        p50_us / 1000,
        p99_us / 1000,
        wrong,
        errors,
    )


def _wrk_output(proc: subprocess.Popen[str], threads: int, timeout: float) -> str:
    """Read wrk's output; interrupt it once every thread has stopped."""
    stdout = proc.stdout
    if stdout is None:
        raise BenchError("wrk has no standard output")
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    stopped = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"wrk did not finish in {timeout:.0f} s")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            return "".join(seen)
        seen.append(line)
        if line.startswith("DAIS-STOP"):
            stopped += 1
            if stopped == threads and proc.poll() is None:
                proc.send_signal(signal.SIGINT)


def _client(
    port: int,
    path: str,
    headers: dict[str, str],
    count: int,
    status: int,
    time_cap: float,
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    """One Python client process: ``count`` POSTs back to back, one connection."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    conn.connect()
    ready.put(os.getpid())
    latencies: list[float] = []
    wrong = errors = 0
    go.wait(START_TIMEOUT)
    # time.monotonic is CLOCK_MONOTONIC on Linux: comparable across processes.
    started = time.monotonic()
    deadline = started + time_cap
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        sent = time.perf_counter()
        try:
            conn.request("POST", path, body=BODY, headers=headers)
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = http.client.HTTPConnection(HOST, port, timeout=10)
            continue
        latencies.append(time.perf_counter() - sent)
        if response.status != status:
            wrong += 1
    ended = time.monotonic()
    conn.close()
    results.put((started, ended, latencies, wrong, errors))


def run_python(
    label: str, port: int, path: str, token: str, count: int, load: Load
) -> LoadResult:
    """Drive ``count`` POSTs from several Python client processes."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    clients = max(1, min(load.processes, count))
    shares = [count // clients + (i < count % clients) for i in range(clients)]
    context = multiprocessing.get_context("spawn")
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    workers = [
        context.Process(
            target=_client,
            args=(
                port,
                path,
                headers,
                share,
                load.status,
                load.time_cap,
                ready,
                go,
                results,
            ),
            daemon=True,
        )
        for share in shares
    ]
    outcomes: list[tuple[float, float, list[float], int, int]] = []
    try:
        for worker in workers:
            worker.start()
        for _ in workers:
            ready.get(timeout=START_TIMEOUT)
        go.set()
        for _ in workers:
            outcomes.append(results.get(timeout=load.time_cap + 60))
    except queue.Empty:
        raise BenchError("a Python client process did not report in time") from None
    finally:
        # Clients that reported exit on their own; any other (an error or an
        # interrupt got here first) is stopped by its PID at once.
        grace = 10.0 if len(outcomes) == len(workers) else 0.0
        for worker in workers:
            worker.join(timeout=grace)
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=10)
    latencies = sorted(x for outcome in outcomes for x in outcome[2])
    seconds = max(o[1] for o in outcomes) - min(o[0] for o in outcomes)
    return LoadResult(
        label,
        count,
        len(latencies),
        seconds,
        percentile(latencies, 50) * 1000,
        percentile(latencies, 99) * 1000,
        sum(o[3] for o in outcomes),
        sum(o[4] for o in outcomes),
    )


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ordered sequence (0 when empty)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def drive(
    label: str,
    port: int,
    path: str,
    token: str,
    count: int,
    load: Load,
    folder: Path,
    servers: dict[str, int],
) -> LoadResult:
    """Warm a path up, then measure ``count`` POSTs along it.

    ``servers`` names the PIDs of the servers whose CPU time is counted.
    """
    warmup = max(100, count // 10)
    if load.generator == "wrk":
        run_wrk(f"{label}-warmup", port, path, token, warmup, load, folder)
    else:
        run_python(f"{label}-warmup", port, path, token, warmup, load)
    before = {name: cpu_seconds(pid) for name, pid in servers.items()}
    if load.generator == "wrk":
        result = run_wrk(label, port, path, token, count, load, folder)
    else:
        result = run_python(label, port, path, token, count, load)
    cpu = {
        name: (cpu_seconds(pid) - before[name]) / max(1, result.completed) * 1e6
        for name, pid in servers.items()
    }
    return replace(result, path=label, cpu_us=cpu)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its live children, in seconds.

    Reads ``/proc``; on a system without it the answer is 0.
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        # After the command: state, ppid, ..., utime (14th field), stime (15th).
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


# -- part 1: HTTP ---------------------------------------------------------------


def http_part(
    args: argparse.Namespace, workdir: Path, procs: Processes
) -> dict[str, Any]:
    """Run the three paths and print their figures."""
    load = Load(
        generator=choose_generator(args.loadgen),
        status=args.status,
        connections=args.connections,
        wrk_threads=args.wrk_threads,
        processes=args.processes,
        time_cap=args.time_cap,
    )
    upstream = start_upstream(procs, load.status)
    gateway, token = start_gateway(
        procs,
        workdir / "gateway",
        upstream,
        args.gateway_workers,
        args.cpu_affinity,
        lane=not args.no_gateway_lane,
    )
    targets = [("direct", upstream, ROUTE), ("gateway", gateway, GATEWAY_PATH)]
    nginx_note = "not run (--no-nginx)"
    if not args.no_nginx:
        try:
            targets.append(("nginx", start_nginx(procs, workdir, upstream), ROUTE))
            nginx_note = "nginx " + tool_version(["nginx", "-v"])
        except BenchError as exc:
            nginx_note = f"not run ({exc})"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    for label, port, path in targets:
        status = post_once(port, path, headers)
        if status != load.status:
            raise BenchError(
                f"{label}: a test POST got {status}, expected {load.status}"
            )

    if load.generator == "wrk":
        how = (
            f"wrk ({tool_version(['wrk', '--version'])}), {load.connections} "
            f"connections, {min(load.wrk_threads, load.connections)} thread(s)"
        )
    else:
        how = f"Python http.client, {load.processes} processes x 1 connection"
    print(f"\n== HTTP: {args.requests} POSTs of {len(BODY)} bytes per path ==")
    print(f"load generator: {how}")
    print(
        f"gateway: {args.gateway_workers} process(es), "
        f"--cpu-affinity {args.cpu_affinity}"
        + (", --no-gateway-lane" if args.no_gateway_lane else "")
    )
    print(f"nginx: {nginx_note}")
    if load.status == 204:
        print(
            "upstream answers 204: waitress closes the connection after every 204,"
            " so each request opens new connections (--status 200 keeps them alive)"
        )
    else:
        print("upstream answers 200 with Content-Length: 0 (keep-alive on every hop)")
    servers = {name: proc.pid for name, proc in procs.started}
    rounds: list[list[LoadResult]] = []
    for number in range(args.rounds):
        rounds.append(
            [
                drive(label, port, path, token, args.requests, load, workdir, servers)
                for label, port, path in targets
            ]
        )
        if args.rounds > 1:
            done = ", ".join(f"{r.path} {r.rps:.0f}" for r in rounds[-1])
            print(f"round {number + 1}: req/s {done}")
    # Per path, the round with the median throughput.
    results = [
        sorted((run[i] for run in rounds), key=lambda r: r.rps)[len(rounds) // 2]
        for i in range(len(targets))
    ]
    print_http(results, servers)
    by_path = {r.path: r for r in results}
    ratios: dict[str, float] = {}
    gw, direct = by_path["gateway"], by_path["direct"]
    ratios["gateway/direct"] = gw.rps / direct.rps
    if "nginx" in by_path:
        ratios["gateway/nginx"] = gw.rps / by_path["nginx"].rps
        ratios["nginx/direct"] = by_path["nginx"].rps / direct.rps
    print("\nthroughput ratios (req/s):")
    for name, value in ratios.items():
        print(f"  {name:<15} {value:.2f}")
    verdict = "met" if ratios["gateway/direct"] >= 0.5 else "NOT met"
    print(f"target gateway >= 0.5 x direct: {verdict}")
    print(
        f"latency added by the gateway: p50 +{gw.p50_ms - direct.p50_ms:.2f} ms,"
        f" p99 +{gw.p99_ms - direct.p99_ms:.2f} ms"
    )
    if any(r.wrong_status or r.socket_errors for run in rounds for r in run):
        print("WARNING: some requests failed; the figures above are not clean")
    return {
        "load_generator": how,
        "nginx": nginx_note,
        "requests": args.requests,
        "rounds": args.rounds,
        "upstream_status": load.status,
        "body_bytes": len(BODY),
        "paths": [asdict(r) | {"rps": r.rps} for r in results],
        "all_rounds": [[asdict(r) | {"rps": r.rps} for r in run] for run in rounds],
        "ratios": ratios,
    }


def print_http(results: list[LoadResult], servers: dict[str, int]) -> None:
    """Print the table of the HTTP part."""
    cpu_header = "".join(f" {name[:8]:>8}" for name in servers)
    print(
        f"\n{'path':<9} {'completed':>9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'bad st':>8} {'sock err':>8}   CPU us/request:{cpu_header}"
    )
    for r in results:
        note = "  (stopped by --time-cap)" if r.capped else ""
        cpu = "".join(f" {r.cpu_us.get(name, 0.0):>8.0f}" for name in servers)
        print(
            f"{r.path:<9} {r.completed:>9} {r.rps:>9.0f} {r.p50_ms:>8.2f}"
            f" {r.p99_ms:>8.2f} {r.wrong_status:>8} {r.socket_errors:>8}"
            f"                  {cpu}{note}"
        )


def choose_generator(asked: str) -> str:
    """Pick wrk when asked or available, else the Python client."""
    if asked == "python":
        return "python"
    if shutil.which("wrk") is not None:
        return "wrk"
    if asked == "wrk":
        raise BenchError("--loadgen wrk: wrk is not installed")
    return "python"


def tool_version(argv: list[str]) -> str:
    """Return the first version-looking word a tool prints about itself."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return "unknown version"
    found = re.search(r"\d+\.\d+(\.\d+)?", done.stdout + done.stderr)
    return found[0] if found else "unknown version"


# -- part 2: the decision -------------------------------------------------------

PROJECTS = 1000
LINEAGE_VERSIONS = 3
SERVICES = 5
MEASURED_KEYS = 100


@dataclass(frozen=True)
class Stats:
    """Timings of one step, in microseconds."""

    count: int
    mean_us: float
    p50_us: float
    p99_us: float


@dataclass(frozen=True)
class Case:
    """One measured key and the call it makes."""

    key_id: str
    authorization: str
    path: str


def time_calls(
    step: Callable[[int], object], count: int, deadline: float, warmup: int
) -> list[int]:
    """Call ``step(i)`` ``count`` times; return each call's nanoseconds.

    Stops early once ``time.monotonic()`` passes ``deadline``.
    """
    for i in range(warmup):
        step(i)
    samples: list[int] = []
    clock = time.perf_counter_ns
    for i in range(count):
        if i % 256 == 0 and time.monotonic() > deadline:
            break
        started = clock()
        step(i)
        samples.append(clock() - started)
    return samples


def stats_of(samples: list[int]) -> Stats:
    """Summarise nanosecond samples in microseconds."""
    ordered = sorted(samples)
    return Stats(
        len(ordered),
        sum(ordered) / max(1, len(ordered)) / 1000,
        percentile(ordered, 50) / 1000,
        percentile(ordered, 99) / 1000,
    )


def project_of(index: int) -> str:
    """The project of the index-th key."""
    return f"p{index % PROJECTS:04d}"


def fill_store(
    path: Path, keys: int, permissions: int
) -> tuple[SqliteStore, list[Case], list[str]]:
    """Create a store through ``SqliteStore``, then bulk-insert its rows.

    Returns the store, the measured keys' calls and a random sample of the
    ids of all keys.
    """
    if permissions % keys:
        raise BenchError("the permission count must be a multiple of the key count")
    per_key = permissions // keys
    if per_key < 1:
        raise BenchError("each key needs at least one permission")
    store = SqliteStore(path)
    measured = min(MEASURED_KEYS, keys)
    positions = {i * keys // measured: new_key() for i in range(measured)}
    real_ids = {made.id for made in positions.values()}
    ids = [positions[i].id if i in positions else f"{i:016x}" for i in range(keys)]
    if len(set(ids)) != keys or any(
        ids[i] in real_ids for i in range(keys) if i not in positions
    ):
        raise BenchError("a filler key id collides with a real one; run again")
    created = time.time()

    def key_rows() -> Iterator[tuple[str, str, str, float]]:
        for i, key_id in enumerate(ids):
            made = positions.get(i)
            secret_hash = made.secret_hash if made else "0" * 64
            yield key_id, secret_hash, project_of(i), created

    def permission_rows() -> Iterator[tuple[str, str, str, str]]:
        for i, key_id in enumerate(ids):
            for j in range(per_key):
                yield key_id, project_of(i), f"svc{j % SERVICES}", f"/api/hook{j}"

    service_rows = [
        (f"p{p:04d}", v, f"svc{s}", f"http://{HOST}:9/p{p:04d}/v{v}/svc{s}")
        for p in range(PROJECTS)
        for v in range(1, LINEAGE_VERSIONS + 1)
        for s in range(SERVICES)
    ]
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=OFF")
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO keys (id, secret_hash, project, created) VALUES (?,?,?,?)",
            key_rows(),
        )
        db.executemany(
            "INSERT INTO permissions (key_id, project, service, prefix)"
            " VALUES (?,?,?,?)",
            permission_rows(),
        )
        db.executemany(
            "INSERT INTO services (project, lineage_version, service, base_url)"
            " VALUES (?,?,?,?)",
            service_rows,
        )
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    # The measured call matches the key's last permission, so the matcher
    # walks the whole list.
    last = per_key - 1
    cases = [
        Case(
            made.id,
            f"Bearer {made.token}",
            f"/project-gateway/webhooks/{project_of(i)}/lineage-version/latest/"
            f"svc{last % SERVICES}/api/hook{last}/run",
        )
        for i, made in sorted(positions.items())
    ]
    sample = random.Random(1).choices(ids, k=4096)
    return store, cases, sample


Steps = dict[str, tuple[Callable[[int], object], int]]


def prepare_size(
    workdir: Path, keys: int, permissions: int, decisions: int
) -> tuple[dict[str, Any], Steps]:
    """Fill a store of one size; return its description and the steps to time."""
    started = time.monotonic()
    path = workdir / f"core-{keys}.sqlite3"
    store, cases, random_ids = fill_store(path, keys, permissions)
    built = time.monotonic() - started
    clock = time.time
    throttler = Throttler(
        MemoryThrottleState(),
        clock,
        RatePolicy(rate=1_000_000, period=1.0, burst=1_000_000),
        "gateway",
    )
    n = len(cases)
    credentials = [authenticate(store, c.authorization, clock()) for c in cases]
    calls = [parse_gateway_path(c.path) for c in cases]
    for credential, call in zip(credentials, calls, strict=True):
        authorise_call(credential, call, "POST", "", store)

    def uncached(i: int, keys: Any = store, registry: Any = store) -> None:
        case = cases[i % n]
        credential = authenticate(keys, case.authorization, clock())
        call = parse_gateway_path(case.path)
        authorise_call(credential, call, "POST", "", registry)
        throttler.check(credential.key.id)

    # What serve does: keys and service lists come from the in-process
    # caches, which reach the store once per key (or project) per TTL.
    cached_keys = CachedKeyStore(store, store, ttl=3600.0, degraded_ttl=3600.0)
    cached_registry = CachedRegistry(store, ttl=3600.0, degraded_ttl=3600.0)

    def decision(i: int) -> None:
        uncached(i, cached_keys, cached_registry)

    def record(i: int) -> None:
        case = cases[i % n]
        store.record_forward(
            ForwardRecord(
                key_id=case.key_id,
                project=calls[i % n].project,
                service=calls[i % n].service,
                lineage_version=LINEAGE_VERSIONS,
                method="POST",
                route=calls[i % n].route,
                status=204,
                latency=0.001,
                bytes_in=len(BODY),
                request_id=f"bench-{i}",
                at=clock(),
            )
        )

    steps: Steps = {
        "decision": (decision, decisions),
        "decision on a cache miss (store read every time)": (uncached, decisions),
        "authenticate": (
            lambda i: authenticate(store, cases[i % n].authorization, clock()),
            decisions,
        ),
        "  store.load (3 SELECTs)": (
            lambda i: store.load(cases[i % n].key_id),
            decisions,
        ),
        "  store.load, random key of the store": (
            lambda i: store.load(random_ids[i % len(random_ids)]),
            decisions,
        ),
        "parse_gateway_path": (
            lambda i: parse_gateway_path(cases[i % n].path),
            decisions,
        ),
        "authorise_call": (
            lambda i: authorise_call(
                credentials[i % n], calls[i % n], "POST", "", store
            ),
            decisions,
        ),
        "  registry.endpoints (1 SELECT)": (
            lambda i: store.endpoints(calls[i % n].project),
            decisions,
        ),
        "Throttler.check": (lambda i: throttler.check(cases[i % n].key_id), decisions),
        "store.record_forward (1 write transaction)": (
            record,
            max(1, decisions // 4),
        ),
    }
    info = {
        "keys": keys,
        "permissions": permissions,
        "build_seconds": built,
        "file_mb": path.stat().st_size / 2**20,
    }
    return info, steps


def core_part(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Time the decision for each store size and print the figures."""
    sizes = parse_sizes(args.core_sizes)
    print(
        "\n== Decision cost: authenticate + parse_gateway_path + authorise_call"
        " + Throttler.check =="
    )
    print(
        f"as served: CachedKeyStore and CachedRegistry over SqliteStore on disk,"
        f" MemoryThrottleState, one thread, {args.decisions} decisions over"
        f" {MEASURED_KEYS} real keys, each with the same call"
    )
    prepared = []
    for keys, permissions in sizes:
        print(f"building a store of {keys:,} keys / {permissions:,} permissions ...")
        info, steps = prepare_size(workdir, keys, permissions, args.decisions)
        print(f"  built in {info['build_seconds']:.1f} s, {info['file_mb']:.0f} MiB")
        prepared.append((info, steps))
    # Rounds interleave the sizes, so that a burst of load from elsewhere on
    # the machine lands on every size alike rather than on one.
    rounds = args.core_rounds
    samples: list[dict[str, list[int]]] = [{} for _ in prepared]
    deadline = time.monotonic() + args.time_cap
    for _ in range(rounds):
        for index, (_info, steps) in enumerate(prepared):
            for name, (step, count) in steps.items():
                share = max(1, count // rounds)
                found = time_calls(step, share, deadline, warmup=min(share, 500))
                samples[index].setdefault(name, []).extend(found)
    if time.monotonic() > deadline:
        print(f"(stopped by --time-cap after {args.time_cap:.0f} s)")
    measured = [
        info
        | {"timings": {name: asdict(stats_of(found)) for name, found in taken.items()}}
        for (info, _steps), taken in zip(prepared, samples, strict=True)
    ]
    print(f"\n{'store':<32} {'mean us':>8} {'p50 us':>8} {'p99 us':>8} {'n':>7}")
    for result in measured:
        stats = result["timings"]["decision"]
        name = f"{result['keys']:,} keys / {result['permissions']:,} perms"
        print(
            f"{name:<32} {stats['mean_us']:>8.1f} {stats['p50_us']:>8.1f}"
            f" {stats['p99_us']:>8.1f} {stats['count']:>7}"
        )
    summary: dict[str, Any] = {"sizes": measured}
    if len(measured) > 1:
        small = measured[0]["timings"]["decision"]
        large = measured[-1]["timings"]["decision"]
        ratio = large["mean_us"] / small["mean_us"]
        summary["ratio_large_small_mean"] = ratio
        print(
            f"ratio largest/smallest store (mean): {ratio:.2f}"
            f"  (p50: {large['p50_us'] / small['p50_us']:.2f})"
        )
    worst = max(r["timings"]["decision"]["mean_us"] for r in measured)
    print(f"target < 50 us per decision: {'met' if worst < 50 else 'NOT met'}")
    print("\nbreakdown, each step timed alone (mean / p99 us):")
    header = "".join(f" {str(r['keys']) + ' keys':>17}" for r in measured)
    print(f"{'step':<52}{header}")
    for name in measured[0]["timings"]:
        cells = "".join(
            f" {step['mean_us']:>9.1f} / {step['p99_us']:>5.0f}"
            for step in (r["timings"][name] for r in measured)
        )
        print(f"{name:<52}{cells}")
    return summary


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """Read ``KEYS:PERMISSIONS,KEYS:PERMISSIONS``."""
    sizes = []
    for item in text.split(","):
        keys, _, permissions = item.partition(":")
        sizes.append((int(keys), int(permissions)))
    return sizes


# -- main -----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        description="Benchmark the dais gateway (see the module docstring)."
    )
    parser.add_argument(
        "--requests", type=int, default=5000, help="POSTs per path (default 5000)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every path this many times, interleaved, and keep the"
        " median round per path (default 1)",
    )
    parser.add_argument(
        "--time-cap",
        type=float,
        default=120.0,
        help="seconds any one measured run may last (default 120)",
    )
    parser.add_argument(
        "--loadgen",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="load generator (default: wrk if installed, else Python)",
    )
    parser.add_argument(
        "--connections", type=int, default=8, help="wrk connections (default 8)"
    )
    parser.add_argument(
        "--wrk-threads", type=int, default=1, help="wrk threads (default 1)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=4,
        help="Python client processes, one connection each (default 4)",
    )
    parser.add_argument(
        "--status",
        type=int,
        choices=[204, 200],
        default=204,
        help="what the upstream answers: 204 (default) or 200 with Content-Length: 0",
    )
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx path")
    parser.add_argument(
        "--gateway-workers",
        type=int,
        default=1,
        help="gateway processes (serve --workers; >1 needs Redis on 127.0.0.1)",
    )
    parser.add_argument(
        "--cpu-affinity",
        default="auto",
        help="serve --cpu-affinity for the gateway: auto (default) or off",
    )
    parser.add_argument(
        "--no-gateway-lane",
        action="store_true",
        help="serve --no-gateway-lane: every call forwarded from a worker thread",
    )
    parser.add_argument(
        "--decisions",
        type=int,
        default=20000,
        help="timed decisions per store size (default 20000)",
    )
    parser.add_argument(
        "--core-rounds",
        type=int,
        default=5,
        help="split the timed decisions in this many rounds, sizes interleaved"
        " (default 5)",
    )
    parser.add_argument(
        "--core-sizes",
        default="1000:10000,100000:1000000",
        help="store sizes as KEYS:PERMISSIONS,... (default %(default)s)",
    )
    parser.add_argument("--skip-http", action="store_true", help="skip part 1")
    parser.add_argument("--skip-core", action="store_true", help="skip part 2")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if min(args.requests, args.connections, args.processes, args.rounds) < 1:
        parser.error(
            "--requests, --connections, --processes and --rounds must be positive"
        )
    if min(args.decisions, args.core_rounds) < 1 or args.time_cap <= 0:
        parser.error("--decisions, --core-rounds and --time-cap must be positive")
    return args


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = parse_args(argv)
    # Ctrl-C or SIGTERM still stop every server and remove the temporary
    # folder, even when started from a shell that ignores SIGINT.
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    print(
        f"dais gateway benchmark, {time.strftime('%Y-%m-%d %H:%M:%S')},"
        f" {os.cpu_count()} CPUs, {platform.platform()},"
        f" Python {platform.python_version()}"
    )
    with contextlib.suppress(OSError):
        loadavg = Path("/proc/loadavg").read_text().split()[:3]
        print(f"load average before the run: {' '.join(loadavg)}")
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="dais-bench-"))
    procs = Processes(workdir)
    try:
        if not args.skip_http:
            report["http"] = http_part(args, workdir, procs)
            procs.stop_all()
        if not args.skip_core:
            report["core"] = core_part(args, workdir)
    except BenchError as exc:
        print(f"bench/gateway.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/gateway.py: interrupted; stopping the servers", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
