"""The stage-2 data order (`stage2_student.data.EpochOrder`) and loader (`stage2_student.loader.RankBatches`):
the order is a pure function of (seed, epoch, G); every row once per epoch, the leftover included, with and without
shuffling; N processes' micro-batches together are one process's micro-batch of N× the size; the loader delivers
exactly those rows from a background thread, from any step; memory and open files stay in a fixed budget at 10,000
shards under `ulimit -n 256`; running out of descriptors says so and never calls a shard corrupt."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stage1_teacher.capture_modes import draw_uniforms
from stage2_student.data import ORDER_DOMAIN, EpochOrder, micro_batch_rows, slot_lanes, steps_per_epoch
from stage2_student.loader import RankBatches
from storage import RunReader, ShardCorruptError, ShardWriter, build_manifest, claim_run_dir, shard_path
from storage.codec import Encoding
from storage.synthetic import synthetic_rows, synthetic_spec, write_synthetic_run

REPO = Path(__file__).resolve().parents[2]


def every_row(order: EpochOrder) -> np.ndarray:
    return np.concatenate([order.global_batch(s) for s in range(order.steps)])


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("G", [1, 3, 8, 40, 64])
def test_every_row_once_per_epoch_leftover_included(shuffle, G):
    shard_rows = [7, 0, 13, 1, 20]  # 41 rows, an empty shard, blocks cut by the shard ends
    order = EpochOrder(shard_rows, seed=3, epoch=1, global_batch=G, shuffle=shuffle, block_rows=4)
    assert order.steps == steps_per_epoch(41, G) == -(-41 // G)
    rows = every_row(order)
    assert sorted(rows.tolist()) == list(range(41)), "each stored row exactly once, the short leftover included"
    sizes = [len(order.global_batch(s)) for s in range(order.steps)]
    assert sizes == [G] * (41 // G) + ([41 % G] if 41 % G else [])
    if not shuffle:
        # Without shuffling a lane is a run of consecutive stored rows.
        for lane in range(G):
            got = [order.row(lane, s) for s in range(order.lane_len[lane])]
            assert got == list(range(got[0], got[0] + len(got))) if got else True


def test_order_is_a_function_of_seed_epoch_and_global_batch_only():
    shard_rows = [30, 17, 25]
    a = EpochOrder(shard_rows, seed=1, epoch=2, global_batch=8, block_rows=8)
    b = EpochOrder(list(shard_rows), seed=1, epoch=2, global_batch=8, block_rows=8)
    assert every_row(a).tolist() == every_row(b).tolist()
    for other in (dict(seed=2, epoch=2, global_batch=8), dict(seed=1, epoch=3, global_batch=8)):
        assert every_row(EpochOrder(shard_rows, block_rows=8, **other)).tolist() != every_row(a).tolist()
    # The same G split as (batch, accum, processes) in different ways gives the same global batches.
    for batch_size, accum, world in [(8, 1, 1), (4, 1, 2), (2, 2, 2), (1, 2, 4), (2, 4, 1), (1, 1, 8)]:
        assert batch_size * accum * world == 8
        for s in range(a.steps):
            got = np.concatenate(
                [
                    micro_batch_rows(a, s, j, batch_size=batch_size, rank=r, world_size=world)
                    for j in range(accum)
                    for r in range(world)
                ]
            )
            np.testing.assert_array_equal(got, a.global_batch(s))


def test_n_processes_equal_one_process_with_n_times_the_micro_batch():
    order = EpochOrder([50, 50, 3], seed=0, epoch=0, global_batch=12, block_rows=16)
    for s in range(order.steps):
        for j in range(3):  # grad_accum 3, micro-batch 4 = 2 processes × 2
            one = micro_batch_rows(order, s, j, batch_size=4, rank=0, world_size=1)
            two = np.concatenate([micro_batch_rows(order, s, j, batch_size=2, rank=r, world_size=2) for r in (0, 1)])
            np.testing.assert_array_equal(two, one)
    assert list(slot_lanes(1, batch_size=2, rank=1, world_size=2)) == [6, 7]


def test_rows_of_a_block_never_share_a_global_batch_and_stay_close_in_time():
    order = EpochOrder([256] * 40, seed=0, epoch=0, global_batch=16, block_rows=64)
    seen: dict[int, list[int]] = {}
    for s in range(order.steps):
        batch = order.global_batch(s)
        blocks = batch // 64
        assert len(set(blocks.tolist())) == len(blocks), "G lanes, G different blocks in each batch"
        for b in blocks.tolist():
            seen.setdefault(b, []).append(s)
    spans = [max(v) - min(v) for v in seen.values()]
    assert max(spans) < 2 * 64, "a block is read by at most two lanes, over consecutive steps"


def test_order_domain_is_not_the_teachers_draw_stream():
    for seed in range(3):
        for n in range(3):  # epoch n of the student vs sample n of the teacher
            teacher = 1.0 - draw_uniforms(seed, n, 1, 64)[0]  # the generator behind the stored draws
            student = np.random.default_rng([seed, n, ORDER_DOMAIN]).random(64)
            assert not np.allclose(teacher, student)
    assert ORDER_DOMAIN != 0


# ------------------------------------------------------------------------------------------- the loader


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    write_synthetic_run(d, synthetic_spec(num_shards=5, num_sequences=83, k=4, vocab_size=64))
    return d


def loader(run_dir, **kw) -> RankBatches:
    args = dict(seed=0, shuffle=True, batch_size=2, grad_accum=2, rank=0, world_size=1, pad_id=0, block_rows=8)
    args.update(kw)
    return RankBatches(RunReader(run_dir, cache_row_groups=0), **args)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_loader_delivers_every_row_once_per_epoch_across_processes(run_dir, shuffle, world):
    stored = list(RunReader(run_dir))  # global row i
    by_sid = {r.sample_id: r for r in stored}
    got = []
    for rank in range(world):
        lb = loader(run_dir, shuffle=shuffle, rank=rank, world_size=world)
        for step, batches in enumerate(lb.iter_steps(0, lb.steps_per_epoch)):
            for j, b in enumerate(batches):
                sids = [s for s in b["sample_id"].tolist() if s >= 0]
                assert sids == [stored[int(i)].sample_id for i in lb.step_rows(step)[j]], "the rows the order names"
                got += sids
                for i, sid in enumerate(sids):  # decoded and collated right
                    np.testing.assert_array_equal(
                        b["input_ids"][i, : len(by_sid[sid].input_ids)], by_sid[sid].input_ids
                    )
    assert sorted(got) == sorted(by_sid), "every row once per epoch, leftover included"


def test_exhausted_micro_batch_is_a_padding_row_with_nothing_trained(run_dir):
    lb = loader(run_dir, batch_size=4, grad_accum=1, rank=1, world_size=2)  # G = 8, 83 rows: last step has 3
    last = lb.steps_per_epoch - 1
    assert [len(r) for r in lb.step_rows(last)] == [0]
    (b,) = lb.step_batches(last)
    assert b["sample_id"].tolist() == [-1] and not b["label_mask"].any() and b["topk_ids"].shape[0] == 0


def test_loader_resumes_mid_epoch_exactly(run_dir):
    whole = [[b["sample_id"].tolist() for b in step] for step in loader(run_dir).iter_steps(0, 30)]
    late = [[b["sample_id"].tolist() for b in step] for step in loader(run_dir).iter_steps(13, 30)]
    assert late == whole[13:], "a loader started at step 13 (after a resume) gives the same batches"
    assert len(whole) == 30 and 30 > loader(run_dir).steps_per_epoch, "crosses an epoch boundary"


def test_loader_thread_raises_storage_errors_at_the_step_that_needs_them(tmp_path):
    write_synthetic_run(tmp_path, synthetic_spec(num_shards=2, num_sequences=40, k=4, vocab_size=64))
    p = shard_path(tmp_path, 1, 2)
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0xFF
    p.write_bytes(bytes(data))
    lb = loader(tmp_path, shuffle=False, batch_size=1, grad_accum=1)  # G = 1: shard 1 is read from step 20
    steps = lb.iter_steps(0, 40)
    for _ in range(20):
        next(steps)
    with pytest.raises(ShardCorruptError, match="checksum mismatch"):
        next(steps)


# ------------------------------------------------------------------------------------------- scale


def many_shard_run(root: Path, num_shards: int) -> Path:
    """A finalised run of `num_shards` tiny shards (1–3 rows each). Three shards are written by ShardWriter; the
    rest are byte copies of them under their own names with their own receipts (writing 10,000 Parquet files one
    by one takes minutes)."""
    spec = synthetic_spec(num_shards=num_shards, num_sequences=6, k=2, vocab_size=16, seq_len=6)
    claim_run_dir(root, spec)
    rows = list(synthetic_rows(spec))
    templates = []
    for t in range(3):
        path = shard_path(root, t, num_shards)
        with ShardWriter(
            path, fingerprint=spec.fingerprint, k=2, vocab_size=16, encoding=Encoding(), row_group_rows=2
        ) as w:
            for _, *row in rows[: t + 1]:
                w.add(*row)
            w.close()
        templates.append((path, json.loads(path.with_name(path.name + ".receipt.json").read_text())))
    for i in range(3, num_shards):
        src, receipt = templates[i % 3]
        dst = shard_path(root, i, num_shards)
        shutil.copyfile(src, dst)
        receipt = {**receipt, "name": dst.name, "index": i}
        dst.with_name(dst.name + ".receipt.json").write_text(json.dumps(receipt))
    build_manifest(root)
    return root


_UNDER_LIMIT = """
import os, resource, sys, torch
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
from stage2_student.loader import RankBatches
from storage import RunReader
run, world, B, A, max_open = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
rows, peak_resident, peak_open, peak_fds, steps = 0, 0, 0, 0, 0
for rank in range(world):
    reader = RunReader(run, verify="checksum", max_open_files=max_open, cache_row_groups=0)
    lb = RankBatches(reader, seed=0, shuffle=True, batch_size=B, grad_accum=A, rank=rank, world_size=world, pad_id=0)
    for batches in lb.iter_steps(0, lb.steps_per_epoch):
        for b in batches:  # a real (tiny) training step on every micro-batch
            logits = model(b["input_ids"])[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), b["labels"].reshape(-1), reduction="sum")
            loss.backward()
            rows += int((b["sample_id"] >= 0).sum())
        opt.step(); opt.zero_grad()
        steps += 1
        peak_resident = max(peak_resident, lb.resident_rows())
        peak_open = max(peak_open, reader.open_files())
        peak_fds = max(peak_fds, len(os.listdir("/proc/self/fd")))
print(rows, steps, peak_resident, peak_open, peak_fds)
"""


@pytest.mark.slow
def test_ten_thousand_shards_under_ulimit_256_stay_in_budget(tmp_path):
    run = many_shard_run(tmp_path / "run", 10_000)
    n = len(RunReader(run, verify="none"))
    world, B, A, max_open = 1, 4, 2, 32
    p = subprocess.run(
        [sys.executable, "-c", _UNDER_LIMIT, str(run), str(world), str(B), str(A), str(max_open)],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows, steps, peak_resident, peak_open, peak_fds = map(int, p.stdout.split())
    assert rows == n, "every row trained once in the epoch"
    assert steps == world * -(-n // (B * A * world))
    block_rows, row_group_rows = 256, 2
    budget = B * A * (block_rows + 2 * row_group_rows - 2)  # loader.py's documented budget (lanes' blocks)
    assert peak_resident <= budget
    assert peak_open <= max_open and peak_fds < 256


_OUT_OF_FILES = """
import os, resource, sys
from stage2_student.loader import RankBatches
from storage import RunReader, OpenFilesLimitError
reader = RunReader(sys.argv[1], verify="size", max_open_files=100_000, cache_row_groups=0)
lb = RankBatches(
    reader, seed=0, shuffle=True, batch_size=64, grad_accum=1, rank=0, world_size=1, pad_id=0, block_rows=1
)
used = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 20, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    for _ in lb.iter_steps(0, lb.steps_per_epoch):
        pass
except OpenFilesLimitError as e:
    print(e)
    sys.exit(3)
"""


def test_running_out_of_file_descriptors_names_the_limit_not_corruption(tmp_path):
    run = many_shard_run(tmp_path / "run", 200)
    p = subprocess.run(
        [sys.executable, "-c", _OUT_OF_FILES, str(run)],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-3000:]
    msg = p.stdout
    assert "ulimit -n" in msg and "open-files limit" in msg and "--max-open-files" in msg
    assert "corrupt" not in msg.lower() and "delete" not in msg.lower()


@pytest.mark.parametrize("option", ["shuffle_block", "prefetch_steps", "max_open_files"])
def test_loader_options_are_range_checked(option):
    from stage2_student.config import StudentConfig

    with pytest.raises(ValueError, match=f"{option}=0: must be >= 1"):
        StudentConfig(run_dir="r", out="o", **{option: 0})


def test_resume_locks_the_global_batch_not_its_factors(tmp_path):
    from stage2_student.config import StudentConfig
    from stage2_student.train import _check_resume  # the rule itself; the e2e tests run it through the CLI

    saved = StudentConfig(run_dir="r", out="o", batch_size=2, grad_accum=2)  # on 2 processes: G = 8
    ckpt = {"step": 3, "world_size": 2, "global_batch": 8, "config": saved.to_dict()}
    _check_resume(ckpt, saved.replace(batch_size=4), 1, tmp_path)  # 4 × 2 × 1
    _check_resume(ckpt, saved.replace(grad_accum=1), 4, tmp_path)  # 2 × 1 × 4
    with pytest.raises(ValueError, match=r"global batch .*checkpoint 8 .*now 16 .*--grad-accum 1"):
        _check_resume(ckpt, saved.replace(batch_size=4), 2, tmp_path)  # 4 × 2 × 2
    old = {k: v for k, v in ckpt.items() if k != "global_batch"}  # written before the lane order
    with pytest.raises(ValueError, match="before the lane order"):
        _check_resume(old, saved, 2, tmp_path)
    replay = saved.replace(replay_data="general.txt", replay_ratio=0.25)
    with pytest.raises(ValueError, match="--replay-ratio with another process count"):
        _check_resume({**ckpt, "config": replay.to_dict()}, replay.replace(batch_size=4), 1, tmp_path)
    _check_resume({**ckpt, "config": replay.to_dict()}, replay, 2, tmp_path)
