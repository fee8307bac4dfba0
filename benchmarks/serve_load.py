"""Requests/s and latency of `levit-deploy serve` under 1, 4, 16 and 64 concurrent clients posting real photos.

    python benchmarks/serve_load.py ARTIFACT_FOLDER [--duration S] [--concurrency 1 4 16 64] [--out FILE.md]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000/ [...]     # attach to a running server

Without --url it starts a local Ray (4 logical CPUs) and the Serve application on 127.0.0.1 (the package's
defaults: 1 replica, max_batch 16, batch_wait_ms 10, body timeout 10 s, queue 128), waits for it, and shuts it
down at the end. Each client is a thread with its own keep-alive connection (http.client) that posts the
package's bundled JPEG photos in turn for --duration seconds (at most 30) per concurrency level after a short
warm-up; every request has a 60 s timeout, so every level stops by itself. Only 127.0.0.1 is allowed.
Reports requests/s, p50/p95/p99 latency of the answered requests and the count of non-200 answers and errors,
as a markdown table (with the command, the machine and the versions) and, with --json, as JSON.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
import urllib.parse
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

MAX_DURATION_S = 30.0
REQUEST_TIMEOUT_S = 60.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]  # nearest rank


def client(host: str, port: int, photos: list[bytes], offset: int, deadline: float, latencies: list[float],
           statuses: Counter, lock: threading.Lock) -> None:
    """Post photos on one keep-alive connection until ``deadline``; a broken connection is counted and reopened."""
    conn, i = None, offset
    while time.monotonic() < deadline:
        body = photos[i % len(photos)]
        i += 1
        start = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
            conn.request("POST", "/?name=photo.jpg", body=body, headers={"Content-Type": "image/jpeg"})
            response = conn.getresponse()
            response.read()
            status = response.status
            if response.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as e:
            status = type(e).__name__
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.05)  # a refused connection must not spin
        elapsed = time.monotonic() - start
        with lock:
            statuses[status] += 1
            if status == 200:
                latencies.append(elapsed)
    if conn is not None:
        conn.close()


def level(host: str, port: int, photos: list[bytes], concurrency: int, duration: float) -> dict:
    latencies: list[float] = []
    statuses: Counter = Counter()
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + duration
    threads = [threading.Thread(target=client, daemon=True,
                                args=(host, port, photos, k, deadline, latencies, statuses, lock))
               for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + REQUEST_TIMEOUT_S + 5)
    wall = time.monotonic() - start  # includes the requests in flight at the deadline
    ok = statuses.get(200, 0)
    return {"concurrency": concurrency, "duration_s": round(wall, 2), "requests": sum(statuses.values()),
            "ok": ok, "rps": round(ok / wall, 2),
            "p50_ms": round(1000 * percentile(latencies, 50), 1), "p95_ms": round(1000 * percentile(latencies, 95), 1),
            "p99_ms": round(1000 * percentile(latencies, 99), 1),
            "mean_ms": round(1000 * statistics.fmean(latencies), 1) if latencies else float("nan"),
            "non_200": {str(k): v for k, v in statuses.items() if k != 200}}


def wait_ready(host: str, port: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            doc = json.loads(response.read())
            conn.close()
            if response.status == 200:
                return doc
        except (OSError, http.client.HTTPException, ValueError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"no answer from http://{host}:{port}/healthz within {timeout:g} s")
        time.sleep(1)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for name in ("ray", "onnxruntime", "numpy", "uvicorn", "starlette"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a version we cannot read is left out
            pass
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None, "cpu": cpu, "platform": platform.platform(), "versions": versions,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def markdown(rows: list[dict], info: dict) -> str:
    v = ", ".join(f"{k} {x}" for k, x in info["machine"]["versions"].items())
    m = info["machine"]
    lines = [
        "# Serve under load", "",
        f"`{info['command']}`", "",
        f"- date: {m['date']}",
        f"- machine: {m['nproc']} CPUs (nproc; {m['affinity']} usable), {m['cpu']}, {m['platform']}",
        f"- versions: {v}",
        f"- server: {info['server']}",
        f"- model: {info['model']}",
        f"- load: {info['load']}",
        *([f"- note: {info['note']}"] if info.get("note") else []),
        "",
        "| clients | duration s | requests | 200 | req/s | p50 ms | p95 ms | p99 ms | non-200 / errors |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|:--|",
    ]
    for r in rows:
        bad = ", ".join(f"{k}: {n}" for k, n in sorted(r["non_200"].items())) or "0"
        lines.append(f"| {r['concurrency']} | {r['duration_s']} | {r['requests']} | {r['ok']} | {r['rps']} | "
                     f"{r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {bad} |")
    if info.get("batch_sizes"):
        lines += ["", f"Batch sizes the replica inferred over the run (healthz, size: count): {info['batch_sizes']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", nargs="?", help="An artifact folder to serve (not with --url).")
    parser.add_argument("--url", help="Attach to a server already running on 127.0.0.1 instead.")
    parser.add_argument("--port", type=int, default=8790, help="Port of the server started here.")
    parser.add_argument("--duration", type=float, default=20.0, help=f"Seconds per level (at most {MAX_DURATION_S:g}).")
    parser.add_argument("--warmup", type=float, default=3.0, help="Seconds of unrecorded load before each level.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_load.md")
    parser.add_argument("--json", type=Path, help="Also write the rows as JSON here.")
    parser.add_argument("--note", default="", help="A line for the report (how the artifact was made, ...).")
    args = parser.parse_args()
    if (args.artifact is None) == (args.url is None):
        parser.error("give an artifact folder, or --url of a running server")
    if not 0 < args.duration <= MAX_DURATION_S or not 0 <= args.warmup <= 10:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S:g}] and --warmup in [0, 10]")
    if any(c < 1 or c > 256 for c in args.concurrency):
        parser.error("--concurrency levels must be in [1, 256]")

    from levit_deploy.preprocess import bundled_photos

    photos = [p.read_bytes() for p in bundled_photos()]
    started = False
    if args.url:
        u = urllib.parse.urlsplit(args.url)
        if u.hostname != "127.0.0.1":
            parser.error("--url must be on 127.0.0.1")
        host, port = "127.0.0.1", u.port or 80
        server = f"attached to {args.url}"
    else:
        import ray

        from levit_deploy.serve import start

        host, port = "127.0.0.1", args.port
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        start(args.artifact, host=host, port=port)
        started = True
        server = (f"started here: Ray local (4 logical CPUs), 1 replica, runtime threads 1, max_batch 16, "
                  f"batch_wait_ms 10, max_ongoing 64, max_queued 128, body timeout 10 s, port {port}")
    try:
        health = wait_ready(host, port)
        rows = []
        for c in args.concurrency:
            if args.warmup:
                level(host, port, photos, c, args.warmup)
            rows.append(level(host, port, photos, c, args.duration))
            print(json.dumps(rows[-1]), flush=True)
        after = wait_ready(host, port)
    finally:
        if started:
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    info = {"command": shlex.join(["python", sys.argv[0].replace(str(Path.cwd()) + "/", "")] + sys.argv[1:]),
            "machine": machine(), "server": server, "model": health.get("model"),
            "load": (f"{len(photos)} bundled JPEG photos ({min(map(len, photos)) // 1024}-"
                     f"{max(map(len, photos)) // 1024} KiB) posted in turn, one keep-alive connection per client, "
                     f"{args.warmup:g} s warm-up then {args.duration:g} s per level; latency of 200 answers, "
                     f"client-side; req/s = 200 answers / wall time"),
            "batch_sizes": after.get("batch_sizes"), "note": args.note}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, info))
    if args.json:
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=2, default=str))
    print(markdown(rows, info))


if __name__ == "__main__":
    main()
