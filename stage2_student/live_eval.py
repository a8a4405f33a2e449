"""Evaluation during training: `pipeline student --eval-data NAME=PATH --eval-every N`.

    pipeline student --run-dir runs/r1 --out out/lam1 --eval-data retention=prose.jsonl --eval-every 50

Every N optimizer steps (and after the last one) the student is scored on each named set: mean NLL per trained
position and the exact full-vocabulary KL(base‖student) per trained position, where the base is the run's teacher
(the model that wrote the labels). The numbers are those of `pipeline eval --model OUT/model --base TEACHER
--data NAME=PATH --seq-len SEQ_LEN --max-sequences M` on the same model: the same `lm.corpus.load_sequences`
sequences (packed, plain text, the run's --seq-len), the same definitions. They go into the step's metrics.jsonl
line under "eval" and to the trackers (`eval/NAME/nll`, `eval/NAME/kl`).

The base's log-probs: computed once, at the start, not taken from the stored labels. The stored labels are the
teacher's on the TRAINING sequences (and, for the default capture, 32 draws, not a distribution), so they say
nothing exact about a held-out set. The teacher is loaded once (fp32, on the training device) before the student,
run over the eval sets, and freed, so peak memory is one model plus one batch of logits. Its full-vocabulary
log-probs are written once to OUT/live_eval/NAME-KEY.npy (fp32, positions × vocabulary; KEY covers the run, the
set's content and the settings) and memory-mapped: each evaluation reads one batch's rows at a time, so host
memory never holds more than a batch of them, and a resumed run reuses the file instead of loading the teacher
again. The price is disk: positions × V × 4 bytes (16 sequences × 512 tokens × 49,152 vocabulary = 1.6 GB), which
the log states and --eval-max-sequences bounds.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lm.corpus import load_sequences
from lm.loading import load_causal_lm
from storage.atomic import commit, tmp_path

from .batch import pad_inputs
from .config import parse_data
from .losses import exact_kl_sum

log = logging.getLogger(__name__)

_CHUNK = 1024  # positions per fp32 log-softmax chunk


@dataclass
class EvalSet:
    name: str
    batches: list  # [(input_ids (B, T) int64, label_mask (B, T-1) bool)], on the CPU
    base: np.ndarray  # (positions, V) fp32 base log-probs, memory-mapped, in batch order
    tokens: int


def _batches(sequences, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of one length each, in corpus order within a length (no padding enters the numbers)."""
    by_len: dict[int, list] = {}
    for s in sequences:
        by_len.setdefault(len(s.input_ids), []).append(s)
    out = []
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            b = pad_inputs(group[i : i + batch_size])
            out.append((b["input_ids"], b["label_mask"]))
    return out


def prepare(acc, config, spec, tokenizer) -> list[EvalSet]:
    """The eval sets with their base log-probs (computed by the main process, once; cached under OUT/live_eval).
    Call before the student is loaded: the teacher is loaded here and freed before this returns."""
    if not config.eval_data:
        return []
    corpora, problems = parse_data(config.eval_data)
    if problems:  # checked again here: the files may have gone since the config was built
        raise ValueError("--eval-data: " + "; ".join(problems))
    teacher = {k: spec.teacher.get(k) for k in ("name_or_path", "gguf_file", "revision")}
    teacher["trust_remote_code"] = config.trust_remote_code  # trusted by this command line, not by run.json
    pending = []
    sets = []
    for name, path in corpora.items():
        try:
            res = load_sequences(
                path, tokenizer, seq_len=spec.seq_len, text_field="text", max_samples=config.eval_max_sequences
            )
        except ValueError as e:  # e.g. no "text" column: name the option as typed
            raise ValueError(f"--eval-data {name}={path}: {e} (eval sets are plain text in a 'text' column)") from None
        if res.trained_positions == 0:
            raise ValueError(f"--eval-data {name}={path}: no text to evaluate on (no trained positions)")
        batches = _batches(res.sequences, config.batch_size)
        key = hashlib.sha256(
            json.dumps(
                {"run": spec.fingerprint, "teacher": teacher, "corpus": res.fingerprint, "batch": config.batch_size},
                sort_keys=True,
            ).encode()
        ).hexdigest()[:16]
        file = Path(config.out) / "live_eval" / f"{name}-{key}.npy"
        sets.append((name, batches, file, res.trained_positions))
        if not file.exists():
            pending.append((name, batches, file, res.trained_positions))
    if pending and acc.is_main_process:
        _write_base_logprobs(teacher, pending, acc.device)
    acc.wait_for_everyone()
    return [EvalSet(name, b, np.load(file, mmap_mode="r"), n) for name, b, file, n in sets]


def _write_base_logprobs(teacher: dict, pending, device) -> None:
    base = load_causal_lm(
        teacher["name_or_path"],
        teacher["gguf_file"],
        revision=teacher["revision"],
        trust_remote_code=bool(teacher.get("trust_remote_code")),
    )
    base = base.to(device).eval().requires_grad_(False)
    try:
        for name, batches, file, positions in pending:
            vocab = base.get_output_embeddings().weight.shape[0]
            log.info(
                "live eval %s: the base's log-probs at %d positions x %d vocabulary (%.2f GB) -> %s (once)",
                name,
                positions,
                vocab,
                positions * vocab * 4 / 1e9,
                file,
            )
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = tmp_path(file)
            try:
                arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(positions, vocab))
                pos = 0
                with torch.inference_mode():
                    for ids, mask in batches:
                        z = base(input_ids=ids[:, :-1].to(device)).logits[mask.to(device)]  # (N, V)
                        for s in range(0, z.shape[0], _CHUNK):
                            lp = torch.log_softmax(z[s : s + _CHUNK].float(), dim=-1)
                            arr[pos : pos + lp.shape[0]] = lp.cpu().numpy()
                            pos += lp.shape[0]
                arr.flush()
                del arr
                commit(tmp, file)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    finally:
        del base
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def evaluate(model, sets: list[EvalSet], device) -> dict[str, dict]:
    """{name: {"nll", "kl", "tokens"}}: means per trained position of the model as it is now (eval mode, no
    gradients; the model's train/eval mode is restored)."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        with torch.no_grad():
            for s in sets:
                nll = torch.zeros((), dtype=torch.float64, device=device)
                kl = torch.zeros((), dtype=torch.float64, device=device)
                pos = 0
                for ids, mask in s.batches:
                    mask = mask.to(device)
                    ids = ids.to(device)
                    z = model(input_ids=ids[:, :-1]).logits[mask]  # (N, V); the last id is only a target
                    labels = ids[:, 1:][mask]
                    for c in range(0, z.shape[0], _CHUNK):
                        zc = z[c : c + _CHUNK]
                        lp = torch.log_softmax(zc.float(), dim=-1)  # (C, V)
                        nll -= lp.gather(1, labels[c : c + _CHUNK, None]).sum(dtype=torch.float64)
                        t = torch.from_numpy(np.array(s.base[pos : pos + zc.shape[0]])).to(device)  # a copy
                        if t.shape[1] != zc.shape[1]:
                            raise ValueError(
                                f"--eval-data {s.name}: the student's logits have {zc.shape[1]} entries but the "
                                f"base's {t.shape[1]}: the vocabularies differ, so KL(base‖student) is undefined"
                            )
                        kl += exact_kl_sum(zc, t).double()
                        pos += zc.shape[0]
                out[s.name] = {"nll": float(nll) / s.tokens, "kl": float(kl) / s.tokens, "tokens": s.tokens}
    finally:
        model.train(was_training)
    return out


def due(config, step: int, total: int) -> bool:
    """Whether the eval sets are scored after optimizer step `step` (1-based): every --eval-every, and the last."""
    if not config.eval_data:
        return False
    return step == total or (config.eval_every > 0 and step % config.eval_every == 0)
