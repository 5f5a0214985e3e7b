"""Benchmark orchestrator: the product against the bare relay, side by side, same run.

    python -m bench.run --smoke          # seconds; checks that the harness works (CI)
    python -m bench.run --full           # the full table and the target checks (< ~15 min)
    python -m bench.run --full --quick   # the same scenarios, fewer requests (a few minutes)
    python -m bench.run --profile        # py-spy profile of the product under 50-stream bursty load
    python -m bench.run --full --only cluster   # cluster mode (one node + Redis) vs single process

Processes: the fake upstream (bench.upstream), the product (`python run.py`, auth on,
SQLite in a temp dir, rate limits out of the way), the bare relay (bench.relay), and one
load generator process per measurement (bench.loadgen). Servers are pinned to core 0;
upstream, load generators and this orchestrator to core 1 (when the machine has 2+ cores).
Every product figure is reported with its ratio to the bare relay's. The `cluster` part runs
the product twice, side by side: single process, and in cluster mode on a local redis-server
(pinned with the clients), and counts the Redis commands the cluster node sends.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.common import JWT_SECRET, free_port, hs256_token, percentile, pin_to, raise_nofile

ROOT = Path(__file__).resolve().parent.parent
PRODUCT_ROOT = [ROOT]  # --product-root: run another checkout (e.g. with a proposed patch applied)
PYTHON = sys.executable
SERVER_CORE = {0}
CLIENT_CORE = {1}
# The product's limiter keeps a ring of `limit` float slots per key (8 bytes each):
# high enough to never bite in a run, small enough not to distort RSS (1.6 MB, one key).
RATE_LIMIT = 200_000
UPSTREAM_PS: list[psutil.Process] = []


# --- processes ---------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the orchestrator dies, however it dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child_setup(cores: set[int]):  # type: ignore[no-untyped-def]
    def setup() -> None:
        pin_to(cores)
        raise_nofile()
        os.setpgrp()  # our own group: a Ctrl-C of the orchestrator is handled by us, once
        _die_with_parent()

    return setup


class LineReader:
    """Lines of a child's stdout, with timeouts."""

    def __init__(self, stream: Any) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {prefix!r} line within {timeout:g}s")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"process ended before printing {prefix!r}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    log_path: Path
    ps: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.ps = psutil.Process(self.proc.pid)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def wait_healthy(self, path: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   + self.log_path.read_text()[-2000:])
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as response:
                    if response.status < 500:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not answer {path} within {timeout:g}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_upstream(workdir: Path) -> tuple[subprocess.Popen, str]:
    log = (workdir / "upstream.log").open("w")
    proc = subprocess.Popen([PYTHON, "-m", "bench.upstream", "--port", "0"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log, text=True, preexec_fn=_child_setup(CLIENT_CORE))
    port = int(LineReader(proc.stdout).expect("PORT", 20))
    UPSTREAM_PS[:] = [psutil.Process(proc.pid)]
    return proc, f"http://127.0.0.1:{port}/v1"


def _clean_env() -> dict[str, str]:
    names = {"PORT", "HOST", "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "MONGODB_URI", "JWT_SECRET"}
    return {k: v for k, v in os.environ.items() if not k.startswith("AICHAT_") and k not in names}


def start_product(workdir: Path, upstream_url: str, command: list[str] | None = None,
                  start_timeout: float = 30, extra_env: dict[str, str] | None = None,
                  name: str = "product") -> Server:
    """The product: `python run.py`, or ``command`` + its arguments (e.g. under a profiler)."""
    port = free_port()
    env = _clean_env()
    env.update({
        "OPENAI_BASE_URL": upstream_url,
        "OPENAI_API_KEY": "bench-key",
        "AICHAT_STORAGE_SQLITE_PATH": str(workdir / "chat.sqlite3"),
        "AICHAT_RATE_LIMIT_ANONYMOUS_LIMIT": str(RATE_LIMIT),
        "AICHAT_RATE_LIMIT_AUTHENTICATED_LIMIT": str(RATE_LIMIT),
        "AICHAT_AUTH_JWT_SECRET": JWT_SECRET,
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    })
    log_path = workdir / f"{name}.log"
    proc = subprocess.Popen([*(command or [PYTHON, "run.py"]), "--host", "127.0.0.1", "--port", str(port)],
                            cwd=PRODUCT_ROOT[0], env=env,
                            stdin=subprocess.DEVNULL, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                            preexec_fn=_child_setup(SERVER_CORE))
    server = Server(name, proc, port, log_path)
    server.wait_healthy("/healthz", start_timeout)
    return server


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    """A redis-server without persistence, on the clients' core (`bash scripts/setup_redis.sh`)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("the cluster part needs redis-server: run `bash scripts/setup_redis.sh` as root")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdin=subprocess.DEVNULL,
                            stdout=(workdir / "redis.log").open("w"), stderr=subprocess.STDOUT,
                            preexec_fn=_child_setup(CLIENT_CORE))
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while redis_commands(url) is None:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("redis-server did not start; see " + str(workdir / "redis.log"))
        time.sleep(0.05)
    return proc, url


#: the commands a node sends itself (the GET, SET, ZADD... inside its scripts are not round trips)
NODE_COMMANDS = ("evalsha", "eval", "publish", "mget", "ping", "hello", "select", "subscribe")


def redis_commands(url: str) -> int | None:
    """How many commands nodes have sent the Redis (None: it does not answer).

    From INFO commandstats, which also counts the commands a script runs: only the kinds a
    node sends directly are summed (the bench's loads never send a plain GET).
    """
    import redis

    try:
        with redis.Redis.from_url(url, socket_timeout=2) as client:
            stats = client.info("commandstats")
    except (redis.RedisError, OSError):
        return None
    return sum(int(value["calls"]) for name, value in stats.items()
               if name.removeprefix("cmdstat_").split("|")[0] in NODE_COMMANDS + ("client", "script"))


def start_relay(workdir: Path, upstream_url: str, command: list[str] | None = None,
                start_timeout: float = 30) -> Server:
    """The bare relay: `python -m bench.relay`, or ``command`` + its arguments (e.g. under a profiler)."""
    port = free_port()
    log_path = workdir / "relay.log"
    proc = subprocess.Popen([*(command or [PYTHON, "-m", "bench.relay"]), "--port", str(port),
                             "--upstream", upstream_url],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                            preexec_fn=_child_setup(SERVER_CORE))
    server = Server("relay", proc, port, log_path)
    server.wait_healthy("/socket.io/?EIO=4&transport=polling", start_timeout)
    return server


class PeakRss:
    """Samples a process's RSS every few milliseconds in a thread; keeps the peak."""

    def __init__(self, server: Server, interval: float = 0.02) -> None:
        self.server = server
        self.interval = interval
        self.peak = server.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, self.server.rss())
            except psutil.Error:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.server.rss())
        return self.peak


def start_loadgen(config: dict[str, Any], workdir: Path) -> tuple[subprocess.Popen, LineReader]:
    log = (workdir / "loadgen.log").open("a")
    proc = subprocess.Popen([PYTHON, "-m", "bench.loadgen", json.dumps(config)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log, text=True, preexec_fn=_child_setup(CLIENT_CORE))
    return proc, LineReader(proc.stdout)


def _finish(proc: subprocess.Popen) -> None:
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# --- measurements -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    key: str  # e.g. "bursty-50"
    transport: str  # sse | socketio
    concurrency: int
    requests: int  # per client, sequential
    chunks: int
    gap_ms: int

    @property
    def label(self) -> str:
        kind = "bursty" if self.gap_ms == 0 else f"paced {self.gap_ms}ms"
        return f"{kind} c={self.concurrency} n={self.chunks}"


def measure_streams(server: Server, scenario: Scenario, workdir: Path, token: str | None,
                    deadline: float, profiler: Profiler | None = None,
                    counter: Callable[[], int | None] | None = None) -> dict[str, Any]:
    """``counter``: read before and after the measured load (e.g. Redis commands), reported as its delta."""
    config = {"mode": "streams", "url": server.url, "transport": scenario.transport,
              "concurrency": scenario.concurrency, "requests": scenario.requests, "chunks": scenario.chunks,
              "gap_ms": scenario.gap_ms, "token": token, "deadline": deadline}
    proc, lines = start_loadgen(config, workdir)
    try:
        ready = json.loads(lines.expect("READY", deadline + 30))
        time.sleep(0.2)  # let the warm-up's stores and sockets settle
        cpu_before = server.cpu_seconds()
        client_procs = [psutil.Process(proc.pid)] + ([UPSTREAM_PS[0]] if UPSTREAM_PS else [])
        client_before = sum(sum(p.cpu_times()[:2]) for p in client_procs)
        sampler = PeakRss(server)
        if profiler is not None:
            profiler.start(server, f"{server.name}-{scenario.transport}-{scenario.key}")
        counted = counter() if counter is not None else None
        began = time.perf_counter()
        proc.stdin.write("GO\n")
        proc.stdin.flush()
        result = json.loads(lines.expect("RESULT", deadline + 60))
        elapsed = time.perf_counter() - began
        if counted is not None and counter is not None:
            after = counter()
            counted = None if after is None else after - counted
        if profiler is not None:
            profiler.stop()
        cpu = server.cpu_seconds() - cpu_before
        client_cpu = sum(sum(p.cpu_times()[:2]) for p in client_procs) - client_before
        peak = sampler.stop()
    finally:
        _finish(proc)
    chunks = result["chunks"]
    wall = result["wall"] or elapsed
    ttfc = result["ttfc_ms"]
    return {
        "server": server.name, "transport": scenario.transport, "scenario": scenario.key, "label": scenario.label,
        "requests": scenario.concurrency * scenario.requests, "completed": result["completed"],
        "failures": result["failures"] + ready.get("warmup_errors", 0), "errors": result["errors"],
        "chunks": chunks, "frames": result["frames"], "wall_s": wall,
        "chunks_per_s": chunks / wall if wall > 0 else 0.0,
        "ttfc_p50_ms": percentile(ttfc, 0.50), "ttfc_p99_ms": percentile(ttfc, 0.99),
        "cpu_ms": cpu * 1000, "cpu_ms_per_1k_chunks": cpu * 1e6 / chunks if chunks else None,
        "cpu_core_pct": 100 * cpu / wall if wall > 0 else None,
        "cpu_ms_per_request": cpu * 1000 / result["completed"] if result["completed"] else None,
        "peak_rss_mb": peak / 2**20,
        "frames_per_answer": result["frames"] / result["completed"] if result["completed"] else None,
        # load generator + upstream: near 100% means the client core, not the server, set the pace
        "client_core_pct": 100 * client_cpu / elapsed if elapsed > 0 else None,
        "counted": counted,
    }


def measure_idle(server: Server, connections: int, workdir: Path, processes: int) -> dict[str, Any]:
    time.sleep(1.0)
    before = server.rss()
    per_process = [connections // processes + (1 if i < connections % processes else 0) for i in range(processes)]
    procs = [start_loadgen({"mode": "idle", "url": server.url, "connections": n, "hold": 300}, workdir)
             for n in per_process if n]
    try:
        ready = [json.loads(lines.expect("READY", 200)) for _, lines in procs]
        time.sleep(2.0)  # let the server settle (engine.io's first pings go out, buffers shrink)
        after = server.rss()
        for proc, _ in procs:
            proc.stdin.write("STOP\n")
            proc.stdin.flush()
        results = [json.loads(lines.expect("RESULT", 60)) for _, lines in procs]
    finally:
        for proc, _ in procs:
            _finish(proc)
    connected = sum(r["connected"] for r in ready)
    return {
        "server": server.name, "connections": connections, "connected": connected,
        "failures": sum(r["failures"] for r in ready) + (connections - connected),
        "connect_seconds": max(r["seconds"] for r in ready),
        "alive_at_end": sum(r["alive_at_end"] for r in results),
        "rss_before_mb": before / 2**20, "rss_after_mb": after / 2**20,
        "kb_per_connection": (after - before) / 1024 / connected if connected else None,
    }


def measure_rounds(server: Server, rounds: int, scenarios: list[Scenario], workdir: Path,
                   token: str | None, deadline: float) -> dict[str, Any]:
    rss: list[float] = []
    failures = 0
    for _ in range(rounds):
        for scenario in scenarios:
            failures += measure_streams(server, scenario, workdir, token, deadline)["failures"]
        time.sleep(0.5)
        rss.append(server.rss() / 2**20)
    return {"server": server.name, "rss_mb": rss, "failures": failures}


# --- profiling (py-spy) -------------------------------------------------------------------------


class Profiler:
    def __init__(self, py_spy: str, outdir: Path) -> None:
        self.py_spy = py_spy
        self.outdir = outdir
        self.proc: subprocess.Popen | None = None
        self.files: list[Path] = []

    def start(self, server: Server, name: str) -> None:
        out = self.outdir / f"{name}.txt"
        self.files.append(out)
        self.proc = subprocess.Popen([self.py_spy, "record", "--pid", str(server.proc.pid), "--rate", "500",
                                      "--format", "raw", "--output", str(out), "--nonblocking"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=_child_setup(CLIENT_CORE))
        time.sleep(0.5)  # py-spy attaches

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            _finish(self.proc)
            self.proc = None


def summarize_profile(path: Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    if not total:
        return f"{path.name}: no samples"
    out = [f"{path.name}: {total} samples", "  self%  function"]
    out += [f"  {100 * n / total:5.1f}  {name}" for name, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]]
    out += ["  incl%  function"]
    out += [f"  {100 * n / total:5.1f}  {name}"
            for name, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(out)


# --- report -------------------------------------------------------------------------------------


def _ratio(product: float | None, relay: float | None) -> str:
    if product is None or relay is None or relay == 0:
        return "  -  "
    return f"{product / relay:.2f}x"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


METRICS = [("chunks_per_s", "chunks/s", 0), ("frames_per_answer", "frames/answer", 1),
           ("ttfc_p50_ms", "TTFC p50 ms", 2), ("ttfc_p99_ms", "TTFC p99 ms", 2),
           ("cpu_ms_per_1k_chunks", "CPU ms/1k chunks", 1), ("cpu_ms_per_request", "CPU ms/answer", 2),
           ("cpu_core_pct", "CPU % core", 0),
           ("peak_rss_mb", "peak RSS MB", 1)]


def stream_table(rows: list[tuple[Scenario, dict, dict]]) -> str:
    head = "| transport | load | " + " | ".join(f"{title} product (relay) ratio" for _, title, _ in METRICS)
    head += " | client core % P/R | failures P/R |"
    lines = [head, "|" + " --- |" * (len(METRICS) + 4)]
    for scenario, product, relay in rows:
        cells = [scenario.transport, scenario.label]
        for key, _, digits in METRICS:
            cells.append(f"{_num(product[key], digits)} ({_num(relay[key], digits)}) "
                         f"**{_ratio(product[key], relay[key])}**")
        cells.append(f"{_num(product['client_core_pct'], 0)}/{_num(relay['client_core_pct'], 0)}")
        cells.append(f"{product['failures']}/{relay['failures']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def idle_table(rows: list[tuple[dict, dict]]) -> str:
    lines = ["| idle Socket.IO connections | product KB/conn (relay) ratio | product RSS MB before -> after "
             "| relay RSS MB before -> after | connected P/R | connect time s P/R |",
             "| --- | --- | --- | --- | --- | --- |"]
    for product, relay in rows:
        lines.append(
            f"| {product['connections']:,} | {_num(product['kb_per_connection'])} ({_num(relay['kb_per_connection'])})"
            f" **{_ratio(product['kb_per_connection'], relay['kb_per_connection'])}** "
            f"| {product['rss_before_mb']:.1f} -> {product['rss_after_mb']:.1f} "
            f"| {relay['rss_before_mb']:.1f} -> {relay['rss_after_mb']:.1f} "
            f"| {product['connected']}/{relay['connected']} "
            f"| {product['connect_seconds']}/{relay['connect_seconds']} |")
    return "\n".join(lines)


def rounds_table(product: dict, relay: dict) -> str:
    n = len(product["rss_mb"])
    lines = ["| RSS MB after round | " + " | ".join(str(i + 1) for i in range(n)) + " |",
             "| --- |" + " --- |" * n]
    for result in (product, relay):
        lines.append(f"| {result['server']} | " + " | ".join(f"{v:.1f}" for v in result["rss_mb"]) + " |")
    return "\n".join(lines)


def growth_second_half(rss: list[float]) -> float:
    """RSS growth (MB) over the second half of the rounds.

    A leak grows every round; bounded caches (SQLite's page cache, 2 MB by default, fills
    as the database grows; connection pools) level off in the first half.
    """
    if len(rss) < 3:
        return 0.0
    half = len(rss) // 2
    return rss[-1] - rss[half - 1]


def flat(product: list[float], relay: list[float]) -> tuple[bool, float, float]:
    """Flat: the product grows no more than the bare relay (allocator noise) + max(1 MB, 1%)."""
    grown, relay_grown = growth_second_half(product), growth_second_half(relay)
    allowance = max(1.0, 0.01 * product[len(product) // 2 - 1]) if len(product) >= 3 else 1.0
    return grown <= max(0.0, relay_grown) + allowance, grown, relay_grown


def check_targets(streams: dict[tuple[str, str], tuple[dict, dict]], idle: list[tuple[dict, dict]],
                  rounds: dict | None, keys: dict[str, str]) -> list[tuple[str, bool, str]]:
    checks: list[tuple[str, bool, str]] = []

    def get(transport: str, key: str) -> tuple[dict, dict] | None:
        return streams.get((transport, key))

    main = get("sse", keys["bursty_mid"])
    if main:
        # psutil's CPU times tick at 10 ms: a tiny load (smoke) can measure 0 for the relay
        ratio = main[0]["cpu_ms_per_1k_chunks"] / max(main[1]["cpu_ms_per_1k_chunks"], 1e-9)
        checks.append((f"SSE server CPU per chunk <= 2x bare relay ({keys['bursty_mid']})", ratio <= 2.0,
                       f"{ratio:.2f}x ({main[0]['cpu_ms_per_1k_chunks']:.1f} vs "
                       f"{main[1]['cpu_ms_per_1k_chunks']:.1f} ms/1k chunks)"))
    main = get("socketio", keys["bursty_mid"])
    if main:
        # psutil's CPU times tick at 10 ms: a tiny load (smoke) can measure 0 for the relay
        ratio = main[0]["cpu_ms_per_1k_chunks"] / max(main[1]["cpu_ms_per_1k_chunks"], 1e-9)
        checks.append((f"Socket.IO server CPU per chunk <= 1.5x bare relay ({keys['bursty_mid']})", ratio <= 1.5,
                       f"{ratio:.2f}x ({main[0]['cpu_ms_per_1k_chunks']:.1f} vs "
                       f"{main[1]['cpu_ms_per_1k_chunks']:.1f} ms/1k chunks)"))
    for transport in ("sse", "socketio"):
        pair = get(transport, keys.get("one_chunk", ""))
        if pair and pair[0]["cpu_ms_per_request"] is not None and pair[1]["cpu_ms_per_request"]:
            product_ms, relay_ms = pair[0]["cpu_ms_per_request"], pair[1]["cpu_ms_per_request"]
            checks.append((f"{transport}: server CPU per answer <= 2x bare relay ({keys['one_chunk']})",
                           product_ms <= 2 * relay_ms,
                           f"{product_ms / relay_ms:.2f}x ({product_ms:.2f} vs {relay_ms:.2f} ms/answer)"))
    for transport in ("sse", "socketio"):
        pair = get(transport, keys["bursty_mid"])
        if pair:
            p99 = pair[0]["ttfc_p99_ms"]
            checks.append((f"{transport}: TTFC p99 at {keys['bursty_mid']} <= 50 ms", p99 is not None and p99 <= 50,
                           f"{_num(p99, 2)} ms (relay {_num(pair[1]['ttfc_p99_ms'], 2)} ms)"))
    for transport in ("sse", "socketio"):
        pair = get(transport, keys["bursty_one"])
        if pair:
            p50 = pair[0]["ttfc_p50_ms"]
            checks.append((f"{transport}: single stream TTFC p50 <= 2 ms", p50 is not None and p50 <= 2,
                           f"{_num(p50, 2)} ms (relay {_num(pair[1]['ttfc_p50_ms'], 2)} ms)"))
    for transport in ("sse", "socketio"):
        pair = get(transport, keys["paced_high"])
        if pair:
            pct = pair[0]["cpu_core_pct"]
            checks.append((f"{transport}: {keys['paced_high']} paced streams <= 70% of one core",
                           pct is not None and pct <= 70,
                           f"{_num(pct, 0)}% (relay {_num(pair[1]['cpu_core_pct'], 0)}%)"))
    for product, relay in idle:
        kb = product["kb_per_connection"]
        checks.append((f"<= 50 KB RSS per idle Socket.IO connection ({product['connections']:,})",
                       kb is not None and kb <= 50 and product["failures"] == 0,
                       f"{_num(kb)} KB (relay {_num(relay['kb_per_connection'])} KB); "
                       f"{product['connected']} connected"))
    if rounds is not None:
        ok, growth, relay_growth = flat(rounds["product"]["rss_mb"], rounds["relay"]["rss_mb"])
        checks.append((f"memory flat over {len(rounds['product']['rss_mb'])} rounds", ok,
                       f"second half of the rounds: {growth:+.1f} MB (relay {relay_growth:+.1f} MB)"))
    return checks


def cluster_table(rows: list[tuple[Scenario, dict, dict]]) -> str:
    lines = ["| transport | load | chunks/s cluster (single) | CPU ms/answer cluster (single) | "
             "TTFC p99 ms cluster (single) | Redis commands/answer | Redis commands/chunk |",
             "|---|---|---|---|---|---|---|"]
    for scenario, cluster, single in rows:
        counted, answers, chunks = cluster["counted"], cluster["completed"], cluster["chunks"]
        per_answer = counted / answers if counted is not None and answers else None
        per_chunk = counted / chunks if counted is not None and chunks else None
        lines.append(
            f"| {scenario.transport} | {scenario.label} "
            f"| {cluster['chunks_per_s']:,.0f} ({single['chunks_per_s']:,.0f})"
            f" | {_num(cluster['cpu_ms_per_request'], 2)} ({_num(single['cpu_ms_per_request'], 2)})"
            f" | {_num(cluster['ttfc_p99_ms'], 1)} ({_num(single['ttfc_p99_ms'], 1)})"
            f" | {_num(per_answer, 2)} | {_num(per_chunk, 3)} |")
    return "\n".join(lines)


def cluster_targets(rows: list[tuple[Scenario, dict, dict]], paced: str) -> list[tuple[str, bool, str]]:
    checks: list[tuple[str, bool, str]] = []
    for scenario, cluster, single in rows:
        if scenario.key == paced:
            ratio = cluster["chunks_per_s"] / max(single["chunks_per_s"], 1e-9)
            checks.append((f"{scenario.transport}: cluster throughput at {paced} within 10% of single process",
                           ratio >= 0.9, f"{ratio:.3f}x ({cluster['chunks_per_s']:,.0f} vs "
                                         f"{single['chunks_per_s']:,.0f} chunks/s)"))
        extra = (cluster["cpu_ms_per_request"] or 0) - (single["cpu_ms_per_request"] or 0)
        checks.append((f"{scenario.transport}: cluster CPU per answer <= single + 0.5 ms ({scenario.key})",
                       extra <= 0.5, f"{extra:+.2f} ms ({_num(cluster['cpu_ms_per_request'], 2)} vs "
                                     f"{_num(single['cpu_ms_per_request'], 2)})"))
        if cluster["counted"] is not None and cluster["completed"]:
            # 3 per answer; the node's lock renewal (one call per lock_ttl/3) comes on top
            per_answer = cluster["counted"] / cluster["completed"]
            checks.append((f"{scenario.transport}: Redis commands per answer <= 3, none per token ({scenario.key})",
                           per_answer <= 3.2, f"{per_answer:.2f} per answer, {cluster['counted']} for "
                                              f"{cluster['completed']} answers / {cluster['chunks']} chunks"))
    return checks


# --- plans -------------------------------------------------------------------------------------


def plan(mode: str, quick: bool) -> dict[str, Any]:
    if mode == "smoke":
        return {
            "streams": [("bursty-1", 1, 3, 10, 0), ("bursty-5", 5, 2, 10, 0), ("paced-5", 5, 1, 5, 5)],
            "idle": [20], "idle_processes": 1, "rounds": 2, "round_load": [("round", 5, 1, 10, 0)],
            "keys": {"bursty_one": "bursty-1", "bursty_mid": "bursty-5", "paced_high": "paced-5"},
            "cluster": [("bursty-5", 5, 2, 10, 0), ("paced-5", 5, 1, 5, 5)], "cluster_paced": "paced-5",
            "deadline": 20,
        }
    scale = 0.4 if quick else 1.0

    def r(n: int) -> int:
        return max(1, round(n * scale))

    return {
        # key, concurrency, requests per client, chunks per answer, ms between chunks
        "streams": [("bursty-1", 1, r(300), 100, 0), ("bursty-50", 50, r(20), 100, 0),
                    ("1chunk-50", 50, r(20), 1, 0),
                    ("bursty-500", 500, r(4), 100, 0), ("paced-50", 50, r(3), 100, 20),
                    ("paced-200", 200, r(3), 100, 20)],
        "idle": [1000, 10000] if not quick else [1000, 4000], "idle_processes": 2,
        "rounds": 20, "round_load": [("round", 50, r(5), 100, 0)],
        "keys": {"bursty_one": "bursty-1", "bursty_mid": "bursty-50", "paced_high": "paced-200",
                 "one_chunk": "1chunk-50"},
        "cluster": [("bursty-50", 50, r(20), 100, 0), ("paced-200", 200, r(3), 100, 20)],
        "cluster_paced": "paced-200",
        "deadline": 180,
    }


def machine_line() -> str:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    return (f"{os.cpu_count()} CPU ({model}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--smoke", action="store_true", help="seconds long; asserts only that the harness works")
    group.add_argument("--full", action="store_true", help="every scenario and target")
    group.add_argument("--profile", action="store_true", help="py-spy profile of the product (50 bursty streams)")
    parser.add_argument("--quick", action="store_true", help="with --full: fewer requests per scenario")
    parser.add_argument("--profile-chunks", type=int, default=100, help="with --profile: chunks per answer")
    parser.add_argument("--only", default="", help="comma list of parts: streams,idle,rounds,cluster (default all)")
    parser.add_argument("--scenarios", default="", help="comma list of stream scenarios, e.g. bursty-1,bursty-50")
    parser.add_argument("--transports", default="sse,socketio")
    parser.add_argument("--product-root", type=Path, default=ROOT,
                        help="directory holding the product's run.py (default: this checkout)")
    parser.add_argument("--json", type=Path, help="write all results here (default bench/results/<mode>.json)")
    parser.add_argument("--py-spy", default=os.environ.get("PY_SPY") or shutil.which("py-spy") or "",
                        help="py-spy executable for --profile")
    args = parser.parse_args(argv)

    mode = "smoke" if args.smoke else "profile" if args.profile else "full"
    # SIGTERM (e.g. from `timeout`) unwinds through the `finally` below that stops the servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    PRODUCT_ROOT[0] = args.product_root.resolve()
    started = time.monotonic()
    pinned = pin_to(CLIENT_CORE)
    parts = set(filter(None, args.only.split(","))) or {"streams", "idle", "rounds", "cluster"}
    transports = [t for t in args.transports.split(",") if t]
    settings = plan("full" if mode == "profile" else mode, args.quick)
    token = hs256_token()
    print(f"# bench {mode}{' (quick)' if args.quick else ''} - {dt.datetime.now().isoformat(timespec='seconds')}")
    print(f"# machine: {machine_line()}")
    print(f"# pinning: servers on cores {sorted(SERVER_CORE)}, upstream/load on {sorted(CLIENT_CORE)}: "
          f"{'yes' if pinned else 'no (fewer than 2 cores)'}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="aichat-bench-"))
    upstream_proc, upstream_url = start_upstream(workdir)
    servers: list[Server] = []
    redis_holder: list[subprocess.Popen] = []
    report: dict[str, Any] = {"mode": mode, "quick": args.quick, "machine": machine_line(),
                              "date": dt.datetime.now().isoformat(timespec="seconds")}
    harness_ok = True
    try:
        product = start_product(workdir, upstream_url)
        servers.append(product)
        relay = start_relay(workdir, upstream_url)
        servers.append(relay)
        print(f"# product pid {product.proc.pid} on {product.url}; relay pid {relay.proc.pid} on {relay.url}; "
              f"upstream {upstream_url}; logs in {workdir}", flush=True)

        if mode == "profile":
            return run_profile(args, product, settings, workdir, token)

        deadline = settings["deadline"]
        stream_rows: list[tuple[Scenario, dict, dict]] = []
        streams: dict[tuple[str, str], tuple[dict, dict]] = {}
        if "streams" in parts:
            wanted = set(filter(None, args.scenarios.split(",")))
            for key, concurrency, requests, chunks, gap in settings["streams"]:
                if wanted and key not in wanted:
                    continue
                for transport in transports:
                    scenario = Scenario(key, transport, concurrency, requests, chunks, gap)
                    # relay first, then product: the same conditions, seconds apart
                    relay_result = measure_streams(relay, scenario, workdir, None, deadline)
                    product_result = measure_streams(product, scenario, workdir, token, deadline)
                    stream_rows.append((scenario, product_result, relay_result))
                    streams[(transport, key)] = (product_result, relay_result)
                    print(f"{transport:8} {scenario.label:16} product {product_result['chunks_per_s']:9,.0f} "
                          f"chunks/s {_num(product_result['cpu_ms_per_1k_chunks'])} ms/1k "
                          f"{_num(product_result['cpu_ms_per_request'], 2)} ms/answer | relay "
                          f"{relay_result['chunks_per_s']:9,.0f} chunks/s "
                          f"{_num(relay_result['cpu_ms_per_1k_chunks'])} ms/1k "
                          f"{_num(relay_result['cpu_ms_per_request'], 2)} ms/answer | client core "
                          f"{_num(product_result['client_core_pct'], 0)}%/{_num(relay_result['client_core_pct'], 0)}%"
                          f" | failures {product_result['failures']}/{relay_result['failures']}", flush=True)
                    for result in (product_result, relay_result):
                        if result["errors"]:
                            print(f"   {result['server']} errors: {result['errors'][:3]}", flush=True)
            report["streams"] = [{"product": p, "relay": r} for _, p, r in stream_rows]

        rounds = None
        if "rounds" in parts:
            # on fresh servers: after the big loads above, freed-but-kept memory would hide a leak
            for server in servers:
                server.stop()
            servers[:] = [start_product(workdir, upstream_url), start_relay(workdir, upstream_url)]
            product, relay = servers
            round_scenarios = [Scenario(key, t, c, n, k, g) for key, c, n, k, g in settings["round_load"]
                               for t in transports]
            rounds = {"product": measure_rounds(product, settings["rounds"], round_scenarios, workdir, token,
                                                deadline),
                      "relay": measure_rounds(relay, settings["rounds"], round_scenarios, workdir, None, deadline)}
            report["rounds"] = rounds

        cluster_rows: list[tuple[Scenario, dict, dict]] = []
        if "cluster" in parts:
            for server in servers:
                server.stop()
            redis_proc, redis_url = start_redis(workdir)
            redis_holder.append(redis_proc)
            cluster_env = {"AICHAT_CLUSTER_REDIS_URL": redis_url, "AICHAT_CLUSTER_NODE_ID": "bench-node"}
            servers[:] = [start_product(workdir, upstream_url),
                          start_product(workdir, upstream_url, extra_env=cluster_env, name="cluster")]
            single, cluster = servers
            for key, concurrency, requests, chunks, gap in settings["cluster"]:
                for transport in transports:
                    scenario = Scenario(key, transport, concurrency, requests, chunks, gap)
                    single_result = measure_streams(single, scenario, workdir, token, deadline)
                    cluster_result = measure_streams(cluster, scenario, workdir, token, deadline,
                                                     counter=lambda: redis_commands(redis_url))
                    cluster_rows.append((scenario, cluster_result, single_result))
                    print(f"{transport:8} {scenario.label:16} cluster {cluster_result['chunks_per_s']:9,.0f} chunks/s "
                          f"{_num(cluster_result['cpu_ms_per_request'], 2)} ms/answer | single "
                          f"{single_result['chunks_per_s']:9,.0f} chunks/s "
                          f"{_num(single_result['cpu_ms_per_request'], 2)} ms/answer | redis commands "
                          f"{cluster_result['counted']} for {cluster_result['completed']} answers, "
                          f"{cluster_result['chunks']} chunks", flush=True)
            report["cluster"] = [{"cluster": c, "single": s} for _, c, s in cluster_rows]

        idle_rows: list[tuple[dict, dict]] = []
        if "idle" in parts:
            # on fresh servers: memory freed by the stream loads would hide what connections cost
            for count in settings["idle"]:
                for server in servers:
                    server.stop()
                servers[:] = [start_product(workdir, upstream_url), start_relay(workdir, upstream_url)]
                product, relay = servers
                for server in servers:  # first connections load code and warm caches: not per-connection cost
                    measure_idle(server, 20, workdir, 1)
                pair = (measure_idle(product, count, workdir, settings["idle_processes"]),
                        measure_idle(relay, count, workdir, settings["idle_processes"]))
                idle_rows.append(pair)
                print(f"idle {count}: product {_num(pair[0]['kb_per_connection'])} KB/conn, "
                      f"relay {_num(pair[1]['kb_per_connection'])} KB/conn", flush=True)
            report["idle"] = idle_rows

        print()
        if stream_rows:
            print("## Streams: product (bare relay) ratio\n")
            print(stream_table(stream_rows) + "\n")
        if idle_rows:
            print("## Idle Socket.IO connections\n")
            print(idle_table(idle_rows) + "\n")
        if cluster_rows:
            print("## Cluster mode (one node + Redis) vs single process\n")
            print(cluster_table(cluster_rows) + "\n")
        if rounds:
            print(f"## Memory over {settings['rounds']} rounds of "
                  f"{' + '.join(f'{s.transport} c={s.concurrency}x{s.requests}' for s in round_scenarios)}\n")
            print(rounds_table(rounds["product"], rounds["relay"]) + "\n")

        checks = check_targets(streams, idle_rows, rounds, settings["keys"])
        checks += cluster_targets(cluster_rows, settings["cluster_paced"])
        report["targets"] = [{"target": t, "pass": ok, "measured": m} for t, ok, m in checks]
        print("## Targets" + (" (smoke: informative only, loads are tiny)" if mode == "smoke" else "") + "\n")
        for target, ok, measured in checks:
            print(f"{'PASS' if ok else 'FAIL'}  {target}: {measured}")

        # The harness works when every answer was correct and every part produced figures.
        failures = sum(p["failures"] + r["failures"] for _, p, r in stream_rows)
        failures += sum(p["failures"] + r["failures"] for p, r in idle_rows)
        failures += sum(rounds[s]["failures"] for s in ("product", "relay")) if rounds else 0
        failures += sum(c["failures"] + s["failures"] for _, c, s in cluster_rows)
        harness_ok = failures == 0 and (not stream_rows or all(p["chunks"] and r["chunks"]
                                                               for _, p, r in stream_rows))
        print(f"\nharness: {'OK' if harness_ok else 'FAILED'} ({failures} failed requests/connections); "
              f"{time.monotonic() - started:.0f}s")
    finally:
        for server in servers:
            server.stop()
        for proc in redis_holder:
            proc.terminate()
            _finish(proc)
        upstream_proc.stdin.close()  # the upstream exits at EOF
        _finish(upstream_proc)
        out = args.json or ROOT / "bench" / "results" / f"{mode}{'-quick' if args.quick else ''}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str))
        if harness_ok:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if harness_ok else 1


def run_profile(args: argparse.Namespace, product: Server, settings: dict[str, Any], workdir: Path,
                token: str) -> int:
    if not args.py_spy:
        print("error: --profile needs py-spy (pip install py-spy; pass --py-spy PATH or set PY_SPY)")
        return 2
    outdir = ROOT / "bench" / "results" / "profile"
    outdir.mkdir(parents=True, exist_ok=True)
    profiler = Profiler(args.py_spy, outdir)
    for transport in [t for t in args.transports.split(",") if t]:
        scenario = Scenario("bursty-50", transport, 50, 40, args.profile_chunks, 0)
        result = measure_streams(product, scenario, workdir, token, settings["deadline"], profiler)
        print(f"{transport}: {result['chunks_per_s']:,.0f} chunks/s, {result['cpu_ms_per_request']:.2f} ms CPU/answer, "
              f"{result['failures']} failures "
              f"(under py-spy: slower than unprofiled)")
    for path in profiler.files:
        print(summarize_profile(path))
        print()
    print(f"collapsed stacks in {outdir} (e.g. flamegraph.pl or speedscope)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
