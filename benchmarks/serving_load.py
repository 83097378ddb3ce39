"""A bounded load test of the served champion: good requests mixed with oversized and malformed ones.

    python benchmarks/serving_load.py            # after `make run`: models:/segflow@champion in ./mlflow.db

Starts `mlflow models serve` of ``--model`` on loopback, sends ``--requests`` requests from ``--concurrency``
threads in a seeded order: good ones (a PNG of the default data, base64), oversized ones (a 310 kB PNG of 9000x9000
black pixels: refused from its header by the model's pixel limit) and malformed ones (text that is not base64, bytes
that are no image, an array of the wrong shape). Every good request must be answered (200, a mask of the image's
size) and every bad one refused (400); the report gives each kind's count, status codes and p50/p99 latency, and the
server's resident memory (its process tree) before and after. Writes ``reports/serving_load.{md,json}``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def request_bodies(image_file: Path) -> dict[str, list[tuple[dict, tuple[int, int] | None]]]:
    """Per kind, the bodies sent and, for good ones, the mask shape expected."""
    good = Image.open(image_file).convert("RGB")
    shape = (good.height, good.width)
    return {
        "good": [({"inputs": _png(good)}, shape)],
        "oversized": [({"inputs": _png(Image.new("L", (9000, 9000)))}, None)],
        "malformed": [({"inputs": "not base64 at all!"}, None),
                      ({"inputs": base64.b64encode(b"no image in these bytes").decode()}, None),
                      ({"inputs": [[1, 2], [3, 4]]}, None)],
    }


def tree_memory(process: psutil.Process) -> int:
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(model: str, port: int, log_file: Path) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local", "-p",
                               str(port), "-h", "127.0.0.1"], env=env, stdout=log_file.open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        if server.poll() is not None:
            sys.exit(f"mlflow models serve exited: {log_file.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            sys.exit("mlflow models serve did not answer /ping within 180 s")
        try:
            requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).raise_for_status()
            return server
        except requests.RequestException:
            time.sleep(0.5)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models:/segflow@champion")
    parser.add_argument("--image", type=Path, default=None, help="a good image (default: the default data's first)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--bad-share", type=float, default=0.3, help="share of oversized + malformed requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "reports/serving_load")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{REPO / 'mlflow.db'}")
    image = args.image or sorted((REPO / "data/synthetic/images").glob("*.png"))[0]
    bodies = request_bodies(image)
    rng = random.Random(args.seed)
    kinds_sent = ["good" if rng.random() >= args.bad_share else rng.choice(["oversized", "malformed"])
                  for _ in range(args.requests)]
    plan = [(kind, rng.randrange(len(bodies[kind]))) for kind in kinds_sent]

    load = os.getloadavg()[0]
    port = _free_port()
    server = serve(args.model, port, args.out.with_suffix(".log"))
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        process = psutil.Process(server.pid)
        memory_before = tree_memory(process)

        def send(planned: tuple[str, int]) -> dict:
            kind, index = planned
            body, shape = bodies[kind][index]
            started = time.perf_counter()
            response = requests.post(url, json=body, timeout=120)
            seconds = time.perf_counter() - started
            ok = (response.status_code == 200 and np.asarray(response.json()["predictions"]).shape == shape
                  if kind == "good" else response.status_code == 400)
            return {"kind": kind, "status": response.status_code, "seconds": seconds, "ok": bool(ok)}

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(send, plan))
        wall = time.perf_counter() - started
        memory_after = tree_memory(process)
        ping = requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)

    kinds = {}
    for kind in ("good", "oversized", "malformed"):
        runs = [r for r in results if r["kind"] == kind]
        seconds = [r["seconds"] for r in runs]
        kinds[kind] = {"requests": len(runs), "as_expected": sum(r["ok"] for r in runs),
                       "statuses": dict(sorted(Counter(r["status"] for r in runs).items())),
                       "p50_ms": 1000 * percentile(seconds, 50), "p99_ms": 1000 * percentile(seconds, 99)}
    summary = {"model": args.model, "image": str(image.relative_to(REPO) if image.is_relative_to(REPO) else image),
               "requests": args.requests, "concurrency": args.concurrency, "wall_seconds": wall,
               "server_rss_mb_before": memory_before / 1e6, "server_rss_mb_after": memory_after / 1e6,
               "ping_after": ping, "kinds": kinds, "cpu": f"{os.cpu_count()} cores", "load_average_at_start": load,
               "all_as_expected": all(r["ok"] for r in results)}
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["# Serving under load: good requests mixed with oversized and malformed ones", "",
             f"`python benchmarks/serving_load.py`: `mlflow models serve` of {args.model} on loopback, {args.requests} "
             f"requests from {args.concurrency} threads ({os.cpu_count()} CPU cores, load average {load:.1f} when it "
             "started: other jobs share the cores at that), good: a "
             f"{Image.open(image).width}x{Image.open(image).height} PNG of the default data; oversized: a 9000x9000 "
             "black PNG (310 kB); malformed: text that is not base64, bytes that are no image, an array of the wrong "
             "shape.", "",
             "| kind | requests | as expected | status codes | p50 (ms) | p99 (ms) |", "|---|---|---|---|---|---|"]
    for kind, stats in kinds.items():
        lines.append(f"| {kind} | {stats['requests']} | {stats['as_expected']} | "
                     f"{', '.join(f'{s}: {n}' for s, n in stats['statuses'].items())} | {stats['p50_ms']:.0f} | "
                     f"{stats['p99_ms']:.0f} |")
    lines += ["", f"Server memory (resident, its process tree): {memory_before / 1e6:.0f} MB before, "
                  f"{memory_after / 1e6:.0f} MB after; /ping after the run: {ping}; wall time {wall:.1f} s.",
              f"Every good request answered with a mask of its size and every bad one refused with 400: "
              f"{'yes' if summary['all_as_expected'] else 'NO'}."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not summary["all_as_expected"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
