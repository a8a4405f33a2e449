"""The lm_head inside the loss: `fused_head_ce_kl_sums(h, W, ...)` equals the autograd reference applied
to the logits h Wᵀ + b (values and gradients w.r.t. h, W and b), in fp32 and under bf16 autocast; and
`fused_head_for` uses it only where the model's logits really are lm_head(h)."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_losses import NEG_INF, make_case, reference_total

from stage2_student.lm_head_bypass import fused_head_for
from stage2_student.losses import fused_ce_kl_sums, fused_head_ce_kl_sums, loss_weights


def _case(n=13, v=17, k=5, h=6, seed=5, pad_prob=0.2, bias=True):
    c = make_case(n=n, v=v, k=k, seed=seed, pad_prob=pad_prob)
    g = torch.Generator().manual_seed(seed)
    c["h"] = torch.randn(n, h, generator=g)
    c["w"] = torch.randn(v, h, generator=g)
    c["b"] = torch.randn(v, generator=g) * 0.3 if bias else None
    return c


def _leaves(c):
    return [t.clone().requires_grad_(True) if t is not None else None for t in (c["h"], c["w"], c["b"])]


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("loss_form,lam", [("add", 0.7), ("mix", 0.3), ("add", 0.0)])
@pytest.mark.parametrize("chunk_size,bias", [(1, True), (4, False), (1024, True)])
def test_fused_head_equals_reference_on_the_logits(tail, tau, loss_form, lam, chunk_size, bias):
    c = _case(bias=bias)
    c["ids"][0], c["lp"][0], c["tail"][0] = -1, NEG_INF, NEG_INF  # a row with no teacher mass
    w_ce, w_kl = loss_weights(lam, loss_form)
    h, w, b = _leaves(c)
    z = h @ w.T + (b if b is not None else 0)
    ref = reference_total(c, z, w_ce=w_ce, w_kl=w_kl, tail=tail, tau=tau)
    (ref[0] * 0.37).backward()
    ref_grads = [t.grad for t in (h, w, b) if t is not None]

    h2, w2, b2 = _leaves(c)
    out = fused_head_ce_kl_sums(
        h2,
        w2,
        c["labels"],
        c["ids"],
        c["lp"],
        c["tail"],
        bias=b2,
        ce_weight=w_ce,
        kl_weight=w_kl,
        tail=tail,
        kd_temperature=tau,
        chunk_size=chunk_size,
    )
    (out.total * 0.37).backward()
    torch.testing.assert_close(out.total, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.ce, ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kl, ref[2], rtol=1e-5, atol=1e-5)
    for got, want in zip([t.grad for t in (h2, w2, b2) if t is not None], ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fused_head_equals_the_logits_fused_loss_under_bf16_autocast():
    c = _case(n=40, v=64, k=6, h=16, seed=3)
    grads = []
    for fused in (False, True):
        h, w, b = _leaves(c)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                out = fused_head_ce_kl_sums(
                    h, w, c["labels"], c["ids"], c["lp"], c["tail"], bias=b, kl_weight=1.5, chunk_size=16
                )
            else:  # what the logits path does: nn.Linear under autocast, then the fused loss on bf16 logits
                z = torch.nn.functional.linear(h, w, b)
                assert z.dtype == torch.bfloat16
                out = fused_ce_kl_sums(z, c["labels"], c["ids"], c["lp"], c["tail"], kl_weight=1.5, chunk_size=16)
        out.total.backward()
        grads.append((out.total, h.grad, w.grad, b.grad))
    (t0, *g0), (t1, *g1) = grads
    assert all(g.dtype == torch.float32 for g in g1)  # gradients in the leaves' dtype, as autograd gives
    torch.testing.assert_close(t1, t0, rtol=1e-3, atol=1e-3)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * float(b.abs().max()))


def test_fused_head_without_grad_backward_twice_and_bad_shapes():
    c = _case(n=6, v=9, k=3, h=4, seed=8)
    with torch.no_grad():
        out = fused_head_ce_kl_sums(c["h"], c["w"], c["labels"], c["ids"], c["lp"], c["tail"])
    assert not out.total.requires_grad
    h, w, _ = _leaves(c)
    out = fused_head_ce_kl_sums(h, w, c["labels"], c["ids"], c["lp"], c["tail"])
    out.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.total.backward()
    with pytest.raises(ValueError, match="same H"):
        fused_head_ce_kl_sums(c["h"], c["w"][:, :3], c["labels"], c["ids"], c["lp"], c["tail"])
    with pytest.raises(ValueError, match="topk_ids must be"):
        fused_head_ce_kl_sums(c["h"], c["w"], c["labels"], c["ids"][:2], c["lp"][:2], c["tail"])


# ---------------------------------------------------------------------------------------------------
# when the model may use it


def _tiny(tiny_model_dir, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kw)


def test_head_used_for_a_plain_model_and_its_hidden_states_reproduce_the_logits(tiny_model_dir):
    model = _tiny(tiny_model_dir)
    head = fused_head_for(model, "auto")
    assert head is not None and head.weight is model.lm_head.weight
    ids = torch.tensor([[1, 5, 9, 200, 17]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with head.hidden_states():
            hidden = model(input_ids=ids).logits
        after = model(input_ids=ids).logits  # the patch is gone after the block
    assert hidden.shape == (1, 5, model.config.hidden_size)
    torch.testing.assert_close(head.logits(hidden), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, logits)


def test_head_refused_where_the_logits_are_not_lm_head_of_h(tiny_model_dir, caplog):
    model = _tiny(tiny_model_dir)
    model.config.final_logit_softcapping = 30.0  # what Gemma 2 does after the lm_head
    with caplog.at_level(logging.INFO, logger="stage2_student.lm_head_bypass"):
        assert fused_head_for(model, "auto") is None
    assert "final_logit_softcapping" in caplog.text
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        fused_head_for(model, "on")

    # A rescaling no config field announces is caught by the check on the model itself.
    model = _tiny(tiny_model_dir)
    forward = model.forward

    def scaled(*a, **kw):  # a soft cap applied in the model's forward, with no config field saying so
        out = forward(*a, **kw)
        out.logits = 2.0 * torch.tanh(out.logits / 2.0)
        return out

    model.forward = scaled
    with pytest.raises(ValueError, match="differs from the model's logits"):
        fused_head_for(model, "on")
    assert fused_head_for(model, "auto") is None

    assert fused_head_for(_tiny(tiny_model_dir), "off") is None
    assert fused_head_for(_tiny(tiny_model_dir), "auto", reason_off="an online teacher needs the full logits") is None
    assert fused_head_for(_tiny(tiny_model_dir), "auto", fsdp=True) is None


def test_head_refused_for_a_lora_wrapped_lm_head(tiny_model_dir):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_tiny(tiny_model_dir), peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        fused_head_for(model, "on")
    # LoRA elsewhere, plain head: usable.
    model = peft.get_peft_model(_tiny(tiny_model_dir), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert fused_head_for(model, "on") is not None


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 60),
    v=st.integers(5, 80),
    hdim=st.integers(1, 24),
    k_frac=st.floats(0.0, 1.0),
    pad_prob=st.sampled_from([0.0, 0.3, 0.9]),
    seed=st.integers(0, 2**31 - 1),
    tail=st.sampled_from(["bucket", "renorm"]),
    tau=st.sampled_from([1.0, 0.5, 3.0]),
    chunk_size=st.integers(1, 70),
    lam=st.floats(0.0, 2.0),
    bias=st.booleans(),
)
def test_property_fused_head_equals_the_logits_path(
    n, v, hdim, k_frac, pad_prob, seed, tail, tau, chunk_size, lam, bias
):
    """Any shape, k, padding, chunking: the same sums and gradients (h, W, b) as the fused loss on h Wᵀ + b."""
    k = max(1, min(v, round(k_frac * v)))
    c = _case(n=n, v=v, k=k, h=hdim, seed=seed, pad_prob=pad_prob, bias=bias)
    outs, grads = [], []
    for fused in (False, True):
        h, w, b = _leaves(c)
        if fused:
            out = fused_head_ce_kl_sums(
                h,
                w,
                c["labels"],
                c["ids"],
                c["lp"],
                c["tail"],
                bias=b,
                kl_weight=lam,
                tail=tail,
                kd_temperature=tau,
                chunk_size=chunk_size,
            )
        else:
            z = h @ w.T + (b if b is not None else 0)
            out = fused_ce_kl_sums(
                z,
                c["labels"],
                c["ids"],
                c["lp"],
                c["tail"],
                kl_weight=lam,
                tail=tail,
                kd_temperature=tau,
                chunk_size=chunk_size,
            )
        out.total.backward()
        outs.append(out)
        grads.append([t.grad for t in (h, w, b) if t is not None])
    for a, b_ in zip(outs[1], outs[0]):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-4)
    for a, b_ in zip(grads[1], grads[0]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4)
