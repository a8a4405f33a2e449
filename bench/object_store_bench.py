"""Stage-1 write and stage-2 read throughput of a run directory on an S3-compatible server vs local disk.

    python bench/object_store_bench.py            # needs the s3 extra: make venv-s3
    python bench/object_store_bench.py --quick

The server is moto's (`moto[server]`), started in a child process on 127.0.0.1 (a free port): a Python server
on the same 2 cores, so the S3 figures are a lower bound on what a real bucket gives (no network latency either:
a real bucket adds ~10-50 ms per request, which whole-row-group reads amortise). The same synthetic shards
(storage.synthetic: Zipf-like top-k labels) are written by ShardWriter to a local directory and to
s3://bench/run-N (staged locally, uploaded whole with a conditional PUT), then read back in full by RunReader
(verify=size: footers and row groups, by range requests; verify=checksum adds one sequential read of each shard).
Variants run interleaved (bench/common.py); ratios are of medians of this one run.
Prints a table; writes bench/out/object_store_bench.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import OUT, interleaved, machine_info, median, summarize, table, write_json

from storage import Encoding, RunReader, ShardWriter, build_manifest, claim_run_dir, shard_path
from storage.synthetic import synthetic_rows, synthetic_spec

_SERVER = (
    "import sys; from moto.server import ThreadedMotoServer; s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, "
    "verbose=False); s.start(); print(s.get_host_and_port()[1], flush=True); sys.stdin.read(); s.stop()"
)


def start_server() -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = int(p.stdout.readline())
    return p, f"http://127.0.0.1:{port}"


def write_run(run_dir, spec, rows) -> None:
    claim_run_dir(run_dir, spec)
    enc = Encoding.from_dict(spec.encoding)
    for i in range(spec.num_shards):
        with ShardWriter(
            shard_path(run_dir, i, spec.num_shards),
            fingerprint=spec.fingerprint,
            k=spec.k,
            vocab_size=spec.vocab_size,
            encoding=enc,
            row_group_rows=64,
        ) as w:
            for shard, *row in rows:
                if shard == i:
                    w.add(*row)
            w.close()
    build_manifest(run_dir)


def read_run(run_dir, verify: str) -> int:
    r = RunReader(run_dir, verify=verify, max_open_files=2)
    n = sum(int(x.label_mask.sum()) for x in r)
    r.close()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    seqs, repeats = (200, 2) if args.quick else (800, args.repeats)
    spec = synthetic_spec(k=32, vocab_size=512, num_shards=4, num_sequences=seqs, seq_len=256)
    rows = list(synthetic_rows(spec))
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    server, endpoint = start_server()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    import boto3  # the s3 extra

    boto3.client("s3").create_bucket(Bucket="bench")
    tmp = Path(tempfile.mkdtemp(prefix="object_store_bench_"))
    counter = {"local": 0, "s3": 0}

    def write_local():
        counter["local"] += 1
        write_run(tmp / f"run-{counter['local']}", spec, rows)

    def write_s3():
        counter["s3"] += 1
        write_run(f"s3://bench/run-{counter['s3']}", spec, rows)

    try:
        w = interleaved({"local": write_local, "s3": write_s3}, repeats, log=print)
        local_dir, s3_dir = tmp / "run-1", "s3://bench/run-1"
        nbytes = sum(p.stat().st_size for p in (local_dir / "shards").glob("*.parquet"))
        trained = read_run(local_dir, "none")
        assert read_run(s3_dir, "none") == trained
        r = interleaved(
            {
                "local size": lambda: read_run(local_dir, "size"),
                "s3 size": lambda: read_run(s3_dir, "size"),
                "local checksum": lambda: read_run(local_dir, "checksum"),
                "s3 checksum": lambda: read_run(s3_dir, "checksum"),
            },
            repeats,
            log=print,
        )
    finally:
        server.stdin.close()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    mb = nbytes / 1e6
    results = {}
    table_rows = []
    for name, times, ref in (
        ("write local", w["local"], w["local"]),
        ("write s3 (moto)", w["s3"], w["local"]),
        ("read local, verify=size", r["local size"], r["local size"]),
        ("read s3, verify=size", r["s3 size"], r["local size"]),
        ("read local, verify=checksum", r["local checksum"], r["local checksum"]),
        ("read s3, verify=checksum", r["s3 checksum"], r["local checksum"]),
    ):
        t = median(times)
        results[name] = {**summarize(times), "MB_per_s": mb / t, "trained_tokens_per_s": trained / t}
        table_rows.append([name, f"{t:.3f}", f"{mb / t:.1f}", f"{trained / t:,.0f}", f"{median(ref) / t:.2f}"])
    print(
        table(
            ["variant", "median s", "MB/s", "trained tok/s", "speed vs local"],
            table_rows,
            title=f"{spec.num_shards} shards, {seqs} sequences, {mb:.1f} MB, {trained:,} trained tokens, k={spec.k}",
        )
    )
    path = write_json(
        OUT / ("object_store_bench_quick.json" if args.quick else "object_store_bench.json"),
        {"bytes": nbytes, "trained_tokens": trained, "sequences": seqs, "results": results, "machine": machine_info()},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
