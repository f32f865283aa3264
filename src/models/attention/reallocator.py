"""AR: the attention function that reallocates attention between the audio and visual spans.

A :class:`Reallocator` is both the configuration (mode, multipliers, target share, layers, heads,
query rows) and the attention function registered with transformers' ``AttentionInterface``
(see :mod:`src.models.attention.interface`). Modes:

- ``reweight``: post-softmax weights of each modality's keys times a fixed multiplier, then
  renormalised; done as an additive ``log w`` bias in SDPA.
- ``span_mass``: per query row and head, the mass on the audio and on the visual span is measured
  from a softmax of the selected rows' logits and moved toward a target audio share of their
  sum; the exact per-row log factors go to SDPA as a bias, so the result equals post-softmax
  reallocation.
- ``logit_scale``: PAI's intervention ``s' = s + alpha |s|`` on one modality's logits, on an
  explicit eager path (the peer baseline).

Only the selected query rows are recomputed with a bias; the other rows keep plain SDPA.
"""

from typing import Any, Literal

import torch
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from src.core.modality import Modality
from src.models.attention.share_monitor import ShareMonitor
from src.models.attention.spans import (
    MONITORED,
    key_one_hot,
    keys_bias,
    pai_logits,
    reweighted_masses,
    share_pair,
    span_mass_factors,
    span_mass_masses,
    span_masses,
)
from src.models.modality_context import ModalityContext

Mode = Literal["reweight", "span_mass", "logit_scale"]
Target = Literal["fixed", "proportional", "from_adapter"]
QueryRows = Literal["last", "text", "all"]

MODES: tuple[str, ...] = ("reweight", "span_mass", "logit_scale")
TARGETS: tuple[str, ...] = ("fixed", "proportional", "from_adapter")
QUERY_ROWS: tuple[str, ...] = ("last", "text", "all")


class Reallocator:
    """Configuration and state of attention reallocation; call it as an attention function.

    Args:
        mode: ``reweight``, ``span_mass`` or ``logit_scale`` (see the module docstring).
        multipliers: ``reweight`` only: modality name (``audio``, ``visual``, ``text``) -> positive
            multiplier of that modality's post-softmax weights; missing modalities keep 1.
        target: ``span_mass`` only: where the target audio share comes from: ``fixed``
            (``audio_share``), ``proportional`` (visible audio keys / visible audio+visual keys of
            the row) or ``from_adapter`` (``w_a / (w_a + w_v)`` from MoSE's modality weights,
            given to :meth:`bind`).
        audio_share: ``span_mass`` with ``target="fixed"``: the audio share of the audio+visual
            mass to move toward, in ``[0, 1]``.
        strength: ``span_mass`` only: fraction of the way to the target, in ``[0, 1]``.
        scale_modality: ``logit_scale`` only: the modality whose logits are amplified.
        alpha: ``logit_scale`` only: PAI's amplification ``alpha >= 0``.
        layers: decoder layers to act on (negative counts from the end); ``None`` = all.
        heads: query heads to act on; ``None`` = all.
        query_rows: rows to act on: ``last`` (each sample's last non-padding row: the row that
            generates the next token), ``text`` (every text row, generated tokens included) or
            ``all`` (every non-padding row).
        monitor: whether to measure per-layer attention shares (every layer, the selected rows
            and heads). Costs one logits pass over the selected rows in ``reweight`` mode.
    """

    def __init__(
        self,
        mode: Mode = "span_mass",
        multipliers: dict[str, float] | None = None,
        target: Target = "proportional",
        audio_share: float = 0.5,
        strength: float = 1.0,
        scale_modality: str = "visual",
        alpha: float = 0.5,
        layers: list[int] | None = None,
        heads: list[int] | None = None,
        query_rows: QueryRows = "text",
        monitor: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"AR mode must be one of {MODES}, got {mode!r}")
        if target not in TARGETS:
            raise ValueError(f"AR target must be one of {TARGETS}, got {target!r}")
        if query_rows not in QUERY_ROWS:
            raise ValueError(f"AR query_rows must be one of {QUERY_ROWS}, got {query_rows!r}")
        if not 0.0 <= audio_share <= 1.0:
            raise ValueError(f"AR audio_share must be in [0, 1], got {audio_share}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"AR strength must be in [0, 1], got {strength}")
        if alpha < 0.0:
            raise ValueError(f"AR alpha must be >= 0, got {alpha}")
        self.multipliers: dict[Modality, float] = {}
        for name, value in (multipliers or {}).items():
            modality = Modality.parse(name)
            if modality not in MONITORED:
                raise ValueError(f"AR multipliers: no multiplier for modality {name!r}")
            if not value > 0.0:
                raise ValueError(f"AR multipliers[{name!r}] must be > 0, got {value}")
            self.multipliers[modality] = float(value)
        self.scale_modality = Modality.parse(scale_modality)
        if self.scale_modality not in MONITORED:
            raise ValueError(f"AR scale_modality must be audio, visual or text: {scale_modality!r}")
        if heads is not None and any(h < 0 for h in heads):
            raise ValueError(f"AR heads must be non-negative, got {heads}")
        self.mode = mode
        self.target = target
        self.audio_share = float(audio_share)
        self.strength = float(strength)
        self.alpha = float(alpha)
        self.layers = None if layers is None else [int(x) for x in layers]
        self.heads = None if heads is None else sorted({int(h) for h in heads})
        self.query_rows = query_rows
        self.monitor_enabled = monitor
        self.monitor: ShareMonitor | None = None
        self.calls = 0
        self._context: ModalityContext | None = None
        self._layer_set: frozenset[int] = frozenset()
        self._adapter_share: float | None = None
        self._plan: _Plan | None = None
        self._shares: torch.Tensor | None = None
        # Multipliers in MONITORED order; modalities not given keep 1.
        self._weights = torch.tensor([self.multipliers.get(m, 1.0) for m in MONITORED])

    # ----------------------------------------------------------------- binding

    @property
    def is_bound(self) -> bool:
        """Whether :meth:`bind` gave this reallocator a context (it is ready to run)."""
        return self._context is not None

    @property
    def is_identity(self) -> bool:
        """Whether the settings leave attention unchanged (multipliers 1, strength 0, alpha 0)."""
        if self.mode == "reweight":
            return all(w == 1.0 for w in self.multipliers.values())
        if self.mode == "span_mass":
            return self.strength == 0.0
        return self.alpha == 0.0

    def bind(
        self,
        context: ModalityContext,
        num_layers: int,
        modality_weights: dict[str, float] | None = None,
    ) -> "Reallocator":
        """Attach the modality context and the backbone's depth; reset the monitor.

        Args:
            context: the multimodal model's :class:`ModalityContext`.
            num_layers: number of decoder layers of the backbone.
            modality_weights: ``{"audio": w_a, "visual": w_v}`` (MoSE); required for
                ``target="from_adapter"`` in ``span_mass`` mode.
        """
        layers = range(num_layers) if self.layers is None else self.layers
        resolved = set()
        for layer in layers:
            index = layer + num_layers if layer < 0 else layer
            if not 0 <= index < num_layers:
                raise ValueError(f"AR layers: {layer} is out of range for {num_layers} layers")
            resolved.add(index)
        self._adapter_share = None
        if self.mode == "span_mass" and self.target == "from_adapter":
            self._adapter_share = _share_from_weights(modality_weights)
        self._context = context
        self._layer_set = frozenset(resolved)
        self.monitor = ShareMonitor(num_layers) if self.monitor_enabled else None
        self.calls = 0
        self._plan = None
        self._shares = None
        return self

    def unbind(self) -> None:
        """Detach the context (the monitor's numbers stay readable)."""
        self._context = None
        self._plan = None

    # ------------------------------------------------------- attention function

    def __call__(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention function, with transformers' attention-interface signature."""
        if self._context is None:
            raise RuntimeError("the Reallocator is not bound: call bind(context, num_layers) first")
        if module.training:
            raise RuntimeError("attention reallocation is inference-only; the module is training")
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise RuntimeError(f"{type(module).__name__} has no layer_idx; AR needs it")
        self.calls += 1
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        acts = layer in self._layer_set
        if self.mode == "logit_scale":
            return self._pai_eager(module, layer, acts, query, key, value, attention_mask, scale)

        acts = acts and not self.is_identity
        plain_kwargs = dict(kwargs, dropout=dropout, scaling=scaling)
        if not (acts or self.monitor is not None):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **plain_kwargs)
        plan = self._plan_for(layer, query, key, attention_mask)
        if plan.index is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **plain_kwargs)

        masses = None
        if self.monitor is not None or self.mode == "span_mass":
            groups = getattr(module, "num_key_value_groups", 1)
            rows_q = query if plan.full else query[:, :, plan.index]
            logits = _logits(rows_q, key, scale, groups) + plan.logit_mask()
            masses = span_masses(torch.softmax(logits, dim=-1), plan.one_hot())

        sub_mask, after = None, None
        if self.mode == "reweight":
            if acts:
                sub_mask = plan.reweight_mask(self._weights, query.dtype)
            if masses is not None:
                after = reweighted_masses(masses, self._weights.to(masses.device))
        else:
            shares = self._target_shares(plan)
            factors = span_mass_factors(masses, shares, self.strength, plan.selected)
            if acts:
                sub_mask = plan.sdpa_mask(query.dtype) + keys_bias(factors, plan.one_hot()).to(
                    query.dtype
                )
            if self.monitor is not None:
                after = span_mass_masses(masses, factors)

        if self.monitor is not None:
            self.monitor.update(layer, masses, after if acts else masses, plan.selected)
        if sub_mask is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **plain_kwargs)

        # Only the selected rows are recomputed with the bias (merged into a float mask); the
        # others keep the plain SDPA call and its fast kernel.
        dropped = ("is_causal", "position_bias")
        sub_kwargs = {k: v for k, v in plain_kwargs.items() if k not in dropped}
        rows_q = query if plan.full else query[:, :, plan.index]
        out_rows, _ = sdpa_attention_forward(
            module, rows_q, key, value, sub_mask, is_causal=False, **sub_kwargs
        )
        if plan.full:
            # Unselected rows got a zero bias; fully masked (padding) rows get SDPA's zeros
            # rather than the uniform average a float mask of -max gives.
            if plan.dead_rows is not None:
                out_rows = out_rows.masked_fill(plan.dead_rows, 0.0)
            return out_rows, None
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **plain_kwargs)
        # Per sample, only its own selected rows take the biased result (the union of rows may
        # hold another sample's padding rows, whose fully masked output SDPA defines differently).
        if not plan.all_own:
            out_rows = torch.where(plan.own_rows, out_rows, out[:, plan.index])
        out[:, plan.index] = out_rows
        return out, None

    def _plan_for(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> "_Plan":
        """The row/key bookkeeping of the current forward, built at its first layer.

        Every layer of one forward sees the same mask object and lengths, and layers come in
        increasing order; a lower-or-equal layer index means a new forward.
        """
        plan = self._plan
        batch, heads, q_len, _ = query.shape
        k_len = key.shape[2]
        if (
            plan is None
            or layer <= plan.layer
            or plan.attention_mask is not attention_mask
            or plan.q_len != q_len
            or plan.k_len != k_len
        ):
            device = query.device
            key_ids = self._context.keys(k_len).to(device)
            rows = self._rows(self._context.queries(q_len, k_len).to(device))
            head_mask = self._head_mask(heads, device)
            plan = _Plan(key_ids, rows, attention_mask, q_len, head_mask, self.heads is None)
            self._plan = plan
        plan.layer = layer
        return plan

    # ------------------------------------------------------------------ helpers

    def _rows(self, query_ids: torch.Tensor) -> torch.Tensor:
        """Boolean ``(B, Q)``: the query rows AR acts on and the monitor counts."""
        real = query_ids != int(Modality.PAD)
        if self.query_rows == "all":
            return real
        if self.query_rows == "text":
            return query_ids == int(Modality.TEXT)
        positions = torch.arange(query_ids.shape[1], device=query_ids.device)
        last = torch.where(real, positions, -1).amax(dim=1, keepdim=True)
        return positions[None] == last

    def _head_mask(self, heads: int, device: torch.device) -> torch.Tensor:
        if self.heads is None:
            return torch.ones(heads, dtype=torch.bool, device=device)
        if self.heads[-1] >= heads:
            raise ValueError(f"AR heads {self.heads} out of range for {heads} attention heads")
        mask = torch.zeros(heads, dtype=torch.bool, device=device)
        mask[self.heads] = True
        return mask

    def _target_shares(self, plan: "_Plan") -> torch.Tensor:
        """Target shares ``(t, 1 - t)`` of the audio and visual span, ``(2,)`` or ``(B,1,U,2)``."""
        if self.target == "proportional":
            return plan.proportional_shares()
        if self.target == "from_adapter" and self._adapter_share is None:
            raise RuntimeError("AR target 'from_adapter' needs modality weights in bind()")
        device = plan.key_ids.device
        if self._shares is None or self._shares.device != device:
            share = self.audio_share if self.target == "fixed" else self._adapter_share
            self._shares = share_pair(share).to(device)
        return self._shares

    def _pai_eager(
        self,
        module: nn.Module,
        layer: int,
        acts: bool,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager attention with PAI's logit amplification (the peer baseline's code path)."""
        batch, heads, q_len, _ = query.shape
        k_len = key.shape[2]
        groups = getattr(module, "num_key_value_groups", 1)
        key_states, value_states = repeat_kv(key, groups), repeat_kv(value, groups)
        logits = torch.matmul(query, key_states.transpose(2, 3)) * scale
        every_row = torch.arange(q_len, device=query.device)
        visible, additive = _mask_rows(attention_mask, every_row, batch, q_len, k_len, query.device)
        if additive is not None:
            logits = logits + additive
        else:
            logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)
        key_ids = self._context.keys(k_len).to(query.device)
        rows = self._rows(self._context.queries(q_len, k_len).to(query.device))
        selected = rows[:, None] & self._head_mask(heads, query.device)[None, :, None]
        scaled = logits
        if acts and self.alpha != 0.0:
            target = (key_ids == int(self.scale_modality))[:, None, None] & visible
            scaled = pai_logits(logits, target & selected[..., None], self.alpha)
        weights = nn.functional.softmax(scaled, dim=-1, dtype=torch.float32)
        if self.monitor is not None:
            one_hot = key_one_hot(key_ids)  # (B, 1, K, 3)
            before = nn.functional.softmax(logits, dim=-1, dtype=torch.float32) @ one_hot
            self.monitor.update(layer, before, weights @ one_hot, selected)
        weights = weights.to(query.dtype)
        out = torch.matmul(weights, value_states).transpose(1, 2).contiguous()
        return out, weights


class _Plan:
    """Row and key bookkeeping shared by every layer of one forward (cheap to reuse in decode).

    Args:
        key_ids: ``(B, K)`` key modality ids.
        rows: ``(B, Q)`` boolean, the selected query rows.
        attention_mask: the mask the layers receive (kept to recognise the same forward).
        q_len: query length.
        head_mask: ``(H,)`` boolean, the selected heads.
        all_heads: whether every head is selected.
    """

    def __init__(
        self,
        key_ids: torch.Tensor,
        rows: torch.Tensor,
        attention_mask: torch.Tensor | None,
        q_len: int,
        head_mask: torch.Tensor,
        all_heads: bool,
    ) -> None:
        self.key_ids = key_ids
        self.attention_mask = attention_mask
        self.q_len = q_len
        self.k_len = key_ids.shape[1]
        self.layer = -1
        index = rows.any(0).nonzero().squeeze(1)
        self.index = index if index.numel() else None
        self.full = index.numel() == q_len
        if self.index is None:
            return
        batch = rows.shape[0]
        self.visible, self.additive = _mask_rows(
            attention_mask, index, batch, q_len, self.k_len, key_ids.device
        )
        self.selected = rows[:, None, index] & head_mask[None, :, None]  # (B, H, U)
        # With every head selected, one mask row serves all heads.
        self.selected_rows = self.selected[:, :1] if all_heads else self.selected
        self.own_rows = rows[:, index, None, None]  # (B, U, 1, 1), output layout
        self.all_own = bool(self.own_rows.all())
        dead = ~self.visible.any(-1)  # (B, 1, U)
        self.dead_rows = dead.transpose(1, 2)[..., None] if bool(dead.any()) else None
        self._cache: dict[str, Any] = {}

    def one_hot(self) -> torch.Tensor:
        """Key membership ``(B, 1, K, 3)`` in audio, visual, text (float32)."""
        if "one_hot" not in self._cache:
            self._cache["one_hot"] = key_one_hot(self.key_ids)
        return self._cache["one_hot"]

    def logit_mask(self) -> torch.Tensor:
        """Float32 ``(B, 1, U, K)``: the additive mask, ``-inf`` where not visible."""
        if "logit_mask" not in self._cache:
            base = self.additive.float() if self.additive is not None else 0.0
            self._cache["logit_mask"] = torch.where(self.visible, base, float("-inf"))
        return self._cache["logit_mask"]

    def sdpa_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The float SDPA mask of the selected rows in ``dtype`` (``-max`` where not visible,
        as transformers builds float masks), to which a bias is added."""
        key = f"sdpa_mask_{dtype}"
        if key not in self._cache:
            base = self.additive.to(dtype) if self.additive is not None else 0.0
            self._cache[key] = torch.where(self.visible, base, torch.finfo(dtype).min)
        return self._cache[key]

    def reweight_mask(self, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``reweight``'s float mask (mask + ``log w`` of each key), the same for every layer."""
        key = f"reweight_{dtype}"
        if key not in self._cache:
            factors = weights.to(self.key_ids.device).expand(*self.selected_rows.shape, -1)
            factors = torch.where(self.selected_rows[..., None], factors, 1.0)
            bias = keys_bias(factors, self.one_hot()).to(dtype)
            self._cache[key] = self.sdpa_mask(dtype) + bias
        return self._cache[key]

    def proportional_shares(self) -> torch.Tensor:
        """Visible audio and visual keys over their sum, per row, ``(B, 1, U, 2)``."""
        if "shares" not in self._cache:
            counts = torch.matmul(self.visible.float(), self.one_hot()[..., :2])  # (B, 1, U, 2)
            # Rows without both spans are left alone later; avoid 0/0 here.
            self._cache["shares"] = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
        return self._cache["shares"]


def _share_from_weights(weights: dict[str, float] | None) -> float:
    """``w_a / (w_a + w_v)`` from MoSE modality weights, with clear errors."""
    if weights is None:
        raise ValueError(
            "AR target 'from_adapter' needs modality weights, but the adapter has none "
            "(Adapter.modality_weights() returned None)"
        )
    try:
        audio, visual = float(weights["audio"]), float(weights["visual"])
    except KeyError as err:
        raise ValueError(f"AR modality weights lack {err.args[0]!r}: got {weights}") from None
    if audio < 0 or visual < 0 or audio + visual <= 0:
        raise ValueError(f"AR modality weights must be >= 0 with a positive sum, got {weights}")
    return audio / (audio + visual)


def _logits(query: torch.Tensor, key: torch.Tensor, scale: float, groups: int) -> torch.Tensor:
    """``q k^T * scale`` as float32 for grouped-query attention without repeating the keys.

    Half-precision inputs are multiplied in their dtype (float32 accumulation, as SDPA does)
    rather than copying the whole key cache to float32 at every layer.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if kv_heads * groups != heads:
        raise ValueError(f"{heads} query heads do not match {kv_heads} key heads x {groups} groups")
    q = query.reshape(batch, kv_heads, groups * q_len, dim)
    logits = torch.matmul(q, key.transpose(-1, -2)).float() * scale
    return logits.reshape(batch, heads, q_len, key.shape[2])


def _mask_rows(
    mask: torch.Tensor | None,
    index: torch.Tensor,
    batch: int,
    q_len: int,
    k_len: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``index`` of the attention mask: boolean visibility ``(B, 1, U, K)`` and, for float
    masks, the additive values (else ``None``).

    ``mask=None`` means what SDPA does without a mask: causal aligned top-left for several query
    rows (``is_causal=True``), every key for a single row.
    """
    if mask is None:
        if q_len == 1:
            visible = torch.ones(1, 1, index.numel(), k_len, dtype=torch.bool, device=device)
        else:
            visible = index[:, None] >= torch.arange(k_len, device=device)[None]
            visible = visible[None, None]
        return visible.expand(batch, 1, -1, -1), None
    rows = mask[:, :, index, :k_len].expand(batch, 1, -1, -1)
    if rows.dtype == torch.bool:
        return rows, None
    return rows > torch.finfo(rows.dtype).min / 2, rows
