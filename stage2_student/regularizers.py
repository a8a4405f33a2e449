"""Baselines that share the training loop: an anchor to the initial weights (L2-SP, EWC) and replay.

Anchor penalty: (c/2) · Σ_i w_i (θ_i − θ0_i)², added to the per-token loss of every step.
- L2-SP: w_i = 1.
- EWC: w_i = F_i, the diagonal Fisher of the base model per trained token (`estimate_fisher`):
      F_i = mean over trained positions t of E_{y~p(.|x<t)} [(∂ log p(y|x<t) / ∂θ_i)²],
  the same quantity whatever the sequence length or masking. The expectation over y uses the stored
  labels as the base model's predictions (the student starts as the base model; no extra teacher pass).
The gradient c · w · (θ − θ0) is added to .grad after the backward pass: identical on every rank, so
it needs no communication under DDP, and it costs no activation memory.
"""

from __future__ import annotations

import numpy as np
import torch

from storage import mode_of

from .batch import with_kl_target_weights


class AnchorPenalty:
    """Pulls trainable parameters toward their values at construction time."""

    def __init__(self, params: list[torch.nn.Parameter], coeff: float, weights: list[torch.Tensor] | None = None):
        self.params = params
        self.coeff = coeff
        self.anchor = [p.detach().clone() for p in params]
        self.weights = weights

    def _to_param_devices(self) -> None:
        # Built before accelerate moves the model; follow the parameters to their device once.
        for i, p in enumerate(self.params):
            if self.anchor[i].device != p.device:
                self.anchor[i] = self.anchor[i].to(p.device)
                if self.weights is not None:
                    self.weights[i] = self.weights[i].to(p.device)

    @torch.no_grad()
    def add_grad(self) -> None:
        self._to_param_devices()
        for i, (p, a) in enumerate(zip(self.params, self.anchor)):
            d = p - a
            if self.weights is not None:
                d = d * self.weights[i]
            if p.grad is None:
                p.grad = self.coeff * d
            else:
                p.grad.add_(d, alpha=self.coeff)

    @torch.no_grad()
    def value(self) -> float:
        self._to_param_devices()
        total = 0.0
        for i, (p, a) in enumerate(zip(self.params, self.anchor)):
            d2 = (p - a).float().pow(2)
            if self.weights is not None:
                d2 = d2 * self.weights[i]
            total += float(d2.sum())
        return 0.5 * self.coeff * total


# ------------------------------------------------------------------------------------------- EWC Fisher
#
# Squaring the gradient of a sequence's summed (or mean) log-likelihood is NOT the per-token Fisher: the square
# of Σ_t g_t holds the cross terms g_t·g_t' (and a mean divides it by T more). Per-token squared gradients would
# cost one backward per position and label. One backward per sequence is enough with random signs: with
# independent Rademacher s_{t,y} ∈ {−1, +1},
#     E[(Σ_{t,y} s_{t,y} √w_{t,y} g_{t,y})²] = Σ_{t,y} w_{t,y} g_{t,y}²        (elementwise, for every parameter)
# where g_{t,y} = ∇ log p(y | x<t) and (y, w) are the stored labels of position t as a distribution: the
# KL target of the run's capture mode (`batch.with_kl_target_weights`: counts / N for sample, exact head +
# p_T · c / M tail draws for hybrid, both unbiased), renormalised over the stored ids (topk / topp: the tail's
# ids are not stored, so E_y is over the top k; exact at k = V). Dividing by the number of trained positions
# gives the per-token Fisher. Each backward's estimate has a relative std of about √2 per parameter; it falls
# as 1/√(sequences · sign draws).


def fisher_label_weights(batch: dict, capture: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N, K) int64 with 0 at unused slots, weights (N, K) float32 summing to 1 per trained position, 0 at
    unused slots) from a collated batch of stored labels; `capture` is the run spec's capture dict."""
    target = with_kl_target_weights(batch, capture)
    ids = target["topk_ids"].long()
    logw = target["topk_logprobs"].float().masked_fill(ids < 0, float("-inf"))  # (N, K)
    has = (logw > float("-inf")).any(dim=1, keepdim=True)
    w = torch.where(has, torch.softmax(torch.where(has, logw, 0.0), dim=1), 0.0)  # renormalised over stored ids
    return ids.clamp(min=0), w


def estimate_fisher(
    model, batches: list[dict], capture: dict, device, *, seed: int, sign_draws: int = 1
) -> list[torch.Tensor]:
    """Diagonal per-token Fisher of the trainable parameters of the base `model`, from collated batches of stored
    labels (`batch.collate_labels`): one backward per sequence and sign draw (see the comment above)."""
    mode_of(capture)  # an unknown capture mode is refused here, before any backward pass
    params = [p for p in model.parameters() if p.requires_grad]
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    g = torch.Generator().manual_seed(seed)
    positions = 0
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the deterministic base model
    for b in batches:
        ids_all, w_all = fisher_label_weights(b, capture)  # (N, K) over the batch's trained positions
        per_row = b["label_mask"].sum(dim=1).tolist()
        starts = np.concatenate([[0], np.cumsum(per_row)]).astype(int)
        for i in range(b["input_ids"].shape[0]):
            rows = slice(int(starts[i]), int(starts[i + 1]))
            n = rows.stop - rows.start
            if n == 0:
                continue
            positions += n
            ids, sqrt_w = ids_all[rows].to(device), w_all[rows].sqrt().to(device)  # (n, K)
            for _ in range(sign_draws):
                signs = torch.randint(0, 2, ids.shape, generator=g).to(device, torch.float32) * 2 - 1  # (n, K)
                model.zero_grad(set_to_none=True)
                logits = model(
                    input_ids=b["input_ids"][i : i + 1].to(device),
                    attention_mask=b["attention_mask"][i : i + 1].to(device),
                ).logits[0, :-1]  # (T-1, V)
                logp = torch.log_softmax(logits[b["label_mask"][i].to(device)].float(), dim=-1)  # (n, V)
                (logp.gather(1, ids) * (signs * sqrt_w)).sum().backward()
                for f, p in zip(fisher, params):
                    if p.grad is not None:
                        f.add_(p.grad.float().pow(2))
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if positions == 0:
        raise ValueError("EWC: no trained positions in the sequences sampled for the Fisher estimate")
    return [f / (positions * sign_draws) for f in fisher]


# ------------------------------------------------------------------------------------------- replay


def trained_positions(seq) -> int:
    return int(np.count_nonzero(seq.label_mask))


class ReplayStream:
    """Sequences of a general corpus mixed into training: CE only (no stored teacher labels); a micro-batch
    of them is `batch.pad_inputs(rows)`. Sequence i of the stream is a function of (seed, i) only: epoch
    i // n of the corpus, each epoch its own permutation."""

    def __init__(self, sequences: list, seed: int):
        sequences = [s for s in sequences if trained_positions(s) > 0]
        if not sequences:
            raise ValueError("replay corpus produced no sequences with a trained position")
        self.sequences = sequences
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def __getitem__(self, i: int):
        epoch, offset = divmod(i, len(self.sequences))
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 7919, epoch]).permutation(len(self.sequences)))
        return self.sequences[int(self._perm[1][offset])]


class ReplayMixer:
    """Whole replay sequences added to the steps so that replay makes up `ratio` of the trained POSITIONS
    (labelled + replay) over the run.

    A deficit accumulator over global counts: after a step with L labelled positions (all ranks), the next
    sequences of the stream are added while each brings the replay positions closer to ratio/(1−ratio) × the
    labelled positions so far, so the running share is off by at most half a replay sequence's positions
    (plus the first step's rounding). The state is the same on every rank (global counts, one cursor), saved
    with each checkpoint (`state`) and restored on resume (`load_state`)."""

    def __init__(self, stream: ReplayStream, ratio: float):
        if not 0 < ratio < 1:
            raise ValueError(f"replay ratio {ratio}: must be in (0, 1)")
        self.stream, self.ratio = stream, ratio
        self.labelled = self.replayed = self.cursor = 0

    def take(self, labelled: int) -> list:
        """The replay sequences (in stream order) to add to a step that trains `labelled` labelled positions."""
        self.labelled += int(labelled)
        target = self.ratio / (1 - self.ratio) * self.labelled  # replay positions for a share of `ratio`
        out = []
        while True:
            seq = self.stream[self.cursor]
            n = trained_positions(seq)
            if self.replayed + n / 2 > target:  # adding it would move the share further from the target
                return out
            out.append(seq)
            self.replayed += n
            self.cursor += 1

    def share(self) -> float:
        return self.replayed / max(self.labelled + self.replayed, 1)

    def state(self) -> dict:
        return {"labelled": self.labelled, "replayed": self.replayed, "cursor": self.cursor}

    def load_state(self, state: dict) -> None:
        self.labelled, self.replayed, self.cursor = (int(state[k]) for k in ("labelled", "replayed", "cursor"))


def replay_rows(seqs: list, *, rank: int, world: int, batch_size: int) -> list[list]:
    """This rank's share of a step's replay sequences (sequence i goes to rank i % world), cut into
    micro-batches of at most `batch_size` sequences."""
    mine = seqs[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
