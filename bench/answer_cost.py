"""CPU per answer, product vs bare relay: a small, repeatable A/B tool (issue #16).

    python -m bench.answer_cost                       # 1-chunk answers, both transports, 3 repeats
    python -m bench.answer_cost --concurrency 50      # the same with 50 clients (group commit shows)
    python -m bench.answer_cost --cprofile out.prof   # and a cProfile of the product's event loop
    python -m bench.answer_cost --product-root DIR    # another checkout of the product (A/B)
    python -m bench.answer_cost --cluster redis://127.0.0.1:6399/0   # the product in cluster mode

Same processes and pinning as `bench.run` (fake upstream, the product with auth, limiter and
SQLite on, the bare relay). Each repeat measures the relay and then the product on the same
load (C clients x N 1-chunk answers), so the per-answer set-up dominates; the result is the
median over the repeats of psutil's CPU time (user+sys, all threads) per answer. On a busy
machine CPU time still inflates with cache contention, so compare A/B runs made one right
after the other, and look at the ratio to the relay (measured seconds apart) as well.

With --cprofile the product runs under a launcher that profiles its main thread (the event
loop) during the measured windows only (SIGUSR1 on, SIGUSR2 off and dump); the profile's
own overhead inflates small calls, so use it for where, not for how much.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import run as bench_run
from bench.common import hs256_token, pin_to

# Runs the product's run.py with cProfile toggled by signals (main thread only).
PROFILED_LAUNCHER = """
import cProfile, runpy, signal, sys, time
profile = cProfile.Profile(time.thread_time)  # CPU time of the loop thread, not wall time
out = sys.argv.pop(1)
def on(*_):
    profile.enable()
def off(*_):
    profile.disable()
    profile.dump_stats(out)
signal.signal(signal.SIGUSR1, on)
signal.signal(signal.SIGUSR2, off)
sys.argv[0] = "run.py"
runpy.run_path("run.py", run_name="__main__")
"""


def _callgrind_start(pid: int) -> None:
    subprocess.run(["callgrind_control", "--instr=on", str(pid)], check=True, capture_output=True)
    subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)


def _callgrind_instructions(pid: int, out: Path) -> int:
    """Instructions the process executed (all threads) since _callgrind_start, via a dump."""
    for old in out.parent.glob(out.name + "*"):
        old.unlink()
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
    total = 0
    for dump in out.parent.glob(out.name + "*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:") or line.startswith("summary:"):
                total += int(line.split()[1])
                break
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=int, default=1000, help="answers per measurement (default 1000)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--chunks", type=int, default=1, help="chunks per answer (default 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transports", default="sse,socketio")
    parser.add_argument("--no-relay", action="store_true", help="measure the product only")
    parser.add_argument("--product-root", type=Path, default=bench_run.ROOT)
    parser.add_argument("--cprofile", type=Path, help="write a cProfile of the product's event loop here")
    parser.add_argument("--callgrind", action="store_true",
                        help="run the product under callgrind: instructions per answer (deterministic, slow)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--cluster", metavar="REDIS_URL", default="",
                        help="run the product in cluster mode on this Redis (compare with a run without)")
    args = parser.parse_args(argv)

    bench_run.PRODUCT_ROOT[0] = args.product_root.resolve()
    pin_to(bench_run.CLIENT_CORE)
    token = hs256_token()
    transports = [t for t in args.transports.split(",") if t]
    workdir = Path(tempfile.mkdtemp(prefix="aichat-answer-cost-"))
    upstream_proc, upstream_url = bench_run.start_upstream(workdir)
    servers: list[bench_run.Server] = []
    figures: dict[str, list[float]] = {}
    try:
        command = None
        if args.cprofile:
            command = [bench_run.PYTHON, "-c", PROFILED_LAUNCHER, str(args.cprofile.resolve())]
        callgrind_out = {name: workdir / f"callgrind-{name}.out" for name in ("product", "relay")}

        def under_callgrind(name: str, *python_args: str) -> list[str]:
            return ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                    f"--callgrind-out-file={callgrind_out[name]}", bench_run.PYTHON, *python_args]

        if args.callgrind:
            command = under_callgrind("product", "run.py")
        cluster_env = {"AICHAT_CLUSTER_REDIS_URL": args.cluster} if args.cluster else None
        product = bench_run.start_product(workdir, upstream_url, command=command,
                                          start_timeout=600 if args.callgrind else 30, extra_env=cluster_env)
        servers.append(product)
        relay = None
        if not args.no_relay:
            relay_command = under_callgrind("relay", "-m", "bench.relay") if args.callgrind else None
            relay = bench_run.start_relay(workdir, upstream_url, command=relay_command,
                                          start_timeout=600 if args.callgrind else 30)
        if relay is not None:
            servers.append(relay)
        requests = max(1, args.answers // args.concurrency)
        # warm both up (imports on first use, SQLite pages, connection pools)
        for server in servers:
            for transport in transports:
                scenario = bench_run.Scenario("warm", transport, args.concurrency, 20, args.chunks, 0)
                bench_run.measure_streams(server, scenario, workdir, token if server is product else None, 60)
        for repeat in range(args.repeats):
            for transport in transports:
                scenario = bench_run.Scenario("cost", transport, args.concurrency, requests, args.chunks, 0)
                for server in servers:
                    if args.cprofile and server is product:
                        os.kill(product.proc.pid, signal.SIGUSR1)
                    if args.callgrind:
                        _callgrind_start(server.proc.pid)
                    result = bench_run.measure_streams(server, scenario, workdir,
                                                       token if server is product else None, 600)
                    if args.cprofile and server is product:
                        os.kill(product.proc.pid, signal.SIGUSR2)
                    if args.callgrind:
                        instructions = _callgrind_instructions(server.proc.pid, callgrind_out[server.name])
                        per_answer = instructions / result["completed"]
                        figures.setdefault(f"instructions {server.name} {transport}", []).append(per_answer)
                        print(f"repeat {repeat + 1} {transport:8} {server.name:7} {per_answer / 1e6:.3f} M "
                              "instructions/answer (callgrind)", flush=True)
                    if result["failures"]:
                        print(f"  {server.name} {transport}: {result['failures']} failures {result['errors'][:2]}")
                    figures.setdefault(f"{server.name} {transport}", []).append(result["cpu_ms_per_request"])
                    print(f"repeat {repeat + 1} {transport:8} {server.name:7} "
                          f"{result['cpu_ms_per_request']:.3f} ms CPU/answer, TTFC p50 {result['ttfc_p50_ms']:.2f} ms",
                          flush=True)
    finally:
        for server in servers:
            server.stop()
        upstream_proc.stdin.close()
        bench_run._finish(upstream_proc)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nmedian CPU ms per answer over {args.repeats} repeats "
          f"({args.concurrency} client(s) x {requests} answers of {args.chunks} chunk(s)):")
    summary = {}
    for transport in transports:
        if args.callgrind:
            product_i = statistics.median(figures[f"instructions product {transport}"]) / 1e6
            line = f"  {transport:8} product {product_i:.3f} M instructions/answer (callgrind, all threads)"
            summary[transport] = {"product_instructions": product_i}
            if relay is not None:
                relay_i = statistics.median(figures[f"instructions relay {transport}"]) / 1e6
                summary[transport]["relay_instructions"] = relay_i
                line += f"  relay {relay_i:.3f}  ratio {product_i / relay_i:.2f}x"
            print(line)
        product_ms = statistics.median(figures[f"product {transport}"])
        summary.setdefault(transport, {})["product"] = product_ms
        line = f"  {transport:8} product {product_ms:.3f}"
        if relay is not None:
            relay_ms = statistics.median(figures[f"relay {transport}"])
            summary[transport]["relay"] = relay_ms
            line += f"  relay {relay_ms:.3f}  ratio {product_ms / relay_ms:.2f}x  gap {product_ms - relay_ms:.3f}"
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": figures, "time": time.time()}, indent=1))
    if args.cprofile:
        print(f"cProfile of the product's event loop: {args.cprofile} (python -m pstats)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
