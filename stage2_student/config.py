"""The one config of stage 2, shared by `pipeline student`, `pipeline sweep` and the Python API."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class StudentConfig:
    # Not `--run`: torchrun's own argument parser swallows any option that abbreviates its `--run-path`.
    run_dir: Path = field(metadata={"help": "Run directory written by `pipeline teacher` (the stored soft labels)."})
    out: Path = field(metadata={"help": "Output directory: checkpoints/, model/, metrics.jsonl, config.json."})
    kl_weight: float = field(default=1.0, metadata={"help": "λ in CE + λ·KL(teacher‖student); 0 = plain fine-tuning."})
    model: str | None = field(default=None, metadata={"help": "Student to start from (default: the teacher recorded in the run). Must share its tokenizer."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside --model's folder (default: the run's, when --model is not given)."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps (overrides --epochs)."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the stored sequences (when --max-steps is not set)."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per micro-batch per process."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    lr: float = field(default=2e-5, metadata={"help": "Peak learning rate (AdamW)."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Cosine schedule floor as a fraction of --lr."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    lr_schedule: str = field(default="cosine", metadata={"help": "cosine | constant (after warm-up)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW β1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW β2."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0 disables)."})
    kl_tail: str = field(default="bucket", metadata={"help": "bucket: KL on top-k + one tail category (default, recommended) | renorm: top-k renormalised (axolotl/DistillKit style)."})
    divergence: str = field(default="forward", metadata={"help": "forward KL(teacher‖student) | reverse | jsd, on the top-k+tail support."})
    kd_temperature: float = field(default=1.0, metadata={"help": "Distillation temperature applied in the loss (approximate over top-k + tail; see losses.py)."})
    loss_form: str = field(default="add", metadata={"help": "add: CE + λ·KL | mix: (1−λ)·CE + λ·KL."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0 = full fine-tuning). Needs peft."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    l2_init: float = field(default=0.0, metadata={"help": "Baseline L2-SP: (c/2)·||θ − θ0||² toward the initial weights (0 = off)."})
    ewc: float = field(default=0.0, metadata={"help": "Baseline EWC: (c/2)·Σ F·(θ − θ0)² with a diagonal Fisher of the base model (0 = off)."})
    ewc_sequences: int = field(default=16, metadata={"help": "Stored sequences used to estimate the EWC Fisher."})
    replay_data: str | None = field(default=None, metadata={"help": "Baseline replay: a general text corpus (jsonl/txt/parquet) mixed into training with CE only."})
    replay_ratio: float = field(default=0.0, metadata={"help": "Fraction of each micro-batch's sequences that are replay (added on top of --batch-size)."})
    replay_text_field: str = field(default="text", metadata={"help": "Column of --replay-data holding text."})
    teacher_online: str | None = field(default=None, metadata={"help": "Reference, not the recommended path: run this frozen teacher on every micro-batch and use the exact full-vocabulary KL instead of the stored labels (costs a second model in memory and a teacher forward per step)."})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16."})
    seed: int = field(default=0, metadata={"help": "Seed for data order, init of adapters, dropout."})
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N optimizer steps (0: only at the end)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Complete checkpoints to keep."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest complete checkpoint in --out."})
    log_every: int = field(default=1, metadata={"help": "Write a metrics.jsonl line every N steps."})
    fused_head: str = field(default="auto", metadata={"help": "auto: apply the lm_head inside the loss, chunk by chunk, where that is exact (checked on the model; no (N, V) logits) | on: required | off: full logits."})
    chunk_size: int = field(default=1024, metadata={"help": "Positions per chunk of the fused CE+KL (bounds memory)."})
    shuffle: bool = field(default=True, metadata={"help": "Shuffle rows each epoch (row-group blocks, then rows in a window)."})
    verify: str = field(default="checksum", metadata={"help": "Shard check before training: checksum | size | none."})
    save_model: bool = field(default=True, metadata={"help": "Write the final model in Hugging Face format to OUT/model."})

    def __post_init__(self):
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        object.__setattr__(self, "out", Path(self.out))
        p = []
        finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)
        if not finite(self.kl_weight) or self.kl_weight < 0:
            p.append(f"kl_weight={self.kl_weight}: must be a finite number >= 0")
        if self.loss_form not in ("add", "mix"):
            p.append(f"loss_form={self.loss_form!r}: choose add or mix")
        elif self.loss_form == "mix" and self.kl_weight > 1:
            p.append(f"kl_weight={self.kl_weight} with loss_form=mix gives CE a negative weight; use λ in [0, 1] or --loss-form add")
        if self.max_steps is not None and self.max_steps < 1:
            p.append(f"max_steps={self.max_steps}: must be >= 1")
        if not finite(self.epochs) or self.epochs <= 0:
            p.append(f"epochs={self.epochs}: must be > 0")
        for name in ("batch_size", "grad_accum", "log_every", "chunk_size", "keep_checkpoints"):
            if getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)}: must be >= 1")
        if not finite(self.lr) or self.lr <= 0:
            p.append(f"lr={self.lr}: must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            p.append(f"min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if self.warmup_steps < 0 or self.save_every < 0 or self.lora_r < 0:
            p.append("warmup_steps, save_every and lora_r must be >= 0")
        if self.fused_head not in ("auto", "on", "off"):
            p.append(f"fused_head={self.fused_head!r}: choose auto, on or off")
        if self.lr_schedule not in ("cosine", "constant"):
            p.append(f"lr_schedule={self.lr_schedule!r}: choose cosine or constant")
        if self.kl_tail not in ("bucket", "renorm"):
            p.append(f"kl_tail={self.kl_tail!r}: choose bucket or renorm")
        if self.divergence not in ("forward", "reverse", "jsd"):
            p.append(f"divergence={self.divergence!r}: choose forward, reverse or jsd")
        if not finite(self.kd_temperature) or self.kd_temperature <= 0:
            p.append(f"kd_temperature={self.kd_temperature}: must be > 0")
        if self.precision not in ("auto", "fp32", "bf16"):
            p.append(f"precision={self.precision!r}: choose auto, fp32 or bf16 (fp16 is not supported: its range "
                     f"overflows full-vocabulary logits; use bf16)")
        for name in ("l2_init", "ewc"):
            v = getattr(self, name)
            if not finite(v) or v < 0:
                p.append(f"{name}={v}: must be a finite number >= 0")
        if self.ewc_sequences < 1:
            p.append(f"ewc_sequences={self.ewc_sequences}: must be >= 1")
        if not 0 <= self.replay_ratio < 1:
            p.append(f"replay_ratio={self.replay_ratio}: must be in [0, 1)")
        if self.replay_ratio > 0 and not self.replay_data:
            p.append("replay_ratio > 0 needs --replay-data (a general corpus to replay)")
        if self.replay_data and self.replay_ratio == 0:
            p.append("--replay-data given but --replay-ratio is 0; set a ratio such as 0.25")
        if self.teacher_online and self.divergence != "forward":
            p.append("--teacher-online supports --divergence forward only (the exact full-vocabulary KL)")
        if self.verify not in ("checksum", "size", "none"):
            p.append(f"verify={self.verify!r}: choose checksum, size or none")
        if not 0 <= self.adam_beta1 < 1 or not 0 <= self.adam_beta2 < 1:
            p.append("adam betas must be in [0, 1)")
        if p:
            raise ValueError("invalid student config:\n  " + "\n  ".join(p))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["run_dir"], d["out"] = str(self.run_dir), str(self.out)
        return d

    def replay_per_micro_batch(self) -> int:
        """Replay sequences added to each micro-batch so that they make up `replay_ratio` of it."""
        if self.replay_ratio <= 0:
            return 0
        return max(1, round(self.batch_size * self.replay_ratio / (1 - self.replay_ratio)))

    def replace(self, **kw) -> "StudentConfig":
        return dataclasses.replace(self, **kw)
