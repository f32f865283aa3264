"""AR core: parity of the SDPA reallocation with an explicit eager post-softmax reference."""

import math
import uuid

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from src.core.modality import Modality
from src.models.attention import (
    ShareMonitor,
    build_reallocator,
    install_reallocator,
    reallocated,
    restore_attention,
    unique_name,
)
from src.models.attention.spans import (
    key_one_hot,
    keys_bias,
    share_pair,
    span_mass_factors,
    span_masses,
)
from src.models.modality_context import ModalityContext

T, A, V, P = (int(Modality.TEXT), int(Modality.AUDIO), int(Modality.VISUAL), int(Modality.PAD))
VOCAB = 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Hidden 64, 2 layers, 4 query heads over 2 key/value heads (GQA)."""
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        initializer_range=0.2,  # peaky attention, so reallocation changes outputs visibly
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def make_batch(padding: str | None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two samples: text, audio, visual and text spans in different orders and lengths."""
    first = [T, T, A, V, V, V, V, V, T, T, T, T]
    second = [T, V, V, V, V, A, T, T, T, T] if padding else [T, T, V, V, V, V, V, A, T, T, T, T]
    width = len(first)
    pad = [P] * (width - len(second))
    if padding == "left":
        second = pad + second
    elif padding == "right":
        second = second + pad
    modality_ids = torch.tensor([first, second])
    attention_mask = (modality_ids != P).long()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, modality_ids.shape, generator=generator)
    return {
        "input_ids": input_ids.masked_fill(attention_mask == 0, 0),
        "attention_mask": attention_mask,
        "modality_ids": modality_ids,
    }


# ---------------------------------------------------------------- the reference


def _selected_row(ids: torch.Tensor, row: int, query_rows: str) -> bool:
    if query_rows == "text":
        return bool(ids[row] == T)
    if query_rows == "all":
        return bool(ids[row] != P)
    real = (ids != P).nonzero()
    return len(real) > 0 and row == int(real[-1])


def _masses(p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.stack([p[ids == m].sum() for m in (A, V, T)])


class EagerReference:
    """Eager attention, then the reallocation written out row by row on the probabilities."""

    def __init__(self, context: ModalityContext, num_layers: int, **settings: object) -> None:
        self.context = context
        self.mode = settings.get("mode", "span_mass")
        self.multipliers = settings.get("multipliers", {})
        self.target = settings.get("target", "proportional")
        self.audio_share = settings.get("audio_share", 0.5)
        self.strength = settings.get("strength", 1.0)
        self.only_away = settings.get("only_away", True)  # never raise audio (over-relied)
        self.gated = settings.get("sample_gate")  # per-sample gate or None (all samples)
        self.alpha = settings.get("alpha", 0.5)
        self.scale_modality = settings.get("scale_modality", "visual")
        self.layers = [i % num_layers for i in settings.get("layers") or range(num_layers)]
        self.heads = settings.get("heads")
        self.query_rows = settings.get("query_rows", "text")
        self.sums = torch.zeros(num_layers, 7, dtype=torch.float64)

    def __call__(self, module, query, key, value, attention_mask, scaling, **kwargs):
        groups = module.num_key_value_groups
        key = key.repeat_interleave(groups, dim=1).float()
        value = value.repeat_interleave(groups, dim=1).float()
        batch, heads, q_len, _ = query.shape
        k_len = key.shape[2]
        key_ids = self.context.keys(k_len)
        query_ids = self.context.queries(q_len, k_len)
        logits = query.float() @ key.transpose(-1, -2) * scaling + attention_mask
        visible = attention_mask == 0
        layer = module.layer_idx
        acts = layer in self.layers
        if self.mode == "logit_scale" and acts:
            target_keys = key_ids == int(Modality.parse(self.scale_modality))
            for b in range(batch):
                for row in range(q_len):
                    if not _selected_row(query_ids[b], row, self.query_rows):
                        continue
                    for h in self.heads or range(heads):
                        cols = target_keys[b] & visible[b, 0, row]
                        s = logits[b, h, row, cols]
                        logits[b, h, row, cols] = s + self.alpha * s.abs()
        original = torch.softmax(
            query.float() @ key.transpose(-1, -2) * scaling + attention_mask, -1
        )
        probs = torch.softmax(logits, dim=-1)
        for b in range(batch):
            ids = key_ids[b]
            for row in range(q_len):
                if not _selected_row(query_ids[b], row, self.query_rows):
                    continue
                for h in self.heads or range(heads):
                    p = probs[b, h, row]
                    gated_out = self.gated is not None and not self.gated[b]
                    if gated_out:
                        p = original[b, h, row]
                    elif acts and self.mode == "reweight":
                        weights = torch.ones_like(p)
                        for name, w in self.multipliers.items():
                            weights[ids == int(Modality.parse(name))] = w
                        p = p * weights / (p * weights).sum()
                    elif acts and self.mode == "span_mass":
                        audio, visual = p[ids == A].sum(), p[ids == V].sum()
                        if audio > 0 and visual > 0:
                            if self.target == "fixed":
                                share = self.audio_share
                            else:
                                seen = visible[b, 0, row]
                                n_a, n_v = (seen & (ids == A)).sum(), (seen & (ids == V)).sum()
                                share = float(n_a / (n_a + n_v))
                            total, s = audio + visual, self.strength
                            new_audio = (1 - s) * audio + s * share * total
                            new_visual = (1 - s) * visual + s * (1 - share) * total
                            if not (self.only_away and new_audio > audio):
                                p = p.clone()
                                p[ids == A] *= new_audio / audio
                                p[ids == V] *= new_visual / visual
                    probs[b, h, row] = p
                    before = _masses(original[b, h, row], ids)
                    after = _masses(p, ids)
                    one = torch.ones(1, device=p.device)
                    self.sums[layer] += torch.cat([before, after, one]).double().cpu()
        out = (probs @ value).transpose(1, 2).contiguous().to(query.dtype)
        return out, probs


def run(model, batch, attention=None, *, generate: int = 0) -> torch.Tensor:
    """Forward logits (or greedy tokens) with ``modality_ids`` bound; ``attention`` = a callable
    registered for the call (the eager reference), or a Reallocator, or None for plain SDPA."""
    context = model._test_context
    batch = {k: v.to(model.device) for k, v in batch.items()}
    with torch.no_grad(), context.bind(batch["modality_ids"]):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if generate:
            return model.generate(**inputs, max_new_tokens=generate, do_sample=False)
        return model(**inputs).logits


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA)])
def model(request) -> LlamaForCausalLM:
    """The tiny Llama on each available device (the CUDA run checks the GPU SDPA kernels)."""
    llm = tiny_llama().to(request.param)
    llm._test_context = ModalityContext()
    return llm


def with_reference(model, batch, settings: dict, *, generate: int = 0):
    """Run ``model`` under the eager reference; return (output, reference)."""
    reference = EagerReference(model._test_context, model.config.num_hidden_layers, **settings)
    name = f"ar_test_reference_{uuid.uuid4().hex[:8]}"
    AttentionInterface.register(name, reference)
    AttentionMaskInterface.register(name, eager_mask)
    model.set_attn_implementation(name)
    try:
        return run(model, batch, generate=generate), reference
    finally:
        model.set_attn_implementation("sdpa")


def with_ar(model, batch, settings: dict, *, generate: int = 0):
    """Run ``model`` under a Reallocator built from ``settings``; return (output, reallocator)."""
    reallocator = build_reallocator(**settings).bind(
        model._test_context, model.config.num_hidden_layers, {"audio": 1.0, "visual": 3.0}
    )
    with reallocated(model, reallocator):
        return run(model, batch, generate=generate), reallocator


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_multipliers_of_one_equal_plain_sdpa(model, padding):
    batch = make_batch(padding)
    plain = run(model, batch)
    out, reallocator = with_ar(model, batch, {"mode": "reweight", "multipliers": {"audio": 1.0}})
    assert reallocator.calls == model.config.num_hidden_layers
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=0)


def test_unit_bias_path_equals_plain_sdpa(model):
    """A multiplier of 1 + 1e-12 is not the identity, so the selected rows go through the biased
    SDPA call and get scattered back: that path alone must still match plain SDPA."""
    batch = make_batch("left")
    plain = run(model, batch)
    settings = {"mode": "reweight", "multipliers": {"audio": 1.0 + 1e-12}}
    out, _ = with_ar(model, batch, settings)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=0)


SETTINGS = [
    {"mode": "reweight", "multipliers": {"audio": 0.25, "visual": 3.0}},
    {"mode": "reweight", "multipliers": {"text": 0.5, "visual": 2.0}, "query_rows": "all"},
    {"mode": "span_mass", "target": "proportional"},
    {"mode": "span_mass", "target": "fixed", "audio_share": 0.1, "strength": 0.7},
    {
        "mode": "span_mass",
        "target": "fixed",
        "audio_share": 0.9,
        "layers": [-1],
        "heads": [0, 3],
        "only_away": False,
    },
    {"mode": "span_mass", "target": "fixed", "audio_share": 0.2, "query_rows": "last"},
    {"mode": "logit_scale", "alpha": 0.5, "scale_modality": "visual"},
    {"mode": "logit_scale", "alpha": 0.8, "scale_modality": "audio", "query_rows": "last"},
]


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_forward_equals_eager_reference(model, padding, settings):
    batch = make_batch(padding)
    expected, reference = with_reference(model, batch, settings)
    out, reallocator = with_ar(model, batch, settings)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=0)
    # The reallocation must matter, or the parity above proves nothing.
    assert (out[real] - run(model, batch)[real]).abs().max() > 1e-3
    # The share monitor equals the shares the reference computed row by row.
    before, after = (x.cpu() for x in reallocator.monitor.per_layer())
    count = reference.sums[:, -1:]
    torch.testing.assert_close(reallocator.monitor.count.cpu(), reference.sums[:, -1])
    torch.testing.assert_close(before, reference.sums[:, :3] / count, atol=1e-6, rtol=0)
    torch.testing.assert_close(after, reference.sums[:, 3:6] / count, atol=1e-6, rtol=0)


@pytest.mark.parametrize("padding", [None, "left"])
@pytest.mark.parametrize("settings", SETTINGS[::2] + SETTINGS[5:6], ids=lambda s: s["mode"])
def test_greedy_generation_equals_eager_reference(model, padding, settings):
    batch = make_batch(padding, seed=1)
    expected, reference = with_reference(model, batch, settings, generate=6)
    tokens, reallocator = with_ar(model, batch, settings, generate=6)
    assert torch.equal(tokens, expected)
    # Every step of the KV-cached decode went through AR (prefill + 5 one-token steps).
    assert reallocator.calls == 6 * model.config.num_hidden_layers
    torch.testing.assert_close(reallocator.monitor.count.cpu(), reference.sums[:, -1])


def test_generation_changes_under_reallocation(model):
    batch = make_batch("left", seed=1)
    plain = run(model, batch, generate=6)
    settings = {"mode": "reweight", "multipliers": {"visual": 50.0}, "query_rows": "all"}
    tokens, _ = with_ar(model, batch, settings, generate=6)
    assert not torch.equal(tokens, plain)


def test_original_implementation_restored(model):
    batch = make_batch("left")
    plain = run(model, batch)
    reallocator = build_reallocator(mode="span_mass").bind(model._test_context, 2)
    name = unique_name()
    original = install_reallocator(model, reallocator, name)
    assert original == "sdpa"
    assert model.config._attn_implementation == name
    restore_attention(model, name, original)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(run(model, batch), plain, atol=0, rtol=0)
    # A stale switch to the uninstalled name fails loudly instead of silently running AR.
    model.set_attn_implementation(name)
    with pytest.raises(RuntimeError, match="uninstalled"):
        run(model, batch)
    model.set_attn_implementation("sdpa")


def test_restored_after_exception(model):
    reallocator = build_reallocator(mode="reweight").bind(model._test_context, 2)
    with pytest.raises(RuntimeError, match="no modality_ids"):
        with reallocated(model, reallocator):
            model(input_ids=torch.ones(1, 4, dtype=torch.long, device=model.device))  # unbound
    assert model.config._attn_implementation == "sdpa"


def test_eager_original_is_restored_too():
    llm = tiny_llama()
    llm.set_attn_implementation("eager")
    context = ModalityContext()
    reallocator = build_reallocator(mode="reweight", multipliers={"visual": 2.0}).bind(context, 2)
    with reallocated(llm, reallocator):
        assert llm.config._attn_implementation != "eager"
    assert llm.config._attn_implementation == "eager"


def test_refuses_training_mode(model):
    batch = make_batch(None)
    model.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        with_ar(model, batch, {"mode": "span_mass"})


def test_unbound_reallocator_is_refused(model):
    with pytest.raises(RuntimeError, match="bind"):
        install_reallocator(model, build_reallocator(), unique_name())


# ------------------------------------------------------- the math, directly


def _random_case(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 5, 9, generator=generator) * 3
    key_ids = torch.tensor([[T, A, V, V, V, T, T, P, P], [V, V, A, A, T, T, T, T, T]])
    visible = torch.rand(2, 1, 5, 9, generator=generator) > 0.2
    visible[..., 1:4] = True  # both spans visible in every row of the first sample
    visible &= key_ids[:, None, None] != P
    return logits.masked_fill(~visible, -math.inf), key_ids


@pytest.mark.parametrize("strength", [1.0, 0.4])
@pytest.mark.parametrize("share", [0.05, 0.5, 0.93])
def test_span_mass_bias_is_exact_post_softmax_reallocation(strength, share):
    logits, key_ids = _random_case()
    probs = torch.softmax(logits, dim=-1)
    one_hot = key_one_hot(key_ids)
    factors = span_mass_factors(span_masses(probs, one_hot), share_pair(share), strength)
    moved = torch.softmax(logits + keys_bias(factors, one_hot), dim=-1)
    torch.testing.assert_close(moved.sum(-1), torch.ones(2, 3, 5))  # rows sum to one
    is_a, is_v = (key_ids == A)[:, None, None], (key_ids == V)[:, None, None]
    audio, visual = (probs * is_a).sum(-1), (probs * is_v).sum(-1)
    total = audio + visual
    new_audio = (1 - strength) * audio + strength * share * total
    new_visual = (1 - strength) * visual + strength * (1 - share) * total
    valid = ((audio > 0) & (visual > 0))[..., None]
    expected = torch.where(is_a, probs * (new_audio / audio)[..., None], probs)
    expected = torch.where(is_v, probs * (new_visual / visual)[..., None], expected)
    expected = torch.where(valid, expected, probs)
    torch.testing.assert_close(moved, expected, atol=1e-6, rtol=0)
    assert valid.any()
    if strength == 1.0:  # the target is reached exactly
        got = (moved * is_a).sum(-1) / ((moved * is_a).sum(-1) + (moved * is_v).sum(-1))
        torch.testing.assert_close(got[valid[..., 0]], torch.full_like(got[valid[..., 0]], share))


def test_span_masses_and_target_extremes():
    logits, key_ids = _random_case(1)
    probs = torch.softmax(logits, dim=-1)
    one_hot = key_one_hot(key_ids)
    masses = span_masses(probs, one_hot)
    for i, m in enumerate((A, V, T)):
        expected = (probs * (key_ids == m)[:, None, None]).sum(-1)
        torch.testing.assert_close(masses[..., i], expected, atol=1e-6, rtol=0)
    # A target share of 0 empties the audio span exactly and keeps the rows finite.
    factors = span_mass_factors(masses, share_pair(0.0), 1.0)
    moved = torch.softmax(logits + keys_bias(factors, one_hot), -1)
    assert torch.isfinite(moved[0]).all()
    assert (moved[0] * (key_ids[0] == A)).sum() == 0
    # Fully masked rows (NaN probabilities) are left alone rather than poisoning the bias.
    nan_masses = torch.full((1, 1, 1, 3), float("nan"))
    assert (span_mass_factors(nan_masses, share_pair(0.5), 1.0) == 1).all()


def test_share_monitor_sums_selected_entries():
    monitor = ShareMonitor(num_layers=3)
    before = torch.tensor([[0.2, 0.3, 0.5], [float("nan")] * 3, [0.0, 0.6, 0.4]])
    after = torch.tensor([[0.1, 0.4, 0.5], [float("nan")] * 3, [0.2, 0.4, 0.4]])
    selected = torch.tensor([True, False, True])
    monitor.update(1, before, after, selected)
    shares_before, shares_after = monitor.per_layer()
    torch.testing.assert_close(
        shares_before[1], torch.tensor([0.1, 0.45, 0.45], dtype=torch.float64)
    )
    torch.testing.assert_close(
        shares_after[1], torch.tensor([0.15, 0.4, 0.45], dtype=torch.float64)
    )
    assert torch.isnan(shares_before[0]).all()
    summary = monitor.summary()
    assert summary["after"]["audio"] == pytest.approx(0.15)
    assert set(summary["before"]) == {"audio", "visual", "text"}
    fig = monitor.figure()
    assert len(fig.axes) == 1
    with pytest.raises(ValueError, match="out of range"):
        monitor.update(3, before, after, selected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "boost"}, "mode"),
        ({"multipliers": {"audio": 0.0}}, "multipliers"),
        ({"multipliers": {"smell": 2.0}}, "unknown modality"),
        ({"mode": "span_mass", "audio_share": 1.5}, "audio_share"),
        ({"gate": "sometimes"}, "gate"),
        ({"over_relied": "text"}, "over_relied"),
        ({"query_rows": "first"}, "query_rows"),
        ({"strength": -0.1}, "strength"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_reallocator(**kwargs)


def test_from_adapter_needs_weights_and_uses_them(model):
    context = ModalityContext()
    with pytest.raises(ValueError, match="modality weights"):
        build_reallocator(mode="span_mass", target="from_adapter").bind(context, 2, None)
    with pytest.raises(ValueError, match="out of range"):
        build_reallocator(layers=[5]).bind(context, 2)
    batch = make_batch("left")
    # with_ar binds weights audio 1, visual 3: the same as a fixed audio share of 1/4.
    from_adapter, _ = with_ar(model, batch, {"mode": "span_mass", "target": "from_adapter"})
    fixed, _ = with_ar(model, batch, {"mode": "span_mass", "target": "fixed", "audio_share": 0.25})
    torch.testing.assert_close(from_adapter, fixed, atol=0, rtol=0)


@pytest.mark.parametrize("monitor", [True, False])
def test_consecutive_forwards_do_not_reuse_stale_rows(model, monitor):
    """Per-forward bookkeeping is shared across layers; a new batch of the same shape (and the
    same ``None`` mask) with other modality ids must not reuse it."""
    batch = make_batch(None)
    flipped = {k: v.flip(0) for k, v in batch.items()}
    reallocator = build_reallocator(
        mode="reweight", multipliers={"visual": 4.0}, layers=[1], monitor=monitor
    ).bind(model._test_context, 2)
    with reallocated(model, reallocator):
        first = run(model, batch)
        second = run(model, flipped)
    torch.testing.assert_close(second, first.flip(0), atol=1e-5, rtol=0)
    expected, _ = with_reference(
        model, flipped, {"mode": "reweight", "multipliers": {"visual": 4.0}, "layers": [1]}
    )
    torch.testing.assert_close(second, expected, atol=1e-5, rtol=0)
