"""Tokenizer identity, stored in the manifest so stage 2 can refuse a student whose tokenizer
maps ids to different tokens than the teacher's (the shards hold ids, not text)."""

from __future__ import annotations

import hashlib
import json


def tokenizer_fingerprint(tokenizer) -> dict:
    """{hash, vocab_size, eos_token_id, pad_token_id}; hash = sha256 of the sorted vocabulary
    (token -> id, added tokens included), the special tokens and the chat template."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = {
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "pad": tokenizer.pad_token,
        "unk": tokenizer.unk_token,
        "all": sorted(tokenizer.all_special_tokens),
    }
    template = getattr(tokenizer, "chat_template", None)
    payload = json.dumps({"vocab": vocab, "special": special, "chat_template": template}, ensure_ascii=False)
    return {
        "hash": hashlib.sha256(payload.encode("utf-8")).hexdigest(),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
