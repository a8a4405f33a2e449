"""The one config of stage 1, shared by `pipeline teacher` and the Python API."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from lm.dtypes import canonical_dtype
from storage import MODES, Encoding
from storage.fs import RemotePath, is_remote, location

from .engines import ENGINE_NAMES


def _one_of(names) -> str:
    names = list(names)
    return ", ".join(names[:-1]) + " or " + names[-1]


# Defaults of the mode options. They are None in the dataclass so that an option the user GAVE can be told from
# one left at its default: under --capture auto an explicit --top-k / --top-p / --draws picks the mode, and an
# option the chosen mode would ignore is an error instead of being dropped silently.
MODE_OPTION_DEFAULTS = {"top_k": 32, "top_p": 0.99, "min_k": 4, "draws": 32}
# The modes each option means something for (an option given with another mode is refused).
MODE_OPTION_USERS = {
    "top_k": ("topk", "topp", "hybrid"),
    "top_p": ("topp",),
    "min_k": ("topp",),
    "draws": ("sample", "hybrid"),
}


VLLM_OPTIONS = ("tensor_parallel_size", "max_model_len", "gpu_memory_utilization")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_shard_index() -> int | None:
    # SLURM array jobs and Kubernetes Indexed Jobs say which work unit this process is.
    for var in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"):
        v = os.environ.get(var)
        if v not in (None, ""):
            return int(v)
    return None


def _env_num_shards() -> int | None:
    v = os.environ.get("SLURM_ARRAY_TASK_COUNT")
    return int(v) if v else None


@dataclass(frozen=True)
class TeacherConfig:
    model: str = field(
        metadata={"help": "Teacher: a local Hugging Face folder, a hub name, or a folder holding --gguf-file."}
    )
    data: str = field(
        metadata={"help": "Corpus: .jsonl/.json/.parquet/.txt file, a directory of them, or a hub dataset name."}
    )
    out: RemotePath | Path = field(
        metadata={"help": "Run directory to create or resume: a local path, or s3://, gs://, hdfs:// (storage.fs)."}
    )
    top_k: int | None = field(
        default=None,
        metadata={
            "help": "Teacher log-probs kept per trained position (topk; the cap for topp; the exact head for "
            "hybrid). Under --capture auto, giving it selects topk.",
            "default_text": MODE_OPTION_DEFAULTS["top_k"],
        },
    )
    capture: str = field(
        default="auto",
        metadata={
            "help": "What to store per position: auto (default: sample, with either engine; the best retention per "
            "byte, bench/RESULTS.md; an explicit --top-k "
            "selects topk, --top-p / --min-k topp, --draws sample) | "
            + " | ".join(f"{m.name} ({m.help})" for m in MODES.values())
            + ". See storage/capture.py."
        },
    )
    top_p: float | None = field(
        default=None,
        metadata={
            "help": "topp: keep the smallest prefix holding this much teacher mass.",
            "default_text": MODE_OPTION_DEFAULTS["top_p"],
        },
    )
    min_k: int | None = field(
        default=None,
        metadata={
            "help": "topp: at least this many entries per position.",
            "default_text": MODE_OPTION_DEFAULTS["min_k"],
        },
    )
    draws: int | None = field(
        default=None,
        metadata={
            "help": "sample / hybrid: draws per position from the teacher (hybrid: from its tail).",
            "default_text": MODE_OPTION_DEFAULTS["draws"],
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "sample / hybrid: seed of the draws (each sequence's draws depend on (seed, sample id) only)."
        },
    )
    seq_len: int = field(default=1024, metadata={"help": "Tokens per stored sequence (documents are packed)."})
    engine: str = field(
        default="auto", metadata={"help": "auto | hf | vllm (auto: vllm when installed and a GPU is present)."}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Teacher compute dtype: auto (bf16 on GPU, fp32 on CPU) | fp32 (float32) | bf16 (bfloat16) | "
            "fp16 (float16, half): the dtype spellings of every command (lm/dtypes.py)."
        },
    )
    device: str = field(default="auto", metadata={"help": "hf engine device: auto | cpu | cuda[:i]."})
    batch_size: int = field(default=8, metadata={"help": "Sequences scored per engine call."})
    num_shards: int | None = field(
        default=None, metadata={"help": "Work units (shard files); default SLURM_ARRAY_TASK_COUNT or 1."}
    )
    shard_index: int | None = field(
        default=None,
        metadata={"help": "Only this shard (default: SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX, else all)."},
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "Stop after this many sequences (a prefix of the corpus)."}
    )
    text_field: str = field(default="text", metadata={"help": "Column holding plain text."})
    messages_field: str | None = field(
        default=None, metadata={"help": "Column holding chat messages [{role, content}] (switches to chat mode)."}
    )
    train_on_prompt: bool = field(default=False, metadata={"help": "Chat mode: also train on prompt tokens."})
    allow_roles: str | None = field(
        default=None,
        metadata={
            "help": "Chat mode: comma-separated message roles to render although the chat template does not name "
            "them (else such a row is an error listing the template's roles)."
        },
    )
    pack: bool = field(
        default=True,
        metadata={"help": "Pack documents (EOS-separated) into full sequences; else one document per sequence."},
    )
    split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file inside --model's folder, loaded through transformers."}
    )
    revision: str | None = field(
        default=None,
        metadata={
            "help": "Hub branch, tag or commit of --model (a hub name; refused for a local folder). The commit "
            "used is recorded in run.json."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Let transformers run the model's own Python code (models not built into transformers)."},
    )
    chat_template: Path | None = field(
        default=None,
        metadata={
            "help": "Jinja chat template FILE that replaces the tokenizer's own for chat rows (--messages-field); "
            "recorded in run.json, and stage 2 gives the student the same one."
        },
    )
    encoding: str = field(
        default="compact", metadata={"help": "Shard encoding: compact | exact | key=value list (see storage/codec.py)."}
    )
    store_draw_logprobs: bool = field(
        default=False,
        metadata={
            "help": "Sampled modes: also store the drawn ids' log-probs (diagnostics: stage 2 then logs an unbiased "
            "KL estimate; +~25% bytes). The loss never reads them."
        },
    )
    ray: bool = field(
        default=False,
        metadata={
            "help": "Score the pending shards on a Ray cluster (Ray Data, one engine per worker); "
            "needs the [ray] extra."
        },
    )
    ray_address: str | None = field(
        default=None,
        metadata={
            "help": "Ray cluster to join: auto (the cluster of this node) or HEAD:6379; "
            "default: RAY_ADDRESS, else a local instance."
        },
    )
    num_workers: int = field(
        default=1,
        metadata={
            "help": "With --ray: engines scoring shards at once "
            "(one GPU each when the cluster has GPUs, else CPU workers)."
        },
    )

    # vLLM engine options (issue 19), passed to vllm.LLM; None: vLLM's own default. Refused with --engine hf.
    tensor_parallel_size: int | None = field(
        default=None, metadata={"help": "vLLM engine: GPUs (or CPU processes) one teacher is split over."}
    )
    max_model_len: int | None = field(
        default=None, metadata={"help": "vLLM engine: context length it plans memory for (default --seq-len)."}
    )
    gpu_memory_utilization: float | None = field(
        default=None, metadata={"help": "vLLM engine: share of GPU memory vLLM may take (vLLM's default 0.9)."}
    )

    def __post_init__(self):
        if self.num_shards is None:
            object.__setattr__(self, "num_shards", _env_num_shards() or 1)
        if self.shard_index is None:
            object.__setattr__(self, "shard_index", _env_shard_index())
        object.__setattr__(self, "out", location(self.out))  # LocationError (a ValueError) before any write
        if self.chat_template is not None:
            object.__setattr__(self, "chat_template", Path(self.chat_template))
        problems = []
        if self.chat_template is not None and self.messages_field is None:
            problems.append(
                f"--chat-template {self.chat_template}: a chat template applies to chat rows; pass --messages-field "
                f"(the column holding the conversations), or drop --chat-template for plain text"
            )
        if self.trust_remote_code and self.engine == "vllm":
            problems.append("--trust-remote-code is supported with the hf engine only here; pass --engine hf")
        if self.ray and is_remote(self.out):
            problems.append(
                f"--out {self.out}: --ray writes into a local or shared-filesystem run directory only; for a bucket, "
                f"run one process per shard (--shard-index, a SLURM / Kubernetes array) without --ray"
            )
        top_k, top_p, min_k, draws = (self.mode_settings()[n] for n in ("top_k", "top_p", "min_k", "draws"))
        if top_k < 1:
            problems.append(f"top_k={top_k}: must be >= 1")
        if self.dtype != "auto":
            try:
                canonical_dtype(self.dtype, option="--dtype")
            except ValueError as e:
                problems.append(str(e))
        if self.capture != "auto" and self.capture not in MODES:
            problems.append(f"capture={self.capture!r}: choose {_one_of(['auto', *MODES])}")
        if not 0 < top_p <= 1:
            problems.append(f"top_p={top_p}: must be in (0, 1]")
        if not 1 <= draws <= 65535:
            problems.append(f"draws={draws}: must be in 1..65535")
        problems += self._mode_option_problems()
        if self.allow_roles and self.messages_field is None:
            problems.append("allow_roles: chat roles apply to chat rows only; give --messages-field too")
        chosen = self.explicit_capture()
        if chosen == "topp" and not 1 <= min_k <= top_k:  # topp's own option
            problems.append(f"min_k={min_k}: must be in 1..top_k ({top_k}) (top-k is the cap of topp)")
        problems += self._vllm_option_problems()
        if self.seq_len < 2:
            problems.append(f"seq_len={self.seq_len}: must be >= 2")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size}: must be >= 1")
        if self.engine not in ENGINE_NAMES:
            problems.append(f"engine={self.engine!r}: choose {_one_of(ENGINE_NAMES)}")
        if self.num_shards < 1:
            problems.append(f"num_shards={self.num_shards}: must be >= 1")
        if self.shard_index is not None and not 0 <= self.shard_index < self.num_shards:
            problems.append(
                f"shard_index={self.shard_index}: must be in 0..{self.num_shards - 1} "
                f"(check --num-shards, or SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX)"
            )
        if self.max_samples is not None and self.max_samples < 1:
            problems.append(f"max_samples={self.max_samples}: must be >= 1")
        if self.num_workers < 1:
            problems.append(f"num_workers={self.num_workers}: must be >= 1")
        elif self.num_workers > 1 and not self.ray:
            problems.append(
                f"num_workers={self.num_workers} needs ray=True (--ray); without Ray, run one process "
                f"per shard with --shard-index (or a SLURM / Kubernetes array)"
            )
        if self.ray_address is not None and not self.ray:
            problems.append(f"ray_address={self.ray_address!r} needs ray=True (--ray)")
        try:
            Encoding.parse(self.encoding)
        except ValueError as e:
            problems.append(f"encoding={self.encoding!r}: {e}")
        try:
            chosen = self.explicit_capture() if self.capture == "auto" or self.capture in MODES else None
        except ValueError:  # conflicting mode options: reported on their own
            chosen = None
        if self.store_draw_logprobs and chosen is not None and not MODES[chosen].sampled:
            problems.append(
                f"store_draw_logprobs (--store-draw-logprobs) has no effect with --capture {chosen}: "
                "only sample and hybrid draw; drop it"
            )
        if problems:
            raise ValueError("invalid teacher config:\n  " + "\n  ".join(problems))

    def _given(self) -> list[str]:
        return [n for n in MODE_OPTION_DEFAULTS if getattr(self, n) is not None]

    def explicit_capture(self) -> str | None:
        """The mode the options name without knowing the engine: --capture itself, or under auto the mode an
        explicit --top-k (topk), --top-p / --min-k (topp) or --draws (sample) selects; None for a plain auto."""
        if self.capture != "auto":
            return self.capture
        given = set(self._given())
        if given & {"top_p", "min_k"}:
            return "topp"
        if "top_k" in given:
            return "topk"
        if "draws" in given:
            return "sample"
        return None

    def _mode_option_problems(self) -> list[str]:
        given = self._given()
        if self.capture == "auto":
            if "draws" in given and len(given) > 1:
                other = " / ".join(_flag(n) for n in given if n != "draws")
                return [
                    f"{other} together with --draws under --capture auto: say which mode you mean, e.g. "
                    f"--capture hybrid (the exact top --top-k + --draws draws from the tail) or --capture sample"
                ]
            return []
        if self.capture not in MODES:
            return []
        return [
            f"{_flag(n)} has no effect with --capture {self.capture}: drop it, or use "
            + " / ".join(f"--capture {m}" for m in MODE_OPTION_USERS[n])
            for n in given
            if self.capture not in MODE_OPTION_USERS[n]
        ]

    def _vllm_option_problems(self) -> list[str]:
        given = [n for n in VLLM_OPTIONS if getattr(self, n) is not None]
        problems = []
        if given and self.engine == "hf":
            problems.append(
                " / ".join(_flag(n) for n in given) + " only apply to the vLLM engine: drop them, or use --engine vllm"
            )
        if self.tensor_parallel_size is not None and self.tensor_parallel_size < 1:
            problems.append(f"tensor_parallel_size={self.tensor_parallel_size}: must be >= 1")
        if self.max_model_len is not None and self.max_model_len < self.seq_len:
            problems.append(
                f"max_model_len={self.max_model_len} is below --seq-len {self.seq_len}: every stored sequence must "
                f"fit; raise --max-model-len or lower --seq-len"
            )
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            problems.append(f"gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1]")
        return problems

    def vllm_kwargs(self) -> dict:
        """The vLLM engine options that were given, as `vllm.LLM` keywords."""
        return {n: getattr(self, n) for n in VLLM_OPTIONS if getattr(self, n) is not None}

    def mode_settings(self) -> dict:
        """top_k, top_p, min_k, draws: the values given, else their defaults (MODE_OPTION_DEFAULTS)."""
        return {n: d if getattr(self, n) is None else getattr(self, n) for n, d in MODE_OPTION_DEFAULTS.items()}

    def resolved_capture(self, engine: str) -> str:
        """The capture mode for a resolved engine name: the explicit one (`explicit_capture`), else `auto` becomes
        sample on every engine (vLLM draws through its hidden-state route, see engines/vllm_engine.py)."""
        return self.explicit_capture() or "sample"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["chat_template"] = None if self.chat_template is None else str(self.chat_template)
        return d
