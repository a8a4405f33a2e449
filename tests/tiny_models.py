"""Tiny, deterministic assets for tests and benches: a byte-level BPE tokenizer, a random
2-layer Llama and a small jsonl corpus.

Plain functions so that benches and scripts can build them without pytest:

    python -c "from tests.tiny_models import build_tiny_model; build_tiny_model('/tmp/tiny')"

Everything here is offline and takes about a second (most of it importing transformers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START, IM_END]
TINY_VOCAB_SIZE = 384  # 256 byte symbols + 5 specials + 123 merges

# ChatML, written out without whitespace control so that rendering a prefix of a conversation
# renders a prefix of the text (corpus.py relies on that to find the assistant tokens).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SENTENCES = [
    "The teacher model reads every sequence once and writes down its top guesses.",
    "A student learns from those guesses without forgetting what it already knew.",
    "Rain fell on the old stone bridge while the river carried leaves to the sea.",
    "She counted seven boats, three gulls and one very patient heron near the dock.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "Numbers like 42, 3.14 and 1000 appear in text more often than you might think.",
    "The quick brown fox jumps over the lazy dog; the dog does not seem to mind.",
    "In the morning the market opens early, and the bakers are the first to arrive.",
    "Large language models predict the next token given all the tokens before it.",
    "Distillation matches the student's distribution to the teacher's distribution.",
    "When the lights went out, the library grew quiet and the clocks kept ticking.",
    "Mountains rise slowly, rivers cut through them, and the valleys fill with green.",
    "He wrote the letter twice, tore up the first copy, and mailed the second one.",
    "Please answer the question briefly and explain your reasoning step by step.",
    "The answer is four, because two plus two equals four in ordinary arithmetic.",
    "Tokens, bytes and characters are not the same thing, which surprises people.",
    "A good test is small, fast, deterministic and fails with a clear message.",
]

_QUESTIONS = [
    ("What is two plus two?", "Two plus two is four."),
    ("Name a color of the sky.", "The sky is often blue."),
    ("Write a function that adds numbers.", "def add(a, b):\n    return a + b"),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What does a teacher model do?", "It scores every token and keeps its top guesses."),
    ("Say hello.", "Hello!"),
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Give me a number between one and ten.", "Seven."),
    ("Why do rivers flow to the sea?", "Water runs downhill, and the sea is the lowest place."),
    ("Translate 'bonjour' to English.", "Bonjour means hello."),
]


def _training_text() -> list[str]:
    # A few KB with the chat markup in it, so that merges cover role names and newlines.
    chats = [f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{a}{IM_END}\n" for q, a in _QUESTIONS]
    return (_SENTENCES + chats) * 3


def build_tiny_tokenizer(path: str | os.PathLike) -> Path:
    """Train a byte-level BPE (vocab 384) and save it as a `PreTrainedTokenizerFast` with
    bos/eos/pad tokens and a ChatML chat template. Returns the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return path


def build_tiny_model(path: str | os.PathLike, seed: int = 0) -> Path:
    """Save the tiny tokenizer plus a random 2-layer LlamaForCausalLM (hidden 64, 4 heads,
    vocab = len(tokenizer), 512 positions) as safetensors. Returns the directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    build_tiny_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # fork_rng: seeding must not leak into the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return path


def tiny_text_rows() -> list[dict]:
    """40 plain-text rows; row 7 is empty and row 13 holds a number instead of a string."""
    rows = []
    for i in range(40):
        a, b = _SENTENCES[i % len(_SENTENCES)], _SENTENCES[(3 * i + 1) % len(_SENTENCES)]
        rows.append({"id": i, "text": f"{a} {b}" if i % 3 else a})
    rows[7]["text"] = ""
    rows[13]["text"] = 12345
    return rows


def tiny_chat_rows() -> list[dict]:
    """20 OpenAI-style conversations: some with a system turn, some with two exchanges."""
    rows = []
    for i in range(20):
        q, a = _QUESTIONS[i % len(_QUESTIONS)]
        messages = []
        if i % 4 == 0:
            messages.append({"role": "system", "content": "You are brief."})
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 3 == 0:
            q2, a2 = _QUESTIONS[(i + 5) % len(_QUESTIONS)]
            messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        rows.append({"id": i, "messages": messages})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_tiny_corpus(path: str | os.PathLike) -> Path:
    """Write `text.jsonl` (field `text`) and `chat.jsonl` (field `messages`). Returns the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_jsonl(path / "text.jsonl", tiny_text_rows())
    _write_jsonl(path / "chat.jsonl", tiny_chat_rows())
    return path
