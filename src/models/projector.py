"""Projects a stream's features to LLM input embeddings."""

import torch
from torch import nn


class FeatureProjector(nn.Module):
    """Pooled: ``(B, dim) -> (B, tokens, hidden)``; sequence: ``(B, tokens, dim) -> (B, tokens,
    hidden)`` with one shared map applied to every row (Emotion-LLaMA's ``llama_proj``).

    The map is one linear layer (Emotion-LLaMA) or a small GELU MLP.

    Args:
        dim: Input feature size (of the vector, or of each row of a sequence).
        hidden_size: LLM embedding size.
        tokens: Number of LLM tokens: made from one vector, or the number of rows.
        mlp_hidden: Width of a GELU hidden layer; ``None`` for a single linear map.
        sequence: Inputs are ``(B, tokens, dim)`` sequences, one token per row.
    """

    def __init__(
        self,
        dim: int,
        hidden_size: int,
        tokens: int,
        mlp_hidden: int | None = None,
        sequence: bool = False,
    ) -> None:
        super().__init__()
        self.tokens = tokens
        self.hidden_size = hidden_size
        self.sequence = sequence
        out = hidden_size if sequence else tokens * hidden_size
        if mlp_hidden is None:
            self.net: nn.Module = nn.Linear(dim, out)
        else:
            self.net = nn.Sequential(
                nn.Linear(dim, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The projector trains in its own dtype (float32) whatever the frozen backbone's
        # (``dtype: bfloat16`` without autocast); the caller casts the result to the embeddings.
        x = x.to(next(self.net.parameters()).dtype)
        if self.sequence:
            if x.ndim != 3 or x.shape[1] != self.tokens:
                raise ValueError(
                    f"a sequence stream needs (batch, {self.tokens}, dim) features, "
                    f"got {tuple(x.shape)}"
                )
            return self.net(x)  # nn.Linear maps the last axis: every row on its own
        return self.net(x).view(x.shape[0], self.tokens, self.hidden_size)
