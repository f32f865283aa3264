"""Closed-set label scoring in one pass: every label's answer after one copy of the prompt.

The label answers share the prompt, so instead of repeating each prompt once per label the
answers are laid out side by side after it and a tree-shaped 4D attention mask lets each answer
token see the prompt and the earlier tokens of its own answer only::

    columns   [ prompt (right-padded to P) | answer 0 | answer 1 | ... | answer L-1 ]
    rows of answer l, token j:  prompt keys (as the prompt's attention mask says) + answer l's
                                tokens 0..j;  position id  n_b + j  (n_b: the prompt's length)

Every answer token then sees exactly the keys, at exactly the positions, it would see in its own
row ``prompt + answer``, so the scores equal the per-label computation (up to float rounding)
while the prompt is run once: the cost is one forward of ``P + sum_l len(answer_l)`` tokens.
The logits kept are the prompt's last row (it predicts every answer's first token) and the
answer rows that predict a next answer token.
"""

from dataclasses import dataclass
from typing import Any

import torch

from src.core.modality import Modality


@dataclass(frozen=True)
class AnswerTree:
    """The label answers as one block of ``T`` tokens, with where each token sits.

    Attributes:
        ids: ``(T,)`` the answers' tokens, answer after answer.
        label: ``(T,)`` which answer (label index) each token belongs to.
        depth: ``(T,)`` each token's index inside its answer.
        lengths: ``(L,)`` tokens per answer.
        predictor: ``(T,)`` for each token, the kept-logit column that predicts it: 0 (the
            prompt's last row) for an answer's first token, else ``1 +`` the rank of the
            previous token among the answer tokens that predict a next one.
        inner: ``(T - L,)`` block columns of the tokens that predict a next token of their
            answer (every answer token but the last).
    """

    ids: torch.Tensor
    label: torch.Tensor
    depth: torch.Tensor
    lengths: torch.Tensor
    predictor: torch.Tensor
    inner: torch.Tensor

    @classmethod
    def build(cls, answers: list[list[int]], device: torch.device | str = "cpu") -> "AnswerTree":
        """The tree of ``answers`` (token ids per label, each non-empty)."""
        if not answers or any(len(a) == 0 for a in answers):
            raise ValueError("label scoring needs at least one label, each with answer tokens")
        ids, label, depth, inner = [], [], [], []
        for index, answer in enumerate(answers):
            for j, token in enumerate(answer):
                if j < len(answer) - 1:
                    inner.append(len(ids))
                ids.append(int(token))
                label.append(index)
                depth.append(j)
        # Token j > 0 is predicted by the row of token j - 1 (the previous column).
        rank = {column: r for r, column in enumerate(inner)}
        predictor = [0 if d == 0 else 1 + rank[c - 1] for c, d in enumerate(depth)]

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            ids=tensor(ids),
            label=tensor(label),
            depth=tensor(depth),
            lengths=tensor([len(a) for a in answers]),
            predictor=tensor(predictor),
            inner=tensor(inner),
        )

    @property
    def size(self) -> int:
        """``T``, the number of answer tokens."""
        return int(self.ids.numel())

    def to(self, device: torch.device | str) -> "AnswerTree":
        """The same tree on ``device``."""
        return AnswerTree(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})


@dataclass
class TreeInputs:
    """Backbone inputs of a batch's prompts followed by the answer tree.

    Attributes:
        input_ids, modality_ids, stream_ids: ``(B, P + T)``; answer tokens are text.
        position_ids: ``(B, P + T)`` (or ``(axes, B, P + T)``): the prompt's own positions,
            then the next position after the prompt plus ``depth``.
        attention_mask: ``(B, 1, P + T, P + T)`` additive float mask (0 visible, the dtype's
            minimum hidden), the form transformers passes through unchanged to every attention
            implementation (SDPA, eager, and AR's registered function).
        keep: ``(B, 1 + T - L)`` the positions whose logits the scores need.
    """

    input_ids: torch.Tensor
    modality_ids: torch.Tensor
    stream_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    keep: torch.Tensor


def tree_inputs(
    batch: dict[str, Any],
    tree: AnswerTree,
    dtype: torch.dtype,
    prompt_positions: torch.Tensor | None = None,
) -> TreeInputs:
    """Lay out right-padded prompts (``batch`` from the collator) followed by ``tree``.

    ``batch["attention_mask"]`` may hide tokens inside the prompt (dropped modalities); the
    prompt length of a row is its count of non-PAD ``modality_ids``, as elsewhere.
    ``prompt_positions`` (``(B, P)`` or ``(axes, B, P)``, the backbone's own, e.g. TMRoPE's)
    replace the count ``0..P-1``; an answer token then sits at the prompt's largest position
    plus one plus its depth on every axis, as text after the prompt does in that model.
    """
    input_ids = batch["input_ids"]
    rows, width = input_ids.shape
    device = input_ids.device
    tree = tree.to(device) if tree.ids.device != device else tree
    lengths = (batch["modality_ids"] != int(Modality.PAD)).sum(dim=1)  # (B,)
    size = tree.size
    answer = tree.ids.expand(rows, size)
    ids = torch.cat([input_ids, answer], dim=1)
    modality = torch.cat(
        [batch["modality_ids"], torch.full_like(answer, int(Modality.TEXT))], dim=1
    )
    streams = torch.cat([batch["stream_ids"], torch.full_like(answer, -1)], dim=1)
    columns = torch.arange(width, device=device)
    if prompt_positions is None:
        prompt_positions = columns.expand(rows, width)
        start = lengths  # the next position after each prompt
    else:
        inside = columns[None] < lengths[:, None]  # (B, P)
        start = prompt_positions.masked_fill(~inside, -1).amax(dim=-1) + 1  # (B,) or (A, B)
    answer_positions = start[..., None] + tree.depth.to(start.dtype)
    positions = torch.cat([prompt_positions, answer_positions], dim=-1)

    key_on = batch["attention_mask"].bool() & (columns[None] < lengths[:, None])  # (B, P)
    causal = columns[:, None] >= columns[None]  # (P, P)
    same_answer = tree.label[:, None] == tree.label[None]
    earlier = tree.depth[:, None] >= tree.depth[None]
    visible = torch.zeros(rows, width + size, width + size, dtype=torch.bool, device=device)
    visible[:, :width, :width] = causal[None] & key_on[:, None, :]
    visible[:, width:, :width] = key_on[:, None, :]
    visible[:, width:, width:] = (same_answer & earlier)[None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    mask = mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]

    keep = torch.cat([(lengths - 1)[:, None], (width + tree.inner)[None].expand(rows, -1)], dim=1)
    return TreeInputs(ids, modality, streams, positions, mask, keep)


def tree_scores(logits: torch.Tensor, tree: AnswerTree, length_normalize: bool) -> torch.Tensor:
    """``(B, L)`` summed (or mean) answer log-likelihoods from the kept ``logits``
    ``(B, 1 + T - L, vocab)``."""
    tree = tree.to(logits.device) if tree.ids.device != logits.device else tree
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_lp = logprobs[:, tree.predictor, tree.ids]  # (B, T): advanced indexing pairs them
    n_labels = int(tree.lengths.numel())
    total = token_lp.new_zeros(logits.shape[0], n_labels).index_add_(1, tree.label, token_lp)
    return total / tree.lengths.to(total.dtype) if length_normalize else total
