import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_models import tiny_chat_rows, tiny_text_rows
from transformers import AutoTokenizer

from lm.corpus import Sequence, corpus_settings, load_range, load_sequences, plan_corpus


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _valid_texts():
    return [r["text"] for r in tiny_text_rows() if isinstance(r["text"], str) and r["text"]]


def _doc_stream(tok, texts):
    """What packing must produce, built independently: each document's tokens + EOS."""
    out = []
    for t in texts:
        out += tok(t)["input_ids"] + [tok.eos_token_id]
    return np.array(out, dtype=np.int32)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_packing_cuts_the_document_stream_into_full_sequences(tok, tiny_corpus_dir):
    r = load_sequences(tiny_corpus_dir / "text.jsonl", tok, seq_len=32)
    lengths = [len(s.input_ids) for s in r.sequences]
    assert all(n == 32 for n in lengths[:-1]) and 2 <= lengths[-1] <= 32
    stream = np.concatenate([s.input_ids for s in r.sequences])
    np.testing.assert_array_equal(stream, _doc_stream(tok, _valid_texts()))
    assert [s.sample_id for s in r.sequences] == list(range(len(r.sequences)))
    for s in r.sequences:
        assert s.input_ids.dtype == np.int32 and s.label_mask.dtype == np.bool_
        assert s.label_mask.shape == (len(s.input_ids) - 1,) and s.label_mask.all()
    assert r.documents == 38 and r.skipped == 2 and r.rows_read == 40
    assert r.tokens == len(stream) and r.trained_positions == len(stream) - len(r.sequences)


def test_eos_closes_every_document(tok, tiny_corpus_dir):
    r = load_sequences(tiny_corpus_dir / "text.jsonl", tok, seq_len=128, pack=False)
    assert len(r.sequences) == r.documents == 38
    eos = tok.eos_token_id
    assert sum(int((s.input_ids == eos).sum()) for s in r.sequences) == 38
    # unpacked: one sequence per (short) document, EOS last
    for s, text in zip(r.sequences, _valid_texts()):
        np.testing.assert_array_equal(s.input_ids, tok(text)["input_ids"] + [eos])


def test_unpacked_long_documents_are_split_not_truncated(tok, tmp_path):
    text = " ".join(["The teacher model reads every sequence once."] * 8)
    r = load_sequences([{"text": text}, {"text": "short one"}], tok, seq_len=16, pack=False)
    expected = tok(text)["input_ids"] + [tok.eos_token_id]
    n_chunks = -(-len(expected) // 16)
    np.testing.assert_array_equal(np.concatenate([s.input_ids for s in r.sequences[:n_chunks]]), expected)
    assert all(len(s.input_ids) == 16 for s in r.sequences[: n_chunks - 1])
    np.testing.assert_array_equal(r.sequences[n_chunks].input_ids, tok("short one")["input_ids"] + [tok.eos_token_id])
    assert len(r.sequences) == n_chunks + 1


def _trained_text(tok, s: Sequence) -> str:
    # label_mask[t] says whether input_ids[t+1] is a target
    return tok.decode(s.input_ids[1:][s.label_mask])


def test_chat_trains_only_assistant_tokens(tok, tiny_corpus_dir):
    r = load_sequences(tiny_corpus_dir / "chat.jsonl", tok, seq_len=512, pack=False, messages_field="messages")
    rows = tiny_chat_rows()
    assert len(r.sequences) == len(rows) and r.skipped == 0
    for s, row in zip(r.sequences, rows):
        msgs = row["messages"]
        rendered = tok.apply_chat_template(msgs, tokenize=False)
        np.testing.assert_array_equal(s.input_ids[:-1], tok(rendered, add_special_tokens=False)["input_ids"])
        assert s.input_ids[-1] == tok.eos_token_id and not s.label_mask[-1]  # separator EOS: not trained
        expected = "".join(m["content"] + "<|im_end|>\n" for m in msgs if m["role"] == "assistant")
        assert _trained_text(tok, s) == expected
        untrained = tok.decode(s.input_ids[1:][~s.label_mask])
        for m in msgs:
            if m["role"] != "assistant":
                assert m["content"] in untrained


def test_chat_packed_keeps_masks_aligned(tok, tiny_corpus_dir):
    unpacked = load_sequences(tiny_corpus_dir / "chat.jsonl", tok, seq_len=512, pack=False, messages_field="messages")
    packed = load_sequences(tiny_corpus_dir / "chat.jsonl", tok, seq_len=48, messages_field="messages")

    # Re-derive the per-token `trained` flags of the whole stream both ways; they must agree
    # except at sequence starts (position 0 is never a target).
    def flags(seqs):
        return np.concatenate([np.concatenate([[False], s.label_mask]) for s in seqs])

    a, b = flags(unpacked.sequences), flags(packed.sequences)
    np.testing.assert_array_equal(
        np.concatenate([s.input_ids for s in unpacked.sequences]),
        np.concatenate([s.input_ids for s in packed.sequences]),
    )
    starts = np.cumsum([0] + [len(s.input_ids) for s in packed.sequences[:-1]])
    a[starts] = False
    np.testing.assert_array_equal(a, b)


def test_train_on_prompt_trains_everything(tok, tiny_corpus_dir):
    r = load_sequences(tiny_corpus_dir / "chat.jsonl", tok, seq_len=64, messages_field="messages", train_on_prompt=True)
    assert all(s.label_mask.all() for s in r.sequences)
    masked = load_sequences(tiny_corpus_dir / "chat.jsonl", tok, seq_len=64, messages_field="messages")
    assert r.trained_positions > masked.trained_positions
    assert r.fingerprint != masked.fingerprint


def test_skipped_rows_are_counted_and_warned(tok, tiny_corpus_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="lm.corpus"):
        r = load_sequences(tiny_corpus_dir / "text.jsonl", tok, seq_len=32)
    assert r.skipped == 2 and r.skipped_rows == [8, 14]
    assert "skipped 2" in caplog.text and "rows 8, 14" in caplog.text


def test_malformed_conversations_are_skipped(tok, tmp_path, caplog):
    good = tiny_chat_rows()[:3]
    bad = [
        {"messages": "just a string"},
        {"messages": []},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user"}]},
        {"messages": None},
    ]
    path = _write_jsonl(tmp_path / "c.jsonl", [good[0], *bad, good[1], good[2]])
    with caplog.at_level(logging.WARNING, logger="lm.corpus"):
        r = load_sequences(path, tok, seq_len=512, pack=False, messages_field="messages")
    assert r.skipped == 5 and r.skipped_rows == [2, 3, 4, 5, 6] and len(r.sequences) == 3
    assert "malformed conversations" in caplog.text and "rows 2, 3, 4, 5, 6" in caplog.text


def test_conversation_without_assistant_is_dropped(tok):
    rows = [{"messages": [{"role": "user", "content": "hi"}]}, *tiny_chat_rows()[:2]]
    r = load_sequences(rows, tok, seq_len=512, pack=False, messages_field="messages")
    assert len(r.sequences) == 2 and r.untrained_documents == 1 and r.skipped == 0


def test_missing_file_names_the_path(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_sequences(tmp_path / "nope.jsonl", tok, seq_len=32)
    with pytest.raises(FileNotFoundError, match="no .* files in corpus directory"):
        load_sequences(tmp_path, tok, seq_len=32)


def test_missing_field_lists_the_available_columns(tok, tiny_corpus_dir):
    with pytest.raises(
        ValueError, match=r"column 'txt' not found in .*text\.jsonl; available: id, text; pass --text-field"
    ):
        load_sequences(tiny_corpus_dir / "text.jsonl", tok, seq_len=32, text_field="txt")
    with pytest.raises(ValueError, match=r"column 'msgs' not found .*available: id, messages; pass --messages-field"):
        load_sequences(tiny_corpus_dir / "chat.jsonl", tok, seq_len=32, messages_field="msgs")


def test_nothing_trainable_is_an_error(tok, tmp_path):
    path = _write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": None}, {"text": "  "}])
    with pytest.raises(ValueError, match="no trainable position"):
        load_sequences(path, tok, seq_len=32)
    prompts_only = [{"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(ValueError, match="no trainable position.*train_on_prompt"):
        load_sequences(prompts_only, tok, seq_len=32, messages_field="messages")


def test_template_without_prefix_property_fails_clearly(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    # renders the final turn differently from the same turn inside a longer conversation
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
        "{% if loop.last %}{{ ' (last)' }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(ValueError, match="token prefix of the whole conversation"):
        load_sequences(tiny_chat_rows()[:2], tok, seq_len=512, messages_field="messages")
    # train_on_prompt needs no assistant spans, so the same template is fine then
    r = load_sequences(tiny_chat_rows()[:2], tok, seq_len=512, messages_field="messages", train_on_prompt=True)
    assert len(r.sequences) == 1


def test_deterministic_and_fingerprint_tracks_settings(tok, tiny_corpus_dir):
    a = load_sequences(tiny_corpus_dir / "text.jsonl", tok, seq_len=32)
    b = load_sequences(tiny_corpus_dir / "text.jsonl", tok, seq_len=32)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    for x, y in zip(a.sequences, b.sequences, strict=True):
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.label_mask, y.label_mask)
    assert load_sequences(tiny_corpus_dir / "text.jsonl", tok, seq_len=33).fingerprint != a.fingerprint
    assert load_sequences(tiny_corpus_dir / "text.jsonl", tok, seq_len=32, pack=False).fingerprint != a.fingerprint


def test_max_samples_is_a_prefix_of_the_full_run(tok, tiny_corpus_dir):
    full = load_sequences(tiny_corpus_dir / "text.jsonl", tok, seq_len=32)
    few = load_sequences(tiny_corpus_dir / "text.jsonl", tok, seq_len=32, max_samples=5)
    assert len(few.sequences) == 5 and few.rows_read < full.rows_read
    for x, y in zip(few.sequences, full.sequences[:5]):
        np.testing.assert_array_equal(x.input_ids, y.input_ids)


def test_txt_parquet_and_directory_inputs(tok, tmp_path):
    texts = _valid_texts()[:6]
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text(texts[0] + "\n" + texts[1])
    (tmp_path / "txt" / "b.txt").write_text(texts[2])
    r = load_sequences(tmp_path / "txt", tok, seq_len=512, pack=False)
    assert r.documents == 2  # one document per .txt file, in sorted order
    np.testing.assert_array_equal(r.sequences[1].input_ids, tok(texts[2])["input_ids"] + [tok.eos_token_id])

    pq.write_table(pa.table({"body": texts}), tmp_path / "t.parquet")
    r = load_sequences(tmp_path / "t.parquet", tok, seq_len=32, text_field="body")
    np.testing.assert_array_equal(np.concatenate([s.input_ids for s in r.sequences]), _doc_stream(tok, texts))

    (tmp_path / "shards").mkdir()
    _write_jsonl(tmp_path / "shards" / "part-1.jsonl", [{"text": t} for t in texts[3:]])
    _write_jsonl(tmp_path / "shards" / "part-0.jsonl", [{"text": t} for t in texts[:3]])
    r = load_sequences(tmp_path / "shards", tok, seq_len=32)
    np.testing.assert_array_equal(np.concatenate([s.input_ids for s in r.sequences]), _doc_stream(tok, texts))

    (tmp_path / "shards" / "extra.txt").write_text("x")
    with pytest.raises(ValueError, match="mixes formats"):
        load_sequences(tmp_path / "shards", tok, seq_len=32)


def test_in_memory_inputs_match_files(tok, tiny_corpus_dir):
    import datasets

    rows = [json.loads(line) for line in (tiny_corpus_dir / "chat.jsonl").read_text().splitlines()]
    from_file = load_sequences(tiny_corpus_dir / "chat.jsonl", tok, seq_len=64, messages_field="messages")
    from_list = load_sequences(rows, tok, seq_len=64, messages_field="messages")
    from_ds = load_sequences(datasets.Dataset.from_list(rows), tok, seq_len=64, messages_field="messages")
    assert from_file.fingerprint == from_list.fingerprint == from_ds.fingerprint


def test_bad_settings(tok, tiny_corpus_dir):
    with pytest.raises(ValueError, match="seq_len"):
        load_sequences(tiny_corpus_dir / "text.jsonl", tok, seq_len=1)
    with pytest.raises(ValueError, match="max_samples"):
        load_sequences(tiny_corpus_dir / "text.jsonl", tok, seq_len=8, max_samples=0)
    with pytest.raises(ValueError, match="label_mask shape"):
        Sequence(0, np.zeros(4, np.int32), np.zeros(4, bool))


def test_conversations_the_template_refuses_are_skipped(tiny_tokenizer_dir, caplog):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    rows = tiny_chat_rows()[:4]  # row 1 (counted from 1) has a system turn
    with caplog.at_level(logging.WARNING, logger="lm.corpus"):
        r = load_sequences(rows, tok, seq_len=512, pack=False, messages_field="messages")
    assert r.skipped == 1 and r.skipped_rows == [1] and len(r.sequences) == 3
    assert "no system turns" in caplog.text


# --------------------------------------------------------------------------------------------- shards


def _split_corpus(tmp_path, texts, files=3):
    """JSON-lines files of `texts` (some long, so lines cross many range boundaries)."""
    d = tmp_path / "split"
    d.mkdir()
    per = -(-len(texts) // files)
    for f in range(files):
        _write_jsonl(d / f"part-{f}.jsonl", [{"text": t} for t in texts[f * per : (f + 1) * per]])
    return d


def _texts(n=120):
    base = _valid_texts()
    return [(" ".join(base[(i + j) % len(base)] for j in range(1 + i % 7))) for i in range(n)]


@pytest.mark.parametrize("count", [1, 2, 5, 17, 64])
def test_ranges_partition_the_rows_exactly(tmp_path, count):
    """Every row belongs to exactly one shard's range, in corpus order, for JSON lines and parquet alike."""
    texts = _texts()
    jsonl = _split_corpus(tmp_path, texts)
    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    for f in range(3):
        pq.write_table(pa.table({"text": texts[f * 40 : (f + 1) * 40]}), pq_dir / f"p{f}.parquet", row_group_size=7)
    for data in (jsonl, pq_dir):
        plan = plan_corpus(data)
        got = []
        for i in range(count):
            got += list(plan.values("text", *plan.split_range(i, count)))
        assert got == texts, data


def test_a_shard_reads_only_its_own_range(tmp_path, tok, monkeypatch):
    """Shard 5 of 64 reads about 1/64 of the bytes (its range, the end of its last line, and each file's
    4 KiB head and tail for the identity) and tokenizes only its rows; its packed sequences are the
    tokens of exactly those rows."""
    texts = _texts(2000)
    data = _split_corpus(tmp_path, texts, files=2)
    total = sum(p.stat().st_size for p in data.iterdir())
    read = {"bytes": 0}
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def read(self, *a):
            b = self.f.read(*a)
            read["bytes"] += len(b)
            return b

        def readline(self, *a):
            b = self.f.readline(*a)
            read["bytes"] += len(b)
            return b

    monkeypatch.setattr("builtins.open", lambda *a, **kw: Counting(real_open(*a, **kw)))
    encoded = {"rows": 0}
    real_call = type(tok).__call__

    def counting_call(self, text, *a, **kw):
        encoded["rows"] += len(text) if isinstance(text, list) else 1
        return real_call(self, text, *a, **kw)

    monkeypatch.setattr(type(tok), "__call__", counting_call)
    plan = plan_corpus(data)
    planned = read["bytes"]
    assert planned <= 2 * 2 * 4096 + 2 * (1 << 16), "planning reads heads and tails, not the files"
    settings = corpus_settings(tok, seq_len=64)
    lo, hi = plan.split_range(5, 64)
    r = load_range(plan, tok, settings, lo=lo, hi=hi, first_sample_id=7 << 32, allow_empty=True)
    longest = max(len(json.dumps({"text": t})) + 1 for t in texts)
    assert read["bytes"] - planned <= (hi - lo) + 2 * longest, (read["bytes"] - planned, total)
    monkeypatch.undo()
    mine = list(plan.values("text", lo, hi))
    assert encoded["rows"] == len(mine) and 0 < len(mine) < len(texts) / 32
    stream = np.concatenate([s.input_ids for s in r.sequences])
    np.testing.assert_array_equal(stream, _doc_stream(tok, mine))
    assert [s.sample_id for s in r.sequences] == [(7 << 32) + j for j in range(len(r.sequences))]


def test_plan_identity_is_cheap_and_tracks_the_files(tmp_path):
    texts = _texts()
    data = _split_corpus(tmp_path, texts)
    a = plan_corpus(data).identity
    assert a == plan_corpus(data).identity
    (data / "part-1.jsonl").write_text((data / "part-1.jsonl").read_text() + json.dumps({"text": "one more"}) + "\n")
    assert plan_corpus(data).identity != a
