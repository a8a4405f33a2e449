"""The configs of stage 2: `StudentConfig` (shared by `pipeline student`, `pipeline sweep` and the Python API),
`EvalConfig` (`pipeline eval`), `MergeConfig` (`pipeline merge`) and `SweepConfig` (`pipeline sweep`).

The command line imports this module to build its options, so it imports neither torch nor transformers:
`pipeline --help` must not pay seconds for them. The stage modules that run a config import them at the top.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from lm.dtypes import canonical_dtype
from storage import mode_of
from storage.fs import RemotePath, is_uri, location

from .trackers import parse_report_to


@dataclass(frozen=True)
class StudentConfig:
    # Not `--run`: torchrun's own argument parser swallows any option that abbreviates its `--run-path`.
    run_dir: RemotePath | Path = field(
        metadata={
            "help": "Run directory written by `pipeline teacher` (the stored soft labels): a local path or a URI "
            "(s3://, gs://, hdfs://)."
        }
    )
    out: Path = field(metadata={"help": "Output directory: checkpoints/, model/, metrics.jsonl, config.json."})
    kl_weight: float = field(default=1.0, metadata={"help": "λ in CE + λ·KL(teacher‖student); 0 = plain fine-tuning."})
    model: str | None = field(
        default=None,
        metadata={
            "help": "Student to start from (default: the teacher recorded in the run). Must share its tokenizer."
        },
    )
    gguf_file: str | None = field(
        default=None,
        metadata={"help": "GGUF file inside --model's folder (default: the run's, when --model is not given)."},
    )
    revision: str | None = field(
        default=None,
        metadata={
            "help": "Hub branch, tag or commit of --model (default: without --model, the teacher commit recorded in "
            "the run)."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Let transformers run the student's own Python code (models not built into transformers)."},
    )
    chat_template: Path | None = field(
        default=None,
        metadata={
            "help": "Jinja chat template FILE for the student's tokenizer, saved with OUT/model (default: the one "
            "the run recorded from the teacher's --chat-template, else the model's own). Must give the run's "
            "tokenizer fingerprint."
        },
    )
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps (overrides --epochs)."})
    epochs: float = field(
        default=1.0, metadata={"help": "Passes over the stored sequences (when --max-steps is not set)."}
    )
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
    kl_tail: str = field(
        default="bucket",
        metadata={
            "help": "bucket: KL on top-k + one tail category (default, recommended) | "
            "renorm: top-k renormalised (axolotl/DistillKit style)."
        },
    )
    divergence: str = field(
        default="forward",
        metadata={
            "help": "forward KL(teacher‖student) | reverse | jsd, on the top-k+tail support. reverse and jsd need "
            "a topk / topp run (sampled labels give undrawn tokens no teacher probability)."
        },
    )
    kd_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Distillation temperature applied in the loss (approximate over top-k + tail; see "
            "stage2_student/losses). Only 1 with a sample / hybrid run (tempered draw counts are biased)."
        },
    )
    loss_form: str = field(default="add", metadata={"help": "add: CE + λ·KL | mix: (1−λ)·CE + λ·KL."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0 = full fine-tuning). Needs peft."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    l2_init: float = field(
        default=0.0, metadata={"help": "Baseline L2-SP: (c/2)·||θ − θ0||² toward the initial weights (0 = off)."}
    )
    ewc: float = field(
        default=0.0,
        metadata={
            "help": "Baseline EWC: (c/2)·Σ F·(θ − θ0)² with F the base model's diagonal Fisher per trained token "
            "(the expected squared score, estimated from the stored labels; 0 = off)."
        },
    )
    ewc_sequences: int = field(default=16, metadata={"help": "Stored sequences used to estimate the EWC Fisher."})
    ewc_sign_draws: int = field(
        default=1,
        metadata={
            "help": "Backward passes per Fisher sequence (independent random signs); more lowers the estimate's "
            "variance (relative std ≈ √(2 / (sequences · draws)) per parameter)."
        },
    )
    replay_data: str | None = field(
        default=None,
        metadata={
            "help": "Baseline replay: a general text corpus (jsonl/txt/parquet) mixed into training with CE only."
        },
    )
    replay_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Share of the trained POSITIONS (labelled + replay) that are replay, over the run: whole replay "
            "sequences (CE only) are added on top of --batch-size whenever the running share falls below it."
        },
    )
    replay_text_field: str = field(default="text", metadata={"help": "Column of --replay-data holding text."})
    teacher_online: str | None = field(
        default=None,
        metadata={
            "help": "Reference, not the recommended path: run this frozen teacher on every micro-batch and use the "
            "exact full-vocabulary KL instead of the stored labels (costs a second model in memory and a teacher "
            "forward per step)."
        },
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "auto (bf16 autocast on GPU, fp32 on CPU) | fp32 (float32) | bf16 (bfloat16): the dtype "
            "spellings of every command (lm/dtypes.py)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for data order, init of adapters, dropout."})
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N optimizer steps (0: only at the end)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Complete checkpoints to keep."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest complete checkpoint in --out."})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Write into a non-empty --out that is not this run's to resume: replaces label-anneal's files "
            "there (config.json, metrics.jsonl, checkpoints/, model/); other files are kept."
        },
    )
    log_every: int = field(default=1, metadata={"help": "Write a metrics.jsonl line every N steps."})
    fused_head: str = field(
        default="auto",
        metadata={
            "help": "auto: apply the lm_head inside the loss, chunk by chunk, where that is exact "
            "(checked on the model; no (N, V) logits) | on: required | off: full logits."
        },
    )
    chunk_size: int = field(default=1024, metadata={"help": "Positions per chunk of the fused CE+KL (bounds memory)."})
    shuffle: bool = field(
        default=True,
        metadata={
            "help": "Shuffle each epoch: blocks of --shuffle-block rows in a random order, rows shuffled inside each "
            "block (stage2_student/data.py). Off: rows in stored order. Every row is trained once per epoch either way."
        },
    )
    shuffle_block: int = field(
        default=256,
        metadata={
            "help": "Rows per shuffled block (default: the shard writer's row-group size). Each of a process's "
            "batch_size × grad_accum lanes holds one decoded block: memory grows with it."
        },
    )
    prefetch_steps: int = field(
        default=2, metadata={"help": "Steps the loader thread decodes and collates ahead of the training loop."}
    )
    max_open_files: int = field(
        default=32, metadata={"help": "Shards each process keeps open at once (least recently used closed first)."}
    )
    verify: str = field(
        default="checksum",
        metadata={
            "help": "Shard checks: checksum (sizes at start; each process checks the sha256 of a shard when it "
            "first reads it) | size (sizes at start, footers when read) | none."
        },
    )
    save_model: bool = field(
        default=True, metadata={"help": "Write the final model in Hugging Face format to OUT/model."}
    )
    report_to: str = field(
        default="none",
        metadata={
            "help": "Experiment trackers, through accelerate's: tensorboard | wandb | mlflow | none, comma-separated "
            "for several. They get the metrics.jsonl numbers (train/..., eval/NAME/...); TensorBoard and W&B "
            "offline files go under OUT/trackers."
        },
    )
    tracker_project: str = field(
        default="label-anneal", metadata={"help": "Project (TensorBoard folder, W&B project, MLflow experiment)."}
    )
    eval_data: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "NAME=PATH held-out text corpus scored during training (repeat): NLL and exact KL(base‖student) "
            "per trained position, base = the run's teacher, whose log-probs are computed once at the start and "
            "cached in OUT/live_eval (stage2_student/live_eval.py).",
            "metavar": "NAME=PATH",
            "default_text": "none",
        },
    )
    eval_every: int = field(
        default=0,
        metadata={"help": "Score the --eval-data sets every N optimizer steps (0: only after the last step)."},
    )
    eval_max_sequences: int = field(
        default=16,
        metadata={
            "help": "Sequences of the run's --seq-len per --eval-data set (the first ones); bounds the time per "
            "evaluation and the cached base log-probs (positions × vocabulary × 4 bytes)."
        },
    )

    def __post_init__(self):
        object.__setattr__(self, "run_dir", location(self.run_dir))  # LocationError (a ValueError) for a bad URI
        object.__setattr__(self, "out", _local_out(self.out))
        if self.chat_template is not None:
            object.__setattr__(self, "chat_template", Path(self.chat_template))
        eval_data = (self.eval_data,) if isinstance(self.eval_data, str) else tuple(self.eval_data or ())
        object.__setattr__(self, "eval_data", eval_data)
        p = []

        def finite(x):
            return isinstance(x, (int, float)) and math.isfinite(x)

        if not finite(self.kl_weight) or self.kl_weight < 0:
            p.append(f"kl_weight={self.kl_weight}: must be a finite number >= 0")
        if self.loss_form not in ("add", "mix"):
            p.append(f"loss_form={self.loss_form!r}: choose add or mix")
        elif self.loss_form == "mix" and self.kl_weight > 1:
            p.append(
                f"kl_weight={self.kl_weight} with loss_form=mix gives CE a negative weight; "
                "use λ in [0, 1] or --loss-form add"
            )
        if self.max_steps is not None and self.max_steps < 1:
            p.append(f"max_steps={self.max_steps}: must be >= 1")
        if not finite(self.epochs) or self.epochs <= 0:
            p.append(f"epochs={self.epochs}: must be > 0")
        for name in (
            "batch_size",
            "grad_accum",
            "log_every",
            "chunk_size",
            "keep_checkpoints",
            "shuffle_block",
            "prefetch_steps",
            "max_open_files",
        ):
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
        if self.precision != "auto":
            try:  # any spelling of the table; stored as fp32 / bf16
                canon = canonical_dtype(self.precision, option="--precision", allow_fp16=False)
                object.__setattr__(self, "precision", {"float32": "fp32", "bfloat16": "bf16"}[canon])
            except ValueError as e:
                p.append(str(e))
        for name in ("l2_init", "ewc"):
            v = getattr(self, name)
            if not finite(v) or v < 0:
                p.append(f"{name}={v}: must be a finite number >= 0")
        if self.ewc_sequences < 1:
            p.append(f"ewc_sequences={self.ewc_sequences}: must be >= 1")
        if self.ewc_sign_draws < 1:
            p.append(f"ewc_sign_draws={self.ewc_sign_draws}: must be >= 1")
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
        if self.resume and self.overwrite:
            p.append("--resume continues the run in --out and --overwrite replaces it: give one of them")
        try:
            parse_report_to(self.report_to)
        except ValueError as e:
            p.append(str(e))
        if self.eval_data:
            p += [f"--eval-{m}" for m in parse_data(self.eval_data)[1]]
        elif self.eval_every:
            p.append(f"--eval-every {self.eval_every} without --eval-data: give the sets to score, as NAME=PATH")
        if self.eval_every < 0:
            p.append(f"--eval-every {self.eval_every}: must be >= 0")
        if self.eval_max_sequences < 1:
            p.append(f"--eval-max-sequences {self.eval_max_sequences}: must be >= 1")
        if p:
            raise ValueError("invalid student config:\n  " + "\n  ".join(p))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["run_dir"], d["out"] = str(self.run_dir), str(self.out)
        d["eval_data"] = list(self.eval_data)
        d["chat_template"] = None if self.chat_template is None else str(self.chat_template)
        return d

    def run_problems(self, capture: dict) -> list[str]:
        """What this config cannot do with a run captured as `capture` (run.json's capture dict); each problem
        names the option as typed, the capture mode and what to use instead. Empty when the combination is
        supported (README, "Which stage-2 options each capture mode supports")."""
        mode = mode_of(capture)
        if not mode.sampled or self.teacher_online:  # the online teacher replaces the stored labels in the KL
            return []
        how = f"a run captured as {mode.name} (draws from the teacher)"
        p = []
        if self.divergence != "forward":
            p.append(
                f"--divergence {self.divergence} with {how}: an undrawn token has no stored teacher probability, so "
                f"{'the reverse KL' if self.divergence == 'reverse' else 'the JSD'} would charge it as impossible "
                f"(a biased loss and gradient). Use --divergence forward (unbiased with sampled labels), or capture "
                f"the run with --capture topk (or topp) for reverse KL / JSD"
            )
        if self.kd_temperature != 1.0:
            p.append(
                f"--kd-temperature {self.kd_temperature:g} with {how}: tempering the empirical draw counts is biased "
                f"(E[softmax(log(c/N)/τ)] ≠ softmax(log p/τ)). Use --kd-temperature 1 with this run, or capture with "
                f"--capture topk for a tempered loss (approximate over the top k + tail), or --teacher-online (exact)"
            )
        if self.kl_tail != "bucket":
            p.append(
                f"--kl-tail {self.kl_tail} with {how}: renormalising the student over the drawn ids (a random "
                f"support) biases the gradient. Use --kl-tail bucket (the default) with sampled labels"
            )
        return p

    def check_run(self, capture: dict, run_dir: Path | str) -> None:
        """ValueError listing `run_problems`, before any work starts."""
        p = self.run_problems(capture)
        if p:
            raise ValueError(f"invalid student config for the run in {run_dir}:\n  " + "\n  ".join(p))

    def replace(self, **kw) -> "StudentConfig":
        return dataclasses.replace(self, **kw)


# ------------------------------------------------------------------------------------------- pipeline eval

# Model dtypes `pipeline eval` accepts besides "auto": every spelling of fp32 / bf16 in lm/dtypes.py. fp16 is left
# out on purpose: its range overflows full-vocabulary logits.


@dataclass(frozen=True)
class EvalConfig:
    model: str = field(
        metadata={"help": "Model to evaluate: a folder (e.g. OUT/model of `pipeline student`) or a hub name."}
    )
    data: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "A corpus as NAME=PATH (a .jsonl/.json/.parquet/.txt file or a folder of them); repeat for "
            "several, e.g. --data target=math.jsonl --data retention=prose.jsonl. Needed unless --lm-eval-tasks "
            "is given.",
            "metavar": "NAME=PATH",
            "default_text": "none",
        },
    )
    base: str | None = field(
        default=None,
        metadata={
            "help": "Base model for KL(base‖model) per token; must share the model's tokenizer. Without it, kl is null."
        },
    )
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside --model's folder."})
    base_gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside --base's folder."})
    seq_len: int = field(
        default=512,
        metadata={"help": "packed: tokens per packed sequence; lm-eval: the context window (lm-eval's max_length)."},
    )
    convention: str = field(
        default="packed",
        metadata={
            "help": "Which tokens are scored. packed: documents tokenized as the teacher stores them (BOS if the "
            "tokenizer adds one), joined by EOS and packed into --seq-len sequences; every position after a "
            "sequence's first is scored, each document's EOS included (training's 'per token'). lm-eval: "
            "lm-evaluation-harness's loglikelihood_rolling: each document alone, without special tokens, after "
            "one prefix token (BOS, else EOS) that is not scored, no EOS, in rolling windows of --seq-len."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    max_sequences: int | None = field(
        default=None, metadata={"help": "Evaluate at most this many sequences per corpus (the first ones)."}
    )
    text_field: str = field(default="text", metadata={"help": "Column holding the text in jsonl/json/parquet corpora."})
    json_out: Path | None = field(
        default=None, metadata={"help": "Also write the results (and this config) to this JSON file."}
    )
    device: str = field(default="auto", metadata={"help": "auto (cuda when available) | cpu | cuda[:i]."})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Model dtype: auto (bf16 on GPU, fp32 on CPU) | fp32 (float32) | bf16 (bfloat16). Log-softmax "
            "and KL are always fp32."
        },
    )
    lm_eval_tasks: str | None = field(
        default=None,
        metadata={"help": "Comma-separated lm-evaluation-harness tasks to run too (needs `pip install lm_eval`)."},
    )
    lm_eval_include: Path | None = field(
        default=None, metadata={"help": "Folder of extra lm-eval task YAMLs (local tasks on local files run offline)."}
    )
    lm_eval_limit: int | None = field(default=None, metadata={"help": "At most this many documents per lm-eval task."})

    def __post_init__(self):
        data = (self.data,) if isinstance(self.data, str) else tuple(self.data or ())
        object.__setattr__(self, "data", data)
        for name in ("json_out", "lm_eval_include"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        p = []
        if not self.model:
            p.append("model: required (a folder or a hub name)")
        if data or not self.lm_eval_tasks:  # lm-eval tasks alone need no corpus
            p += parse_data(data)[1]
        if self.convention not in ("packed", "lm-eval"):
            p.append(f"--convention {self.convention!r}: choose packed or lm-eval")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            p.append(f"seq_len={self.seq_len}: must be an int >= 2 (T tokens give T-1 predictions)")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            p.append(f"batch_size={self.batch_size}: must be >= 1")
        if self.max_sequences is not None and self.max_sequences < 1:
            p.append(f"max_sequences={self.max_sequences}: must be >= 1 (or unset for all)")
        if self.lm_eval_limit is not None and self.lm_eval_limit < 1:
            p.append(f"lm_eval_limit={self.lm_eval_limit}: must be >= 1 (or unset for all)")
        if self.lm_eval_include is not None and not self.lm_eval_include.is_dir():
            p.append(f"lm_eval_include={self.lm_eval_include}: no such folder")
        if self.lm_eval_include is not None and not self.lm_eval_tasks:
            p.append("lm_eval_include is set but lm_eval_tasks is not: name the tasks to run")
        p += device_dtype_problems(self.device, self.dtype)
        if p:
            raise ValueError("invalid eval config:\n  " + "\n  ".join(p))

    @property
    def corpora(self) -> dict[str, Path]:
        return parse_data(self.data)[0]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["data"] = list(self.data)
        for name in ("json_out", "lm_eval_include"):
            d[name] = None if d[name] is None else str(d[name])
        return d


def parse_data(entries) -> tuple[dict[str, Path], list[str]]:
    """({name: path}, problems) from "NAME=PATH" strings; each problem names its entry."""
    corpora: dict[str, Path] = {}
    problems = []
    if not entries:
        problems.append("data: give at least one corpus as NAME=PATH (e.g. --data target=math.jsonl)")
    for entry in entries:
        if not isinstance(entry, str) or "=" not in entry:
            problems.append(f"data entry {entry!r}: expected NAME=PATH (e.g. target=math.jsonl)")
            continue
        name, path = (s.strip() for s in entry.split("=", 1))
        if not name or not path:
            problems.append(f"data entry {entry!r}: both NAME and PATH must be non-empty")
            continue
        if name in corpora:
            problems.append(f"data entry {entry!r}: the name {name!r} is used twice; give each corpus its own name")
            continue
        p = Path(path).expanduser()
        if not p.exists():
            problems.append(f"data entry {entry!r}: {path} does not exist")
            continue
        corpora[name] = p
    return corpora, problems


def device_dtype_problems(device: str, dtype: str) -> list[str]:
    """What is wrong with an eval --device / --dtype pair (empty when nothing is)."""
    p = []
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        p.append(f"device={device!r}: choose auto, cpu, cuda or cuda:N")
    if dtype != "auto":
        try:
            canonical_dtype(dtype, option="--dtype", allow_fp16=False)
        except ValueError as e:
            p.append(str(e))
    return p


# ------------------------------------------------------------------------------------------- pipeline merge


@dataclass(frozen=True)
class MergeConfig:
    base: str = field(metadata={"help": "The base model (a folder or a hub name): θ at α = 0."})
    tuned: str = field(
        metadata={
            "help": "The fine-tuned model (a folder): θ at α = 1. Must share the base's architecture and tokenizer."
        }
    )
    alpha: float = field(
        metadata={
            "help": "θ = (1−α)·θ_base + α·θ_tuned: 0 = base, 1 = tuned, (0,1) = WiSE-FT, "
            "> 1 = ExPO extrapolation (warns above 3)."
        }
    )
    out: Path = field(
        metadata={"help": "Output folder for the merged model (Hugging Face format, written atomically)."}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace an existing model folder at --out (else a non-empty --out is refused)."},
    )

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        p = []
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not math.isfinite(self.alpha):
            p.append(f"alpha={self.alpha!r}: must be a finite number")
        elif self.alpha < 0:
            p.append(f"alpha={self.alpha}: must be >= 0 (0 = base, 1 = tuned, > 1 extrapolates away from the base)")
        if not self.base or not self.tuned:
            p.append("base and tuned are both required")
        if p:
            raise ValueError("invalid merge config:\n  " + "\n  ".join(p))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d


# ------------------------------------------------------------------------------------------- pipeline sweep


def parse_floats(text: str | None, name: str) -> list[float]:
    """The values of a comma-separated option such as --kl-weights "0,0.3,1" (finite, >= 0)."""
    if text in (None, ""):
        return []
    try:
        vals = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--{name.replace('_', '-')} {text!r}: expected comma-separated numbers, e.g. 0,0.3,1"
        ) from None
    if any(not math.isfinite(v) or v < 0 for v in vals):
        raise ValueError(f"--{name.replace('_', '-')} {text!r}: values must be finite and >= 0")
    return vals


@dataclass(frozen=True)
class SweepConfig:
    run_dir: RemotePath | Path = field(
        metadata={"help": "Run directory of stored labels (from `pipeline teacher`): a local path or a URI."}
    )
    out: Path = field(metadata={"help": "Sweep directory: runs/NAME per student, sweep.json, sweep.md, tradeoff.png."})
    kl_weights: str = field(default="0,1", metadata={"help": "Comma-separated λ values (0 = direct fine-tuning)."})
    lrs: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated learning rates crossed with the λ values (default: the student's --lr). "
            "Lower-lr direct fine-tuning is the honest baseline."
        },
    )
    l2_inits: str | None = field(
        default=None, metadata={"help": "Comma-separated L2-SP coefficients (baseline, λ=0, first lr)."}
    )
    ewc_weights: str | None = field(
        default=None, metadata={"help": "Comma-separated EWC coefficients (baseline, λ=0, first lr)."}
    )
    replay_ratios: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated replay ratios, each the share of trained positions that are replay "
            "(baseline, λ=0, first lr; needs --replay-data)."
        },
    )
    merge_alphas: str | None = field(
        default=None, metadata={"help": "Comma-separated WiSE-FT α: base + α·(λ=0 model − base), per lr."}
    )
    eval_data: tuple = field(
        default=(),
        metadata={
            "help": "NAME=PATH held-out corpora (repeat); 'target' is the fine-tuning domain, the rest retention."
        },
    )
    seeds: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated seeds, e.g. 0,1,2: every configuration (and merge) is trained once per seed; "
            "sweep.md shows the mean over seeds and tradeoff.png ± one standard deviation as error bars "
            "(default: the student's --seed, once)."
        },
    )
    eval_seq_len: int = field(default=256, metadata={"help": "Tokens per evaluation sequence."})
    eval_max_sequences: int | None = field(default=None, metadata={"help": "Cap on evaluation sequences per corpus."})
    student: dict = field(
        default_factory=dict, metadata={"help": "Other StudentConfig fields shared by every student."}
    )

    def __post_init__(self):
        object.__setattr__(self, "run_dir", location(self.run_dir))  # LocationError (a ValueError) for a bad URI
        object.__setattr__(self, "out", _local_out(self.out))
        object.__setattr__(self, "eval_data", tuple(self.eval_data))
        problems = []
        for name in ("kl_weights", "lrs", "l2_inits", "ewc_weights", "replay_ratios", "merge_alphas"):
            try:
                parse_floats(getattr(self, name), name)
            except ValueError as e:
                problems.append(str(e))
        try:
            self.seed_list()
        except ValueError as e:
            problems.append(str(e))
        if not parse_floats(self.kl_weights, "kl_weights"):
            problems.append("--kl-weights: give at least one λ")
        if parse_floats(self.merge_alphas, "merge_alphas") and 0.0 not in parse_floats(self.kl_weights, "kl_weights"):
            problems.append("--merge-alphas interpolates the λ=0 model: include 0 in --kl-weights")
        if parse_floats(self.replay_ratios, "replay_ratios") and not self.student.get("replay_data"):
            problems.append("--replay-ratios needs --replay-data")
        bad = {k for k in self.student if k not in {f.name for f in dataclasses.fields(StudentConfig)}}
        if bad:
            problems.append(f"unknown student setting(s) {sorted(bad)}")
        for k in ("run_dir", "out", "kl_weight", "resume", "overwrite"):
            if k in self.student:
                problems.append(f"student setting {k!r} is set by the sweep itself")
        if self.eval_seq_len < 2:
            problems.append("--eval-seq-len must be >= 2")
        if problems:
            raise ValueError("invalid sweep config:\n  " + "\n  ".join(problems))

    def seed_list(self) -> list[int]:
        """The --seeds values (default: the student's seed, once)."""
        if self.seeds in (None, ""):
            return [int(self.student.get("seed", StudentConfig.__dataclass_fields__["seed"].default))]
        try:
            vals = [int(x) for x in str(self.seeds).split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--seeds {self.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
        if not vals or len(set(vals)) != len(vals):
            raise ValueError(f"--seeds {self.seeds!r}: give distinct integers, e.g. 0,1,2")
        if "seed" in self.student:
            raise ValueError("give either --seed or --seeds, not both")
        return vals

    def plan(self) -> list[tuple[str, dict, dict]]:
        """[(name, StudentConfig overrides, description)] for every student to train: each configuration once per
        seed; with several seeds the names end in _seedN and the description's `config` names the configuration."""
        seeds = self.seed_list()
        if len(seeds) == 1 and self.seeds in (None, ""):
            return self._plan_one_seed()
        out = []
        for seed in seeds:
            for name, overrides, desc in self._plan_one_seed():
                out.append((f"{name}_seed{seed}", {**overrides, "seed": seed}, {**desc, "seed": seed, "config": name}))
        return out

    def _plan_one_seed(self) -> list[tuple[str, dict, dict]]:
        s = dict(self.student)
        lrs = parse_floats(self.lrs, "lrs") or [s.get("lr", StudentConfig.__dataclass_fields__["lr"].default)]
        out = []
        for lr in lrs:
            for lam in parse_floats(self.kl_weights, "kl_weights"):
                out.append(
                    (
                        f"kl{lam:g}_lr{lr:g}",
                        {**s, "kl_weight": lam, "lr": lr},
                        {"method": "direct fine-tuning" if lam == 0 else "label annealing", "kl_weight": lam, "lr": lr},
                    )
                )
        lr0 = lrs[0]
        for c in parse_floats(self.l2_inits, "l2_inits"):
            out.append(
                (
                    f"l2_{c:g}_lr{lr0:g}",
                    {**s, "kl_weight": 0.0, "lr": lr0, "l2_init": c},
                    {"method": "L2-SP", "l2_init": c, "lr": lr0},
                )
            )
        for c in parse_floats(self.ewc_weights, "ewc_weights"):
            out.append(
                (
                    f"ewc_{c:g}_lr{lr0:g}",
                    {**s, "kl_weight": 0.0, "lr": lr0, "ewc": c},
                    {"method": "EWC", "ewc": c, "lr": lr0},
                )
            )
        for r in parse_floats(self.replay_ratios, "replay_ratios"):
            out.append(
                (
                    f"replay_{r:g}_lr{lr0:g}",
                    {**s, "kl_weight": 0.0, "lr": lr0, "replay_ratio": r},
                    {"method": "replay", "replay_ratio": r, "lr": lr0},
                )
            )
        return out


def _local_out(out) -> Path:
    """Stage-2 outputs (checkpoints, model, metrics) are local: a URI here is refused before any work."""
    if is_uri(str(out)) or re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", str(out)):  # Path("s3://b") is "s3:/b"
        raise ValueError(
            f"out={out}: stage-2 outputs go to a local directory (or a mounted one); the run directory "
            f"(--run-dir) may be a bucket, --out may not. Copy the output up afterwards"
        )
    return Path(out)
