"""Stage 2: train the student against the stored soft labels. One written-out loop for every option.

    pipeline student --run-dir runs/r1 --out out/lam1 --kl-weight 1

`accelerate` handles devices, bf16 autocast, DDP (`torchrun` / `accelerate launch`) and state saving;
the loop itself stays here, short and readable, instead of inside a Trainer subclass whose defaults
we would have to undo. Loss normalisation: each micro-batch's loss is a SUM over its trained
positions; every step divides by the global number of trained positions in the step (all
micro-batches, all ranks), so gradient accumulation and data parallelism give exactly the gradient
of one big batch.

`run` = `setup` (accelerator, run, student, optimizer, resume) -> `fit` (the steps) -> `save` (the final model).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from lm.corpus import load_sequences
from lm.loading import load_causal_lm, load_tokenizer, read_chat_template
from storage.atomic import atomic_write_bytes, atomic_write_json
from storage.run_reader import RunReader
from storage.spec import RunSpec, load_run_spec

from . import checkpoint as ckpt
from . import live_eval, trackers
from .batch import collate_labels, pad_inputs
from .config import StudentConfig
from .data import steps_per_epoch
from .lm_head_bypass import FusedHead, fused_head_for
from .loader import RankBatches
from .losses import (
    ce_sum,
    exact_kl_sum,
    fused_ce_kl_sums,
    fused_head_ce_kl_sums,
    loss_weights,
    topk_jsd_sum,
    topk_reverse_kl_sum,
)
from .model_io import check_replaceable, check_student, free_bytes, is_student_output, model_bytes, save_hf
from .regularizers import AnchorPenalty, ReplayMixer, ReplayStream, estimate_fisher, replay_rows

log = logging.getLogger(__name__)

# Settings that must not change across a resume (the data order and the optimisation depend on them). The batch
# geometry is checked as one number, the global batch G = batch_size · grad_accum · world_size (the data order
# depends on G only, `data.EpochOrder`), so a run can resume on another number of processes at the same G.
_RESUME_KEYS = (
    "run_dir",
    "teacher_online",
    "l2_init",
    "ewc",
    "ewc_sequences",
    "ewc_sign_draws",
    "replay_data",
    "replay_ratio",
    "kl_weight",
    "lr",
    "seed",
    "kl_tail",
    "divergence",
    "kd_temperature",
    "loss_form",
    "lora_r",
    "shuffle",
    "shuffle_block",
    "lr_schedule",
    "warmup_steps",
    "min_lr_ratio",
)


def lr_factor(step: int, total: int, config: StudentConfig) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ------------------------------------------------------------------------------------------- one step


class StepSums(NamedTuple):
    """What `accumulate_gradients` returns: this process's sums over one optimizer step, and the global counts."""

    ce: torch.Tensor  # Σ CE over labelled positions
    kl: torch.Tensor  # Σ logged KL (`loss_sums`: comparable across capture modes)
    replay_ce: torch.Tensor  # Σ CE over replay positions
    counts: list  # [global labelled positions, global replay positions]
    objective: torch.Tensor  # Σ of the optimised loss (w_ce·CE + w_kl·KL + replay CE), before the division


def loss_sums(
    config: StudentConfig,
    logits_or_hidden: torch.Tensor,
    batch: dict,
    teacher_logits: torch.Tensor | None = None,
    head: FusedHead | None = None,
):
    """(total, ce, kl) sums over the micro-batch's trained positions; only total carries a gradient.
    With `teacher_logits` (the online reference) the KL is the exact full-vocabulary one. The returned kl is the
    LOGGED one: the loss's KL plus the batch's `kl_offset` where the target is sampled (an unbiased estimate of
    KL(teacher‖student), `batch.with_kl_target_weights`); total is the optimised objective either way. With `head`,
    `logits_or_hidden` holds the final hidden states (B, T, H) and the lm_head runs inside the loss; otherwise
    it holds the logits (B, T, V). The KL target is `topk_ids` / `topk_logprobs` / `tail_logprob` as
    `batch.with_kl_target_weights` left them."""
    mask = batch["label_mask"]
    labels = batch["labels"][mask]  # (N,)
    w_ce, w_kl = loss_weights(config.kl_weight, config.loss_form)
    offset = batch["kl_offset"].sum() if "kl_offset" in batch else 0.0
    if head is not None:
        hidden = logits_or_hidden[:, :-1][mask]  # (N, H)
        total, ce, kl = fused_head_ce_kl_sums(
            hidden,
            head.weight,
            labels,
            batch["topk_ids"],
            batch["topk_logprobs"],
            batch["tail_logprob"],
            bias=head.bias,
            ce_weight=w_ce,
            kl_weight=w_kl,
            tail=config.kl_tail,
            kd_temperature=config.kd_temperature,
            chunk_size=config.chunk_size,
        )
        return total, ce, kl + offset
    z = logits_or_hidden[:, :-1][mask]  # (N, V)
    if teacher_logits is not None:
        tau = config.kd_temperature
        t = torch.log_softmax(teacher_logits[:, :-1][mask].float() / tau, -1)  # (N, V)
        ce = ce_sum(z, labels)
        kl = exact_kl_sum(z.float() / tau, t) * tau**2
        return w_ce * ce + w_kl * kl, ce.detach(), kl.detach()
    args = (batch["topk_ids"], batch["topk_logprobs"], batch["tail_logprob"])
    if config.divergence == "forward":
        total, ce, kl = fused_ce_kl_sums(
            z,
            labels,
            *args,
            ce_weight=w_ce,
            kl_weight=w_kl,
            tail=config.kl_tail,
            kd_temperature=config.kd_temperature,
            chunk_size=config.chunk_size,
        )
        return total, ce, kl + offset
    div = topk_reverse_kl_sum if config.divergence == "reverse" else topk_jsd_sum
    ce = ce_sum(z, labels)
    kl = div(z, *args, tail=config.kl_tail, kd_temperature=config.kd_temperature)
    return w_ce * ce + w_kl * kl, ce.detach(), kl.detach() + offset


def accumulate_gradients(
    acc,
    model,
    batches: list[dict],
    config: StudentConfig,
    replay: list[dict] | None = None,
    teacher=None,
    head: FusedHead | None = None,
):
    """Backward over the micro-batches of one optimizer step. Returns StepSums (this process's sums; the counts
    global). Each micro-batch contributes sum / global count, so the accumulated gradient equals the gradient of
    the mean loss over the whole step, however positions are split. `replay` batches (no teacher labels) add CE
    only and count toward the positions."""
    world = acc.num_processes
    items = [("labels", b) for b in batches] + [("replay", b) for b in (replay or [])]
    local = torch.tensor(
        [float(sum(int(b["label_mask"].sum()) for k, b in items if k == kind)) for kind in ("labels", "replay")],
        device=acc.device,
    )
    counts = acc.reduce(local, reduction="sum").tolist()  # note: a sync point, once per step
    global_tokens = counts[0] + counts[1]
    scale = world / max(global_tokens, 1.0)  # DDP averages over ranks: undo it, then divide by the count
    sums = torch.zeros(4, device=acc.device)  # ce, logged kl, replay ce, objective
    for j, (kind, b) in enumerate(items):
        b = _to(b, acc.device)
        sync = contextlib.nullcontext() if j == len(items) - 1 else acc.no_sync(model)
        with sync:
            with acc.autocast(), head.hidden_states() if head is not None else contextlib.nullcontext():
                # (B, T, V) logits; with a head, the final hidden states (B, T, H)
                logits_or_hidden = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            if kind == "labels":
                t_logits = None
                if teacher is not None:
                    with torch.no_grad(), acc.autocast():
                        t_logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                with acc.autocast() if head is not None else contextlib.nullcontext():
                    total_sum, ce_s, kl_s = loss_sums(config, logits_or_hidden, b, t_logits, head)
                sums[0] += ce_s
                sums[1] += kl_s
            else:
                trained = logits_or_hidden[:, :-1][b["label_mask"]]  # (N, V), or (N, H) with a head
                if head is not None:  # replay is CE only: the (N_replay, V) logits a plain CE needs
                    with acc.autocast():
                        trained = head.logits(trained)
                total_sum = ce_sum(trained, b["labels"][b["label_mask"]])
                sums[2] += total_sum.detach()
            sums[3] += total_sum.detach()
            acc.backward(total_sum * scale)
    return StepSums(sums[0], sums[1], sums[2], counts, sums[3])


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def step_batches(loader: RankBatches, step: int) -> list[dict]:
    """This process's `grad_accum` micro-batches of one optimizer step, collated, with the run's capture mode turned
    into the KL target (`batch.with_kl_target_weights`), read on the calling thread. `fit` gets the same batches
    from `loader.iter_steps`, which reads them on a background thread ahead of the loop."""
    return loader.step_batches(step)


def replay_batches(acc, replay: ReplayMixer, batches: list[dict], config: StudentConfig, *, pad_id: int) -> list[dict]:
    """This process's replay micro-batches of one optimizer step (CE only): the sequences the mixer adds for the
    step's labelled positions on all ranks (one small all-reduce), this rank's share, at most --batch-size each."""
    local = torch.tensor([float(sum(int(b["label_mask"].sum()) for b in batches))], device=acc.device)
    labelled = int(acc.reduce(local, reduction="sum").item())  # note: a sync point, once per step with replay
    seqs = replay.take(labelled)
    rows = replay_rows(seqs, rank=acc.process_index, world=acc.num_processes, batch_size=config.batch_size)
    return [pad_inputs(r, pad_id=pad_id) for r in rows]


# ------------------------------------------------------------------------------------------- setup


@dataclass
class Training:
    """What `setup` builds and `fit` / `save` use."""

    acc: Accelerator
    reader: RunReader
    loader: RankBatches  # this process's micro-batches (reads `reader` on its own thread during `fit`)
    tokenizer: Any
    model: torch.nn.Module  # as returned by accelerate.prepare
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    params: list[torch.nn.Parameter]  # the trainable ones
    head: FusedHead | None  # the lm_head inside the loss, or None for the logits path
    anchors: list[AnchorPenalty]  # L2-SP / EWC
    replay: ReplayMixer | None
    teacher: torch.nn.Module | None  # the online reference teacher
    pad_id: int
    steps_per_epoch: int
    total: int  # optimizer steps of the whole run
    start: int  # first step of this invocation (> 0 after a resume)
    eval_sets: list  # --eval-data sets with the base's log-probs (live_eval.EvalSet)


def setup(config: StudentConfig) -> Training:
    """Accelerator, the run, the student (LoRA, fused head, anchors), replay, optimizer and schedule, online
    teacher, resume, output files; in this order, which fixes how the seeded random streams are used."""
    # Option combinations this run's capture mode cannot support are refused before anything is loaded, and so is
    # an --out that holds something this run must not write over.
    run_spec = load_run_spec(config.run_dir)
    config.check_run(run_spec.capture, config.run_dir)
    check_out(config, run_spec.fingerprint)
    use_cuda = torch.cuda.is_available()
    bf16 = config.precision == "bf16" or (config.precision == "auto" and use_cuda)
    acc = Accelerator(
        cpu=not use_cuda,
        mixed_precision="bf16" if bf16 else "no",
        **trackers.accelerator_kwargs(config.report_to, config.out),
    )
    # Every process checks sizes here (a stat per shard, nothing opened) and then checks each shard it reads when it
    # first reads it (footer; sha256 with verify=checksum): no process waits for a whole-run check.
    # With verify=checksum each process hashes only its share of the shards (i % processes == rank): the job reads
    # the run once between all processes for checksums, on a background thread during `fit`.
    reader = RunReader(
        config.run_dir,
        verify=config.verify,
        max_open_files=config.max_open_files,
        cache_row_groups=0,
        checksum_share=(acc.process_index, acc.num_processes),
    )
    spec = reader.spec
    # Before the student: the teacher is loaded, run over the eval sets once and freed (live_eval.py).
    eval_sets = live_eval.prepare(acc, config, spec, _eval_tokenizer(config, spec)) if config.eval_data else []
    set_seed(config.seed)
    tokenizer, model = _load_student(config, spec)
    head = fused_head_for(
        model,
        config.fused_head,
        fsdp=acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED),
        reason_off="an online teacher needs the full logits"
        if config.teacher_online
        else None
        if config.divergence == "forward"
        else f"--divergence {config.divergence} works on logits",
    )
    params = [p for p in model.parameters() if p.requires_grad]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    anchors = _build_anchors(config, model, params, reader, pad_id)
    replay = _load_replay(config, tokenizer, spec.seq_len)
    opt = torch.optim.AdamW(
        params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay
    )
    spe, total = _length(config, len(reader), acc.num_processes)
    check_free_space(config, model, params, total)
    # Not passed through accelerate.prepare: its wrapper steps the schedule once per process.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, config))
    teacher = _load_online_teacher(config, spec, acc.device) if config.teacher_online else None
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)
    start = _resume(acc, config, replay, spec.fingerprint)
    _prepare_outputs(acc, config, total, spec.fingerprint, start)
    if acc.is_main_process:
        trackers.start(acc, config.report_to, config.tracker_project, config.to_dict(), config.out)
    loader = RankBatches(
        reader,
        seed=config.seed,
        shuffle=config.shuffle,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        rank=acc.process_index,
        world_size=acc.num_processes,
        pad_id=pad_id,
        block_rows=config.shuffle_block,
        prefetch_steps=config.prefetch_steps,
    )
    return Training(
        acc=acc,
        reader=reader,
        loader=loader,
        tokenizer=tokenizer,
        model=model,
        opt=opt,
        sched=sched,
        params=params,
        head=head,
        anchors=anchors,
        replay=replay,
        teacher=teacher,
        pad_id=pad_id,
        steps_per_epoch=spe,
        total=total,
        start=start,
        eval_sets=eval_sets,
    )


def _load_student(config: StudentConfig, spec: RunSpec):
    """(tokenizer, model): --model, or the teacher recorded in the run; checked against the run; LoRA applied."""
    model_name = config.model or spec.teacher["name_or_path"]
    gguf = config.gguf_file if config.model else (config.gguf_file or spec.teacher.get("gguf_file"))
    # Without --model: the very commit the teacher was (run.json), unless --revision says otherwise.
    revision = config.revision or (None if config.model else spec.teacher.get("revision"))
    template = read_chat_template(config.chat_template) or spec.teacher.get("chat_template")
    hub = {"revision": revision, "trust_remote_code": config.trust_remote_code}
    tokenizer = load_tokenizer(model_name, gguf, chat_template=template, **hub)
    model = load_causal_lm(model_name, gguf, **hub)
    check_student(spec, tokenizer, model, where=f"student {model_name!r}")
    if config.lora_r:
        model = _apply_lora(model, config)
    return tokenizer, model


def _eval_tokenizer(config: StudentConfig, spec: RunSpec):
    """The tokenizer of the run's teacher (the base of --eval-data; the student must share it, `check_student`)."""
    return load_tokenizer(
        spec.teacher["name_or_path"],
        spec.teacher.get("gguf_file"),
        revision=spec.teacher.get("revision"),
        trust_remote_code=config.trust_remote_code,
        chat_template=spec.teacher.get("chat_template"),
    )


def _load_replay(config: StudentConfig, tokenizer, seq_len: int) -> ReplayMixer | None:
    """The replay mixer (None without --replay-ratio)."""
    if config.replay_ratio <= 0:
        return None
    rep = load_sequences(config.replay_data, tokenizer, seq_len=seq_len, text_field=config.replay_text_field)
    log.info(
        "replay: %d sequences from %s, %.3g of the trained positions", len(rep.sequences), config.replay_data,
        config.replay_ratio,
    )  # fmt: skip
    return ReplayMixer(ReplayStream(rep.sequences, seed=config.seed), config.replay_ratio)


def _length(config: StudentConfig, num_rows: int, world: int) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps of the run)."""
    G = config.batch_size * config.grad_accum * world
    spe = steps_per_epoch(num_rows, G)  # ceil: the leftover rows make a short last step
    if spe == 0:
        raise ValueError(f"{config.run_dir} holds no sequences")
    return spe, config.max_steps or max(1, math.ceil(config.epochs * spe))


def _load_online_teacher(config: StudentConfig, spec: RunSpec, device):
    # The reference path: a frozen second model, run in no-grad on every micro-batch.
    teacher = load_causal_lm(config.teacher_online, None)
    check_student(
        spec, load_tokenizer(config.teacher_online), teacher, where=f"online teacher {config.teacher_online!r}"
    )
    return teacher.to(device).eval().requires_grad_(False)


def _resume(acc, config: StudentConfig, replay: ReplayMixer | None, run_fingerprint: str | None = None) -> int:
    """The step to start from: that of the newest complete checkpoint with --resume (its state loaded, the replay
    mixer's included), else 0."""
    out = config.out
    if not config.resume:
        if config.overwrite and acc.is_main_process:
            ckpt.discard_all(out)  # --overwrite: this run's checkpoints replace the earlier run's
        acc.wait_for_everyone()
        if ckpt.latest_checkpoint(out) is not None:
            raise ValueError(f"{out} already holds checkpoints; pass --resume to continue, or use a new --out")
        return 0
    last = ckpt.latest_checkpoint(out)
    if last is None:
        log.warning("--resume: no complete checkpoint in %s; starting from step 0", out)
        return 0
    state = ckpt.read_state(last)
    _check_resume(state, config, acc.num_processes, last, run_fingerprint)
    if state.get("world_size") != acc.num_processes:
        log.info(
            "resuming a %s-process checkpoint on %d processes (same global batch: same data order)",
            state.get("world_size"),
            acc.num_processes,
        )
    if replay is not None:
        if "replay" not in state:
            raise ValueError(
                f"cannot resume from {last}: it was written before replay counted trained positions "
                f"(no replay state); start a new --out directory"
            )
        replay.load_state(state["replay"])
    acc.load_state(str(last))
    log.info("resumed from %s (step %d)", last, state["step"])
    return state["step"]


def _prepare_outputs(acc, config: StudentConfig, total: int, run_fingerprint: str, start: int) -> None:
    """OUT/config.json, and metrics.jsonl cut back to the steps up to `start`. Main process only."""
    if not acc.is_main_process:
        return
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        out / "config.json",
        {**config.to_dict(), "world_size": acc.num_processes, "total_steps": total, "run_fingerprint": run_fingerprint},
    )
    # On resume, drop metric lines past the checkpoint so the log has no duplicated steps (atomically: a
    # kill here must not lose the lines already there).
    metrics_path = out / "metrics.jsonl"
    kept = _metric_lines_up_to(metrics_path, start) if start else []
    atomic_write_bytes(metrics_path, "".join(l + "\n" for l in kept).encode())


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


def _same_path(key: str, saved, now, state: dict, run_fingerprint: str | None) -> bool:
    """A path setting spelled differently (relative / absolute, through a link) that names the same thing: the run
    directory by its fingerprint when the checkpoint recorded one, else any path by its resolved identity."""
    if key not in ("run_dir", "replay_data") or not isinstance(saved, str) or not isinstance(now, str):
        return False
    if key == "run_dir" and state.get("run_fingerprint") is not None:
        return state["run_fingerprint"] == run_fingerprint
    try:
        return Path(saved).resolve() == Path(now).resolve() or os.path.samefile(saved, now)
    except OSError:
        return False


def _check_resume(
    state: dict, config: StudentConfig, world: int, ckpt_dir: Path, run_fingerprint: str | None = None
) -> None:
    saved = state["config"]
    diffs = [
        f"{_option(k)}: checkpoint {saved.get(k)!r} vs now {v!r}"
        for k, v in config.to_dict().items()
        if k in _RESUME_KEYS and saved.get(k) != v and not _same_path(k, saved.get(k), v, state, run_fingerprint)
    ]
    # The data order depends on G = batch_size · grad_accum · world_size only, not on the three separately.
    saved_world = state.get("world_size")
    saved_g = state.get("global_batch")
    g = config.batch_size * config.grad_accum * world
    if saved_g is None:
        diffs.append(
            "data order: the checkpoint was written before the lane order (stage2_student/data.py; its state has no "
            "global_batch), so the rest of its epoch cannot be reproduced; start a new --out, or resume with the "
            "label-anneal version that wrote it"
        )
    elif saved_g != g:
        diffs.append(
            f"global batch (batch_size × grad_accum × processes): checkpoint {saved_g} "
            f"({saved.get('batch_size')} × {saved.get('grad_accum')} × {saved_world}) vs now {g} "
            f"({config.batch_size} × {config.grad_accum} × {world}); keep the product equal, e.g. "
            f"--grad-accum {_matching_accum(saved_g, config.batch_size, world)}"
        )
    elif config.replay_ratio > 0 and (saved_world, saved.get("batch_size")) != (world, config.batch_size):
        # The replay stream is laid out per micro-batch slot of batch_size sequences, not per lane.
        diffs.append(
            f"--replay-ratio with another process count or batch size: checkpoint {saved_world} processes × "
            f"batch {saved.get('batch_size')} vs now {world} × {config.batch_size}; resume replay runs on the same "
            f"number of processes and batch size"
        )
    if diffs:
        raise ValueError(
            f"cannot resume from {ckpt_dir}: settings differ:\n  "
            + "\n  ".join(diffs)
            + "\nResume with the same settings, or start a new --out directory."
        )


def _matching_accum(global_batch, batch_size: int, world: int) -> str:
    """The --grad-accum that gives `global_batch` with this batch size and process count, or advice if none does."""
    if isinstance(global_batch, int) and global_batch % (batch_size * world) == 0:
        return str(global_batch // (batch_size * world))
    return f"N with batch_size × N × {world} = {global_batch}"


def _build_anchors(config: StudentConfig, model, params, reader: RunReader, pad_id: int) -> list[AnchorPenalty]:
    anchors = []
    if config.l2_init > 0:
        anchors.append(AnchorPenalty(params, config.l2_init))
    if config.ewc > 0:
        n = min(config.ewc_sequences, len(reader))
        rows = [reader[i] for i in range(n)]
        batches = [collate_labels(rows[i : i + 4], pad_id=pad_id) for i in range(0, n, 4)]
        fisher = estimate_fisher(
            model,
            batches,
            reader.spec.capture,
            next(model.parameters()).device,
            seed=config.seed,
            sign_draws=config.ewc_sign_draws,
        )
        anchors.append(AnchorPenalty(params, config.ewc, weights=fisher))
    return anchors


def _apply_lora(model, config: StudentConfig):
    try:  # peft is an optional extra: pip install 'label-anneal[lora]'
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("--lora-r needs peft: pip install 'label-anneal[lora]'") from e
    lcfg = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lcfg)


# ------------------------------------------------------------------------------------------- fit, save, run


def fit(t: Training, config: StudentConfig) -> tuple[dict, float]:
    """Optimizer steps t.start .. t.total: batches, gradients, update, a metrics line, checkpoints.
    Returns (the last step's metrics, trained tokens of this invocation)."""
    acc = t.acc
    world = acc.num_processes
    metrics_path = config.out / "metrics.jsonl"
    t.model.train()
    tokens_done = 0
    last = {}
    bar = tqdm(
        total=t.total, initial=t.start, desc="student", unit="step", disable=not acc.is_main_process, dynamic_ncols=True
    )
    # Decoded and collated on the loader's thread, prefetch_steps ahead of this loop. Left early (an exception), the
    # generator's close stops the thread; it is a daemon thread, so it never holds the process open.
    steps = t.loader.iter_steps(t.start, t.total)
    checks = _ShareCheck(t.reader)  # this process's share of the sha256 checks, next to training
    for step in range(t.start, t.total):
        t0 = time.perf_counter()
        epoch = step // t.steps_per_epoch
        batches = next(steps)
        checks.raise_failure()
        replay = None if t.replay is None else replay_batches(acc, t.replay, batches, config, pad_id=t.pad_id)
        r = accumulate_gradients(acc, t.model, batches, config, replay, t.teacher, t.head)
        n_lab, n_rep = r.counts
        grad_norm, lr_now = _update(t, config)
        sums = acc.reduce(torch.stack([r.ce, r.kl, r.replay_ce, r.objective]), reduction="sum")
        tokens_done += n_lab + n_rep
        dt = time.perf_counter() - t0
        last = _step_metrics(config, t, step, epoch, sums, n_lab, n_rep, lr_now, grad_norm, dt)
        scored = live_eval.due(config, step + 1, t.total)
        if scored:  # every process: under FSDP the forward is collective
            last["eval"] = live_eval.evaluate(t.model, t.eval_sets, acc.device)
        if acc.is_main_process and ((step + 1) % config.log_every == 0 or step + 1 == t.total or scored):
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            trackers.log(acc, config.report_to, last)
        bar.set_postfix(ce=f"{last['ce']:.3f}", kl=f"{last['kl']:.3f}")
        bar.update(1)
        if config.save_every and ((step + 1) % config.save_every == 0 or step + 1 == t.total):
            _save_checkpoint(acc, config.out, step + 1, config, world, t.replay, t.reader.spec.fingerprint)
    steps.close()
    checks.finish()  # the run's shards are all checked before its result is saved
    bar.close()
    return last, tokens_done


class _ShareCheck:
    """`RunReader.verify_owned` on a daemon thread; its error (a corrupt shard) is raised in the training loop."""

    def __init__(self, reader: RunReader):
        # its own reader state is not needed: verify_owned reads only paths and receipts
        self._stop = threading.Event()
        self._failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(reader,), name="shard-checksums", daemon=True)
        self._thread.start()

    def _run(self, reader: RunReader) -> None:
        try:
            reader.verify_owned(self._stop)
        except BaseException as e:  # surfaced by raise_failure / finish
            self._failure.append(e)

    def raise_failure(self) -> None:
        if self._failure:
            self._stop.set()
            raise self._failure[0]

    def finish(self) -> None:
        self._thread.join()
        self.raise_failure()


def _update(t: Training, config: StudentConfig):
    """Anchor gradients, clipping, optimizer and schedule step. Returns (gradient norm, lr used)."""
    for a in t.anchors:
        a.add_grad()
    if config.max_grad_norm > 0:
        grad_norm = t.acc.clip_grad_norm_(t.params, config.max_grad_norm)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in t.params if p.grad is not None]))
    lr_now = t.sched.get_last_lr()[0]
    t.opt.step()
    t.sched.step()
    t.opt.zero_grad(set_to_none=True)
    return grad_norm, lr_now


def _step_metrics(
    config: StudentConfig,
    t: Training,
    step: int,
    epoch: int,
    sums: torch.Tensor,
    n_lab: float,
    n_rep: float,
    lr_now: float,
    grad_norm,
    dt: float,
) -> dict:
    """One metrics.jsonl line."""
    global_tokens = n_lab + n_rep
    # ce and kl per labelled position, replay_ce per replay position; total is the optimised loss per trained
    # position (every trained position counts once) plus the anchor penalty. kl is comparable across capture
    # modes (`loss_sums`); with sampled labels it is an unbiased estimate and may be slightly negative.
    last = {
        "step": step + 1,
        "epoch": epoch,
        "ce": sums[0].item() / max(n_lab, 1),
        "kl": sums[1].item() / max(n_lab, 1),
        "total": sums[3].item() / global_tokens + sum(a.value() for a in t.anchors),
        "lr": lr_now,
        "grad_norm": float(grad_norm),
        "trained_tokens": int(global_tokens),
        "tokens_per_s": global_tokens / dt,
        "step_s": dt,
    }
    if t.replay is not None:
        last["replay_ce"] = sums[2].item() / max(n_rep, 1)
        last["replay_tokens"] = int(n_rep)
        last["replay_share"] = t.replay.share()  # replay positions / all trained positions, over the run so far
    if t.anchors:
        last["anchor_penalty"] = sum(a.value() for a in t.anchors)
    return last


def save(t: Training, config: StudentConfig) -> Path | None:
    """The final model in Hugging Face format under OUT/model (with --save-model); its folder on the main process."""
    if not config.save_model:
        return None
    acc = t.acc
    acc.wait_for_everyone()
    # Collective under FSDP (gathers the shards); a plain state dict otherwise. Every rank must call it.
    full_state = acc.get_state_dict(t.model) if acc.distributed_type.name == "FSDP" else None
    if acc.is_main_process:
        model = acc.unwrap_model(t.model)
        try:
            return save_hf(model, t.tokenizer, config.out / "model", state_dict=full_state)
        except OSError as e:
            raise ModelSaveError(_rescue(model, t, config, full_state, e)) from None
    return None


class ModelSaveError(ValueError):
    """The final model could not be written; the message says where the trained weights are."""


RESCUE_ENV = "LABEL_ANNEAL_RESCUE_DIR"


def _rescue(model, t: Training, config: StudentConfig, full_state, error: OSError) -> str:
    """After a failed final save (a disk that filled up during training): where the trained weights are now, as
    the error message. A checkpoint of the last step holds them already; otherwise they are saved to another
    filesystem ($LABEL_ANNEAL_RESCUE_DIR, else the system's temporary directory)."""
    target = config.out / "model"
    why = f"could not write the final model to {target} ({error.strerror or error})"
    final_ckpt = ckpt.checkpoint_dir(config.out, t.total)
    if ckpt.is_complete(final_ckpt):
        return (
            f"{why}. The trained weights are safe in the checkpoint {final_ckpt}: free space on that filesystem, "
            f"then run the same command with --resume (it writes the model without training again)."
        )
    base = Path(os.environ.get(RESCUE_ENV) or tempfile.gettempdir())
    rescue = base / f"label-anneal-rescue-{config.out.name}-{secrets.token_hex(4)}" / "model"
    try:
        rescue.parent.mkdir(parents=True)
        save_hf(model, t.tokenizer, rescue, state_dict=full_state)
    except OSError as e2:
        return (
            f"{why}, and the fallback copy to {rescue} failed too ({e2.strerror or e2}): the trained weights are "
            f"lost. Free space (the model needs about {model_bytes(model):,} bytes) and train again; --save-every N "
            f"keeps checkpoints that survive this."
        )
    return (
        f"{why}. The trained weights were saved to {rescue} instead (a complete Hugging Face model folder): free "
        f"space, then move that folder to {target}, or use it where it is (`pipeline eval --model {rescue}`)."
    )


def check_out(config: StudentConfig, run_fingerprint: str) -> None:
    """Refuse an --out this run must not write into, before anything is loaded or written: a file; a non-empty
    folder that is neither this run's own output resumed (--resume) nor given up (--overwrite); a model/ folder
    holding files the final save would delete."""
    out = config.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory (it receives model/, checkpoints/, metrics.jsonl)")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries:
        shown = ", ".join(entries[:6]) + (f", ... ({len(entries)} entries)" if len(entries) > 6 else "")
        own = is_student_output(out)
        if config.resume:
            if own is None:
                raise ValueError(
                    f"--out {out} holds no student run to resume (no config.json written by `pipeline student`; "
                    f"it holds {shown}). Drop --resume and choose an empty --out."
                )
            if own.get("run_fingerprint") != run_fingerprint:
                raise ValueError(
                    f"--resume: {out} was trained on another run (its config.json names run fingerprint "
                    f"{own.get('run_fingerprint')}, --run-dir {config.run_dir} has {run_fingerprint}). Resume with "
                    f"that run's --run-dir, or choose a new --out."
                )
        elif not config.overwrite:
            raise ValueError(
                f"--out {out} is not empty (it holds {shown}); nothing was changed. Pass --resume to continue the run "
                f"written there, --overwrite to replace label-anneal's files in it (config.json, metrics.jsonl, "
                f"checkpoints/, model/; other files are kept), or choose a new --out."
            )
    if config.save_model:
        check_replaceable(out / "model", "--out")


def check_free_space(config: StudentConfig, model, params, total: int) -> None:
    """Refuse to train when the filesystem of --out cannot hold what the run writes: the final model, and with
    --save-every one checkpoint more than --keep-checkpoints (rotation deletes after the new one is complete)."""
    weights = model_bytes(model)
    need_model = weights if config.save_model else 0
    need_ckpt = 0
    if config.save_every:
        # accelerate's state: the weights, AdamW's two fp32 moments per trainable parameter, RNG and schedule
        per = weights + sum(2 * 4 * p.numel() for p in params)
        written = min(total // config.save_every + (total % config.save_every != 0), config.keep_checkpoints + 1)
        have = len(ckpt.complete_checkpoints(config.out))
        need_ckpt = per * max(written - have, 1 if written else 0)
    need = need_model + need_ckpt
    if need == 0:
        return
    need += (1 << 20) + need // 50  # tokenizer files, config, metrics: a margin
    free = free_bytes(config.out)
    if free < need:
        parts = f"the final model needs about {need_model:,} bytes" if need_model else ""
        if need_ckpt:
            parts += (" and " if parts else "") + (
                f"the checkpoints (--save-every {config.save_every}, --keep-checkpoints {config.keep_checkpoints}) "
                f"about {need_ckpt:,}"
            )
        raise ValueError(
            f"--out {config.out}: {parts} ({need:,} bytes with a margin), but its filesystem has {free:,} bytes "
            f"free. Free space, choose an --out on a larger filesystem"
            + (", or lower --keep-checkpoints / raise --save-every" if need_ckpt else "")
            + "; nothing was trained."
        )


def run(config: StudentConfig) -> dict:
    t = setup(config)
    t_start = time.perf_counter()
    last, tokens_done = fit(t, config)
    model_dir = save(t, config)
    elapsed = time.perf_counter() - t_start
    trackers.finish(t.acc, config.report_to)  # a no-op on the other processes (they hold no trackers)
    t.acc.wait_for_everyone()
    return {
        "out": str(config.out),
        "model_dir": str(model_dir) if model_dir else None,
        "steps": t.total,
        "start_step": t.start,
        "trained_tokens": int(tokens_done),
        "tokens_per_s": tokens_done / elapsed if elapsed > 0 else None,
        "final": last,
    }


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


def _save_checkpoint(
    acc, out: Path, step: int, config: StudentConfig, world: int, replay: ReplayMixer | None, run_fingerprint: str
) -> None:
    tmp = ckpt.begin(out, step) if acc.is_main_process else ckpt.tmp_dir(out, step)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {
            "step": step,
            "world_size": world,
            "global_batch": config.batch_size * config.grad_accum * world,
            "run_fingerprint": run_fingerprint,
            "config": config.to_dict(),
        }
        if replay is not None:  # the mixer's counts and cursor after this step: resume continues them exactly
            state["replay"] = replay.state()
        ckpt.commit(tmp, state, config.keep_checkpoints)
    acc.wait_for_everyone()


def summary_line(s: dict) -> str:
    f = s.get("final") or {}
    rate = f"{s['tokens_per_s']:,.0f} trained tok/s" if s.get("tokens_per_s") else "-"
    return (
        f"student: {s['steps']} steps ({s['steps'] - s['start_step']} this run), "
        f"{s['trained_tokens']:,} trained tokens, "
        f"{rate}, final CE {f.get('ce', float('nan')):.4f} KL {f.get('kl', float('nan')):.4f} -> "
        f"{s['model_dir'] or s['out']}"
    )
