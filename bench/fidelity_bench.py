"""Capture modes head to head: bytes per trained token against gradient fidelity, on real text.

    . .venv/bin/activate
    python bench/fidelity_bench.py                # full: SmolLM2-135M fp32, 3 domains x 8 x 256 positions (~16-18 min
                                                  # on 2 cores shared with other sessions, load 5-7)
    python bench/fidelity_bench.py --quick        # 3 x 4 x 64 positions, fewer modes: a smoke run (~2 min)
    python bench/fidelity_train.py ...            # the training-outcome comparison (~3 h for 2 seeds, resumable)

Teacher, text, student
    SmolLM2-135M-Instruct (`demo.assets.smollm2_path()`, fp32) through the project's own
    `HFEngine`. Windows of 257 tokens (256 trained positions) of Shakespeare, CHAMP math (the *test*
    split) and Python standard-library source (bench/storage_bench.py's `windows`); every position
    trained. The student is the teacher after ONE plain SGD step (θ ← θ − lr·∇θ, default lr 0.03) on the
    mean cross-entropy of 4 windows of CHAMP math from the *train* split: a fine-tune that has just
    started to drift (its exact KL(teacher‖student) per domain is printed and stored). `--student-lrs`
    adds larger steps for a subset of modes: the signal q − p grows with the drift while the sampled
    labels' noise does not, and top-k's tail bias grows with it, so the ranking depends on the distance.

Capture (what stage 1 would store)
    For each mode the teacher is scored with `stage1_teacher.capture_modes.score_batch` (→ `HFEngine.score`,
    with `draw_uniforms` per sequence for the sampled modes) and turned into stored arrays with
    `stage1_teacher.capture_modes.stored_entries`, exactly as `pipeline teacher` does. The transformer forward is run
    once per block and fed to every mode (the engine's `_base` is swapped for the cached final hidden states),
    so the per-mode cost (lm_head, log-softmax, top-k, tail, inverse-CDF draws, `stored_entries`) is measured
    without re-running the model; the forward itself is timed once per block. Capture cost relative to
    topk-32 = (forward + per-mode post-processing) / (forward + topk-32's).
    Shards: one real shard per mode through `storage.ShardWriter` with the default `Encoding()` and the
    mode's `variable` / `sampled` flags; bytes per trained token = whole file / trained positions
    (input_ids, label_mask and footer included; column split from the Parquet metadata).

Fidelity (read back from the shards, so q8 quantisation counts)
    Rows are read with `storage.ShardReader`, collated with `collate_labels`, turned into the mode's target
    with `stage2_student.batch.with_kl_target_weights` and fed to `fused_ce_kl_sums(ce_weight=0, kl_weight=1)`;
    its gradient g w.r.t. the student logits is compared with the exact full-vocabulary gradient of
    KL(teacher‖student), q − p:
      mass        mean teacher probability held by the stored ids (exact p)
      cos/pos     mean over positions of cos(g_t, q_t − p_t)
      lm_head cos cosine of Σ_t g_t h_tᵀ with Σ_t (q_t − p_t) h_tᵀ (h_t: the student's final hidden
                  states; the lm_head / tied-embedding gradient through the logits), per block of 1,024
                  positions (4 sequences of one domain, a small training batch; mean and min over blocks)
                  and over all positions
      KL seen     Σ KL(stored target ‖ student) / Σ exact KL(p ‖ q), for topk/topp (the loss's own value)
      ‖g‖ ratio   RMS over positions of ‖g_t‖ / RMS of ‖q_t − p_t‖, and ‖lm_head grad‖ / exact (1,024 blocks)
    Per-position cosine misjudges sampled labels (unbiased but noisy per position, FINDINGS §1): weigh
    the lm_head cosine, and in the end the training outcome (bench/fidelity_train.py).

The Fidelity issue's training-outcome comparison lives in bench/fidelity_train.py (it reuses this bench's mode
table, `all_modes`; this bench does not import it).

Prints a table sorted by bytes per trained token; writes bench/out/fidelity_bench.json
(fidelity_bench_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import OUT, log, machine_info, table, write_json  # noqa: E402

SEQ_LEN = 257  # tokens per window: 256 trained positions
BLOCK_SEQS = 4  # sequences per block: 4 x 256 = 1,024 positions, one small training batch
DOMAINS = ("shakespeare", "math", "python")
SEED = 0
TARGET_PERF = (60.0, 0.99)  # Performance issue: <= 60 B per trained token with gradient cosine >= 0.99
TARGET_FID = 40.0  # Fidelity issue: <= 40 B per trained token (judged by training outcome)


# ------------------------------------------------------------------------------------------ modes


@dataclass(frozen=True)
class Mode:
    name: str
    capture: dict  # spec.capture as `stage1_teacher.prepare.prepare` records it
    width: int  # K: the most entries a position can hold (spec.k)
    loss_tail: str = "bucket"  # fused_ce_kl_sums(tail=...)
    shard_of: str | None = None  # reuse another mode's shard (same stored labels, other loss)

    @property
    def kind(self) -> str:
        return self.capture["mode"]


def _cap(mode: str, **kw) -> dict:
    return {"mode": mode, "engine": "hf", "dtype": "float32", **kw}


def all_modes() -> list[Mode]:
    from storage import MODES

    out = []
    for k in (8, 16, 32, 128):
        out.append(Mode(f"topk-{k}", _cap("topk"), k))
    out.append(Mode("topk-32 renorm", _cap("topk"), 32, loss_tail="renorm", shard_of="topk-32"))
    for p in (0.9, 0.99):
        out.append(Mode(f"topp-{p}", _cap("topp", top_p=p, min_k=4, max_k=128), 128))
    for n in (12, 32):
        out.append(
            Mode(f"sample-{n}", _cap("sample", draws=n, seed=SEED, head_k=0), MODES["sample"].stored_width(0, n))
        )
    for k in (8, 16):
        for m in (8, 16):
            out.append(
                Mode(
                    f"hybrid-{k}+{m}", _cap("hybrid", draws=m, seed=SEED, head_k=k), MODES["hybrid"].stored_width(k, m)
                )
            )
    return out


QUICK_MODES = ("topk-8", "topk-32", "topk-32 renorm", "topp-0.99", "sample-12", "hybrid-8+8")
SENSITIVITY_MODES = (
    "topk-8",
    "topk-16",
    "topk-32",
    "topk-32 renorm",
    "sample-12",
    "sample-32",
    "hybrid-8+8",
    "hybrid-16+16",
)


# ------------------------------------------------------------------------------------------ data


@dataclass
class Block:
    domain: str
    seqs: list  # SimpleNamespace(sample_id, input_ids (T,), label_mask (T-1,))
    t_hidden: object = None  # teacher final hidden states (B, T, H)
    t_logprobs: object = None  # (N, V) fp32 teacher log-probs at the trained positions
    s_hidden: object = None  # (N, H) student final hidden states
    s_logits: object = None  # (N, V) fp32 student logits
    exact_g: object = None  # (N, V) q − p: the exact gradient of KL(p‖q) w.r.t. the student logits
    exact_g2: object = None  # (N,) its squared norms
    exact_w: object = None  # (V, H) Σ_t (q_t − p_t) h_tᵀ
    kl_rows: object = None  # (N,) exact KL(p_t ‖ q_t)
    forward_s: float = 0.0


def make_blocks(tok, n_seq: int, seq_len: int) -> list[Block]:
    from storage_bench import windows

    from demo import assets

    corpora = {
        "shakespeare": assets.shakespeare_docs(),
        "math": assets.champ_docs(split="test"),
        "python": assets.python_stdlib_docs(),
    }
    blocks, sid = [], 0
    for name in DOMAINS:
        win = windows(corpora[name], tok, n_seq, seq_len, tok.eos_token_id)
        for b in range(0, n_seq, BLOCK_SEQS):
            seqs = []
            for row in win[b : b + BLOCK_SEQS]:
                seqs.append(
                    SimpleNamespace(
                        sample_id=sid, input_ids=row.astype(np.int64), label_mask=np.ones(len(row) - 1, dtype=bool)
                    )
                )
                sid += 1
            blocks.append(Block(name, seqs))
    return blocks


class CachedBase:
    """Stands in for `HFEngine._base`: returns the final hidden states computed once per block, so each
    capture mode runs the engine's own post-processing without re-running the transformer."""

    def __init__(self):
        self.hidden = None

    def __call__(self, input_ids, attention_mask=None, use_cache=False):
        if self.hidden is None or tuple(self.hidden.shape[:2]) != tuple(input_ids.shape):
            raise RuntimeError("CachedBase: hidden states of another batch")
        return SimpleNamespace(last_hidden_state=self.hidden)


# ------------------------------------------------------------------------------------------ student


def sgd_gradient(model, tok, n_seq: int, seq_len: int) -> tuple[dict, dict]:
    """∇θ of the mean CE on CHAMP-train windows (the student's one fine-tuning step)."""
    import torch
    from storage_bench import windows

    from demo import assets

    win = windows(assets.champ_docs(split="train"), tok, n_seq, seq_len, tok.eos_token_id)
    m = copy.deepcopy(model).requires_grad_(True)
    x = torch.from_numpy(win).long()
    t0 = time.perf_counter()
    loss = m(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    info = {
        "data": f"CHAMP train split, {n_seq} windows x {seq_len} tokens",
        "ce": float(loss.detach()),
        "grad_norm": norm,
        "seconds": time.perf_counter() - t0,
    }
    del m
    return grads, info


def make_student(model, grads: dict, lr: float):
    import torch

    s = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in s.named_parameters():
            if n in grads:
                p.sub_(lr * grads[n])
    return s.eval().requires_grad_(False)


def student_pass(student, blocks: list[Block]) -> dict:
    """Student hidden states, logits and the exact lm_head gradient per block; exact KL per domain."""
    import torch

    kl = {d: [0.0, 0] for d in DOMAINS}
    with torch.inference_mode():
        for blk in blocks:
            x = torch.from_numpy(np.stack([s.input_ids for s in blk.seqs])).long()
            h = student.model(input_ids=x, use_cache=False).last_hidden_state[:, :-1]
            h = h.reshape(-1, h.shape[-1])  # (N, H)
            blk.s_hidden = h.float().clone()
            blk.s_logits = student.lm_head(h).float()
            p = blk.t_logprobs.exp()
            blk.exact_g = torch.softmax(blk.s_logits, dim=1).sub_(p)  # (N, V) d KL(p‖q) / dz
            blk.exact_g2 = torch.einsum("nv,nv->n", blk.exact_g, blk.exact_g).double()  # (N,)
            blk.exact_w = blk.exact_g.T @ blk.s_hidden  # (V, H)
            blk.kl_rows = (p * (blk.t_logprobs - torch.log_softmax(blk.s_logits, dim=1))).sum(1, dtype=torch.float64)
            kl[blk.domain][0] += float(blk.kl_rows.sum())
            kl[blk.domain][1] += blk.kl_rows.numel()
            del p
    per = {d: v[0] / v[1] for d, v in kl.items() if v[1]}
    per["all"] = sum(v[0] for v in kl.values()) / max(1, sum(v[1] for v in kl.values()))
    return per


# ------------------------------------------------------------------------------------------ capture


def capture_all(engine, blocks: list[Block], modes: list[Mode], shard_dir: Path) -> dict:
    """Write one shard per mode; returns per-mode {bytes, trained, columns, post_s, stored_s, write_s}."""
    import pyarrow.parquet as pq

    from stage1_teacher.capture_modes import score_batch, stored_entries
    from storage import Encoding, ShardWriter, mode_of, shard_name

    stub = CachedBase()
    real_base = engine._base
    engine._base = stub
    own = [m for m in modes if m.shard_of is None]
    writers, res = {}, {}
    try:
        for m in own:
            path = shard_dir / m.name.replace(" ", "_") / shard_name(0, 1)
            writers[m.name] = ShardWriter(
                path,
                fingerprint="fidelity-bench",
                k=m.width,
                vocab_size=engine.vocab_size,
                encoding=Encoding(),
                variable=mode_of(m.capture).variable,
                sampled=mode_of(m.capture).sampled,
            )
            res[m.name] = {"post_s": 0.0, "stored_s": 0.0, "write_s": 0.0, "path": path}
        # One untimed round on the first block: allocator and thread-pool warm-up for every mode.
        stub.hidden = blocks[0].t_hidden
        for m in own:
            score_batch(engine, m.capture, m.width, blocks[0].seqs)
        for i, blk in enumerate(blocks):
            stub.hidden = blk.t_hidden
            for m in own:  # modes interleaved within a block: load from other processes hits all alike
                t0 = time.perf_counter()
                tops = score_batch(engine, m.capture, m.width, blk.seqs)
                t1 = time.perf_counter()
                stored = [stored_entries(m.capture, top, s.label_mask) for s, top in zip(blk.seqs, tops)]
                t2 = time.perf_counter()
                for s, st in zip(blk.seqs, stored):
                    writers[m.name].add(s.sample_id, s.input_ids, s.label_mask, *st)
                t3 = time.perf_counter()
                r = res[m.name]
                r["post_s"] += t1 - t0
                r["stored_s"] += t2 - t1
                r["write_s"] += t3 - t2
            log(f"  capture block {i + 1}/{len(blocks)} ({blk.domain}) done")
        for m in own:
            t0 = time.perf_counter()
            receipt = writers.pop(m.name).close()
            r = res[m.name]
            r["write_s"] += time.perf_counter() - t0
            r["bytes"], r["trained"] = receipt.bytes, receipt.trained_tokens
            cols: dict[str, int] = {}
            meta = pq.ParquetFile(r["path"]).metadata
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                for c in range(rg.num_columns):
                    col = rg.column(c)
                    top = col.path_in_schema.split(".")[0]
                    cols[top] = cols.get(top, 0) + col.total_compressed_size
            cols["footer+header"] = receipt.bytes - sum(cols.values())
            r["columns"] = cols
    finally:
        for w in writers.values():
            w.abort()
        engine._base = real_base
    for m in modes:
        if m.shard_of is not None:
            res[m.name] = dict(res[m.shard_of])
    return res


# ------------------------------------------------------------------------------------------ fidelity


def _cos(a, b) -> float:
    import torch

    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=1e-300))


def fidelity(mode: Mode, path: Path, blocks: list[Block]) -> dict:
    """Per-position and lm_head gradient agreement of the stored labels (read back) with the exact KL."""
    import torch

    from stage2_student.batch import collate_labels, with_kl_target_weights
    from stage2_student.losses import fused_ce_kl_sums
    from storage import ShardReader

    rows = list(ShardReader(path))
    it = iter(rows)
    acc = {
        d: {
            "cos": 0.0,
            "mass": 0.0,
            "entries": 0.0,
            "kl_seen": 0.0,
            "kl_exact": 0.0,
            "g2": 0.0,
            "e2": 0.0,
            "n": 0,
            "block_cos": [],
            "block_norm": [],
        }
        for d in DOMAINS
    }
    w_total = None
    for blk in blocks:
        seq_rows = [next(it) for _ in blk.seqs]
        if [r.sample_id for r in seq_rows] != [s.sample_id for s in blk.seqs]:
            raise RuntimeError(f"{mode.name}: shard rows out of order")
        batch = with_kl_target_weights(collate_labels(seq_rows), mode.capture)
        labels = batch["labels"][batch["label_mask"]]
        z = blk.s_logits.clone().requires_grad_(True)
        out = fused_ce_kl_sums(
            z,
            labels,
            batch["topk_ids"],
            batch["topk_logprobs"],
            batch["tail_logprob"],
            ce_weight=0.0,
            kl_weight=1.0,
            tail=mode.loss_tail,
        )
        out.total.backward()
        with torch.no_grad():
            g = z.grad  # (N, V)
            e = blk.exact_g
            dot = torch.einsum("nv,nv->n", g, e).double()
            gn2, en2 = torch.einsum("nv,nv->n", g, g).double(), blk.exact_g2
            cos_rows = dot / (gn2 * en2).sqrt().clamp(min=1e-300)
            ids = batch["topk_ids"]
            valid = ids >= 0
            mass = torch.where(valid, blk.t_logprobs.gather(1, ids.clamp(min=0)).exp(), 0.0).sum(1, dtype=torch.float64)
            kl_exact = blk.kl_rows
            gw = g.T @ blk.s_hidden  # (V, H)
            a = acc[blk.domain]
            a["cos"] += float(cos_rows.sum())
            a["mass"] += float(mass.sum())
            a["entries"] += float(valid.sum())
            a["kl_seen"] += float(out.kl)
            a["kl_exact"] += float(kl_exact.sum())
            a["g2"] += float(gn2.sum())
            a["e2"] += float(en2.sum())
            a["n"] += len(labels)
            a["block_cos"].append(_cos(gw, blk.exact_w))
            a["block_norm"].append(float(gw.norm() / blk.exact_w.norm()))
            w_total = gw if w_total is None else w_total.add_(gw)
        del z, g, out, gw
    exact_total = sum(b.exact_w for b in blocks)
    res = {
        "lm_head_cos_all": _cos(w_total, exact_total),
        "lm_head_norm_ratio_all": float(w_total.norm() / exact_total.norm()),
        "positions": sum(a["n"] for a in acc.values()),
    }

    def summarize(keys):
        parts = [acc[d] for d in keys if acc[d]["n"]]
        n = sum(a["n"] for a in parts)
        bc = [c for a in parts for c in a["block_cos"]]
        bn = [c for a in parts for c in a["block_norm"]]
        return {
            "cos_pos": sum(a["cos"] for a in parts) / n,
            "mass": sum(a["mass"] for a in parts) / n,
            "entries": sum(a["entries"] for a in parts) / n,
            "kl_seen_ratio": sum(a["kl_seen"] for a in parts) / sum(a["kl_exact"] for a in parts),
            "grad_norm_ratio_pos": math.sqrt(sum(a["g2"] for a in parts) / sum(a["e2"] for a in parts)),
            "lm_head_cos_block_mean": float(np.mean(bc)),
            "lm_head_cos_block_min": float(np.min(bc)),
            "lm_head_norm_ratio_block": float(np.mean(bn)),
            "positions": n,
            "blocks": len(bc),
        }

    res["all"] = summarize(DOMAINS)
    res["domains"] = {d: summarize([d]) for d in DOMAINS if acc[d]["n"]}
    return res


# ------------------------------------------------------------------------------------------ report


def _f(x, nd=3):
    return "—" if x is None else f"{x:.{nd}f}"


def main_table(results: dict, modes: list[Mode], bp: int) -> str:
    ref = results["topk-32"]["capture"]
    fwd = results["_forward_s"]
    rows = []
    for m in sorted(
        modes, key=lambda m: (results[m.name]["capture"]["bytes"] / results[m.name]["capture"]["trained"], m.name)
    ):
        r = results[m.name]
        c, f = r["capture"], r["fidelity"]["all"]
        bpt = c["bytes"] / c["trained"]
        post = c["post_s"] + c["stored_s"]
        rel = (fwd + post) / (fwd + ref["post_s"] + ref["stored_s"])
        kl_seen = f["kl_seen_ratio"] if m.kind in ("topk", "topp") else None
        rows.append(
            [
                m.name,
                f"{bpt:.1f}",
                f"{f['entries']:.1f}",
                _f(f["mass"], 4),
                _f(f["cos_pos"]),
                _f(f["lm_head_cos_block_mean"], 4),
                _f(f["lm_head_cos_block_min"], 4),
                _f(r["fidelity"]["lm_head_cos_all"], 5),
                _f(kl_seen),
                _f(f["grad_norm_ratio_pos"], 2),
                _f(f["lm_head_norm_ratio_block"], 2),
                f"{rel:.2f}",
                f"{post / ref_post(ref):.1f}",
            ]
        )
    return table(
        [
            "mode",
            "B/tok",
            "entries/pos",
            "mass",
            "cos/pos",
            f"lm_head cos {bp:,} (mean)",
            "(min)",
            "lm_head cos all",
            "KL seen",
            "‖g‖/‖g*‖ pos",
            f"‖G‖/‖G*‖ {bp:,}",
            "capture × topk-32",
            "post-fwd × topk-32",
        ],
        rows,
    )


def ref_post(ref: dict) -> float:
    return max(ref["post_s"] + ref["stored_s"], 1e-9)


def domain_table(results: dict, modes: list[Mode]) -> str:
    rows = []
    for m in modes:
        d = results[m.name]["fidelity"]["domains"]
        cells = [m.name]
        for name in DOMAINS:
            x = d.get(name)
            if x is None:
                cells += ["—"] * 4
                continue
            cells += [
                _f(x["mass"], 3),
                _f(x["cos_pos"], 3),
                _f(x["lm_head_cos_block_mean"], 4),
                _f(x["kl_seen_ratio"], 2) if m.kind in ("topk", "topp") else "—",
            ]
        rows.append(cells)
    hdr = ["mode"] + [f"{d} {c}" for d in DOMAINS for c in ("mass", "cos/pos", "lm_head cos", "KL seen")]
    return table(hdr, rows)


def bytes_table(results: dict, modes: list[Mode]) -> str:
    rows = []
    for m in modes:
        if m.shard_of is not None:
            continue
        c = results[m.name]["capture"]
        n = c["trained"]
        cols = c["columns"]
        other = cols.get("input_ids", 0) + cols.get("label_mask", 0) + cols.get("sample_id", 0) + cols["footer+header"]
        rows.append(
            [
                m.name,
                f"{c['bytes'] / n:.1f}",
                f"{cols.get('topk_ids', 0) / n:.1f}",
                f"{cols.get('topk_logprobs', 0) / n:.1f}",
                f"{cols.get('tail_logprob', 0) / n:.1f}",
                f"{(cols.get('label_counts', 0)) / n:.1f}",
                f"{cols.get('sample_counts', 0) / n:.1f}",
                f"{other / n:.1f}",
            ]
        )
    return table(
        ["mode", "B/tok", "ids", "log-probs", "tail", "label_counts", "sample_counts", "input_ids+mask+footer"], rows
    )


def verdicts(results: dict, modes: list[Mode]) -> dict:
    out = {
        "perf_target": f"<= {TARGET_PERF[0]:.0f} B/trained token with gradient cosine >= {TARGET_PERF[1]}",
        "fid_target": f"<= {TARGET_FID:.0f} B/trained token",
    }
    rows = []
    for m in modes:
        r = results[m.name]
        bpt = r["capture"]["bytes"] / r["capture"]["trained"]
        f = r["fidelity"]["all"]
        rows.append(
            {
                "mode": m.name,
                "bpt": bpt,
                "cos_pos": f["cos_pos"],
                "lmblk": f["lm_head_cos_block_mean"],
                "lm_all": r["fidelity"]["lm_head_cos_all"],
            }
        )
    out["meets_perf_per_position"] = [
        r["mode"] for r in rows if r["bpt"] <= TARGET_PERF[0] and r["cos_pos"] >= TARGET_PERF[1]
    ]
    out["meets_perf_lm_head_block"] = [
        r["mode"] for r in rows if r["bpt"] <= TARGET_PERF[0] and r["lmblk"] >= TARGET_PERF[1]
    ]
    under40 = sorted([r for r in rows if r["bpt"] <= TARGET_FID], key=lambda r: -r["lmblk"])
    out["best_under_40_by_lm_head_block"] = [(r["mode"], round(r["bpt"], 1), round(r["lmblk"], 4)) for r in under40]
    under60 = sorted([r for r in rows if r["bpt"] <= TARGET_PERF[0]], key=lambda r: -r["lmblk"])
    out["best_under_60_by_lm_head_block"] = [(r["mode"], round(r["bpt"], 1), round(r["lmblk"], 4)) for r in under60]
    return out


# ------------------------------------------------------------------------------------------ bench


def run_bench(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    from demo import assets
    from stage1_teacher.engines.hf_engine import HFEngine

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    machine = machine_info()  # the load average at the start; other sessions share these cores
    modes = all_modes()
    if args.modes:
        want = [s.strip() for s in args.modes.split(",")]
        unknown = sorted(set(want) - {m.name for m in modes})
        if unknown:
            raise SystemExit(f"--modes: unknown {unknown}; known: {[m.name for m in modes]}")
        modes = [m for m in modes if m.name in want]
    elif args.quick:
        modes = [m for m in modes if m.name in QUICK_MODES]
    for m in list(modes):  # a renorm row needs its shard's mode
        if m.shard_of and m.shard_of not in {x.name for x in modes}:
            modes.insert(0, next(x for x in all_modes() if x.name == m.shard_of))
    if "topk-32" not in {m.name for m in modes}:
        modes.insert(0, next(x for x in all_modes() if x.name == "topk-32"))  # the cost reference
    n_seq, seq_len = args.seqs, args.seq_len

    path = assets.smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    engine = HFEngine(str(path), dtype="float32", device="cpu", chunk_positions=1024)
    if not engine._chunked:
        raise SystemExit(
            "HFEngine fell back to full forwards for SmolLM2; the cached-hidden-state capture needs its chunked path"
        )
    log(
        f"[fidelity] teacher {path} (fp32, {engine.vocab_size} tokens); {len(modes)} modes; "
        f"{len(DOMAINS)} domains x {n_seq} x {seq_len - 1} positions"
    )
    blocks = make_blocks(tok, n_seq, seq_len)

    # 1. teacher: final hidden states once per block (timed), full log-probs for the exact reference
    forward_s = 0.0
    with torch.inference_mode():
        for blk in blocks:
            x = torch.from_numpy(np.stack([s.input_ids for s in blk.seqs])).long()
            t0 = time.perf_counter()
            blk.t_hidden = engine._base(input_ids=x, use_cache=False).last_hidden_state
            blk.forward_s = time.perf_counter() - t0
            forward_s += blk.forward_s
            flat = blk.t_hidden[:, :-1].reshape(-1, blk.t_hidden.shape[-1])
            blk.t_logprobs = torch.log_softmax(engine._apply_head(flat).float(), dim=1)
    positions = sum(len(b.seqs) * (seq_len - 1) for b in blocks)
    log(f"[fidelity] teacher forward: {forward_s:.1f} s for {positions} positions")

    # 2. student: one SGD step on math
    grads, step_info = sgd_gradient(engine.model, tok, BLOCK_SEQS, seq_len)
    lrs = [float(x) for x in args.student_lrs.split(",")]
    student = make_student(engine.model, grads, lrs[0])
    kl_student = student_pass(student, blocks)
    step_info |= {"lr": lrs[0], "exact_kl_teacher_student": kl_student}
    log(
        f"[fidelity] student: one SGD step, lr {lrs[0]}, |grad| {step_info['grad_norm']:.2f}; exact KL(p‖q) "
        + ", ".join(f"{d} {v:.4f}" for d, v in kl_student.items())
    )

    # 3. capture: one real shard per mode
    work = Path(tempfile.mkdtemp(prefix="fidelity_bench_"))
    try:
        cap = capture_all(engine, blocks, modes, work)
        results: dict = {"_forward_s": forward_s}
        for m in modes:
            results[m.name] = {"capture": {k: v for k, v in cap[m.name].items() if k != "path"}}
        # 4. fidelity, read back from the shards
        for m in modes:
            t0 = time.perf_counter()
            results[m.name]["fidelity"] = fidelity(m, cap[m.name]["path"], blocks)
            f = results[m.name]["fidelity"]
            log(
                f"  {m.name:16s} {cap[m.name]['bytes'] / cap[m.name]['trained']:6.1f} B/tok  "
                f"mass {f['all']['mass']:.4f}  "
                f"cos/pos {f['all']['cos_pos']:.3f}  lm_head block {f['all']['lm_head_cos_block_mean']:.4f}  "
                f"all {f['lm_head_cos_all']:.5f}  ({time.perf_counter() - t0:.0f} s)"
            )
        # 5. sensitivity: larger steps, a subset of the modes (same shards)
        sensitivity = []
        del student
        for lr in lrs[1:]:
            for blk in blocks:
                blk.s_hidden = blk.s_logits = blk.exact_g = blk.exact_w = None
            gc.collect()
            st = make_student(engine.model, grads, lr)
            kl = student_pass(st, blocks)
            del st
            log(f"[fidelity] sensitivity: lr {lr}, exact KL(p‖q) " + ", ".join(f"{d} {v:.4f}" for d, v in kl.items()))
            entry = {"lr": lr, "exact_kl_teacher_student": kl, "modes": {}}
            for m in modes:
                if m.name in SENSITIVITY_MODES or args.quick:
                    f = fidelity(m, cap[m.name]["path"], blocks)
                    entry["modes"][m.name] = {
                        "cos_pos": f["all"]["cos_pos"],
                        "lm_head_cos_block_mean": f["all"]["lm_head_cos_block_mean"],
                        "lm_head_cos_block_min": f["all"]["lm_head_cos_block_min"],
                        "lm_head_cos_all": f["lm_head_cos_all"],
                        "kl_seen_ratio": f["all"]["kl_seen_ratio"],
                    }
            sensitivity.append(entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    bp = BLOCK_SEQS * (seq_len - 1)
    main = main_table(results, modes, bp)
    doms = domain_table(results, modes)
    cols = bytes_table(results, modes)
    sens = None
    if sensitivity:
        names = [m.name for m in modes if m.name in sensitivity[0]["modes"]]
        rows = []
        for name in names:
            r0 = results[name]["fidelity"]
            cells = [
                name,
                f"{r0['all']['cos_pos']:.3f} / {r0['all']['lm_head_cos_block_mean']:.4f} / {r0['lm_head_cos_all']:.4f}",
            ]
            for e in sensitivity:
                x = e["modes"][name]
                cells.append(f"{x['cos_pos']:.3f} / {x['lm_head_cos_block_mean']:.4f} / {x['lm_head_cos_all']:.4f}")
            rows.append(cells)
        sens = table(
            ["mode", f"lr {lrs[0]} (KL {kl_student['all']:.3f}): cos/pos / lm_head {bp:,} / lm_head all"]
            + [f"lr {e['lr']} (KL {e['exact_kl_teacher_student']['all']:.3f})" for e in sensitivity],
            rows,
        )
    v = verdicts(results, modes)
    wall = time.perf_counter() - t_start
    print("\n## Capture modes: bytes vs gradient fidelity (sorted by bytes per trained token)\n")
    print(main)
    print(f"\n### Per domain (mass / per-position cosine / lm_head cosine over {bp:,} positions / KL seen)\n")
    print(doms)
    print("\n### Bytes per trained token by column\n")
    print(cols)
    if sens:
        print("\n### Sensitivity to the student's distance from the teacher (SGD step size)\n")
        print(sens)
    print("\n### Targets\n")
    print(json.dumps(v, indent=1))
    print(f"\n[fidelity] wall {wall / 60:.1f} min")

    out = {
        "bench": "fidelity_bench",
        "quick": args.quick,
        "wall_s": wall,
        "machine": machine,
        "loadavg_at_end": os.getloadavg(),
        "setup": {
            "teacher": str(path),
            "dtype": "float32",
            "domains": list(DOMAINS),
            "sequences_per_domain": n_seq,
            "positions_per_sequence": seq_len - 1,
            "positions": positions,
            "block_positions": BLOCK_SEQS * (seq_len - 1),
            "encoding": "storage.Encoding() (ids plain + BYTE_STREAM_SPLIT, q8gap 1/12, f16 tail, zstd 6)",
            "student_step": step_info,
            "teacher_forward_s": forward_s,
            "seed": SEED,
        },
        "modes": {
            m.name: {"capture_spec": m.capture, "width": m.width, "loss_tail": m.loss_tail, **results[m.name]}
            for m in modes
        },
        "sensitivity": sensitivity,
        "verdicts": v,
        "tables": {"main": main, "domains": doms, "bytes": cols, "sensitivity": sens},
    }
    dest = OUT / ("fidelity_bench_quick.json" if args.quick else "fidelity_bench.json")
    write_json(dest, out)
    log(f"[fidelity] wrote {dest}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 domains x 4 sequences x 64 positions, 6 modes")
    ap.add_argument("--seqs", type=int, default=None, help="sequences per domain (a multiple of 4; default 8, quick 4)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 257, quick 65)")
    ap.add_argument("--modes", default=None, help="comma-separated subset of the mode names")
    ap.add_argument(
        "--student-lrs",
        default=None,
        help="SGD step sizes of the student; the first is the main one, the others re-measure a subset "
        "(default '0.03,0.1'; quick '0.03')",
    )
    ap.add_argument("--threads", type=int, default=2)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    args.seqs = args.seqs or (4 if args.quick else 8)
    args.seq_len = args.seq_len or (65 if args.quick else SEQ_LEN)
    args.student_lrs = args.student_lrs or ("0.03" if args.quick else "0.03,0.1")
    if args.seqs % BLOCK_SEQS:
        raise SystemExit(f"--seqs {args.seqs}: use a multiple of {BLOCK_SEQS} (blocks of {BLOCK_SEQS} sequences)")
    run_bench(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
