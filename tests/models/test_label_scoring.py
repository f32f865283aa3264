"""Closed-set label scoring in one batched pass equals a direct per-label computation."""

from pathlib import Path

import pytest
import torch

from src.core.modality import Modality
from src.core.streams import StreamSpec
from src.data.camer.datamodule import SyntheticCAMERDataModule
from src.data.camer.synthetic import SyntheticCAMERConfig
from src.models.adapters.lora import LoRAAdapter
from src.models.emotion_module import EmotionLLMModule

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
        backbone_config=TINY_LLAMA,
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
            backbone_path="meta-llama/Llama-2-7b-hf",
            tokenizer=module.hparams["tokenizer"],
            labels=["a", "b"],
            streams=STREAMS,
        )
    with pytest.raises(FileNotFoundError, match="local director"):
        EmotionLLMModule(
            backbone_config=TINY_LLAMA,
            tokenizer=str(tmp_path / "no-such-dir"),
            labels=["a"],
            streams=STREAMS,
        )
