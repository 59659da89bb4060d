"""Load test of the inspection service: the real `python -m core serve` (uvicorn) on localhost, N requests from C
concurrent clients; p50 / p99 latency, throughput, errors, and whether the registry holds exactly N new results.

    .venv/bin/python benchmarks/load_test.py                       # 2,000 requests, 4 clients, a demo run
    .venv/bin/python benchmarks/load_test.py --registry data/workspace/registry.sqlite --variant bottle

Without --registry it fits a PatchCore run of the bundled demo set (hazelnut_toy, --set below) into a fresh
temporary workspace and deploys it. The images sent are the variant's test images (the demo's 23: good and
defective) in turn, as multipart uploads. After the timed requests, four bad ones (not an image, a 36-megapixel
header, an unknown variant, no file) must each get their 4xx and leave the registry as it was.
Exit status 0 only when there was no error and nothing was lost. Not a test: `make test` does not run it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.data import IMAGE_SUFFIXES  # noqa: E402
from core.runs import RunStore  # noqa: E402

DEMO = REPO / "data" / "demo" / "hazelnut_toy"
DEMO_SET = ["resize=256", "coreset_ratio=0.1", "calibration_fraction=0", "score_border=0"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no real pixels (the service must refuse it unread)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def demo_registry(workspace: Path, settings: list[str]) -> tuple[Path, str]:
    """Fit and deploy a demo run in `workspace` (through the command line, as a user would)."""
    env = {**os.environ, "ANOMALYSCOPE_HOME": str(workspace)}
    log(f"fitting patchcore on {DEMO.name} ({' '.join(settings)}) in {workspace}")
    subprocess.run([sys.executable, "-m", "core", "train", "--data", str(DEMO), "--set", *settings], cwd=REPO,
                   env=env, check=True, stdout=subprocess.DEVNULL)
    store = RunStore(workspace / "registry.sqlite")
    dataset = store.find_dataset(DEMO.name)
    store.set_deployed(dataset["id"], store.list_runs(dataset["id"])[0]["id"])
    return store.path, DEMO.name


def test_images(store: RunStore, variant: str, folder: str | None) -> list[tuple[str, bytes]]:
    if folder:
        paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        source = Path(store.find_dataset(variant)["source"])
        paths = sorted(p for p in (source / "test").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit("no images to send: give --images DIR")
    return [(f"{p.parent.name}/{p.name}", p.read_bytes()) for p in paths]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), to compare settings on a shared machine."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def wait_ready(url: str, server: subprocess.Popen, seconds: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if server.poll() is not None:
            raise SystemExit(f"the service exited with status {server.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the service was not ready within {seconds:g} s")


def fire(url: str, variant: str, images, n: int, clients: int, timeout: float) -> dict:
    """n requests from `clients` threads, each with its own keep-alive connection."""
    counter, lock = itertools.count(), threading.Lock()
    latencies, statuses, verdicts, failures = [], [], {}, []

    def client():
        with httpx.Client(base_url=url, timeout=timeout) as http:
            while True:
                with lock:
                    i = next(counter)
                if i >= n:
                    return
                name, data = images[i % len(images)]
                start = time.perf_counter()
                try:
                    answer = http.post(f"/inspect/{variant}", files={"file": (name, data)})
                    status = answer.status_code
                    verdict = answer.json().get("verdict") if status == 200 else None
                    if status != 200:
                        failures.append(f"{name}: {status} {answer.text[:200]}")
                except httpx.HTTPError as exc:
                    status, verdict = 0, None
                    failures.append(f"{name}: {type(exc).__name__}: {exc}")
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    statuses.append(status)
                    verdicts[verdict] = verdicts.get(verdict, 0) + 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = 1000 * np.array(latencies)
    return {"requests": n, "clients": clients, "wall_s": round(wall, 2),
            "throughput_per_s": round(n / wall, 2), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p90_ms": round(float(np.percentile(ms, 90)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "max_ms": round(float(ms.max()), 1), "mean_ms": round(float(ms.mean()), 1),
            "errors": sum(s != 200 for s in statuses), "verdicts": {str(k): v for k, v in verdicts.items()},
            "first_failures": failures[:5]}


def bad_requests(url: str, variant: str, good: bytes) -> dict:
    """Each bad request and whether it got its status."""
    cases = {
        "not an image -> 415": (f"/inspect/{variant}", {"files": {"file": ("part.png", b"hello, not a picture")}}, 415),
        "36 MP header -> 413": (f"/inspect/{variant}", {"files": {"file": ("huge.png", fake_png_header(6000, 6000))}}, 413),
        "unknown variant -> 404": ("/inspect/no-such-variant", {"files": {"file": ("part.jpg", good)}}, 404),
        "no file -> 422": (f"/inspect/{variant}", {}, 422),
    }
    out = {}
    with httpx.Client(base_url=url, timeout=30) as http:
        for what, (path, request, expected) in cases.items():
            answer = http.post(path, **request)
            out[what] = {"status": answer.status_code, "ok": answer.status_code == expected,
                         "detail": answer.json().get("detail")}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--registry", help="a registry with a deployed run (default: fit a demo run in a temp folder)")
    parser.add_argument("--variant", help="the variant to load (default: the demo's, or the registry's only one)")
    parser.add_argument("--images", help="folder of images to send (default: the variant's test images)")
    parser.add_argument("--set", nargs="*", default=DEMO_SET, help="parameters of the demo fit")
    parser.add_argument("--concurrency", type=int, default=1, help="the service's --concurrency")
    parser.add_argument("--omp-threads", type=int, help="OMP_NUM_THREADS for the service (default: torch's own)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    parser.add_argument("--json", default="bench_results/load_test.json")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="anomalyscope-load-"))
    if args.registry:
        registry, variant = Path(args.registry), args.variant
    else:
        registry, variant = demo_registry(scratch / "workspace", args.set)
    store = RunStore(registry)
    if variant is None:
        deployed = [d["name"] for d in store.list_datasets() if store.deployed_run(d["id"])]
        if len(deployed) != 1:
            raise SystemExit(f"name the variant with --variant (deployed: {', '.join(deployed) or 'none'})")
        variant = deployed[0]
    run = store.deployed_run(store.find_dataset(variant)["id"])
    images = test_images(store, variant, args.images)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ) if args.registry else {**os.environ, "ANOMALYSCOPE_HOME": str(registry.parent)}
    if args.omp_threads:
        env["OMP_NUM_THREADS"] = str(args.omp_threads)
    server_log = scratch / "serve.log"
    command = [sys.executable, "-m", "core", "--registry", str(registry), "serve", "--port", str(port),
               "--variant", variant, "--concurrency", str(args.concurrency)]
    log(f"starting: {' '.join(command)} (log: {server_log})")
    with open(server_log, "w") as server_out:
        server = subprocess.Popen(command, cwd=REPO, env=env, stdout=server_out, stderr=subprocess.STDOUT)
    try:
        ready_s = wait_ready(url, server, 300)
        before = store.count_inspections(run["id"])
        load_before = os.getloadavg()
        log(f"ready in {ready_s:.1f} s; {args.requests} requests from {args.clients} clients "
            f"(load average {load_before[0]:.2f})")
        cpu_before = cpu_seconds(server.pid)
        result = fire(url, variant, images, args.requests, args.clients, args.timeout)
        cpu_after = cpu_seconds(server.pid)
        load_after = os.getloadavg()
        recorded = store.count_inspections(run["id"]) - before
        model_ms = 1000 * np.array([r["seconds"] for r in store.list_inspections(run["id"], limit=args.requests)])
        bad = bad_requests(url, variant, images[0][1])
        after_bad = store.count_inspections(run["id"]) - before
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    result.update(
        variant=variant, run_id=run["id"], detector=run["detector"], params=run["params"],
        model_p50_ms=round(float(np.percentile(model_ms, 50)), 1) if len(model_ms) else None,
        model_p99_ms=round(float(np.percentile(model_ms, 99)), 1) if len(model_ms) else None,
        server_cpu_ms_per_request=(None if cpu_before is None or cpu_after is None
                                   else round(1000 * (cpu_after - cpu_before) / args.requests, 1)),
        service_concurrency=args.concurrency, omp_threads=args.omp_threads, images=len(images),
        registry_new=recorded, registry_complete=recorded == args.requests,
        bad_requests=bad, bad_requests_recorded=after_bad - recorded,
        load_average_before=[round(x, 2) for x in load_before], load_average_after=[round(x, 2) for x in load_after],
        cpus=os.cpu_count(), server_log=str(server_log), measured=time.strftime("%Y-%m-%d %H:%M"))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"wrote {out}")
    print(f"{result['requests']} requests, {result['clients']} clients, {result['errors']} errors, "
          f"{result['wall_s']} s: {result['throughput_per_s']} images/s")
    print(f"latency ms: p50 {result['p50_ms']}  p90 {result['p90_ms']}  p99 {result['p99_ms']}  "
          f"max {result['max_ms']}  mean {result['mean_ms']}")
    print(f"model time alone (the registry's seconds): p50 {result['model_p50_ms']} ms, p99 {result['model_p99_ms']} ms")
    print(f"service CPU time per request: {result['server_cpu_ms_per_request']} ms (all its threads; the "
          f"machine's {result['cpus']} CPUs could serve at most {result['cpus']} s of it per second)")
    print(f"registry: {recorded} new inspections for {args.requests} requests "
          f"({'complete' if result['registry_complete'] else 'MISMATCH'}); verdicts {result['verdicts']}")
    for what, answer in bad.items():
        print(f"bad request, {what}: got {answer['status']} ({'ok' if answer['ok'] else 'WRONG'}): {answer['detail']}")
    print(f"load average (1, 5, 15 min) before {result['load_average_before']}, after "
          f"{result['load_average_after']} on {result['cpus']} CPUs")
    ok = (result["errors"] == 0 and result["registry_complete"] and all(a["ok"] for a in bad.values())
          and result["bad_requests_recorded"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
