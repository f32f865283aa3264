"""Per-layer attention share of each modality, before and after reallocation.

An entry is one (sample, head, query row) that the reallocator's row and head selection picks;
its share of a modality is the softmax mass the row puts on that modality's keys. The monitor
keeps sums on the device of the computation (no host sync per layer), so the state reduces
across processes with one ``sum``.
"""

import torch
from matplotlib.figure import Figure

from src.models.attention.spans import MONITORED


class ShareMonitor:
    """Accumulates attention shares per layer.

    Args:
        num_layers: number of decoder layers of the backbone.
    """

    def __init__(self, num_layers: int) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        self.num_layers = num_layers
        self._state: torch.Tensor | None = None
        # Per-row sums while a row record is open (see start_row_record); None otherwise.
        self._rows: dict[int, torch.Tensor] | None = None

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._state = None

    def update(
        self, layer: int, before: torch.Tensor, after: torch.Tensor, selected: torch.Tensor
    ) -> None:
        """Add the selected entries of one attention call.

        Args:
            layer: decoder layer index.
            before: ``(..., 3)`` masses on audio, visual, text keys before reallocation.
            after: ``(..., 3)`` the same after reallocation.
            selected: boolean ``(...)``: which entries count.
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range for {self.num_layers} layers")
        sel = selected[..., None]
        zero = before.new_zeros(())
        # where, not multiply: unselected rows may hold NaN (fully masked padding rows).
        row = torch.cat(
            [
                torch.where(sel, before, zero).flatten(0, -2).sum(0),
                torch.where(sel, after, zero).flatten(0, -2).sum(0),
                selected.sum().reshape(1).to(before.dtype),
            ]
        ).to(torch.float64)
        if self._state is None or self._state.device != row.device:
            shape = (self.num_layers, row.numel())
            state = torch.zeros(shape, dtype=torch.float64, device=row.device)
            if self._state is not None:
                state += self._state.to(row.device)
            self._state = state
        self._state[layer] += row
        if self._rows is not None:
            self._record_rows(before, after, selected)

    def start_row_record(self) -> None:
        """Also keep sums per batch row of the following attention calls, until
        :meth:`take_row_record` (the per-layer sums are kept as always).

        A row is an index of the first dimension of :meth:`update`'s tensors (one sequence of
        the forward), so a caller that knows how its batch was laid out can read per-sample
        shares, e.g. one clip's share in a batch.
        """
        self._rows = {}

    def take_row_record(self) -> dict[int, torch.Tensor]:
        """The per-row sums since :meth:`start_row_record` and stop recording.

        Returns:
            ``rows -> (rows, 7)`` float64 sums over layers, heads and query rows (3 before, 3
            after, count, as :meth:`state`), keyed by the number of rows of the forwards that
            made them: forwards with the same row count (e.g. every decoding step) add up.
        """
        rows, self._rows = self._rows or {}, None
        return rows

    def _record_rows(
        self, before: torch.Tensor, after: torch.Tensor, selected: torch.Tensor
    ) -> None:
        assert self._rows is not None
        n = before.shape[0] if before.ndim > 1 else 1
        sel = selected[..., None]
        zero = before.new_zeros(())
        sums = torch.cat(
            [
                torch.where(sel, before, zero).reshape(n, -1, before.shape[-1]).sum(1),
                torch.where(sel, after, zero).reshape(n, -1, after.shape[-1]).sum(1),
                selected.reshape(n, -1).sum(1, keepdim=True).to(before.dtype),
            ],
            dim=1,
        ).to(torch.float64)
        if n in self._rows:
            self._rows[n] = self._rows[n] + sums.to(self._rows[n].device)
        else:
            self._rows[n] = sums

    def state(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The raw sums ``(num_layers, 7)``: 3 before, 3 after, count; for cross-process reduce."""
        if self._state is None:
            return torch.zeros(
                self.num_layers, 2 * len(MONITORED) + 1, dtype=torch.float64, device=device
            )
        return self._state if device is None else self._state.to(device)

    def load_state(self, state: torch.Tensor) -> None:
        """Replace the sums, e.g. by their sum over processes."""
        expected = (self.num_layers, 2 * len(MONITORED) + 1)
        if tuple(state.shape) != expected:
            raise ValueError(f"state must have shape {expected}, got {tuple(state.shape)}")
        self._state = state.to(torch.float64)

    @property
    def count(self) -> torch.Tensor:
        """Entries per layer, ``(num_layers,)``."""
        return self.state()[:, -1]

    def per_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean shares per layer, ``(num_layers, 3)`` before and after; NaN for unseen layers."""
        state = self.state()
        n = len(MONITORED)
        count = state[:, -1:]
        return state[:, :n] / count, state[:, n : 2 * n] / count

    def summary(self) -> dict[str, dict[str, float]]:
        """Shares averaged over all entries of all layers: ``{"before"|"after": {modality: x}}``."""
        state = self.state()
        n = len(MONITORED)
        total = state.sum(0)
        count = float(total[-1])
        out: dict[str, dict[str, float]] = {}
        for name, offset in (("before", 0), ("after", n)):
            out[name] = {
                m.name.lower(): float(total[offset + i]) / count if count else float("nan")
                for i, m in enumerate(MONITORED)
            }
        return out

    def figure(self, title: str = "attention share per layer") -> Figure:
        """Grouped bars per layer: each modality's share before (hatched) and after (solid)."""
        before, after = (x.cpu().numpy() for x in self.per_layer())
        fig = Figure(figsize=(max(6.0, 1.2 * self.num_layers + 2), 4.0))
        ax = fig.add_subplot(1, 1, 1)
        width = 0.8 / (2 * len(MONITORED))
        colors = ("tab:orange", "tab:blue", "tab:gray")
        for i, (m, color) in enumerate(zip(MONITORED, colors, strict=True)):
            x = [layer + (2 * i - len(MONITORED) + 0.5) * width for layer in range(self.num_layers)]
            ax.bar(
                x,
                before[:, i],
                width,
                color=color,
                alpha=0.4,
                hatch="//",
                label=f"{m.name.lower()} before",
            )
            ax.bar(
                [v + width for v in x],
                after[:, i],
                width,
                color=color,
                label=f"{m.name.lower()} after",
            )
        ax.set_xticks(range(self.num_layers))
        ax.set_xlabel("layer")
        ax.set_ylabel("mean attention share")
        ax.set_ylim(0.0, 1.0)
        ax.set_title(title)
        ax.legend(ncol=len(MONITORED), fontsize="small")
        fig.tight_layout()
        return fig
