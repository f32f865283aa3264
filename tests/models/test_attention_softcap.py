"""AR on a logit-softcapping family (Gemma2): the model's softcapping is kept exactly."""

import uuid

import pytest
import torch
from transformers import AttentionInterface, Gemma2Config, Gemma2ForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from src.core.modality import Modality
from src.models.attention import reallocated
from src.models.attention.strategies import Reweight
from src.models.modality_context import ModalityContext

T, A, V = int(Modality.TEXT), int(Modality.AUDIO), int(Modality.VISUAL)
SOFTCAP = 0.5  # small: softcapping changes every attention row visibly


def tiny_gemma2(softcap: float | None = SOFTCAP) -> Gemma2ForCausalLM:
    config = Gemma2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        vocab_size=64,
        sliding_window=6,  # layer 0 slides: its mask differs from the full causal one
        attn_logit_softcapping=softcap,
        initializer_range=0.5,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config).eval()  # eager: the family's default (SDPA has no softcap)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    modality_ids = torch.tensor([[T, A, A, V, V, V, T, T, T, T], [T, V, V, A, A, T, T, T, T, T]])
    input_ids = torch.randint(3, 64, modality_ids.shape, generator=torch.Generator().manual_seed(1))
    return input_ids, modality_ids


def logits(model: Gemma2ForCausalLM, context: ModalityContext, reallocator=None) -> torch.Tensor:
    input_ids, modality_ids = batch()
    with torch.no_grad(), context.bind(modality_ids):
        if reallocator is None:
            return model(input_ids=input_ids).logits
        reallocator.bind(context, model.config.num_hidden_layers)
        with reallocated(model, reallocator):
            return model(input_ids=input_ids).logits


def test_identity_ar_keeps_softcapped_logits_exactly():
    model, context = tiny_gemma2(), ModalityContext()
    assert model.config._attn_implementation == "eager"
    plain = logits(model, context)
    identity = logits(model, context, Reweight(strength=0.0))
    torch.testing.assert_close(identity, plain, rtol=0, atol=1e-6)
    # The check can fail: the same weights without softcapping give other logits.
    uncapped = logits(tiny_gemma2(softcap=None), context)
    assert (uncapped - plain).abs().max() > 1e-3
    assert model.config._attn_implementation == "eager"  # switched back


class SoftcappedReweight:
    """Gemma2's eager attention with the audio weights of text rows halved and renormalised."""

    def __init__(self, context: ModalityContext) -> None:
        self.context = context

    def __call__(self, module, query, key, value, attention_mask, scaling, softcap, **kwargs):
        groups = module.num_key_value_groups
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        raw = query @ key.transpose(-1, -2) * scaling
        probs = torch.softmax(torch.tanh(raw / softcap) * softcap + attention_mask, dim=-1)
        k_len = key.shape[2]
        keys = self.context.keys(k_len)[:, None, None, :]  # (B, 1, 1, K)
        rows = (self.context.queries(query.shape[2], k_len) == T)[:, None, :, None]
        weighted = probs * torch.where(keys == A, 0.5, 1.0)
        weighted = weighted / weighted.sum(-1, keepdim=True)
        probs = torch.where(rows, weighted, probs)
        return (probs @ value).transpose(1, 2).contiguous(), probs


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_reweight_under_softcap_equals_softcapped_reference(strength):
    model, context = tiny_gemma2(), ModalityContext()
    name = f"softcap_reference_{uuid.uuid4().hex[:8]}"
    AttentionInterface.register(name, SoftcappedReweight(context))
    AttentionMaskInterface.register(name, eager_mask)
    model.set_attn_implementation(name)
    try:
        reference = logits(model, context)
    finally:
        model.set_attn_implementation("eager")
    # Strength s multiplies by 0.5 ** s: at 1 the reference's halving.
    ar = Reweight(multipliers={"audio": 0.5 ** (1 / strength)}, strength=strength)
    got = logits(model, context, ar)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)
    assert (got - logits(model, context)).abs().max() > 1e-4  # AR acted
