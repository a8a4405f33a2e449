"""Stage 2: train the student against the stored soft labels. One written-out loop for every option.

    pipeline student --run-dir runs/r1 --out out/lam1 --kl-weight 1

`accelerate` handles devices, bf16 autocast, DDP (`torchrun` / `accelerate launch`) and state saving;
the loop itself stays here, short and readable, instead of inside a Trainer subclass whose defaults
we would have to undo. Loss normalisation: each micro-batch's loss is a SUM over its trained
positions; every step divides by the global number of trained positions in the step (all
micro-batches, all ranks), so gradient accumulation and data parallelism give exactly the gradient
of one big batch.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from storage.atomic import atomic_write_bytes, atomic_write_json
from storage.reader import RunReader
from storage.torch_data import collate_labels

from . import checkpoint as ckpt
from .config import StudentConfig
from .data import epoch_order, micro_batch_rows, steps_per_epoch
from .fused_head import fused_head_ce_kl_sums
from .head import FusedHead, fused_head_for
from .losses import ce_sum, exact_kl_sum, fused_ce_kl_sums, loss_weights, topk_jsd_sum, topk_reverse_kl_sum
from .model_io import check_student, load_model, load_tokenizer, save_hf
from .targets import to_targets
from .regularizers import AnchorPenalty, ReplayStream, collate_plain, estimate_fisher

log = logging.getLogger(__name__)

# Settings that must not change across a resume (the data order and the optimisation depend on them).
_RESUME_KEYS = ("run_dir", "teacher_online", "l2_init", "ewc", "ewc_sequences", "replay_data", "replay_ratio", "kl_weight", "batch_size", "grad_accum", "lr", "seed", "kl_tail", "divergence",
                "kd_temperature", "loss_form", "lora_r", "shuffle", "lr_schedule", "warmup_steps", "min_lr_ratio")


def lr_factor(step: int, total: int, config: StudentConfig) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _loss_sums(config: StudentConfig, logits: torch.Tensor, batch: dict, teacher_logits: torch.Tensor | None = None,
               head: FusedHead | None = None):
    """(total, ce, kl) sums over the micro-batch's trained positions; only total carries a gradient.
    With `teacher_logits` (the online reference) the KL is the exact full-vocabulary one. With `head`,
    `logits` holds the final hidden states and the lm_head runs inside the loss."""
    z = logits[:, :-1][batch["label_mask"]]                          # (N, V), or (N, H) with a head
    labels = batch["labels"][batch["label_mask"]]                    # (N,)
    w_ce, w_kl = loss_weights(config.kl_weight, config.loss_form)
    if head is not None:
        return fused_head_ce_kl_sums(z, head.weight, labels, batch["topk_ids"], batch["topk_logprobs"],
                                     batch["tail_logprob"], bias=head.bias, ce_weight=w_ce, kl_weight=w_kl,
                                     tail=config.kl_tail, kd_temperature=config.kd_temperature,
                                     chunk_size=config.chunk_size)
    if teacher_logits is not None:
        tau = config.kd_temperature
        t = torch.log_softmax(teacher_logits[:, :-1][batch["label_mask"]].float() / tau, -1)  # (N, V)
        ce = ce_sum(z, labels)
        kl = exact_kl_sum(z.float() / tau, t) * tau**2
        return w_ce * ce + w_kl * kl, ce.detach(), kl.detach()
    args = (batch["topk_ids"], batch["topk_logprobs"], batch["tail_logprob"])
    if config.divergence == "forward":
        return fused_ce_kl_sums(z, labels, *args, ce_weight=w_ce, kl_weight=w_kl, tail=config.kl_tail,
                                kd_temperature=config.kd_temperature, chunk_size=config.chunk_size)
    div = topk_reverse_kl_sum if config.divergence == "reverse" else topk_jsd_sum
    ce = ce_sum(z, labels)
    kl = div(z, *args, tail=config.kl_tail, kd_temperature=config.kd_temperature)
    return w_ce * ce + w_kl * kl, ce.detach(), kl.detach()


def accumulate_gradients(acc, model, batches: list[dict], config: StudentConfig, replay: list[dict] | None = None,
                         teacher=None, head: FusedHead | None = None):
    """Backward over the micro-batches of one optimizer step. Returns (ce_sum, kl_sum, replay_ce_sum,
    [global labelled positions, global replay positions]). Each micro-batch contributes sum / global count, so the accumulated
    gradient equals the gradient of the mean loss over the whole step, however positions are split.
    `replay` batches (no teacher labels) add CE only and count toward the positions."""
    world = acc.num_processes
    items = [("labels", b) for b in batches] + [("replay", b) for b in (replay or [])]
    local = torch.tensor([float(sum(int(b["label_mask"].sum()) for k, b in items if k == kind))
                          for kind in ("labels", "replay")], device=acc.device)
    counts = acc.reduce(local, reduction="sum").tolist()  # note: a sync point, once per step
    global_tokens = counts[0] + counts[1]
    scale = world / max(global_tokens, 1.0)  # DDP averages over ranks: undo it, then divide by the count
    sums = torch.zeros(3, device=acc.device)  # ce, kl, replay ce
    for j, (kind, b) in enumerate(items):
        b = _to(b, acc.device)
        sync = contextlib.nullcontext() if j == len(items) - 1 else acc.no_sync(model)
        with sync:
            with acc.autocast(), (head.hidden_states() if head is not None else contextlib.nullcontext()):
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            if kind == "labels":
                t_logits = None
                if teacher is not None:
                    with torch.no_grad(), acc.autocast():
                        t_logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                with acc.autocast() if head is not None else contextlib.nullcontext():
                    total_sum, ce_s, kl_s = _loss_sums(config, logits, b, t_logits, head)
                sums[0] += ce_s
                sums[1] += kl_s
            else:
                z = logits[:, :-1][b["label_mask"]]
                if head is not None:  # replay is CE only: the (N_replay, V) logits a plain CE needs
                    with acc.autocast():
                        z = head.logits(z)
                total_sum = ce_sum(z, b["labels"][b["label_mask"]])
                sums[2] += total_sum.detach()
            acc.backward(total_sum * scale)
    return sums[0], sums[1], sums[2], counts


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _check_resume(state: dict, config: StudentConfig, world: int, ckpt_dir: Path) -> None:
    saved = state["config"]
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in config.to_dict().items()
             if k in _RESUME_KEYS and saved.get(k) != v]
    if state.get("world_size") != world:
        diffs.append(f"world_size: checkpoint {state.get('world_size')} vs now {world}")
    if diffs:
        raise ValueError(f"cannot resume from {ckpt_dir}: settings differ:\n  " + "\n  ".join(diffs)
                         + "\nResume with the same settings, or start a new --out directory.")


def _build_anchors(config: StudentConfig, model, params, reader: RunReader, pad_id: int) -> list[AnchorPenalty]:
    anchors = []
    if config.l2_init > 0:
        anchors.append(AnchorPenalty(params, config.l2_init))
    if config.ewc > 0:
        n = min(config.ewc_sequences, len(reader))
        rows = [reader[i] for i in range(n)]
        batches = [collate_labels(rows[i:i + 4], pad_id=pad_id) for i in range(0, n, 4)]
        fisher = estimate_fisher(model, batches, next(model.parameters()).device, seed=config.seed)
        anchors.append(AnchorPenalty(params, config.ewc, weights=fisher))
    return anchors


def _apply_lora(model, config: StudentConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("--lora-r needs peft: pip install 'label-anneal[lora]'") from e
    lcfg = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def run(config: StudentConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from tqdm.auto import tqdm

    use_cuda = torch.cuda.is_available()
    bf16 = config.precision == "bf16" or (config.precision == "auto" and use_cuda)
    acc = Accelerator(cpu=not use_cuda, mixed_precision="bf16" if bf16 else "no")
    world, rank = acc.num_processes, acc.process_index
    out = config.out
    # Checksums once, on the main process; the others check sizes and footers.
    reader = RunReader(config.run_dir, verify=config.verify if acc.is_main_process else
                       ("size" if config.verify != "none" else "none"))
    spec = reader.spec

    model_name = config.model or spec.teacher["name_or_path"]
    gguf = config.gguf_file if config.model else (config.gguf_file or spec.teacher.get("gguf_file"))
    set_seed(config.seed)
    tokenizer = load_tokenizer(model_name, gguf)
    model = load_model(model_name, gguf)
    check_student(spec, tokenizer, model, where=f"student {model_name!r}")
    if config.lora_r:
        model = _apply_lora(model, config)
    head = fused_head_for(model, config.fused_head,
                          fsdp=acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED),
                          reason_off="an online teacher needs the full logits" if config.teacher_online else
                          None if config.divergence == "forward" else f"--divergence {config.divergence} works on logits")
    params = [p for p in model.parameters() if p.requires_grad]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    anchors = _build_anchors(config, model, params, reader, pad_id)
    replay, n_replay = None, config.replay_per_micro_batch()
    if n_replay:
        from stage1_teacher.corpus import load_sequences

        rep = load_sequences(config.replay_data, tokenizer, seq_len=spec.seq_len, text_field=config.replay_text_field)
        replay = ReplayStream(rep.sequences, seed=config.seed)
        log.info("replay: %d sequences from %s, %d per micro-batch", len(rep.sequences), config.replay_data, n_replay)
    opt = torch.optim.AdamW(params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                            weight_decay=config.weight_decay)

    G = config.batch_size * config.grad_accum * world
    spe = steps_per_epoch(len(reader), G)
    if spe == 0:
        raise ValueError(f"{config.run_dir} holds {len(reader)} sequences, fewer than one global batch of {G} "
                         f"(batch_size {config.batch_size} × grad_accum {config.grad_accum} × {world} processes); "
                         f"lower --batch-size or --grad-accum")
    total = config.max_steps or max(1, math.ceil(config.epochs * spe))
    # Not passed through accelerate.prepare: its wrapper steps the schedule once per process.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, config))
    teacher = None
    if config.teacher_online:
        # The reference path: a frozen second model, run in no-grad on every micro-batch.
        teacher = load_model(config.teacher_online, None)
        check_student(spec, load_tokenizer(config.teacher_online), teacher, where=f"online teacher {config.teacher_online!r}")
        teacher = teacher.to(acc.device).eval().requires_grad_(False)
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)

    start = 0
    if config.resume:
        last = ckpt.latest_checkpoint(out)
        if last is None:
            log.warning("--resume: no complete checkpoint in %s; starting from step 0", out)
        else:
            state = ckpt.read_state(last)
            _check_resume(state, config, world, last)
            acc.load_state(str(last))
            start = state["step"]
            log.info("resumed from %s (step %d)", last, start)
    elif ckpt.latest_checkpoint(out) is not None:
        raise ValueError(f"{out} already holds checkpoints; pass --resume to continue, or use a new --out")

    metrics_path = out / "metrics.jsonl"
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", {**config.to_dict(), "world_size": world, "total_steps": total,
                                                "run_fingerprint": spec.fingerprint})
        # On resume, drop metric lines past the checkpoint so the log has no duplicated steps (atomically: a
        # kill here must not lose the lines already there).
        kept = _metric_lines_up_to(metrics_path, start) if start else []
        atomic_write_bytes(metrics_path, "".join(l + "\n" for l in kept).encode())

    model.train()
    order_cache: dict[int, torch.Tensor] = {}
    t_start = time.perf_counter()
    tokens_done = 0
    last = {}
    bar = tqdm(total=total, initial=start, desc="student", unit="step", disable=not acc.is_main_process,
               dynamic_ncols=True)
    for step in range(start, total):
        t0 = time.perf_counter()
        epoch, s = divmod(step, spe)
        if epoch not in order_cache:
            order_cache = {epoch: epoch_order(reader, seed=config.seed, epoch=epoch, shuffle=config.shuffle)}
        batches = [to_targets(collate_labels([reader[int(i)] for i in micro_batch_rows(
            order_cache[epoch], s, j, batch_size=config.batch_size, grad_accum=config.grad_accum,
            rank=rank, world_size=world)], pad_id=pad_id), spec.capture) for j in range(config.grad_accum)]
        replay_batches = None
        if replay is not None:
            replay_batches = [collate_plain(replay.rows(step, j, rank, world, config.grad_accum, n_replay), pad_id=pad_id)
                              for j in range(config.grad_accum)]
        ce_tot, kl_tot, rep_tot, (n_lab, n_rep) = accumulate_gradients(acc, model, batches, config, replay_batches,
                                                                       teacher, head)
        global_tokens = n_lab + n_rep
        for a in anchors:
            a.add_grad()
        if config.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(params, config.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        lr_now = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        sums = acc.reduce(torch.stack([ce_tot, kl_tot, rep_tot]), reduction="sum")
        tokens_done += global_tokens
        dt = time.perf_counter() - t0
        w_ce, w_kl = loss_weights(config.kl_weight, config.loss_form)
        # ce and kl per labelled position, replay_ce per replay position; the optimised loss is their
        # position-weighted mean (every trained position counts once).
        last = {"step": step + 1, "epoch": epoch, "ce": sums[0].item() / max(n_lab, 1),
                "kl": sums[1].item() / max(n_lab, 1),
                "total": (w_ce * sums[0].item() + w_kl * sums[1].item() + sums[2].item()) / global_tokens
                + sum(a.value() for a in anchors),
                "lr": lr_now, "grad_norm": float(grad_norm), "trained_tokens": int(global_tokens),
                "tokens_per_s": global_tokens / dt, "step_s": dt}
        if replay is not None:
            last["replay_ce"] = sums[2].item() / max(n_rep, 1)
        if anchors:
            last["anchor_penalty"] = sum(a.value() for a in anchors)
        if acc.is_main_process and ((step + 1) % config.log_every == 0 or step + 1 == total):
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
        bar.set_postfix(ce=f"{last['ce']:.3f}", kl=f"{last['kl']:.3f}")
        bar.update(1)
        if config.save_every and ((step + 1) % config.save_every == 0 or step + 1 == total):
            _save_checkpoint(acc, out, step + 1, config, world)
    bar.close()

    model_dir = None
    if config.save_model:
        acc.wait_for_everyone()
        # Collective under FSDP (gathers the shards); a plain state dict otherwise. Every rank must call it.
        full_state = acc.get_state_dict(model) if acc.distributed_type.name == "FSDP" else None
        if acc.is_main_process:
            model_dir = save_hf(acc.unwrap_model(model), tokenizer, out / "model", state_dict=full_state)
    elapsed = time.perf_counter() - t_start
    acc.wait_for_everyone()
    return {"out": str(out), "model_dir": str(model_dir) if model_dir else None, "steps": total,
            "start_step": start, "trained_tokens": int(tokens_done),
            "tokens_per_s": tokens_done / elapsed if elapsed > 0 else None, "final": last}


def _metric_lines_up_to(path: Path, step: int) -> list[str]:
    """The lines of `path` (metrics.jsonl) for steps <= `step`. A kill can tear the line being appended; such a
    line belongs to a step after the newest checkpoint (lines are written before the checkpoint), so it goes too."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            s = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if s <= step:
            kept.append(line)
    return kept


def _save_checkpoint(acc, out: Path, step: int, config: StudentConfig, world: int) -> None:
    tmp = ckpt.begin(out, step) if acc.is_main_process else ckpt.tmp_dir(out, step)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt.commit(tmp, {"step": step, "world_size": world, "config": config.to_dict()}, config.keep_checkpoints)
    acc.wait_for_everyone()


def summary_line(s: dict) -> str:
    f = s.get("final") or {}
    rate = f"{s['tokens_per_s']:,.0f} trained tok/s" if s.get("tokens_per_s") else "-"
    return (f"student: {s['steps']} steps ({s['steps'] - s['start_step']} this run), {s['trained_tokens']:,} trained tokens, "
            f"{rate}, final CE {f.get('ce', float('nan')):.4f} KL {f.get('kl', float('nan')):.4f} -> "
            f"{s['model_dir'] or s['out']}")
