"""From a `TeacherConfig` to what a capture task needs: the run spec, where its sequences come from, and
the engine.

Nothing here loads model weights or tokenizes the corpus: the spec is built from the corpus plan (file
names, sizes, parquet footers) and the settings, so every task of a run computes the same spec cheaply,
and each shard's sequences are read later by whoever captures it (`shards.ShardSource`). Every problem
with the options is collected and raised once, before any work starts.

The model is recorded so that stage 2 finds it from any directory: a local folder by its absolute path,
a hub name as the name plus the snapshot's revision (commit hash).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lm.corpus import check_column, corpus_settings, load_range, plan_corpus, plan_fingerprint
from lm.loading import canonical_dtype, check_weight_files, load_tokenizer, model_limits, read_chat_template
from lm.model_files import model_identity, resolve_model_dir
from lm.tokenizer_id import tokenizer_fingerprint
from storage import Encoding, RunSpec, mode_of
from storage.layout import FORMAT_VERSION

from .config import TeacherConfig
from .engines.base import Engine
from .engines.factory import make_engine, resolve_engine_name
from .shards import ShardSource

log = logging.getLogger(__name__)


def resolve_engine_and_dtype(config: TeacherConfig) -> tuple[str, str, str]:
    """(engine, device, dtype) with every "auto" decided for this machine."""
    engine = resolve_engine_name(config.engine)
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = config.dtype
    if dtype == "auto":
        dtype = (
            "bfloat16" if (engine == "vllm" and torch.cuda.is_available()) or device.startswith("cuda") else "float32"
        )
    return engine, device, canonical_dtype(dtype, option="--dtype")


def model_record(config_model: str, model_dir: Path) -> dict:
    """How run.json names the model: an absolute path for a local folder (a relative one would break a
    stage 2 launched elsewhere), or the hub name and the revision of the snapshot that was used."""
    local = Path(config_model).expanduser()
    if local.is_dir():
        return {"name_or_path": str(local.resolve())}
    revision = model_dir.name if model_dir.parent.name == "snapshots" else None
    return {"name_or_path": config_model, "revision": revision}


def prepare(config: TeacherConfig) -> tuple[RunSpec, ShardSource, Path, tuple[str, str, str]]:
    """(spec, the shards' sequence source, model folder, (engine, device, dtype)); no model weights loaded,
    nothing tokenized except the first --max-samples sequences when that option is set."""
    model_dir = resolve_model_dir(config.model, revision=config.revision, trust_remote_code=config.trust_remote_code)
    check_weight_files(Path(model_dir))  # before anything is written: the engine loads the weights only later
    record = model_record(config.model, model_dir)
    template = read_chat_template(config.chat_template)
    identity = {
        **model_identity(model_dir, name_or_path=record["name_or_path"], gguf_file=config.gguf_file),
        **record,
        # Recorded only when given, so that runs without them keep their spec (and resume).
        **({"trust_remote_code": True} if config.trust_remote_code else {}),
        **({"chat_template": template, "chat_template_file": str(config.chat_template)} if template else {}),
    }
    engine, device, dtype = resolve_engine_and_dtype(config)
    if config.trust_remote_code and engine != "hf":
        raise ValueError(
            f"--trust-remote-code is supported with the hf engine only here (--engine {engine}); pass --engine hf"
        )
    mode = mode_of({"mode": config.resolved_capture(engine)})
    if mode.name != config.capture:
        log.info("--capture auto: %s with the %s engine", mode.name, engine)
    s = config.mode_settings()  # top_k, top_p, min_k, draws: given or default
    fields = mode.spec_fields(seed=config.seed, **s)
    vocab_size, max_pos = model_limits(model_dir, config.gguf_file, trust_remote_code=config.trust_remote_code)
    problems = []
    if s["top_k"] > vocab_size and mode.name != "sample":  # sample mode does not use --top-k
        problems.append(f"--top-k {s['top_k']} is larger than the teacher's vocabulary ({vocab_size})")
    elif fields.get("head_k") and s["top_k"] + s["draws"] > vocab_size:
        problems.append(f"--top-k {s['top_k']} + --draws {s['draws']} exceed the teacher's vocabulary ({vocab_size})")
    if max_pos is not None and config.seq_len > max_pos:
        problems.append(f"--seq-len {config.seq_len} exceeds the teacher's context ({max_pos} positions)")
    if problems:
        raise ValueError("; ".join(problems))
    tokenizer = load_tokenizer(
        model_dir, config.gguf_file, trust_remote_code=config.trust_remote_code, chat_template=template
    )
    settings = corpus_settings(
        tokenizer,
        seq_len=config.seq_len,
        text_field=config.text_field,
        messages_field=config.messages_field,
        train_on_prompt=config.train_on_prompt,
        max_samples=config.max_samples,
        pack=config.pack,
        allow_roles=config.allow_roles,
    )
    plan = plan_corpus(config.data, split=config.split)
    check_column(plan, settings["field"], "--messages-field" if config.messages_field else "--text-field")
    source = ShardSource(
        plan=plan,
        settings=settings,
        num_shards=config.num_shards,
        tokenizer_dir=str(Path(model_dir).resolve()),
        gguf_file=config.gguf_file,
        trust_remote_code=config.trust_remote_code,
        chat_template=template,
        _tokenizer=tokenizer,
    )
    if config.max_samples is not None:
        # A prefix of the corpus, cut into blocks by sequence index: every task tokenizes it (it is small).
        prefix = load_range(plan, tokenizer, settings)
        n = prefix.num_sequences
        if config.num_shards > n:
            raise ValueError(
                f"--num-shards {config.num_shards} exceeds the {n} sequences of --max-samples "
                f"{config.max_samples} of {config.data}: every shard needs at least one sequence; "
                f"use --num-shards <= {n}"
            )
        source.prefix = prefix.sequences
        corpus = {"fingerprint": prefix.fingerprint, "sharding": "prefix"}
        num_sequences = n
    else:
        corpus = {"fingerprint": plan_fingerprint(plan, settings), "sharding": "ranges"}
        num_sequences = None
    if config.vllm_kwargs() and engine != "vllm":
        given = " / ".join("--" + n.replace("_", "-") for n in config.vllm_kwargs())
        raise ValueError(f"{given} only apply to the vLLM engine, and --engine {config.engine} chose {engine}")
    try:
        encoding = Encoding.parse(config.encoding, sampled=mode.sampled, draw_logprobs=config.store_draw_logprobs)
    except ValueError as e:
        raise ValueError(f"--encoding {config.encoding!r} with --capture {mode.name}: {e}") from None
    if mode.sampled and encoding.ids == "delta":
        raise ValueError(f"--capture {mode.name} stores draw counts in entry order: use ids=plain in --encoding")
    spec = RunSpec(
        teacher={**identity, "dtype": dtype},
        tokenizer=tokenizer_fingerprint(tokenizer),
        vocab_size=vocab_size,
        k=mode.stored_width(s["top_k"], s["draws"]),
        encoding=encoding.to_dict(),
        capture={"mode": mode.name, "engine": engine, "dtype": dtype, **fields},
        corpus={**corpus, "source": str(config.data), **settings},
        seq_len=config.seq_len,
        num_shards=config.num_shards,
        num_sequences=num_sequences,
        format_version=FORMAT_VERSION,
    )
    return spec, source, model_dir, (engine, device, dtype)


def vllm_engine_kwargs(spec: RunSpec, options: dict | None = None) -> dict:
    """The vLLM engine's settings for a run: the sampled modes take the hidden-state route (pooling runner + our
    lm_head), the top-k modes vLLM's prompt log-probs with max_logprobs raised to the stored k; --max-model-len
    defaults to --seq-len; the other options (`TeacherConfig.vllm_kwargs`) pass through to vllm.LLM."""
    options = dict(options or {})
    kw = {"max_model_len": options.pop("max_model_len", None) or spec.seq_len, **options}
    if mode_of(spec.capture).sampled:
        return {**kw, "route": "hidden"}
    return {**kw, "route": "logprobs", "max_logprobs": spec.k}


def build_engine(
    spec: RunSpec,
    model_dir: Path,
    engine_name: str,
    device: str,
    dtype: str,
    gguf_file: str | None,
    vllm_options: dict | None = None,
) -> Engine:
    """The engine that scores this run's shards (in this process, or once per Ray worker)."""
    engine = make_engine(
        engine_name,
        str(model_dir),
        dtype=dtype,
        device=device,
        gguf_file=gguf_file,
        **(vllm_engine_kwargs(spec, vllm_options) if engine_name == "vllm" else {}),
        **({"trust_remote_code": True} if spec.teacher.get("trust_remote_code") else {}),
    )
    if engine.vocab_size != spec.vocab_size:
        raise ValueError(f"engine reports vocabulary {engine.vocab_size}, the model config {spec.vocab_size}")
    return engine
