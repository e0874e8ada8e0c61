"""Training-loader rows/s from a cache on an object store (s3://) next to the same cache in a folder.

    python benchmarks/remote_read.py --out benchmarks/results/remote_read_cpu.json

Builds a cache (or takes --cache), uploads it to a local S3 API server (moto) and reads it through a
TCP proxy that holds every request --latency-ms before passing it on: a store that far away. Then,
in one process and interleaved, --repeats times each: one epoch of the training loader (CacheDataset
shuffled, DataLoader(batch_size=None), rows decoded and checked as training does, no model) over the
local folder, and over s3:// at each --read-ahead value with no local cache folder (so every epoch
downloads every shard). Reports rows/s medians and remote/local ratios, and writes them (with the
command, machine, versions and git commit) to --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
NICE = int(os.environ.get("KDPIPE_BENCH_NICE", "10"))  # CPU priority of the server process
sys.path.insert(0, str(REPO / "tests"))  # the test suite's S3 server and latency proxy

from s3_server import LatencyProxy, S3Server, s3_environment  # noqa: E402

from kdpipe.pipeline.cache.reader import TeacherCache  # noqa: E402
from kdpipe.pipeline.train.dataset import CacheDataset  # noqa: E402
from kdpipe.pipeline.cache.manifest import software_versions  # noqa: E402
from kdpipe.pipeline.cache.storage.location import CacheLocation  # noqa: E402


def build_cache(args, folder: Path) -> str:
    from kdpipe.pipeline.capture import CaptureSettings, plan_capture, run_capture

    plan = plan_capture(CaptureSettings(teacher=args.teacher, data=args.data, out=str(folder), top_k=args.top_k,
                                        temperatures=(1.0, 2.0), seq_len=args.seq_len, limit_rows=args.rows,
                                        shard_size_mb=args.shard_size_mb, device="cpu"))
    run_capture(plan)
    return str(folder)


def loader_epoch(cache: TeacherCache, *, batch_size: int, epoch: int) -> tuple[int, float, float]:
    """(rows, seconds, seconds to the first batch) of one shuffled epoch of the training loader."""
    dataset = CacheDataset(cache, batch_size=batch_size, seed=0)
    dataset.set_epoch(epoch)
    started, rows, first = time.perf_counter(), 0, None
    for batch in DataLoader(dataset, batch_size=None, num_workers=0):
        rows += len(batch["mask"])
        first = first or time.perf_counter() - started
    return rows, time.perf_counter() - started, first


def serve(conn, latency_s: float) -> None:
    """Child process: the S3 server and the latency proxy in front of it (so that neither competes
    with the loader for the interpreter lock), at a lower CPU priority; answers "requests" with the
    GET+HEAD count and "cpu" with its CPU seconds, exits on "stop"."""
    os.nice(NICE)  # a real store runs elsewhere: this one yields the machine's cores to the loader
    server = S3Server()
    server.start()
    proxy = LatencyProxy(server.get_host_and_port()[1], latency_s=latency_s).start()
    conn.send((server.endpoint, proxy.endpoint))
    while (command := conn.recv()) != "stop":
        if command == "requests":
            conn.send(server.count("GET") + server.count("HEAD"))
        elif command == "cpu":
            conn.send(time.process_time())
    proxy.stop()
    server.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="data/teacher")
    p.add_argument("--data", default="data/shakespeare/train")
    p.add_argument("--cache", default=None, help="an existing local cache (default: capture one)")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--shard-size-mb", type=float, default=4.0,
                   help="uncompressed size cap of a shard (cache-teacher's default is 256: small shards stress per-object costs)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--latency-ms", type=float, default=20.0, help="added to every request to the store")
    p.add_argument("--read-ahead", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default=None, help="JSON file to write the results to")
    args = p.parse_args()

    conn, child_conn = multiprocessing.get_context("spawn").Pipe()
    child = multiprocessing.get_context("spawn").Process(target=serve, args=(child_conn, args.latency_ms / 1000))
    child.start()
    direct, delayed = conn.recv()
    with tempfile.TemporaryDirectory() as tmp, s3_environment(direct):
        local = args.cache or build_cache(args, Path(tmp) / "cache")
        url = "s3://bench/cache"
        location = CacheLocation(url)
        location.fs.mkdir("bench")
        location.fs.put(f"{local}/", "bench/cache", recursive=True)  # straight to the server
        os.environ["AWS_ENDPOINT_URL"] = delayed  # reads go through the latency proxy
        manifest = TeacherCache(local).manifest
        variants = {"local": lambda: TeacherCache(local, verify_hashes=True)}
        for n in args.read_ahead:
            variants[f"s3_read_ahead_{n}"] = lambda n=n: TeacherCache(url, read_ahead=n)
        rates: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}  # (loader, server) CPU s
        firsts: dict[str, list[float]] = {name: [] for name in variants}  # seconds to the first batch
        loader_epoch(variants["local"](), batch_size=args.batch_size, epoch=0)  # warm-up: imports, page cache
        for repeat in range(args.repeats):
            for name, make in variants.items():
                cache = make()
                conn.send("cpu")
                server_cpu, loader_cpu = conn.recv(), time.process_time()
                rows, seconds, to_first = loader_epoch(cache, batch_size=args.batch_size, epoch=repeat)
                conn.send("cpu")
                cpu[name].append((time.process_time() - loader_cpu, conn.recv() - server_cpu))
                cache.close()
                rates[name].append(rows / seconds)
                firsts[name].append(to_first)
                print(f"repeat {repeat} {name}: {rows / seconds:,.0f} rows/s", file=sys.stderr)
        conn.send("requests")
        before = conn.recv()
        cache = TeacherCache(url, read_ahead=max(args.read_ahead))
        loader_epoch(cache, batch_size=args.batch_size, epoch=0)
        cache.close()
        conn.send("requests")
        requests_per_shard = (conn.recv() - before) / len(manifest["shards"])
    conn.send("stop")
    child.join(10)

    medians = {name: statistics.median(values) for name, values in rates.items()}
    report = {
        "benchmark": "training-loader rows/s, s3:// through a latency proxy vs a local folder",
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "cache": {"rows": manifest["totals"]["rows"], "shards": manifest["totals"]["shards"],
                  "bytes": manifest["totals"]["bytes"], "seq_len": manifest["capture"]["seq_len"],
                  "top_k": manifest["capture"]["top_k"], "rows_per_shard": manifest["capture"]["rows_per_shard"],
                  "format": manifest["capture"]["format"]},
        "latency_ms_per_request": args.latency_ms,
        "requests_per_shard": requests_per_shard,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "rows_per_s": {name: [round(v, 1) for v in values] for name, values in rates.items()},
        "median_rows_per_s": {name: round(v, 1) for name, v in medians.items()},
        "ratio_to_local": {name: round(v / medians["local"], 3) for name, v in medians.items()},
        # each repeat's remote rows/s over the local rows/s measured just before it (drifts in the
        # machine's load cancel out), median over the repeats
        "median_paired_ratio_to_local": {name: round(statistics.median(r / loc for r, loc in zip(values, rates["local"])), 3)
                                         for name, values in rates.items()},
        "median_seconds_to_first_batch": {name: round(statistics.median(v), 4) for name, v in firsts.items()},
        "median_cpu_s_per_epoch": {name: {"loader_process": round(statistics.median(c[0] for c in values), 3),
                                          "store_process": round(statistics.median(c[1] for c in values), 3)}
                                   for name, values in cpu.items()},
        "store_process_nice": NICE,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": _cpu_model()},
        "software": {**software_versions(), **_storage_versions()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _storage_versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("fsspec", "s3fs", "botocore", "aiobotocore", "moto")}


if __name__ == "__main__":
    main()
