"""EWC Fisher strength before and after issue 24: the per-token Fisher vs the squared per-sequence mean gradient.

    . .venv/bin/activate
    python bench/ewc_fisher_bench.py            # SmolLM2-135M on CHAMP math, 2048 tokens cut at 128 and 512 (~3 min)
    python bench/ewc_fisher_bench.py --quick    # the tiny random model instead (seconds; a smoke run)

The same 2048 tokens of math text are cut into sequences of 128 and of 512 tokens. Labels are the base model's
own top 64 per position, renormalised (what a `--capture topk --top-k 64` run stores). Two estimators of the
diagonal Fisher of every parameter:
  previous   (label-anneal before issue 24) per sequence: draw y_t ~ top-64 at every position, square the gradient
             of the sequence's MEAN cross-entropy, average over sequences. Its expectation is the per-token Fisher
             / T plus the cross terms of the positions' gradients.
  per-token  `stage2_student.regularizers.estimate_fisher` (one backward per sequence with random signs):
             mean over trained positions of E_y[(∂ log p(y|x<t)/∂θ)²].
Reported: Σ_i F_i over all parameters (the EWC penalty's overall strength at a given --ewc C), per estimator and
sequence length, and the ratios. Prints a table; writes bench/out/ewc_fisher_bench.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import log, machine_info, table, write_json  # noqa: E402

from demo import assets  # noqa: E402
from lm.loading import load_causal_lm, load_tokenizer  # noqa: E402
from stage2_student.regularizers import estimate_fisher  # noqa: E402

K = 64


def label_batches(model, stream: np.ndarray, seq_len: int) -> list[dict]:
    """One batch per sequence: every position trained, labelled with the model's own top K (log-probs)."""
    out = []
    for i in range(0, len(stream) - seq_len + 1, seq_len):
        ids = torch.tensor(stream[i : i + seq_len], dtype=torch.long)[None]  # (1, T)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # (T-1, V)
        top = lp.topk(K, dim=-1)
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "label_mask": torch.ones(1, seq_len - 1, dtype=torch.bool),
                "topk_ids": top.indices,
                "topk_logprobs": top.values,
                "tail_logprob": torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-7)),
            }
        )
    return out


def previous_fisher_sum(model, batches: list[dict], seed: int) -> float:
    """The estimator label-anneal used before issue 24, re-implemented here as it was: Σ_i of the mean over
    sequences of the squared gradient of the mean CE of targets drawn from the renormalised top k."""
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for b in batches:
        pick = torch.multinomial(b["topk_logprobs"].softmax(-1), 1, generator=g)[:, 0]
        y = b["topk_ids"].gather(1, pick[:, None])[:, 0]
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=b["input_ids"]).logits[0, :-1].float()
        torch.nn.functional.cross_entropy(logits, y).backward()
        total += sum(float(p.grad.float().pow(2).sum()) for p in params if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return total / len(batches)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny random model (a smoke run)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq-lens", default="128,512")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.quick:
        sys.path.insert(0, str(ROOT / "tests"))
        import tempfile

        from tiny_models import build_tiny_model

        model_dir = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", seed=0)
        label = "tiny random Llama (2 layers, vocab 384)"
    else:
        model_dir = assets.smollm2_path()
        label = "SmolLM2-135M-Instruct"
    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), None).float().eval()
    text = "\n\n".join(assets.champ_docs(max_docs=400))
    stream = np.asarray(tok(text)["input_ids"][: args.tokens])
    if len(stream) < args.tokens:
        raise SystemExit(f"only {len(stream)} tokens of CHAMP text; lower --tokens")
    rows, result = [], {"model": label, "tokens": int(len(stream)), "k": K, "machine": machine_info(), "runs": []}
    for seq_len in (int(x) for x in args.seq_lens.split(",")):
        batches = label_batches(model, stream, seq_len)
        t0 = time.perf_counter()
        prev = previous_fisher_sum(model, batches, args.seed)
        t1 = time.perf_counter()
        fisher = estimate_fisher(model, batches, {"mode": "topk"}, "cpu", seed=args.seed)
        t2 = time.perf_counter()
        new = float(sum(f.sum() for f in fisher))
        log(f"seq_len {seq_len}: previous {prev:.4g} ({t1 - t0:.0f} s), per-token {new:.4g} ({t2 - t1:.0f} s)")
        result["runs"].append(
            {"seq_len": seq_len, "sequences": len(batches), "previous_sum": prev, "per_token_sum": new}
        )
        rows.append([seq_len, len(batches), f"{prev:.4g}", f"{new:.4g}", f"{new / prev:.0f}×"])
    r = result["runs"]
    print(table(["seq_len", "sequences", "Σ F previous", "Σ F per-token", "per-token / previous"], rows, title=label))
    if len(r) >= 2:
        result["previous_short_over_long"] = r[0]["previous_sum"] / r[-1]["previous_sum"]
        result["per_token_short_over_long"] = r[0]["per_token_sum"] / r[-1]["per_token_sum"]
        print(
            f"Σ F at seq_len {r[0]['seq_len']} / at {r[-1]['seq_len']}: previous "
            f"{result['previous_short_over_long']:.2f}, per-token {result['per_token_short_over_long']:.2f}"
        )
    out = write_json(
        ROOT / "bench" / "out" / ("ewc_fisher_bench_quick.json" if args.quick else "ewc_fisher_bench.json"), result
    )
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
