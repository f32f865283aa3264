"""MoSE: modality-specific LoRA experts, gating loss and dynamic modality weights.

Tiny Llama backbones built from config (random init); hand-made ``modality_ids`` with PAD tokens
and batches where a modality is absent.
"""

import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from src.core.modality import Modality
from src.models.adapters.base import Adapter
from src.models.adapters.mose_adapter import MoSEAdapter
from src.models.modality_context import ModalityContext
from src.models.modality_weights import (
    DominanceModalityWeights,
    FixedModalityWeights,
    LearnedModalityWeights,
    build_modality_weights,
)
from src.models.mose import (
    MoSELinear,
    inject_mose,
    load_mose_state_dict,
    mose_layers,
    mose_state_dict,
)
from src.models.mose_regularizer import LayerRecord, MoSEGateLoss, cv_squared

P, T, A, V = int(Modality.PAD), int(Modality.TEXT), int(Modality.AUDIO), int(Modality.VISUAL)
VOCAB = 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def mixed_ids() -> torch.Tensor:
    """Two rows: text, audio, visual span, text, with right PAD in the first row."""
    return torch.tensor(
        [
            [T, T, A, V, V, V, V, T, T, T, P, P],
            [T, A, V, V, V, V, V, T, T, T, T, T],
        ]
    )


def no_audio_ids() -> torch.Tensor:
    return torch.tensor(
        [
            [T, T, V, V, V, V, V, T, T, T, P, P],
            [T, V, V, V, V, V, V, T, T, T, T, T],
        ]
    )


def tokens(ids: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, ids.shape, generator=g)
    return {"input_ids": input_ids, "attention_mask": (ids != P).long()}


def randomize_experts(layers: list[MoSELinear], seed: int = 3, scale: float = 0.3) -> None:
    """Give the zero-initialised experts values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for p in layer.experts.values():
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(**batch, labels=labels).loss


def mose_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# --- the layer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text_mode", ["experts", "lora", "none"])
@pytest.mark.parametrize("top_k", [None, 2])
def test_zero_init_equals_base_model(text_mode: str, top_k: int | None) -> None:
    model, ctx, ids = tiny_llama(), ModalityContext(), mixed_ids()
    batch = tokens(ids)
    with torch.no_grad():
        expected = model(**batch).logits
    inject_mose(model, ctx, rank=4, text_mode=text_mode, top_k=top_k)
    with torch.no_grad(), ctx.bind(ids):
        got = model(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def reference_output(layer: MoSELinear, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: W0 x + s w_m sum_e g_e B_e A x."""
    weights = layer.modality_weights.weights() if layer.modality_weights else torch.ones(2)
    out = layer.base_layer(x).clone()
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            group = next((g for g in layer.groups if int(g.modality) == int(ids[b, t])), None)
            if group is None:
                continue
            h = layer.lora_A @ x[b, t]
            if group.n_experts > 1:
                gate_in = x[b, t] if layer.gate_input == "hidden" else h
                probs = torch.softmax(layer.gates[group.name].weight @ gate_in, -1)
                if layer.top_k is not None:
                    keep = torch.zeros_like(probs)
                    keep[probs.topk(layer.top_k).indices] = 1
                    probs = probs * keep / (probs * keep).sum()
            else:
                probs = torch.ones(1)
            w = weights[group.weight_index] if group.weight_index is not None else 1.0
            for e in range(group.n_experts):
                expert = layer.experts[group.name][e]
                out[b, t] += layer.scaling * w * probs[e] * (expert @ h)
    return out


@pytest.mark.parametrize(
    ("top_k", "gate_input", "text_mode"),
    [(None, "hidden", "experts"), (2, "hidden", "lora"), (1, "shared_a", "experts")],
)
def test_batched_experts_equal_per_expert_loop(
    top_k: int | None, gate_input: str, text_mode: str
) -> None:
    torch.manual_seed(0)
    ctx, ids = ModalityContext(), mixed_ids()
    weights = FixedModalityWeights(audio=0.7, visual=1.6)
    layer = MoSELinear(
        nn.Linear(16, 24),
        ctx,
        rank=3,
        alpha=6.0,
        n_audio_experts=3,
        n_visual_experts=4,
        n_text_experts=2,
        top_k=top_k,
        gate_input=gate_input,
        text_mode=text_mode,
        modality_weights=weights,
    )
    randomize_experts([layer])
    x = torch.randn(*ids.shape, 16)
    with torch.no_grad(), ctx.bind(ids):
        got = layer(x)
    expected = reference_output(layer, x, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # PAD positions are exactly the base layer's output.
    pad = ids == P
    torch.testing.assert_close(got[pad], layer.base_layer(x)[pad], rtol=0, atol=0)


@pytest.mark.parametrize("top_k", [None, 2])
def test_gate_probabilities_sum_to_one_per_modality(top_k: int | None) -> None:
    ctx, ids = ModalityContext(), mixed_ids()
    layer = MoSELinear(
        nn.Linear(16, 16), ctx, rank=4, n_audio_experts=3, top_k=top_k, text_mode="experts"
    ).train()
    x = torch.randn(*ids.shape, 16)
    flat_x, flat_ids = x.reshape(-1, 16), ids.reshape(-1)
    with ctx.bind(ids):
        plan = layer.plan(*ids.shape, x.device)
        probs, mix, chosen = layer.route(flat_x, flat_x @ layer.lora_A.t(), plan)
        layer(x)
    for group in layer.groups:
        rows = flat_ids == int(group.modality)
        start, stop = layer.columns[group.name]
        n = int(rows.sum())
        # Over the group's own experts, per token: probabilities and mixing weights sum to 1 ...
        torch.testing.assert_close(probs[rows, start:stop].sum(-1), torch.ones(n))
        torch.testing.assert_close(mix[rows, start:stop].sum(-1), torch.ones(n))
        # ... other modalities' experts get exactly nothing ...
        assert probs[rows].sum().item() == pytest.approx(n)
        assert mix[rows].sum().item() == pytest.approx(n)
        # ... and top-k routes each token to exactly k experts.
        assert (chosen[rows].sum(-1) == (top_k or 1)).all()
    pad = flat_ids == P
    assert probs[pad].abs().sum() == 0 and mix[pad].abs().sum() == 0
    (record,) = layer.pop_records()
    assert set(record.groups) == {"audio", "visual", "text"}
    for group in layer.groups:
        r = record[group.name]
        assert r.count == int((ids == int(group.modality)).sum())
        assert r.importance.sum().item() == pytest.approx(r.count, rel=1e-5)
        assert r.usage.sum().item() == pytest.approx(r.count, rel=1e-5)
        assert int(r.dispatch.sum()) == r.count * (top_k or 1)


def test_top_k_mixes_only_k_experts_renormalised() -> None:
    ctx, ids = ModalityContext(), mixed_ids()
    layer = MoSELinear(nn.Linear(16, 16), ctx, rank=4, n_visual_experts=4, top_k=2)
    flat_x = torch.randn(ids.numel(), 16)
    with ctx.bind(ids):
        plan = layer.plan(*ids.shape, flat_x.device)
    probs, mix, _ = layer.route(flat_x, flat_x @ layer.lora_A.t(), plan)
    rows = ids.reshape(-1) == V
    start, stop = layer.columns["visual"]
    probs, mix = probs[rows, start:stop], mix[rows, start:stop]
    torch.testing.assert_close(probs, torch.softmax(layer.gates["visual"](flat_x[rows]), -1))
    assert ((mix > 0).sum(-1) == 2).all()
    torch.testing.assert_close(mix.sum(-1), torch.ones(int(rows.sum())))
    top2 = probs.topk(2, -1)
    torch.testing.assert_close(
        mix.gather(1, top2.indices), top2.values / top2.values.sum(-1, keepdim=True)
    )


@pytest.mark.slow
def test_compiled_core_matches_eager() -> None:
    """compile=True (torch.compile of the shared core) gives the same outputs and gradients."""
    torch.manual_seed(0)
    ctx, ids = ModalityContext(), mixed_ids()
    weights = LearnedModalityWeights()
    eager = MoSELinear(nn.Linear(16, 16), ctx, rank=4, top_k=2, modality_weights=weights).train()
    randomize_experts([eager])
    compiled = MoSELinear(
        eager.base_layer, ctx, rank=4, top_k=2, modality_weights=weights, compile=True
    ).train()
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(*ids.shape, 16)
    outputs, grads = [], []
    for layer in (eager, compiled):
        with ctx.bind(ids):
            out = layer(x)
        (record,) = layer.pop_records()
        (out.square().mean() + record.importance.square().sum()).backward()
        outputs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_shared_a_gets_gradient_from_every_modality() -> None:
    ctx, ids = ModalityContext(), mixed_ids()
    layer = MoSELinear(nn.Linear(16, 16), ctx, rank=4, text_mode="lora")
    randomize_experts([layer])
    x = torch.randn(*ids.shape, 16)
    for code in (A, V, T):
        layer.zero_grad()
        with ctx.bind(ids):
            out = layer(x)
        out[ids == code].pow(2).sum().backward()
        assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0, code
    # Tokens of one modality reach only their own experts.
    layer.zero_grad()
    with ctx.bind(ids):
        out = layer(x)
    out[ids == A].pow(2).sum().backward()
    assert layer.experts["audio"].grad.abs().sum() > 0
    assert layer.experts["visual"].grad.abs().sum() == 0


def test_only_mose_parameters_change_after_a_step() -> None:
    model, ctx, ids = tiny_llama(), ModalityContext(), mixed_ids()
    layers = inject_mose(model, ctx, rank=4, text_mode="experts", n_text_experts=2)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = mose_params(model)
    assert trainable and all(".base_layer." not in n for n in trainable)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    gate_loss = MoSEGateLoss(balance_weight=0.1, modality_balance_weight=0.1)
    batch = tokens(ids)
    for _ in range(2):  # B is zero at first, so A moves from the second step on
        optimizer.zero_grad()
        with ctx.bind(ids):
            loss = lm_loss(model, batch)
        records = [r for layer in layers for r in layer.pop_records()]
        (loss + gate_loss(records).loss).backward()
        optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (name in trainable), name


def test_absent_modality_is_safe_and_touches_every_parameter() -> None:
    """No audio token: no NaN, zero loss terms, yet every MoSE parameter gets a gradient."""
    model, ctx, ids = tiny_llama(), ModalityContext(), no_audio_ids()
    layers = inject_mose(model, ctx, rank=4, top_k=1, modality_weights=LearnedModalityWeights())
    randomize_experts(layers)
    model.train()
    with ctx.bind(ids):
        loss = lm_loss(model, tokens(ids))
    records = [r for layer in layers for r in layer.pop_records()]
    assert all(r["audio"].count == 0 for r in records)
    out = MoSEGateLoss(balance_weight=1.0, modality_balance_weight=1.0)(records)
    assert torch.isfinite(out.loss) and out.modality.item() == 0.0
    (loss + out.loss).backward()
    for name, param in mose_params(model).items():
        assert param.grad is not None, f"{name} is not in the graph (DDP would fail)"
        assert torch.isfinite(param.grad).all(), name


def test_inference_mode_forward_and_routing_cache_reuse() -> None:
    """Validation runs under inference_mode (tensors without version counters)."""
    model, ctx = tiny_llama(), ModalityContext()
    layers = inject_mose(model, ctx, rank=4)
    randomize_experts(layers)
    outputs = []
    for ids in (mixed_ids(), no_audio_ids()):  # same shape, new ids: the cache must not stick
        with torch.inference_mode(), ctx.bind(ids.clone()):
            outputs.append(model(**tokens(mixed_ids())).logits)
    with torch.no_grad(), ctx.bind(no_audio_ids()):
        expected = model(**tokens(mixed_ids())).logits
    torch.testing.assert_close(outputs[1], expected)
    assert not torch.equal(outputs[0], outputs[1])


def test_generate_with_kv_cache_treats_new_tokens_as_text() -> None:
    model, ctx, ids = tiny_llama(), ModalityContext(), mixed_ids()[1:]
    layers = inject_mose(model, ctx, rank=4, text_mode="lora")
    randomize_experts(layers)
    with torch.no_grad(), ctx.bind(ids):
        out = model.generate(**tokens(ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


# --- injection and checkpoints -----------------------------------------------------------------


def test_inject_selects_modules_and_layers_and_freezes_backbone() -> None:
    model, ctx = tiny_llama(), ModalityContext()
    layers = inject_mose(model, ctx, target_modules=("v_proj", "o_proj"), layers=[1], rank=2)
    names = [n for n, _ in mose_layers(model)]
    assert names == ["model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj"]
    assert len(layers) == 2
    assert all(
        (".self_attn." in n and "layers.1" in n and "base_layer" not in n) or "mose_modality" in n
        for n in mose_params(model)
    )
    with pytest.raises(ValueError, match="already contains MoSE"):
        inject_mose(model, ctx)


def test_inject_errors_are_clear() -> None:
    ctx = ModalityContext()
    with pytest.raises(ValueError, match="no nn.Linear named"):
        inject_mose(tiny_llama(), ctx, target_modules=("query",))
    with pytest.raises(ValueError, match=r"layers \[7\]"):
        inject_mose(tiny_llama(), ctx, layers=[0, 7])
    with pytest.raises(ValueError, match="top_k"):
        inject_mose(tiny_llama(), ctx, n_audio_experts=2, top_k=3)
    with pytest.raises(ValueError, match="text_mode"):
        MoSEAdapter(text_mode="tokens")
    with pytest.raises(RuntimeError, match="no modality_ids are bound"):
        model = tiny_llama()
        inject_mose(model, ctx)
        model(**tokens(mixed_ids()))


def test_save_reload_round_trip(tmp_path) -> None:
    ctx, ids = ModalityContext(), mixed_ids()
    model = tiny_llama(seed=0)
    weights = DominanceModalityWeights(momentum=0.0)
    layers = inject_mose(model, ctx, rank=4, top_k=2, modality_weights=weights)
    randomize_experts(layers)
    weights.observe(0.9, 0.3)  # measured weights change predictions: they must be saved too
    state = mose_state_dict(model)
    assert all(".base_layer." not in k for k in state)
    assert "mose_modality_weights._w" in state
    n_trainable = sum(1 for _ in mose_params(model))
    assert len(state) == n_trainable + 1
    torch.save(state, tmp_path / "mose.pt")
    batch = tokens(ids)
    with torch.no_grad(), ctx.bind(ids):
        expected = model(**batch).logits

    fresh, ctx2 = tiny_llama(seed=0), ModalityContext()
    inject_mose(fresh, ctx2, rank=4, top_k=2, modality_weights=DominanceModalityWeights())
    load_mose_state_dict(fresh, torch.load(tmp_path / "mose.pt"))
    with torch.no_grad(), ctx2.bind(ids):
        got = fresh(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    other, ctx3 = tiny_llama(seed=0), ModalityContext()
    inject_mose(other, ctx3, rank=4, layers=[0])
    with pytest.raises(KeyError, match="MoSE keys differ"):
        load_mose_state_dict(other, state)


# --- gating loss -------------------------------------------------------------------------------


def layer_record(
    probs: dict[str, torch.Tensor], contributions: dict[str, float | torch.Tensor] | None = None
) -> LayerRecord:
    """A hand-made record: per group, (tokens, experts) gate probabilities."""
    groups, columns, start = tuple(probs), [], 0
    for p in probs.values():
        columns.append((start, start + p.shape[1]))
        start += p.shape[1]
    contributions = contributions or {}
    return LayerRecord(
        groups=groups,
        columns=tuple(columns),
        counts=tuple(p.shape[0] for p in probs.values()),
        importance=torch.cat([p.sum(0) for p in probs.values()]),
        usage=torch.cat([p.detach().sum(0) for p in probs.values()]),
        dispatch=torch.cat(
            [F.one_hot(p.argmax(-1), p.shape[1]).sum(0).float() for p in probs.values()]
        ),
        contribution=torch.stack(
            [torch.as_tensor(contributions.get(n, 0.0), dtype=torch.float32) for n in groups]
        ),
    )


def test_balance_terms_are_minimal_for_uniform_usage() -> None:
    uniform = torch.full((8, 4), 0.25)
    skewed = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(8, 1)
    for kind in ("cv2", "switch"):
        loss = MoSEGateLoss(balance=kind)
        (low,) = loss.balance_terms([layer_record({"visual": uniform})], "visual")
        (high,) = loss.balance_terms([layer_record({"visual": skewed})], "visual")
        assert high > low
    assert cv_squared(uniform.sum(0)).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("kind", ["cv2", "switch"])
def test_minimising_the_gate_loss_balances_expert_usage(kind: str) -> None:
    torch.manual_seed(0)
    ctx, ids = ModalityContext(), mixed_ids()
    layer = MoSELinear(nn.Linear(16, 16), ctx, rank=4, n_visual_experts=4).train()
    with torch.no_grad():
        layer.gates["visual"].weight.zero_()
        layer.gates["visual"].weight[0] = 0.3  # expert 0 takes most visual tokens
    x = torch.randn(*ids.shape, 16).abs()
    loss_fn = MoSEGateLoss(balance=kind, balance_weight=1.0, modality_balance_weight=0.0)
    optimizer = torch.optim.SGD(layer.gates.parameters(), lr=0.5)

    def visual_entropy() -> float:
        p = rec["visual"].usage / rec["visual"].count
        return float(-(p * p.clamp_min(1e-12).log()).sum())

    entropies = []
    for _ in range(30):
        optimizer.zero_grad()
        with ctx.bind(ids):
            layer(x)
        (rec,) = layer.pop_records()
        entropies.append(visual_entropy())
        loss_fn([rec]).loss.backward()
        optimizer.step()
    assert entropies[-1] > entropies[0] + 0.2


def test_modality_balance_term_pulls_contributions_together() -> None:
    loss = MoSEGateLoss(balance_weight=0.0, modality_balance_weight=1.0)
    probs = torch.full((3, 2), 0.5)
    c_audio = torch.tensor(4.0, requires_grad=True)
    c_visual = torch.tensor(1.0, requires_grad=True)
    out = loss(
        [layer_record({"audio": probs, "visual": probs}, {"audio": c_audio, "visual": c_visual})]
    )
    assert out.modality.item() == pytest.approx((3 / 5) ** 2)
    out.loss.backward()
    assert c_audio.grad < 0 or c_audio.grad > 0
    assert c_audio.grad > 0 > c_visual.grad  # shrink the larger, grow the smaller
    balanced = loss(
        [layer_record({"audio": probs, "visual": probs}, {"audio": 2.0, "visual": 2.0})]
    )
    assert balanced.modality.item() == pytest.approx(0.0)


# --- modality weights --------------------------------------------------------------------------


def test_learned_weights_grow_for_the_modality_the_loss_rewards() -> None:
    ctx, ids = ModalityContext(), mixed_ids()
    weights = LearnedModalityWeights()
    layer = MoSELinear(nn.Linear(16, 16), ctx, rank=4, modality_weights=weights)
    randomize_experts([layer])
    torch.testing.assert_close(weights.weights(), torch.ones(2))
    x = torch.randn(*ids.shape, 16)
    optimizer = torch.optim.SGD(weights.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        with ctx.bind(ids):
            out = layer(x)
        delta = out - layer.base_layer(x).detach()
        # Reward a large audio update: the loss falls as w_audio rises.
        (-delta[ids == A].pow(2).sum()).backward()
        optimizer.step()
    w_audio, w_visual = weights.weights().tolist()
    assert w_audio > 1.0 > w_visual
    assert w_audio + w_visual == pytest.approx(2.0)


class FakeScorer(nn.Module):
    """Scores labels so that one modality alone is confident on the gold label."""

    def __init__(self, confident: Modality) -> None:
        super().__init__()
        self.confident = confident
        self.calls: list[tuple[Modality, ...]] = []

    def score_labels(self, batch, drop_modalities=()):
        self.calls.append(tuple(drop_modalities))
        n = len(batch["labels"])
        scores = torch.zeros(n, 3)
        kept = {Modality.AUDIO, Modality.VISUAL} - set(drop_modalities)
        if kept == {self.confident}:
            scores[torch.arange(n), batch["labels"]] = 4.0
        return scores


@pytest.mark.parametrize("dominant", [Modality.AUDIO, Modality.VISUAL])
def test_dominance_weights_shrink_the_dominant_modality(dominant: Modality) -> None:
    weights = DominanceModalityWeights(alpha=1.0, momentum=0.5, interval=2)
    scorer = FakeScorer(dominant).train()
    batch = {"labels": torch.tensor([0, 2, 1, -1])}
    weights.update(scorer, batch, step=1)  # not a measurement step
    assert scorer.calls == [] and weights.as_dict() == {"audio": 1.0, "visual": 1.0}
    weights.update(scorer, batch, step=2)
    assert sorted(scorer.calls) == [(Modality.AUDIO,), (Modality.VISUAL,)]
    assert scorer.training  # measured in eval mode, mode restored
    first = weights.as_dict()
    weak = "visual" if dominant == Modality.AUDIO else "audio"
    assert first[dominant.name.lower()] < 1.0 < first[weak]
    weights.update(scorer, batch, step=4)
    second = weights.as_dict()
    assert second[dominant.name.lower()] < first[dominant.name.lower()]  # EMA keeps moving
    assert sum(second.values()) == pytest.approx(2.0)


def test_dominance_target_is_neutral_when_balanced_and_floored() -> None:
    weights = DominanceModalityWeights(alpha=10.0, min_weight=0.2)
    torch.testing.assert_close(weights.target(0.4, 0.4), torch.ones(2))
    torch.testing.assert_close(weights.target(0.9, 0.1), torch.tensor([0.2, 1.8]))


def test_build_modality_weights_rejects_unknown() -> None:
    assert isinstance(build_modality_weights("none"), FixedModalityWeights)
    with pytest.raises(ValueError, match="modality_weighting"):
        build_modality_weights("random")


# --- the adapter -------------------------------------------------------------------------------


class TinyLLM(nn.Module):
    """The parts of MultimodalEmotionLLM the adapter uses."""

    def __init__(self) -> None:
        super().__init__()
        self.language_model = tiny_llama()
        self.modality_context = ModalityContext()

    def forward(self, batch):
        with self.modality_context.bind(batch["modality_ids"]):
            return lm_loss(self.language_model, tokens(batch["modality_ids"]))

    def score_labels(self, batch, drop_modalities=()):
        ids = batch["modality_ids"]
        mask = torch.ones_like(ids, dtype=torch.bool)
        for m in drop_modalities:
            mask &= ids != int(m)
        with self.modality_context.bind(ids):
            logits = self.language_model(**tokens(ids)).logits
        return (logits[..., :3] * mask.unsqueeze(-1)).mean(1)


@pytest.mark.parametrize("weighting", ["none", "learned", "dominance"])
def test_adapter_step_metrics_loss_and_figure(weighting: str) -> None:
    llm = TinyLLM().train()
    adapter = MoSEAdapter(
        rank=4, n_audio_experts=2, n_visual_experts=3, modality_weighting=weighting
    )
    assert isinstance(adapter, Adapter)
    adapter.apply(llm)
    assert len(adapter.mose_layers) == 4 and adapter.layer_names[0].endswith("0.self_attn.q_proj")
    optimizer = torch.optim.SGD([p for p in llm.parameters() if p.requires_grad], lr=0.1)
    for step, ids in enumerate([mixed_ids(), no_audio_ids(), mixed_ids()]):
        batch = {"modality_ids": ids, "labels": torch.tensor([0, 1])}
        adapter.on_train_batch_start(llm, batch, step)
        optimizer.zero_grad()
        loss = llm(batch)
        aux = adapter.auxiliary_loss()
        assert aux is not None and aux.requires_grad
        (loss + aux).backward()
        optimizer.step()
        metrics = adapter.step_metrics()
        assert {"gate_loss", "modality_weight/audio", "modality_weight/visual"} <= set(metrics)
        assert "expert_entropy/visual" in metrics
        assert ("expert_entropy/audio" in metrics) == bool((ids == A).any())
        assert all(v == v for v in metrics.values()), metrics  # no NaN
        assert 0.0 <= metrics["expert_entropy/visual"] <= torch.log(torch.tensor(3.0)) + 1e-6
    assert adapter.auxiliary_loss() is None  # consumed
    assert adapter.modality_weights() == {
        "audio": metrics["modality_weight/audio"],
        "visual": metrics["modality_weight/visual"],
    }
    figures = adapter.figures()
    fig = figures["expert_usage.png"]
    assert len([ax for ax in fig.axes if ax.get_title()]) == 2  # audio and visual heat maps
    usage = adapter.usage_table()
    assert usage["visual"].shape == (4, 3)
    torch.testing.assert_close(usage["visual"].sum(1), torch.ones(4))
    if weighting == "dominance":
        assert "dominance/ratio" in metrics


def test_adapter_ignores_forwards_outside_training() -> None:
    llm = TinyLLM()
    adapter = MoSEAdapter(rank=4)
    adapter.apply(llm)
    with torch.no_grad():
        llm.eval()(batch := {"modality_ids": mixed_ids()})
    llm.train()(batch)  # an unconsumed training forward before the step starts
    adapter.on_train_batch_start(llm, batch, 0)
    assert adapter.auxiliary_loss() is None
    with pytest.raises(RuntimeError, match="already called"):
        adapter.apply(llm)


# --- DDP ---------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        llm = TinyLLM().train()
        adapter = MoSEAdapter(rank=4, n_audio_experts=2, top_k=1, modality_weighting="dominance")
        adapter.apply(llm)
        model = nn.parallel.DistributedDataParallel(llm, find_unused_parameters=False)
        optimizer = torch.optim.SGD([p for p in llm.parameters() if p.requires_grad], lr=0.1)
        # Rank 1 never sees an audio token: its audio experts and gates get no real gradient.
        ids = mixed_ids() if rank == 0 else no_audio_ids()
        for step in range(2):
            batch = {"modality_ids": ids, "labels": torch.tensor([0, 1])}
            adapter.on_train_batch_start(llm, batch, step)
            optimizer.zero_grad()
            loss = model(batch) + adapter.auxiliary_loss()
            loss.backward()
            optimizer.step()
        torch.save(
            {"state": mose_state_dict(llm.language_model), "weights": adapter.modality_weights()},
            os.path.join(result_dir, f"rank{rank}.pt"),
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_with_a_modality_missing_on_one_rank(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["weights"] == r1["weights"]  # the dominance measurement is all-reduced
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:
        torch.testing.assert_close(r0["state"][key], r1["state"][key], msg=key)
    audio = [k for k in r0["state"] if k.endswith("experts.audio")]
    assert any(r0["state"][k].abs().sum() > 0 for k in audio)  # audio experts did train
