"""The multimodal emotion LLM: projected feature tokens and text in one frozen causal LM."""

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from src.core.modality import Modality
from src.core.streams import StreamSpec
from src.data.components.batch import EmotionBatch, left_aligned, with_continuations
from src.data.components.prompt import label_answer_ids
from src.models.backbones.base import EmotionBackbone
from src.models.label_scoring import AnswerTree, tree_inputs, tree_scores
from src.models.modality_context import ModalityContext


class MultimodalEmotionLLM(nn.Module):
    """Scores, trains and generates with any :class:`EmotionBackbone` on prompt batches.

    Batches come from :class:`~src.data.components.collate.EmotionCollator`. The batch's
    ``modality_ids`` are bound to :attr:`modality_context` around every backbone call, so adapters
    (MoSE) and the attention function (AR) inside the backbone know which token is which.

    Args:
        backbone: The backbone component, built for ``tokenizer`` and ``streams`` (adapters
            adapt its language model later).
        tokenizer: The backbone's tokenizer.
        streams: Feature streams, in the order of ``batch["stream_ids"]``.
        labels: Label words in class order (closed-set candidates).
        length_normalize: Score a label by its mean token log-likelihood instead of the sum
            (matters for multi-token label words of real tokenizers); ``None``: on when the
            label answers differ in length (real tokenizers), off when every label is one token
            (the demo's word-level tokenizer).
    """

    def __init__(
        self,
        backbone: EmotionBackbone,
        tokenizer: PreTrainedTokenizerBase,
        streams: Sequence[StreamSpec],
        labels: Sequence[str],
        length_normalize: bool | None = None,
    ) -> None:
        super().__init__()
        if not backbone.is_built:
            backbone.build(tokenizer, streams)
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.streams = list(streams)
        self.labels = list(labels)
        self.modality_context = ModalityContext()
        # Refuses label words the tokenizer encodes alike (e.g. unknown words -> <unk>).
        self.label_answer_ids = label_answer_ids(tokenizer, self.labels)
        if length_normalize is None:
            length_normalize = len({len(ids) for ids in self.label_answer_ids}) > 1
        self.length_normalize = length_normalize
        self._answer_trees = {"cpu": AnswerTree.build(self.label_answer_ids)}

    # ----------------------------------------------------------------------------- backbone
    @property
    def language_model(self) -> PreTrainedModel:
        """The backbone's frozen causal LM (what adapters adapt; one that replaces it sets
        ``backbone.language_model``: a module attribute cannot be a property setter)."""
        return self.backbone.language_model

    def embed(
        self, input_ids: torch.Tensor, stream_ids: torch.Tensor, features: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Prompt embeddings with every stream's positions filled by the backbone."""
        return self.backbone.embed(input_ids, stream_ids, features)

    def run_backbone(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        modality_ids: torch.Tensor,
        stream_ids: torch.Tensor,
        features: dict[str, torch.Tensor],
        **kwargs: Any,
    ) -> Any:
        """One backbone forward with ``modality_ids`` bound to the modality context, at the
        backbone's own positions when it has them."""
        embeds = self.embed(input_ids, stream_ids, features)
        if "position_ids" not in kwargs:
            positions = self.positions(input_ids, modality_ids)
            if positions is not None:
                kwargs["position_ids"] = positions
        with self.modality_context.bind(modality_ids):
            return self.backbone(embeds, attention_mask, **kwargs)

    def positions(self, input_ids: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor | None:
        """The backbone's own position ids (``None``: the LM counts tokens). Padding is read
        from ``modality_ids``, not the attention mask, which may hide a dropped modality's
        tokens: they keep their places."""
        return self.backbone.position_ids(input_ids, modality_ids != int(Modality.PAD))

    @staticmethod
    def _drop(batch: EmotionBatch, drop_modalities: Sequence[Modality]) -> EmotionBatch:
        """Mask the tokens of ``drop_modalities`` out of attention (unimodal evidence)."""
        if not drop_modalities:
            return batch
        keep = torch.ones_like(batch["attention_mask"], dtype=torch.bool)
        for m in drop_modalities:
            keep &= batch["modality_ids"] != int(m)
        return {**batch, "attention_mask": batch["attention_mask"] * keep.long()}

    # ------------------------------------------------------------------------ objectives
    def lm_loss(
        self, batch: EmotionBatch, drop_modalities: Sequence[Modality] = ()
    ) -> torch.Tensor:
        """Causal-LM loss on the answer tokens only (label word or reasoning), as Emotion-LLaMA;
        ``drop_modalities`` masks those modalities out of attention (a unimodal loss)."""
        batch = self._drop(batch, drop_modalities)
        targets = batch["target_ids"]
        missing = [n for n, t in zip(batch["names"], targets, strict=True) if not t]
        if missing:
            raise ValueError(f"samples without a training target (label or reason): {missing[:5]}")
        seq = with_continuations(batch, targets, self.tokenizer.pad_token_id)
        out = self.run_backbone(
            seq["input_ids"],
            seq["attention_mask"],
            seq["modality_ids"],
            seq["stream_ids"],
            seq["features"],
            labels=seq["lm_labels"],
        )
        return out.loss

    def continuation_logprobs(self, seq: EmotionBatch) -> torch.Tensor:
        """Per-row summed (or mean) log-likelihood of the ``lm_labels`` tokens of ``seq``."""
        targets = seq["lm_labels"][:, 1:]
        positions = (targets != -100).any(dim=0).nonzero().squeeze(1)
        # Only positions that predict continuation tokens need logits (vocab x seq is large).
        keep = torch.arange(int(positions.min()), int(positions.max()) + 1, device=targets.device)
        out = self.run_backbone(
            seq["input_ids"],
            seq["attention_mask"],
            seq["modality_ids"],
            seq["stream_ids"],
            seq["features"],
            logits_to_keep=keep,
        )
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)
        window = targets[:, keep]
        mask = window != -100
        token_lp = logprobs.gather(-1, window.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        total = token_lp.sum(dim=1)
        return total / mask.sum(dim=1) if self.length_normalize else total

    def score_labels(
        self, batch: EmotionBatch, drop_modalities: Sequence[Modality] = ()
    ) -> torch.Tensor:
        """Log-likelihood of every label as the answer, ``(B, num_labels)``, in one pass.

        Each prompt runs once, followed by all label answers under a tree-shaped attention mask
        (:mod:`src.models.label_scoring`); equal to :meth:`score_labels_repeated`.
        ``drop_modalities`` masks those modalities' tokens out of attention, giving the
        prediction from the remaining modalities alone.
        """
        batch = self._drop(batch, drop_modalities)
        dtype = self.backbone.embedding_dtype
        answers = self.answer_tree(batch["input_ids"].device)
        positions = self.positions(batch["input_ids"], batch["modality_ids"])
        tree = tree_inputs(batch, answers, dtype, positions)
        out = self.run_backbone(
            tree.input_ids,
            tree.attention_mask,
            tree.modality_ids,
            tree.stream_ids,
            batch["features"],
            position_ids=tree.position_ids,
            logits_to_keep=tree.keep,
            use_cache=False,
        )
        return tree_scores(out.logits, answers, self.length_normalize)

    def answer_tree(self, device: torch.device | str = "cpu") -> AnswerTree:
        """The label answers' :class:`AnswerTree` on ``device`` (copied there once)."""
        key = str(device)
        if key not in self._answer_trees:
            self._answer_trees[key] = self._answer_trees["cpu"].to(device)
        return self._answer_trees[key]

    def score_labels_repeated(
        self, batch: dict[str, Any], drop_modalities: Sequence[Modality] = ()
    ) -> torch.Tensor:
        """:meth:`score_labels` the direct way: every prompt repeated once per label, each row
        ``prompt + answer`` (``B x L`` rows). The reference of the parity tests and the
        benchmark (``experiments/bench_scoring.py``)."""
        batch = self._drop(batch, drop_modalities)
        n_labels = len(self.labels)
        rows = batch["input_ids"].shape[0]
        seq = with_continuations(
            batch, self.label_answer_ids * rows, self.tokenizer.pad_token_id, repeat=n_labels
        )
        return self.continuation_logprobs(seq).view(rows, n_labels)

    @torch.no_grad()
    def generate(self, batch: EmotionBatch, max_new_tokens: int = 64) -> list[str]:
        """Greedy, deterministic generation after each prompt (reasoning text)."""
        pad = self.tokenizer.pad_token_id
        left = left_aligned(batch, pad)  # decoder-only generation needs left padding
        embeds = self.embed(left["input_ids"], left["stream_ids"], batch["features"])
        positions = self.positions(left["input_ids"], left["modality_ids"])
        # The prompt's own positions; each new token then takes the last one plus one.
        extra = {} if positions is None else {"position_ids": positions}
        with self.modality_context.bind(left["modality_ids"]):
            out = self.language_model.generate(
                inputs_embeds=embeds,
                attention_mask=left["attention_mask"],
                **extra,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,  # plain greedy even if a checkpoint's generation_config says beams
                pad_token_id=pad,
                eos_token_id=self.tokenizer.eos_token_id,
            )
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)
