"""Evaluate models on named corpora: mean NLL and perplexity per trained token, and the exact
full-vocabulary KL(base‖model) per token against a base model (how far fine-tuning moved it).

    pipeline eval --model out/lam1/model --base Qwen/Qwen3-0.6B \\
        --data target=math.jsonl --data retention=prose.jsonl [--json] [--json-out eval.json]

Python: `run(EvalConfig(...))` for one model, `evaluate_models({...}, base, {...})` for many (the
sweep): every corpus is tokenized once and the base is loaded once.

Tokens: which are scored (`--convention`). The two conventions give different numbers on the same document: they
score different tokens, not the same tokens differently.
- `packed` (default, training's): each corpus goes through `lm.corpus.load_sequences` in plain-text mode,
  packed, with the (shared) tokenizer: documents tokenized as the teacher stores them (with the BOS the
  tokenizer adds, if any), each followed by EOS, packed into `seq_len` sequences. Every position after a
  sequence's first is scored, EOS included, so "per token" means per trained position as in training.
- `lm-eval`: lm-evaluation-harness's `loglikelihood_rolling` (what its perplexity tasks report): each document
  alone, tokenized without special tokens, preceded by one prefix token (BOS, else EOS) that is not scored, no
  EOS; a document longer than the window is scored in disjoint windows of `seq_len` predictions, each window
  conditioned on the `seq_len` tokens before its last one (lm-eval's rolling windows with context length 1).
  `seq_len` plays lm-eval's max_length. `--max-sequences` counts documents here.
Sequences are batched only with sequences of the same length, so no padding or attention mask ever enters the
numbers. Bits per byte (`bits_per_byte`, lm-eval's definition): the summed NLL in bits over the UTF-8 bytes of
the scored text; lm-eval: the documents' bytes; packed: the bytes of the scored tokens decoded (special tokens
count 0 bytes), so packed bits per byte charges EOS predictions to the text's bytes.

KL. `KL(base‖model) = Σ_v p_base(v) (log p_base(v) − log p_model(v))` over the whole vocabulary, averaged
over trained positions: the forward direction used in training, with the base as the reference.
Memory per batch: the model's logits (B, T, V) in its dtype, plus (N, V) fp32 base log-probs and
`_CHUNK` x V fp32 temporaries; lower --batch-size to bound it.

Base log-probs across models. `evaluate_models` keeps the base's (N, V) fp32 log-probs of as many
batches as fit in `base_cache_gb` (CPU memory) and recomputes the base forward for the others, so a
sweep over many models never runs the base twice on a cached batch and never needs more memory than
the budget. (Keeping every batch is rarely possible: 1M tokens x 150k vocab x 4 B = 600 GB.)

lm-eval. `--lm-eval-tasks` runs EleutherAI lm-evaluation-harness tasks on the already-loaded model
(`lm_eval.models.huggingface.HFLM`). `lm_eval` is an optional, separately installed package
(`pip install lm_eval`); its hub tasks download their data sets, while a task YAML of your own under
`--lm-eval-include DIR` whose `dataset_path: json` points at local files runs offline.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from collections.abc import Mapping

import numpy as np
import torch

from lm.corpus import Sequence, load_sequences, plan_corpus
from lm.loading import load_causal_lm, load_tokenizer, torch_dtype
from lm.tokenizer_id import tokenizer_fingerprint
from storage.atomic import atomic_write_json

from .batch import pad_inputs
from .config import EvalConfig, device_dtype_problems
from .losses import exact_kl_sum

log = logging.getLogger(__name__)

# Positions per fp32 log-softmax chunk: bounds the temporaries at _CHUNK x V fp32 besides the logits.
_CHUNK = 1024


def _default(name: str):
    return EvalConfig.__dataclass_fields__[name].default


def _resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    problems = device_dtype_problems(device, dtype)  # fp16 is refused there: it overflows full-vocabulary logits
    if problems:
        raise ValueError("; ".join(problems))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device; use --device cpu")
    if dtype == "auto":
        # fp32 on CPU, where bf16 matmuls gain little and lose accuracy.
        return torch.device(device), (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    return torch.device(device), torch_dtype(dtype, option="dtype")


# ------------------------------------------------------------------------------------------- batches


def _batches(sequences, batch_size: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(input_ids (B, T) int64, label_mask (B, T-1) bool)], each batch of one length, in corpus order
    within a length (packing makes all but the last sequence full-length)."""
    by_len: dict[int, list] = {}
    for s in sequences:
        by_len.setdefault(len(s.input_ids), []).append(s)
    out = []
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            b = pad_inputs(group[i : i + batch_size])  # one length: nothing is padded
            out.append((b["input_ids"].to(device), b["label_mask"].to(device)))
    return out


def _trained_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V) in the model's dtype, labels (N,)) at the N trained positions of a batch. The last id is only
    a target, so it is not run through the model (causal: the other positions' logits are the same)."""
    logits = model(input_ids=ids[:, :-1]).logits  # (B, T-1, V)
    return logits[mask], ids[:, 1:][mask]


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[bool]]]:
    """[(input ids, label mask)] scoring every token of `tokens` once, as lm-eval's loglikelihood_rolling does:
    the first window is [prefix] + the first max_len tokens (all max_len predicted); each later window predicts the
    next min(rest, max_len) tokens from the max_len tokens before its last one (so it is max_len + 1 ids long,
    max_len of them run through the model: the last id is only a target)."""
    n = len(tokens)
    if n == 0:
        return []
    first = min(max_len, n)
    out = [([prefix, *tokens[:first]], [True] * first)]
    done = first
    while done < n:
        pred = min(n - done, max_len)
        end = done + pred
        ids = tokens[end - max_len - 1 : end]  # done >= max_len, so the start is >= 0
        out.append((ids, [False] * (len(ids) - 1 - pred) + [True] * pred))
        done = end
    return out


def lm_eval_sequences(path, tokenizer, *, seq_len: int, text_field: str, max_documents: int | None):
    """(sequences, UTF-8 bytes of the documents) under the lm-eval convention (module docstring)."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise ValueError("--convention lm-eval needs a BOS or EOS token in the tokenizer (the prefix token)")
    seqs, n_bytes, docs = [], 0, 0
    for text in plan_corpus(path).values(text_field):
        if not isinstance(text, str) or not text:
            continue
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        for ids, mask in rolling_windows(toks, prefix, seq_len):
            seqs.append(Sequence(len(seqs), np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)))
        n_bytes += len(text.encode("utf-8"))
        docs += 1
        if max_documents is not None and docs >= max_documents:
            break
    if not seqs:
        raise ValueError(f"{path}: no non-empty text in column {text_field!r}")
    return seqs, n_bytes


def packed_bytes(sequences, tokenizer) -> int:
    """UTF-8 bytes of the scored tokens of packed sequences, decoded (special tokens count 0)."""
    total = 0
    for s in sequences:
        ids = np.asarray(s.input_ids)[1:][np.asarray(s.label_mask, dtype=bool)]
        total += len(tokenizer.decode(ids.tolist(), skip_special_tokens=True).encode("utf-8"))
    return total


def _base_logprobs(base, ids, mask) -> torch.Tensor:
    """(N, V) fp32 log-probs of the base at the trained positions, computed chunk by chunk."""
    z, _ = _trained_logits(base, ids, mask)
    out = torch.empty(z.shape, dtype=torch.float32, device=z.device)
    for s in range(0, z.shape[0], _CHUNK):
        out[s : s + _CHUNK] = torch.log_softmax(z[s : s + _CHUNK].float(), dim=-1)
    return out


class _BaseLogprobs:
    """The base's per-batch log-probs: from a CPU cache while it fits `budget_bytes`, else recomputed."""

    def __init__(self, base, budget_bytes: int):
        self.base = base
        self.budget = budget_bytes
        self.used = 0
        self.cache: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, key: tuple[str, int], ids, mask) -> torch.Tensor:
        hit = self.cache.get(key)
        if hit is not None:
            return hit.to(ids.device, non_blocking=True)
        lp = _base_logprobs(self.base, ids, mask)
        size = lp.numel() * lp.element_size()
        if self.used + size <= self.budget:
            self.cache[key] = lp.to("cpu", copy=True)
            self.used += size
        return lp


def _score_corpus(model, batches, base_lp: _BaseLogprobs | None, corpus: str, device, n_bytes: int) -> dict:
    """{nll, ppl, bits_per_byte, kl, tokens, bytes} of one model on one corpus's batches; means per trained
    position (bits per byte: the summed NLL in bits over `n_bytes`)."""
    # Sums stay on the device: a .item() per chunk would be a GPU sync point.
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    kl_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    with torch.inference_mode():
        for b, (ids, mask) in enumerate(batches):
            z, labels = _trained_logits(model, ids, mask)  # (N, V), (N,)
            t = base_lp.get((corpus, b), ids, mask) if base_lp is not None else None  # (N, V) fp32
            if t is not None and t.shape[1] != z.shape[1]:
                raise ValueError(
                    f"the model's logits have {z.shape[1]} entries but the base's {t.shape[1]}: "
                    f"the vocabularies differ, so KL(base‖model) is undefined"
                )
            for s in range(0, z.shape[0], _CHUNK):
                zc = z[s : s + _CHUNK]
                lp = torch.log_softmax(zc.float(), dim=-1)  # (C, V)
                nll_sum -= lp.gather(1, labels[s : s + _CHUNK, None]).sum(dtype=torch.float64)
                if t is not None:
                    kl_sum += exact_kl_sum(zc, t[s : s + _CHUNK]).double()
            tokens += int(labels.shape[0])
    nll = float(nll_sum) / tokens
    return {
        "nll": nll,
        "ppl": math.exp(nll) if nll < 700 else float("inf"),
        "bits_per_byte": float(nll_sum) / math.log(2) / n_bytes if n_bytes else None,
        "kl": float(kl_sum) / tokens if base_lp is not None else None,
        "tokens": tokens,
        "bytes": n_bytes,
    }


# ------------------------------------------------------------------------------------------- API


def _load(name: str, gguf_file: str | None, device, dtype):
    return load_causal_lm(name, gguf_file, dtype=dtype).to(device).eval().requires_grad_(False)


def _free_memory() -> None:
    """Return the previous model's memory before the next one is loaded."""
    # transformers models hold reference cycles, so refcounting alone does not free them; a full
    # collection costs ~0.5 s, which is why it runs between models and not after the last one.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_tokenizers(names: Mapping[str, tuple[str, str | None]], reference: str):
    """The reference's tokenizer, after checking that every named model's tokenizer has its hash."""
    ref_path, ref_gguf = names[reference]
    tok = load_tokenizer(ref_path, ref_gguf)
    ref_fp = tokenizer_fingerprint(tok)
    problems = []
    for label, (path, gguf) in names.items():
        if label == reference:
            continue
        fp = tokenizer_fingerprint(load_tokenizer(path, gguf))
        if fp["hash"] != ref_fp["hash"]:
            problems.append(
                f"{label} ({path}): tokenizer {fp['hash'][:16]}… (vocab {fp['vocab_size']}) vs "
                f"{reference} ({ref_path}): {ref_fp['hash'][:16]}… (vocab {ref_fp['vocab_size']})"
            )
    if problems:
        raise ValueError(
            "the models do not share one tokenizer, so their per-token NLL and KL(base‖model) "
            "are not comparable:\n  "
            + "\n  ".join(problems)
            + "\nEvaluate models of one tokenizer together (fine-tunes of the same base)."
        )
    return tok


def evaluate_models(
    models: Mapping[str, str],
    base: str | None,
    corpora: Mapping[str, str | os.PathLike],
    *,
    seq_len: int = _default("seq_len"),
    batch_size: int = _default("batch_size"),
    max_sequences: int | None = _default("max_sequences"),
    text_field: str = _default("text_field"),
    device: str = _default("device"),
    dtype: str = _default("dtype"),
    gguf_files: Mapping[str, str] | None = None,
    base_gguf_file: str | None = None,
    base_cache_gb: float = 2.0,
    convention: str = _default("convention"),
    lm_eval_tasks: str | list[str] | None = None,
    lm_eval_include: str | os.PathLike | None = None,
    lm_eval_limit: int | None = None,
) -> dict[str, dict]:
    """Evaluate several models (label -> folder or hub name) on the same corpora (name -> path).

    Each corpus is tokenized once, the base is loaded once, the models one at a time. Returns
    {label: {"model": path, "corpora": {corpus: {"nll", "ppl", "bits_per_byte", "kl", "tokens", "bytes"}},
    "lm_eval": {...} | None}}; kl is None without a base. gguf_files maps a label to the GGUF file in its folder.
    convention: "packed" or "lm-eval", which tokens are scored (module docstring). corpora may be empty when
    lm_eval_tasks are given.
    base_cache_gb: CPU memory for the base's fp32 log-probs, reused across models (0 disables).
    """
    if not models:
        raise ValueError("models: give at least one model to evaluate")
    if not corpora and not lm_eval_tasks:
        raise ValueError("corpora: give at least one corpus to evaluate on (or lm-eval tasks)")
    if convention not in ("packed", "lm-eval"):
        raise ValueError(f"convention={convention!r}: choose packed or lm-eval")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1")
    if not base_cache_gb >= 0:
        raise ValueError(f"base_cache_gb={base_cache_gb!r}: must be >= 0 (0 disables the cache)")
    gguf_files = dict(gguf_files or {})
    unknown = sorted(set(gguf_files) - set(models))
    if unknown:
        raise ValueError(f"gguf_files names {unknown}, which are not among the models {sorted(models)}")
    dev, dt = _resolve_device_dtype(device, dtype)
    tasks = (
        [t.strip() for t in lm_eval_tasks.split(",")] if isinstance(lm_eval_tasks, str) else list(lm_eval_tasks or [])
    )
    tasks = [t for t in tasks if t]

    # Tokenizers first: a mismatch must fail before minutes of loading and tokenizing.
    names = {label: (str(path), gguf_files.get(label)) for label, path in models.items()}
    reference = next(iter(names))
    if base is not None:
        reference = "base"
        while reference in names:  # a model may itself be labelled "base"
            reference = "_" + reference
        names = {reference: (str(base), base_gguf_file), **names}
    tokenizer = check_tokenizers(names, reference)
    manager = _lm_eval_tasks(tasks, lm_eval_include) if tasks else None

    sequences, n_bytes = {}, {}
    for name, path in corpora.items():
        if convention == "lm-eval":
            seqs, n_bytes[name] = lm_eval_sequences(
                path, tokenizer, seq_len=seq_len, text_field=text_field, max_documents=max_sequences
            )
        else:
            seqs = load_sequences(
                path, tokenizer, seq_len=seq_len, text_field=text_field, max_samples=max_sequences, pack=True
            ).sequences
            n_bytes[name] = packed_bytes(seqs, tokenizer)
        log.info("corpus %s: %d sequences, %d scored positions", name, len(seqs), sum(s.label_mask.sum() for s in seqs))
        sequences[name] = _batches(seqs, batch_size, dev)

    base_model = _load(str(base), base_gguf_file, dev, dt) if base is not None else None
    # A cache only pays off when a second model reads it.
    budget = int(base_cache_gb * 2**30) if len(models) > 1 else 0
    base_lp = _BaseLogprobs(base_model, budget) if base_model is not None else None

    results = {}
    for i, (label, path) in enumerate(models.items()):
        if i:
            _free_memory()
        model = _load(str(path), gguf_files.get(label), dev, dt)
        per_corpus = {}
        for name, batches in sequences.items():
            per_corpus[name] = _score_corpus(model, batches, base_lp, name, dev, n_bytes[name])
            log.info("%s on %s: %s", label, name, per_corpus[name])
        lm = _run_lm_eval(model, tokenizer, tasks, manager, lm_eval_limit, batch_size, dev) if tasks else None
        results[label] = {"model": str(path), "corpora": per_corpus, "lm_eval": lm}
        del model
    return results


def run(config: EvalConfig) -> dict:
    """Evaluate config.model; returns {"model", "base", "corpora": {name: {nll, ppl, kl, tokens}},
    "lm_eval", "config"} and writes it to config.json_out when set."""
    label = "model"
    res = evaluate_models(
        {label: config.model},
        config.base,
        config.corpora,
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        max_sequences=config.max_sequences,
        text_field=config.text_field,
        device=config.device,
        dtype=config.dtype,
        gguf_files={label: config.gguf_file} if config.gguf_file else None,
        base_gguf_file=config.base_gguf_file,
        convention=config.convention,
        lm_eval_tasks=config.lm_eval_tasks,
        lm_eval_include=config.lm_eval_include,
        lm_eval_limit=config.lm_eval_limit,
    )[label]
    out = {
        "model": config.model,
        "base": config.base,
        "corpora": res["corpora"],
        "lm_eval": res["lm_eval"],
        "config": config.to_dict(),
    }
    if config.json_out is not None:
        config.json_out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(config.json_out, out)
    return out


def format_table(result: dict) -> str:
    """The output of `run` as a plain-text table."""
    lines = [f"model  {result['model']}", f"base   {result['base'] if result['base'] is not None else '-'}", ""]
    width = max([6, *(len(n) for n in result["corpora"])])
    conv = (result.get("config") or {}).get("convention", "packed")
    lines.insert(2, f"tokens {conv} convention (pipeline eval --help, --convention)")
    lines.append(f"{'corpus':<{width}}  {'tokens':>10}  {'nll':>8}  {'ppl':>10}  {'bits/byte':>9}  {'kl':>10}")
    for name, m in result["corpora"].items():
        kl = "-" if m["kl"] is None else f"{m['kl']:.6f}"
        bpb = "-" if m.get("bits_per_byte") is None else f"{m['bits_per_byte']:.4f}"
        lines.append(f"{name:<{width}}  {m['tokens']:>10,}  {m['nll']:>8.4f}  {m['ppl']:>10.3f}  {bpb:>9}  {kl:>10}")
    if result.get("lm_eval"):
        lines += ["", f"{'lm-eval task':<24}  {'metric':<20}  {'value':>10}"]
        for task, metrics in result["lm_eval"].items():
            for metric, value in metrics.items():
                lines.append(f"{task:<24}  {metric:<20}  {value:>10.4f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- lm-eval


def _lm_eval_tasks(tasks: list[str], include):
    """The lm-eval TaskManager, after checking that lm_eval is installed and knows every task."""
    try:  # lm_eval is an optional extra, installed separately
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ValueError(
            f"--lm-eval-tasks needs lm-evaluation-harness, an optional package: pip install lm_eval ({e})"
        ) from e
    manager = TaskManager(include_path=str(include) if include else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}; `lm_eval ls tasks` lists them, and --lm-eval-include "
            f"adds a folder of your own task YAMLs"
        )
    return manager


def _run_lm_eval(model, tokenizer, tasks, manager, limit, batch_size, device) -> dict:
    """{task: {metric: value}} from lm-evaluation-harness on the loaded model (numeric metrics only)."""
    import lm_eval  # optional extra: _lm_eval_tasks has already checked that it is installed
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    return {
        task: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for task, metrics in out["results"].items()
    }
