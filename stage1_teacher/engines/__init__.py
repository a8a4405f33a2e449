"""Stage 1's engines: the interface (`base`: TopK, Engine), the transformers reference (`hf_engine`), vLLM
(`vllm_engine`, which imports vllm only when an engine is built) and `factory.make_engine`.

This module stays light (no torch) because the CLI imports the option choices below to build its help.
"""

ENGINE_NAMES = ("auto", "hf", "vllm")
