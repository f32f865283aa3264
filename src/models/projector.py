"""Projects one feature vector to a few LLM input embeddings."""

import torch
from torch import nn


class FeatureProjector(nn.Module):
    """``(B, dim) -> (B, tokens, hidden)``: one linear map (Emotion-LLaMA) or a small MLP.

    Args:
        dim: Input feature size.
        hidden_size: LLM embedding size.
        tokens: Number of LLM tokens made from one vector.
        mlp_hidden: Width of a GELU hidden layer; ``None`` for a single linear map.
    """

    def __init__(
        self, dim: int, hidden_size: int, tokens: int, mlp_hidden: int | None = None
    ) -> None:
        super().__init__()
        self.tokens = tokens
        self.hidden_size = hidden_size
        out = tokens * hidden_size
        if mlp_hidden is None:
            self.net: nn.Module = nn.Linear(dim, out)
        else:
            self.net = nn.Sequential(
                nn.Linear(dim, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(x.shape[0], self.tokens, self.hidden_size)
