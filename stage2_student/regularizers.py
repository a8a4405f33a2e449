"""Baselines that share the training loop: an anchor to the initial weights (L2-SP, EWC) and replay.

Anchor penalty: (c/2) · Σ_i w_i (θ_i − θ0_i)², added to the per-token loss of every step.
- L2-SP: w_i = 1.
- EWC: w_i = F_i, the diagonal Fisher of the base model on the fine-tuning corpus. It is estimated
  from the stored soft labels: the student starts as the base model, and targets drawn from the
  stored teacher distribution are samples of the base model's own predictions (the top k,
  renormalised: the tail's ids are not stored), so no extra teacher pass is needed.
The gradient c · w · (θ − θ0) is added to .grad after the backward pass: identical on every rank, so
it needs no communication under DDP, and it costs no activation memory.
"""

from __future__ import annotations

import numpy as np
import torch

from .batch import IGNORE_INDEX


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


def sample_teacher_targets(batch: dict, generator: torch.Generator) -> torch.Tensor:
    """Labels (B, T-1) drawn from the stored teacher top-k (renormalised) at every trained position."""
    probs = batch["topk_logprobs"].float().softmax(-1)  # (N, k)
    pick = torch.multinomial(probs, 1, generator=generator)[:, 0]  # (N,)
    ids = batch["topk_ids"].gather(1, pick[:, None])[:, 0]
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    labels[batch["label_mask"]] = ids
    return labels


def estimate_fisher(model, batches: list[dict], device, seed: int) -> list[torch.Tensor]:
    """Diagonal Fisher of the trainable parameters: mean over sequences of the squared gradient of the
    per-token log-likelihood of targets sampled from the base model's predictions."""
    params = [p for p in model.parameters() if p.requires_grad]
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    g = torch.Generator().manual_seed(seed)
    n = 0
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the deterministic base model
    for b in batches:
        for i in range(b["input_ids"].shape[0]):  # one sequence at a time: squared per-sequence gradients
            one = {
                k: v[i : i + 1] for k, v in b.items() if k in ("input_ids", "attention_mask", "labels", "label_mask")
            }
            rows = slice(int(b["label_mask"][:i].sum()), int(b["label_mask"][: i + 1].sum()))
            one["topk_ids"], one["topk_logprobs"] = b["topk_ids"][rows], b["topk_logprobs"][rows]
            if rows.stop == rows.start:
                continue
            labels = sample_teacher_targets(one, g).to(device)
            model.zero_grad(set_to_none=True)
            logits = model(
                input_ids=one["input_ids"].to(device), attention_mask=one["attention_mask"].to(device)
            ).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX
            )
            loss.backward()
            for f, p in zip(fisher, params):
                if p.grad is not None:
                    f.add_(p.grad.float().pow(2))
            n += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if n == 0:
        raise ValueError("EWC: no trained positions in the sequences sampled for the Fisher estimate")
    return [f / n for f in fisher]


class ReplayStream:
    """Sequences of a general corpus mixed into training: CE only (no stored teacher labels); a micro-batch
    of them is `batch.pad_inputs(rows)`.

    Order is a function of (seed, step, micro-batch, rank), like the main data, so resume and DDP stay exact."""

    def __init__(self, sequences: list, seed: int):
        if not sequences:
            raise ValueError("replay corpus produced no sequences")
        self.sequences = sequences
        self.seed = seed

    def rows(self, step: int, micro: int, rank: int, world: int, grad_accum: int, n: int) -> list:
        per_step = n * grad_accum * world
        start = step * per_step + (micro * world + rank) * n
        epoch, offset = divmod(start, len(self.sequences))
        out = []
        while len(out) < n:
            perm = np.random.default_rng([self.seed, 7919, epoch]).permutation(len(self.sequences))
            take = perm[offset : offset + n - len(out)]
            out += [self.sequences[int(i)] for i in take]
            epoch, offset = epoch + 1, 0
        return out
