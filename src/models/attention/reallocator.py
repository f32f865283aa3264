"""AR (attention reallocation): the base of every strategy, and the attention function itself.

:class:`Reallocator` owns everything the strategies share: which decoder layers, heads and query
rows act, the strength (0 = identity, 1 = the strategy's full effect), the optional per-sample
gate (conflict gating), the row/key bookkeeping of a forward, the SDPA call with an exact
log-bias and the :class:`ShareMonitor`. A strategy (``src/models/attention/strategies/``)
supplies only its per-row, per-modality factors on the post-softmax weights (``reweight``,
``span_mass``) or, for the eager PAI baseline, its logit transform (``logit_scale``). A new
intervention is one new file with one subclass.

Multiplying the post-softmax weights of a key group by ``c`` and renormalising equals adding
``log c`` to its logits, so factors become an additive float mask for SDPA; only the selected
query rows are recomputed with a bias, the other rows keep plain SDPA.
"""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from src.core.modality import Modality
from src.models.attention.share_monitor import ShareMonitor
from src.models.attention.spans import MONITORED, key_one_hot, keys_bias, span_masses
from src.models.modality_context import ModalityContext

QueryRows = Literal["last", "text", "all"]
Gate = Literal["all", "conflict"]

QUERY_ROWS: tuple[str, ...] = ("last", "text", "all")
GATES: tuple[str, ...] = ("all", "conflict")
#: The modalities AR moves attention between (``over_relied`` is one of them).
PERCEPTUAL: tuple[str, ...] = ("audio", "visual")


class Reallocator:
    """Shared settings, bookkeeping and monitoring of AR; call it as an attention function.

    Subclasses implement :meth:`factors` (or, with ``eager = True``, :meth:`transform_logits`)
    and may override :meth:`settings` and :meth:`direction_warning`.

    Args:
        strength: how far to apply the strategy, in ``[0, 1]``: 0 is exactly the identity, 1 the
            strategy's full effect; the effect grows monotonically in between (each strategy
            says how it interpolates).
        layers: decoder layers to act on (negative counts from the end); ``None`` = all.
        heads: query heads to act on; ``None`` = all.
        query_rows: rows to act on: ``last`` (each sample's last non-padding row: the row that
            generates the next token), ``text`` (every text row, generated tokens included) or
            ``all`` (every non-padding row).
        gate: ``all`` (every sample) or ``conflict`` (only samples whose audio-only and
            visual-only predictions disagree; the AR callback measures that per batch and sets
            :meth:`set_sample_gate`).
        over_relied: the modality the model relies on most (the paper's premise: ``audio``).
            AR's defaults never raise its share; a configuration that does is warned about.
        monitor: whether to measure per-layer attention shares (every layer, the selected rows
            and heads). Costs one logits pass over the selected rows where the strategy does
            not need it anyway.
    """

    #: Short name of the strategy (metrics, plots, calibration records).
    name = "identity"
    #: Whether :meth:`factors` reads the rows' current masses (else they are computed only for
    #: the monitor, and the bias is the same for every layer of a forward).
    needs_masses = False
    #: Whether the strategy runs on the explicit eager path (:meth:`transform_logits`).
    eager = False

    def __init__(
        self,
        strength: float = 1.0,
        layers: list[int] | None = None,
        heads: list[int] | None = None,
        query_rows: QueryRows = "text",
        gate: Gate = "all",
        over_relied: Literal["audio", "visual"] = "audio",
        monitor: bool = True,
    ) -> None:
        if query_rows not in QUERY_ROWS:
            raise ValueError(f"AR query_rows must be one of {QUERY_ROWS}, got {query_rows!r}")
        if gate not in GATES:
            raise ValueError(f"AR gate must be one of {GATES}, got {gate!r}")
        if over_relied not in PERCEPTUAL:
            raise ValueError(f"AR over_relied must be one of {PERCEPTUAL}, got {over_relied!r}")
        if heads is not None and any(h < 0 for h in heads):
            raise ValueError(f"AR heads must be non-negative, got {heads}")
        self.strength = _check_strength(strength)
        self.layers = None if layers is None else [int(x) for x in layers]
        self.heads = None if heads is None else sorted({int(h) for h in heads})
        self.query_rows = query_rows
        self.gate = gate
        self.over_relied = over_relied
        self.monitor_enabled = monitor
        self.monitor: ShareMonitor | None = None
        self.calls = 0
        self._context: ModalityContext | None = None
        self._layer_set: frozenset[int] = frozenset()
        self._plan: _Plan | None = None
        self._sample_gate: torch.Tensor | None = None
        self._gate_version = 0
        self._suspended = False

    # ------------------------------------------------------------ strategy API

    def factors(self, masses: torch.Tensor | None, plan: "_Plan") -> torch.Tensor:
        """Per-row factors on the post-softmax weights of each monitored modality's keys.

        Args:
            masses: ``(B, H, U, 3)`` masses of the selected rows on audio, visual, text keys
                (``None`` unless :attr:`needs_masses` or the monitor asks for them).
            plan: the forward's bookkeeping (visible keys, proportional shares, ...).

        Returns:
            Positive factors broadcastable to ``(B, H, U, n)``, ``n`` in 2..3 (audio, visual[,
            text]), already interpolated by :attr:`strength`. Rows outside the selection or the
            gate are reset to 1 by the base.
        """
        raise NotImplementedError(f"{type(self).__name__} implements no factors()")

    def transform_logits(
        self, logits: torch.Tensor, key_ids: torch.Tensor, acting: torch.Tensor
    ) -> torch.Tensor:
        """Eager strategies: the new logits ``(B, H, Q, K)``; ``acting`` is a boolean
        ``(B, H, Q, K)`` of the visible keys in the acting rows and heads."""
        raise NotImplementedError(f"{type(self).__name__} implements no transform_logits()")

    @property
    def is_identity(self) -> bool:
        """Whether the settings leave attention unchanged (strength 0, or no-op settings)."""
        return self.strength == 0.0

    def settings(self) -> dict[str, Any]:
        """The strategy's own settings (plain values) for names, records and logs."""
        return {}

    def direction_warning(self) -> str | None:
        """Why this configuration raises the over-relied modality's share, if it does (checked
        when binding; the monitor's before/after check at the end of test covers the rest)."""
        return None

    # ------------------------------------------------------------- description

    def describe(self) -> dict[str, Any]:
        """Everything that decides the reallocation, as plain values."""
        return {
            "strategy": self.name,
            **self.settings(),
            "strength": self.strength,
            "gate": self.gate,
            "layers": self.layers,
            "heads": self.heads,
            "query_rows": self.query_rows,
        }

    def label(self) -> str:
        """A short stable name, e.g. ``reweight(audio=0.25) s=0.5 gate=conflict``."""
        own = ", ".join(f"{k}={_short(v)}" for k, v in self.settings().items())
        return f"{self.name}({own}) s={_short(self.strength)} gate={self.gate}"

    def set_strength(self, strength: float) -> None:
        """Change the strength (calibration tries several)."""
        self.strength = _check_strength(strength)

    def set_gate(self, gate: Gate) -> None:
        """Change the gate (calibration tries both)."""
        if gate not in GATES:
            raise ValueError(f"AR gate must be one of {GATES}, got {gate!r}")
        self.gate = gate
        self._sample_gate = None

    # ----------------------------------------------------------------- binding

    @property
    def is_bound(self) -> bool:
        """Whether :meth:`bind` gave this reallocator a context (it is ready to run)."""
        return self._context is not None

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
            modality_weights: ``{"audio": w_a, "visual": w_v}`` of the adapter (MoSE), for
                strategies that read them.
        """
        layers = range(num_layers) if self.layers is None else self.layers
        resolved = set()
        for layer in layers:
            index = layer + num_layers if layer < 0 else layer
            if not 0 <= index < num_layers:
                raise ValueError(f"AR layers: {layer} is out of range for {num_layers} layers")
            resolved.add(index)
        self.on_bind(modality_weights)
        warning = None if self.is_identity else self.direction_warning()
        if warning:
            warnings.warn(
                f"AR {self.label()} moves attention toward {self.over_relied}, the modality "
                f"the model is taken to over-rely on: {warning}",
                stacklevel=2,
            )
        self._context = context
        self._layer_set = frozenset(resolved)
        self.monitor = ShareMonitor(num_layers) if self.monitor_enabled else None
        self.calls = 0
        self._plan = None
        self._sample_gate = None
        return self

    def on_bind(self, modality_weights: dict[str, float] | None) -> None:
        """Hook for strategies that read the adapter's modality weights at bind time."""

    def unbind(self) -> None:
        """Detach the context (the monitor's numbers stay readable)."""
        self._context = None
        self._plan = None
        self._sample_gate = None

    def set_sample_gate(self, gate: torch.Tensor | None) -> None:
        """Which samples of the next forwards may be reallocated (``(B,)`` boolean; ``None`` =
        all). A forward with ``R`` rows for ``B`` samples (label scoring repeats each prompt
        once per label, ``repeat_interleave``) maps row ``r`` to sample ``r // (R / B)``."""
        self._sample_gate = None if gate is None else gate.reshape(-1).bool()
        self._gate_version += 1

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Plain attention (no reallocation, no monitoring) inside the ``with`` body: the
        unimodal passes of the conflict gate and of calibration's baseline."""
        previous, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = previous

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
        # Gemma2's logit softcapping: kept exactly (SDPA has none, so those calls run the
        # explicit softcapped attention instead).
        softcap = kwargs.pop("softcap", None)
        plain_kwargs = dict(kwargs, dropout=dropout, scaling=scaling)
        if self._suspended:
            return _plain(module, query, key, value, attention_mask, softcap, plain_kwargs)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        acts = layer in self._layer_set and not self.is_identity
        if self.eager:
            return self._eager(
                module, layer, acts, query, key, value, attention_mask, scale, softcap
            )

        if not (acts or self.monitor is not None):
            return _plain(module, query, key, value, attention_mask, softcap, plain_kwargs)
        plan = self._plan_for(layer, query, key, attention_mask)
        if plan.index is None:
            return _plain(module, query, key, value, attention_mask, softcap, plain_kwargs)
        acts = acts and plan.any_acting

        masses = None
        if self.monitor is not None or (acts and self.needs_masses):
            groups = getattr(module, "num_key_value_groups", 1)
            rows_q = query if plan.full else query[:, :, plan.index]
            logits = _softcap(_logits(rows_q, key, scale, groups), softcap) + plan.logit_mask()
            masses = span_masses(torch.softmax(logits, dim=-1), plan.one_hot())

        sub_mask, factors = None, None
        if acts:
            if self.needs_masses:
                factors = plan.gated(self.factors(masses, plan))
                sub_mask = plan.sdpa_mask(query.dtype) + keys_bias(factors, plan.one_hot()).to(
                    query.dtype
                )
            else:
                # Mass-independent factors: one mask serves every layer of the forward.
                factors, sub_mask = plan.static(self, query.dtype)

        if self.monitor is not None:
            after = masses if factors is None else _apply(masses, factors)
            self.monitor.update(layer, masses, after, plan.selected)
        if sub_mask is None:
            return _plain(module, query, key, value, attention_mask, softcap, plain_kwargs)

        # Only the selected rows are recomputed with the bias (merged into a float mask); the
        # others keep the plain SDPA call and its fast kernel.
        dropped = ("is_causal", "position_bias")
        sub_kwargs = {k: v for k, v in plain_kwargs.items() if k not in dropped}
        rows_q = query if plan.full else query[:, :, plan.index]
        out_rows, _ = _plain(
            module, rows_q, key, value, sub_mask, softcap, dict(sub_kwargs, is_causal=False)
        )
        if plan.full:
            # Unselected rows got a zero bias; fully masked (padding) rows get SDPA's zeros
            # rather than the uniform average a float mask of -max gives.
            if plan.dead_rows is not None:
                out_rows = out_rows.masked_fill(plan.dead_rows, 0.0)
            return out_rows, None
        out, _ = _plain(module, query, key, value, attention_mask, softcap, plain_kwargs)
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
            or plan.gate_version != self._gate_version
        ):
            device = query.device
            key_ids = self._context.keys(k_len).to(device)
            rows = self._rows(self._context.queries(q_len, k_len).to(device))
            head_mask = self._head_mask(heads, device)
            acting = rows & self._row_gate(rows.shape[0], device)[:, None]
            plan = _Plan(
                key_ids, rows, acting, attention_mask, q_len, head_mask, self.heads is None
            )
            plan.gate_version = self._gate_version
            self._plan = plan
        plan.layer = layer
        return plan

    # ------------------------------------------------------------------ helpers

    def _row_gate(self, rows: int, device: torch.device) -> torch.Tensor:
        """``(rows,)`` boolean: which forward rows belong to gated-in samples."""
        if self.gate == "all":
            return torch.ones(rows, dtype=torch.bool, device=device)
        gate = self._sample_gate
        if gate is None:
            raise RuntimeError(
                "AR gate 'conflict' needs a per-sample gate (set_sample_gate) before the forward"
            )
        if rows % gate.numel():
            raise ValueError(f"a forward of {rows} rows does not split into {gate.numel()} samples")
        return gate.to(device).repeat_interleave(rows // gate.numel())

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

    def _eager(
        self,
        module: nn.Module,
        layer: int,
        acts: bool,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scale: float,
        softcap: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager attention with the strategy's logit transform (the PAI baseline's code path)."""
        batch, heads, q_len, _ = query.shape
        k_len = key.shape[2]
        groups = getattr(module, "num_key_value_groups", 1)
        key_states, value_states = repeat_kv(key, groups), repeat_kv(value, groups)
        logits = _softcap(torch.matmul(query, key_states.transpose(2, 3)) * scale, softcap)
        every_row = torch.arange(q_len, device=query.device)
        visible, additive = _mask_rows(attention_mask, every_row, batch, q_len, k_len, query.device)
        if additive is not None:
            logits = logits + additive
        else:
            logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)
        key_ids = self._context.keys(k_len).to(query.device)
        rows = self._rows(self._context.queries(q_len, k_len).to(query.device))
        head_mask = self._head_mask(heads, query.device)[None, :, None]
        selected = rows[:, None] & head_mask
        acting = (rows & self._row_gate(rows.shape[0], query.device)[:, None])[:, None] & head_mask
        scaled = logits
        if acts:
            scaled = self.transform_logits(logits, key_ids, acting[..., None] & visible)
        weights = nn.functional.softmax(scaled, dim=-1, dtype=torch.float32)
        if self.monitor is not None:
            one_hot = key_one_hot(key_ids)  # (B, 1, K, 3)
            before = nn.functional.softmax(logits, dim=-1, dtype=torch.float32) @ one_hot
            self.monitor.update(layer, before, weights @ one_hot, selected)
        weights = weights.to(query.dtype)
        out = torch.matmul(weights, value_states).transpose(1, 2).contiguous()
        return out, weights


def _check_strength(strength: float) -> float:
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"AR strength must be in [0, 1], got {strength}")
    return float(strength)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_short(v)}" for k, v in value.items()) + "}"
    return str(value)


def _apply(masses: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Masses after multiplying each modality's weights by ``factors`` and renormalising."""
    n = factors.shape[-1]
    full = torch.cat([masses[..., :n] * factors, masses[..., n:]], dim=-1)
    return full / full.sum(-1, keepdim=True)


def modality_index(name: str) -> int:
    """Position of ``audio``/``visual``/``text`` in :data:`MONITORED` (masses, factors)."""
    modality = Modality.parse(name)
    if modality not in MONITORED:
        raise ValueError(f"AR: {name!r} is not one of audio, visual, text")
    return MONITORED.index(modality)


class _Plan:
    """Row and key bookkeeping shared by every layer of one forward (cheap to reuse in decode).

    Args:
        key_ids: ``(B, K)`` key modality ids.
        rows: ``(B, Q)`` boolean, the selected query rows (monitored).
        acting: ``(B, Q)`` boolean, the selected rows of gated-in samples (reallocated).
        attention_mask: the mask the layers receive (kept to recognise the same forward).
        q_len: query length.
        head_mask: ``(H,)`` boolean, the selected heads.
        all_heads: whether every head is selected.
    """

    def __init__(
        self,
        key_ids: torch.Tensor,
        rows: torch.Tensor,
        acting: torch.Tensor,
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
        self.gate_version = 0
        index = rows.any(0).nonzero().squeeze(1)
        self.index = index if index.numel() else None
        self.full = index.numel() == q_len
        self.any_acting = False
        if self.index is None:
            return
        batch = rows.shape[0]
        self.visible, self.additive = _mask_rows(
            attention_mask, index, batch, q_len, self.k_len, key_ids.device
        )
        self.selected = rows[:, None, index] & head_mask[None, :, None]  # (B, H, U)
        self.acting = acting[:, None, index] & head_mask[None, :, None]
        self.any_acting = bool(self.acting.any())
        # With every head selected, one mask row serves all heads.
        self.acting_rows = self.acting[:, :1] if all_heads else self.acting
        self.own_rows = rows[:, index, None, None]  # (B, U, 1, 1), output layout
        self.all_own = bool(self.own_rows.all())
        dead = ~self.visible.any(-1)  # (B, 1, U)
        self.dead_rows = dead.transpose(1, 2)[..., None] if bool(dead.any()) else None
        self._cache: dict[str, Any] = {}

    def gated(self, factors: torch.Tensor) -> torch.Tensor:
        """``factors`` on the acting rows and heads, 1 elsewhere, ``(B, H, U, n)``."""
        return torch.where(self.acting[..., None], factors, torch.ones((), device=factors.device))

    def static(
        self, strategy: "Reallocator", dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors and float SDPA mask of a mass-independent strategy, the same for every
        layer of the forward (built once)."""
        key = f"static_{dtype}"
        if key not in self._cache:
            raw = strategy.factors(None, self).to(self.key_ids.device)
            shape = (*self.acting_rows.shape, raw.shape[-1])
            factors = torch.where(self.acting_rows[..., None], raw.expand(shape), 1.0)
            bias = keys_bias(factors, self.one_hot()).to(dtype)
            self._cache[key] = (factors, self.sdpa_mask(dtype) + bias)
        return self._cache[key]

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

    def proportional_shares(self) -> torch.Tensor:
        """Visible audio and visual keys over their sum, per row, ``(B, 1, U, 2)``."""
        if "shares" not in self._cache:
            counts = torch.matmul(self.visible.float(), self.one_hot()[..., :2])  # (B, 1, U, 2)
            # Rows without both spans are left alone later; avoid 0/0 here.
            self._cache["shares"] = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
        return self._cache["shares"]


def _softcap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma2's logit softcapping ``softcap * tanh(logits / softcap)`` (identity for ``None``)."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def _plain(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    softcap: float | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with ``mask`` (boolean, additive float or ``None``: causal): SDPA, or for a
    softcapping model the explicit softcapped attention (the model's own eager math)."""
    if softcap is None:
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    batch, _, q_len, dim = query.shape
    k_len = key.shape[2]
    scaling = kwargs.get("scaling")
    scale = dim**-0.5 if scaling is None else scaling
    groups = getattr(module, "num_key_value_groups", 1)
    key_states, value_states = repeat_kv(key, groups), repeat_kv(value, groups)
    logits = _softcap(torch.matmul(query, key_states.transpose(2, 3)) * scale, softcap)
    if mask is None:
        rows = torch.arange(q_len, device=query.device)
        mask = _mask_rows(None, rows, batch, q_len, k_len, query.device)[0]
    if mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask[..., :k_len], torch.finfo(logits.dtype).min)
    else:
        logits = logits + mask[..., :k_len]
    weights = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value_states).transpose(1, 2).contiguous(), None


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
