"""Closed-set label scoring in one pass equals a direct per-label computation.

``score_labels`` runs each prompt once with every label's answer after it (tree-shaped
attention mask); ``score_labels_repeated`` is the method it replaced (each prompt repeated once
per label). Both must give the same scores with padding, dropped modalities, multi-token labels,
grouped-query attention, the eager attention implementation, MoSE routing and AR installed.
"""

from pathlib import Path

import pytest
import torch

from src.core.modality import Modality
from src.core.streams import StreamSpec
from src.data.camer.datamodule import SyntheticCAMERDataModule
from src.data.camer.synthetic import SyntheticCAMERConfig
from src.models.adapters.lora import LoRAAdapter
from src.models.adapters.mose_adapter import MoSEAdapter
from src.models.attention import reallocated
from src.models.attention.strategies import build_reallocator
from src.models.backbones.projected_causal_lm import ProjectedCausalLM
from src.models.emotion_module import EmotionLLMModule
from src.models.label_scoring import AnswerTree

STREAMS = [
    StreamSpec("face", "mae_340_UTT", "visual", 8, 3),
    StreamSpec("video", "maeV_399_UTT", "visual", 8, 2),
    StreamSpec("audio", "HL-UTT", "audio", 8, 1),
]
TINY_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[EmotionLLMModule, dict]:
    root = tmp_path_factory.mktemp("camer")
    data = SyntheticCAMERDataModule(
        str(root),
        streams=STREAMS,
        batch_size=5,
        eval_batch_size=5,
        synthetic=SyntheticCAMERConfig(n_train=10, n_val=5, n_test=10),
    )
    data.setup("test")
    module = EmotionLLMModule(
        backbone=ProjectedCausalLM(config=TINY_LLAMA),
        adapter=LoRAAdapter(r=4),
        tokenizer=data.tokenizer_path,
        labels=data.label_names,
        streams=STREAMS,
    )
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero LoRA B so the adapter takes part in the check
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    module.eval()
    batch = next(iter(data.test_dataloader()))
    return module, batch


def direct_label_logprob(module: EmotionLLMModule, batch: dict, row: int, label: int) -> float:
    """Sequence = this row's prompt (unpadded) + the label's answer tokens; sum of log-probs."""
    llm = module.model
    n = int((batch["modality_ids"][row] != int(Modality.PAD)).sum())
    answer = torch.tensor(llm.label_answer_ids[label])
    ids = torch.cat([batch["input_ids"][row, :n], answer])[None]
    modality = torch.cat([batch["modality_ids"][row, :n], torch.zeros_like(answer)])[None]
    streams = torch.cat([batch["stream_ids"][row, :n], torch.full_like(answer, -1)])[None]
    feats = {k: v[row : row + 1] for k, v in batch["features"].items()}
    out = llm.run_backbone(ids, torch.ones_like(ids), modality, streams, feats)
    logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)
    return sum(float(logprobs[n - 1 + i, tok]) for i, tok in enumerate(answer.tolist()))


def test_batched_scores_equal_direct_per_label_computation(setup):
    module, batch = setup
    with torch.no_grad():
        scores = module.model.score_labels(batch)
        assert scores.shape == (5, len(module.model.labels))
        for row in range(5):
            for label in range(len(module.model.labels)):
                expected = direct_label_logprob(module, batch, row, label)
                assert scores[row, label].item() == pytest.approx(expected, abs=1e-4)


def test_dropping_a_modality_makes_scores_blind_to_it(setup):
    module, batch = setup
    noisy = {
        **batch,
        "features": {**batch["features"], "audio": torch.randn_like(batch["features"]["audio"])},
    }
    with torch.no_grad():
        full = module.model.score_labels(batch)
        assert not torch.allclose(full, module.model.score_labels(noisy))
        no_audio = module.model.score_labels(batch, drop_modalities=(Modality.AUDIO,))
        no_audio_noisy = module.model.score_labels(noisy, drop_modalities=(Modality.AUDIO,))
    torch.testing.assert_close(no_audio, no_audio_noisy)


def test_lm_loss_is_cross_entropy_on_answer_tokens_only(setup):
    module, batch = setup
    llm = module.model
    with torch.no_grad():
        loss = llm.lm_loss(batch)
        # The gold label's log-likelihood per token, averaged over all answer tokens.
        total, count = 0.0, 0
        for row, label in enumerate(batch["labels"].tolist()):
            total += direct_label_logprob(module, batch, row, label)
            count += len(llm.label_answer_ids[label])
    assert loss.item() == pytest.approx(-total / count, abs=1e-4)


def test_only_adapter_and_projectors_train(setup):
    module, _ = setup
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or (".projectors." in n) for n in trainable)


def test_a_hub_id_fails_with_advice(setup, tmp_path: Path):
    module, _ = setup
    with pytest.raises(FileNotFoundError, match="local director"):
        EmotionLLMModule(
            backbone=ProjectedCausalLM(path="meta-llama/Llama-2-7b-hf"),
            tokenizer=module.hparams["tokenizer"],
            labels=["a", "b"],
            streams=STREAMS,
        )
    with pytest.raises(FileNotFoundError, match="local director"):
        EmotionLLMModule(
            backbone=ProjectedCausalLM(config=TINY_LLAMA),
            tokenizer=str(tmp_path / "no-such-dir"),
            labels=["a"],
            streams=STREAMS,
        )


# --------------------------------------------------------------------- one pass vs repeated


def build_module(
    data_setup, adapter=None, labels=None, attn_implementation=None, **kwargs
) -> EmotionLLMModule:
    """A tiny module with non-zero adapter weights (so the adapter takes part in the check)."""
    module_, batch = data_setup
    module = EmotionLLMModule(
        backbone=ProjectedCausalLM(config=TINY_LLAMA, attn_implementation=attn_implementation),
        adapter=adapter,
        tokenizer=module_.hparams["tokenizer"],
        labels=labels or list(module_.model.labels),
        streams=STREAMS,
        **kwargs,
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name or ".experts." in name:
                p.normal_(0, 0.1)
    return module.eval()


def assert_same_scores(llm, batch, drop=()) -> torch.Tensor:
    with torch.no_grad():
        new = llm.score_labels(batch, drop_modalities=drop)
        old = llm.score_labels_repeated(batch, drop_modalities=drop)
    assert new.shape == old.shape == (batch["input_ids"].shape[0], len(llm.labels))
    torch.testing.assert_close(new, old, rtol=0, atol=2e-5)
    assert torch.equal(new.argmax(1), old.argmax(1))
    return new


def test_padded_prompts_of_different_lengths_and_dropped_modalities(setup):
    module, batch = setup
    lengths = (batch["modality_ids"] != int(Modality.PAD)).sum(1)
    assert lengths.unique().numel() > 1  # right padding takes part
    for drop in ((), (Modality.AUDIO,), (Modality.VISUAL,)):
        assert_same_scores(module.model, batch, drop)


def test_a_wider_padded_batch_changes_nothing(setup):
    """Extra padding columns (a wider collated batch) give the same scores."""
    module, batch = setup
    extra = 7
    padded = {**batch}
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("modality_ids", -1)):
        padded[key] = torch.nn.functional.pad(batch[key], (0, extra), value=fill)
    padded["stream_ids"] = torch.nn.functional.pad(batch["stream_ids"], (0, extra), value=-1)
    with torch.no_grad():
        torch.testing.assert_close(
            module.model.score_labels(padded), module.model.score_labels(batch), rtol=0, atol=2e-5
        )


@pytest.mark.parametrize("length_normalize", [False, True])
def test_multi_token_labels_of_different_lengths(setup, length_normalize):
    # Label "words" of 1 to 3 tokens (plus EOS) from the synthetic vocabulary.
    labels = ["happy", "sad angry", "neutral worried surprise", "angry"]
    module = build_module(setup, LoRAAdapter(r=4), labels, length_normalize=length_normalize)
    lengths = [len(a) for a in module.model.label_answer_ids]
    assert len(set(lengths)) == 3 and max(lengths) == 4
    _, batch = setup
    assert_same_scores(module.model, batch)
    assert_same_scores(module.model, batch, (Modality.VISUAL,))


def test_eager_attention_implementation_with_grouped_query_attention(setup):
    # The tiny config has grouped-query attention (4 query heads over 2 key/value heads).
    assert TINY_LLAMA["num_key_value_heads"] < TINY_LLAMA["num_attention_heads"]
    _, batch = setup
    eager = build_module(setup, LoRAAdapter(r=4), attn_implementation="eager")
    assert_same_scores(eager.model, batch)


@pytest.mark.parametrize("text_mode", ["lora", "experts"])
def test_mose_routes_answer_tokens_as_text(setup, text_mode):
    _, batch = setup
    module = build_module(setup, MoSEAdapter(rank=4, dropout=0.0, text_mode=text_mode))
    assert_same_scores(module.model, batch)
    assert_same_scores(module.model, batch, (Modality.AUDIO,))
    # With text experts off for the answer, scores would differ: the routing matters.
    if text_mode == "experts":
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.endswith("experts.text"):
                    p.zero_()
        changed = module.model.score_labels(batch)
        base = build_module(setup, MoSEAdapter(rank=4, dropout=0.0, text_mode=text_mode))
        assert not torch.allclose(changed, base.model.score_labels(batch), atol=1e-4)


# Parity of the AR path, not a recommended setting: the fixed targets raise audio's share on
# purpose (only_away off), so that AR changes the scores.
AR_SETTINGS = [
    {"mode": "span_mass", "target": "proportional", "query_rows": "text"},
    {
        "mode": "span_mass",
        "target": "fixed",
        "audio_share": 0.8,
        "query_rows": "all",
        "only_away": False,
    },
    {"mode": "reweight", "multipliers": {"audio": 3.0, "visual": 0.5}, "query_rows": "text"},
    {"mode": "logit_scale", "alpha": 0.5, "query_rows": "text"},
    {
        "mode": "span_mass",
        "target": "fixed",
        "audio_share": 0.9,
        "query_rows": "last",
        "only_away": False,
    },
]


@pytest.mark.parametrize("settings", AR_SETTINGS, ids=lambda s: f"{s['mode']}-{s['query_rows']}")
def test_scores_with_attention_reallocation_installed(setup, settings):
    module, batch = setup
    llm = module.model
    layers = llm.language_model.config.num_hidden_layers
    heads = llm.language_model.config.num_attention_heads
    with torch.no_grad():
        plain = llm.score_labels(batch)
    old_ar = build_reallocator(**settings).bind(llm.modality_context, layers)
    with reallocated(llm.language_model, old_ar), torch.no_grad():
        old = llm.score_labels_repeated(batch)
    new_ar = build_reallocator(**settings).bind(llm.modality_context, layers)
    with reallocated(llm.language_model, new_ar), torch.no_grad():
        new = llm.score_labels(batch, drop_modalities=())
    torch.testing.assert_close(new, old, rtol=0, atol=2e-5)
    if settings["query_rows"] != "last":  # `last` is each answer's final row: no score uses it
        assert (new - plain).abs().max() > 2e-4  # ten times the parity tolerance
    # The reallocation (and its monitor) sees each prompt row once, then each answer token once.
    prompt = batch["modality_ids"]
    answers = llm.answer_tree().size
    rows = {
        "text": int((prompt == int(Modality.TEXT)).sum()) + prompt.shape[0] * answers,
        "all": int((prompt != int(Modality.PAD)).sum()) + prompt.shape[0] * answers,
        "last": 1 * prompt.shape[0],
    }[settings["query_rows"]]
    assert new_ar.monitor.count.tolist() == [rows * heads] * layers


def test_answer_tree_layout():
    tree = AnswerTree.build([[5, 9], [7], [3, 4, 9]])
    assert tree.ids.tolist() == [5, 9, 7, 3, 4, 9]
    assert tree.label.tolist() == [0, 0, 1, 2, 2, 2]
    assert tree.depth.tolist() == [0, 1, 0, 0, 1, 2]
    assert tree.inner.tolist() == [0, 3, 4]  # tokens that predict a next token of their answer
    assert tree.predictor.tolist() == [0, 1, 0, 0, 2, 3]
    with pytest.raises(ValueError, match="answer tokens"):
        AnswerTree.build([[1], []])
