"""MoSE: modality-specific experts inside the frozen LLM's linear layers.

A :class:`MoSELinear` wraps a frozen ``nn.Linear`` ``W0`` with a LoRA whose down-projection ``A``
(rank ``r``) is shared by every token and whose up-projection is a group of expert matrices per
modality (audio, visual, and optionally text)::

    y = W0 x + s * w_m * sum_e g_{m,e}(x) B_{m,e} A dropout(x)        for a token of modality m

with ``s = alpha / r``, ``g_m`` the gate of modality ``m`` (softmax or renormalised top-k) and
``w_m`` the dynamic modality weight (:mod:`src.models.modality_weights`). Every ``B`` starts at
zero, so a fresh model computes exactly what the base model computes. Which token is which comes
from ``modality_ids`` bound in the :class:`ModalityContext`; PAD tokens get no update.

All experts run in one matmul: ``sum_e g_e B_e h = [B_1 ... B_E] (g (x) h)``, a single
``(tokens, E*r) @ (E*r, out)`` product, where ``g`` is zero outside the token's own modality's
experts (one softmax, masked per modality, serves all modalities: no gather, scatter or loop).
:func:`inject_mose` puts the layers into any Hugging Face model by module name. Equations and
choices: ``docs/mose.md``.
"""

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from src.core.modality import Modality
from src.models.adapters.targets import linear_features
from src.models.modality_context import ModalityContext
from src.models.modality_weights import FixedModalityWeights, ModalityWeights
from src.models.mose_regularizer import LayerRecord

TEXT_MODES = ("experts", "lora", "none")
GATE_INPUTS = ("hidden", "shared_a")
#: Attribute name under which :func:`inject_mose` registers the modality weights on the model.
MODALITY_WEIGHTS_ATTR = "mose_modality_weights"
#: Records kept per layer when nobody consumes them (a guard against leaking graphs).
MAX_RECORDS = 16


@dataclass(frozen=True)
class ExpertGroup:
    """One modality's experts in a layer.

    Attributes:
        name: ``audio``, ``visual`` or ``text`` (parameter names use it).
        modality: The modality id its tokens carry.
        n_experts: Number of ``B`` matrices; a group of one expert has no gate (plain LoRA).
        weight_index: Index into the modality weight vector, or ``None`` (weight 1).
    """

    name: str
    modality: Modality
    n_experts: int
    weight_index: int | None


@dataclass
class RoutingPlan:
    """Where each token goes, computed once per forward and shared by all MoSE layers.

    Attributes:
        group: ``(tokens,)`` index of each token's group in the layer's group order; the number
            of groups for tokens no group takes (PAD; text with ``text_mode="none"``).
        columns: ``(tokens, experts of all groups)`` True on the columns of the token's group.
        one_hot: ``(tokens, groups)`` float one-hot of ``group`` (per-group sums by a matmul).
        count_div: ``(groups,)`` token counts as floats, at least 1 (per-group means).
        counts: Tokens per group (Python ints: read once per forward, not once per layer).
    """

    group: torch.Tensor
    columns: torch.Tensor
    one_hot: torch.Tensor
    count_div: torch.Tensor
    counts: list[int]


class RoutingCache:
    """The :class:`RoutingPlan` of the forward in progress, shared by all MoSE layers.

    Every layer of one forward sees the same bound ``modality_ids``; building the plan once
    saves its kernels and its one host sync (the token counts) in every other layer.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._ids: torch.Tensor | None = None
        self._plan: RoutingPlan | None = None
        self._constant_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def plan(
        self,
        ids: torch.Tensor,
        batch: int,
        device: torch.device,
        codes: tuple[int, ...],
        column_groups: tuple[int, ...],
    ) -> RoutingPlan:
        """Plan for ``ids`` expanded to ``batch`` rows, groups of modality ``codes`` (in order)
        and expert columns belonging to groups ``column_groups``."""
        # Inference tensors (validation under inference_mode) carry no version counter.
        version = None if ids.is_inference() else ids._version
        key = (version, tuple(ids.shape), batch, str(device), codes, column_groups)
        if self._ids is ids and self._key == key and self._plan is not None:
            return self._plan
        flat = _expand_batch(ids, batch).to(device).reshape(-1)
        code_table, col_group = self._constants(codes, column_groups, device)
        matches = flat.unsqueeze(1) == code_table  # (tokens, groups)
        group = torch.where(matches.any(1), matches.long().argmax(1), len(codes))
        counts = matches.sum(0)
        self._plan = RoutingPlan(
            group=group,
            columns=group.unsqueeze(1) == col_group,
            one_hot=matches.float(),
            count_div=counts.clamp_min(1).float(),
            counts=[int(c) for c in counts.tolist()],
        )
        self._ids, self._key = ids, key
        return self._plan

    def _constants(
        self, codes: tuple[int, ...], column_groups: tuple[int, ...], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Small constant tensors on ``device``, copied there once (a copy can sync)."""
        key = (codes, column_groups, str(device))
        if key not in self._constant_cache:
            self._constant_cache[key] = (
                torch.tensor(codes, device=device),
                torch.tensor(column_groups, device=device),
            )
        return self._constant_cache[key]


def _expand_batch(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat the rows of ``ids`` when the backbone runs an expanded batch (beam search)."""
    if ids.shape[0] == batch:
        return ids
    if batch % ids.shape[0] != 0:
        raise ValueError(
            f"MoSE: the backbone got a batch of {batch} rows but modality_ids has "
            f"{ids.shape[0]}; bind the modality_ids of the batch being run"
        )
    return ids.repeat_interleave(batch // ids.shape[0], dim=0)


class MoSELinear(nn.Module):
    """A frozen linear layer plus modality-specific LoRA experts with a shared ``A``.

    Args:
        base_layer: The backbone's ``nn.Linear`` (or transformers ``Conv1D``, GPT-2's transposed
            linear); it is frozen and kept as ``base_layer``. A fused projection (``qkv_proj``,
            ``query_key_value``, ``c_attn``) is adapted whole, as peft's LoRA adapts it.
        context: Where the batch's ``modality_ids`` are bound during the forward.
        rank: Rank ``r`` of the shared ``A`` (and of every expert ``B``).
        alpha: LoRA ``alpha``; the adapter output is scaled by ``alpha / rank``.
        dropout: Dropout on the layer input before ``A`` (not on the gate input).
        n_audio_experts: Experts in the audio group.
        n_visual_experts: Experts in the visual group.
        n_text_experts: Experts in the text group when ``text_mode="experts"``.
        text_mode: ``"experts"`` (text gets a gated group of ``n_text_experts``), ``"lora"``
            (text gets a single ``B``, i.e. a plain LoRA sharing ``A``) or ``"none"`` (text tokens
            get no update).
        top_k: ``None`` for a dense softmax gate; else each token mixes only its ``top_k``
            most probable experts, with the gate renormalised over them.
        gate_input: ``"hidden"``: the gate is a linear map of the token's layer input ``x``;
            ``"shared_a"``: of the shared projection ``A dropout(x)`` (r-dimensional, cheaper).
        modality_weights: Source of the audio/visual weights (default: constant 1). It is not
            registered as a submodule here; :func:`inject_mose` registers it once on the model.
        routing: Shared :class:`RoutingCache` (default: a private one).
        track_contribution: Record each modality's contribution attached to the graph (needed
            by the cross-modality balance loss; keeps the ``(tokens, out)`` adapter output alive
            until backward). When off, the contribution is recorded detached, for logging only.
        record_dispatch: Count, in dense mode, each token's arg-max expert (only the
            ``switch`` balance loss uses it; top-k mode always has it).
        compile: Run the adapter math through ``torch.compile`` (fuses its ~20 small kernels;
            worth it on GPUs, where they are launch-bound; the first steps compile).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        context: ModalityContext,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        n_audio_experts: int = 4,
        n_visual_experts: int = 4,
        n_text_experts: int = 4,
        text_mode: str = "lora",
        top_k: int | None = None,
        gate_input: str = "hidden",
        modality_weights: ModalityWeights | None = None,
        routing: RoutingCache | None = None,
        track_contribution: bool = True,
        record_dispatch: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        features = linear_features(base_layer)
        if features is None:
            raise TypeError(
                f"MoSELinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}"
            )
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode: unknown {text_mode!r}; expected one of {TEXT_MODES}")
        if gate_input not in GATE_INPUTS:
            raise ValueError(f"gate_input: unknown {gate_input!r}; expected one of {GATE_INPUTS}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        groups = [
            ExpertGroup("audio", Modality.AUDIO, n_audio_experts, 0),
            ExpertGroup("visual", Modality.VISUAL, n_visual_experts, 1),
        ]
        if text_mode != "none":
            n_text = n_text_experts if text_mode == "experts" else 1
            groups.append(ExpertGroup("text", Modality.TEXT, n_text, None))
        for group in groups:
            if group.n_experts < 1:
                raise ValueError(f"n_{group.name}_experts must be >= 1, got {group.n_experts}")
            if top_k is not None and group.n_experts > 1 and not 1 <= top_k <= group.n_experts:
                raise ValueError(
                    f"top_k must be in [1, n_{group.name}_experts={group.n_experts}], got {top_k}"
                )
        self.groups: tuple[ExpertGroup, ...] = tuple(groups)

        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.in_features, self.out_features = features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.top_k, self.gate_input, self.text_mode = top_k, gate_input, text_mode
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        # Adapter parameters in float32 on the base layer's device (as peft does by default).
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.experts = nn.ParameterDict(
            {
                g.name: nn.Parameter(torch.zeros(g.n_experts, self.out_features, rank, **factory))
                for g in self.groups
            }
        )
        gate_dim = self.in_features if gate_input == "hidden" else rank
        # Default (random) init: a zero gate would route every token uniformly, and with B = 0
        # the experts would then receive identical gradients forever.
        self.gates = nn.ModuleDict(
            {
                g.name: nn.Linear(gate_dim, g.n_experts, bias=False, **factory)
                for g in self.groups
                if g.n_experts > 1
            }
        )
        # Expert columns: the gated groups' experts first (their logits come from one matmul),
        # then the single-expert groups (a constant logit). columns[name] = (start, stop).
        order = [g for g in self.groups if g.n_experts > 1] + [
            g for g in self.groups if g.n_experts == 1
        ]
        self._column_order = tuple(g.name for g in order)
        self.columns: dict[str, tuple[int, int]] = {}
        column_groups: list[int] = []
        for g in order:
            start = len(column_groups)
            self.columns[g.name] = (start, start + g.n_experts)
            column_groups += [self.groups.index(g)] * g.n_experts
        self._column_groups = tuple(column_groups)
        self._codes = tuple(int(g.modality) for g in self.groups)
        self._n_single = sum(1 for g in self.groups if g.n_experts == 1)

        self.track_contribution = track_contribution
        self.record_dispatch = record_dispatch
        self.compile = compile
        self.context = context
        # Plain attributes, not submodules: shared by all layers and registered once elsewhere.
        self.__dict__["_modality_weights"] = modality_weights
        self.__dict__["_routing"] = routing if routing is not None else RoutingCache()
        self._records: list[LayerRecord] = []

    @property
    def modality_weights(self) -> ModalityWeights | None:
        """The shared modality weights (``None``: constant 1)."""
        return self.__dict__["_modality_weights"]

    def extra_repr(self) -> str:
        groups = ", ".join(f"{g.name}={g.n_experts}" for g in self.groups)
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"scaling={self.scaling:g}, experts=({groups}), top_k={self.top_k}, "
            f"gate_input={self.gate_input}"
        )

    # --- forward ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if x.dim() != 3:
            raise ValueError(f"MoSELinear expects (batch, seq, features), got {tuple(x.shape)}")
        batch, seq, _ = x.shape
        plan = self.plan(batch, seq, x.device)
        flat_x = x.reshape(-1, self.in_features).to(self.lora_A.dtype)
        record = self.training and torch.is_grad_enabled()
        delta, stats = self._core(flat_x, plan, record)
        if record:
            self._records.append(self._record(plan, *stats))
            del self._records[:-MAX_RECORDS]
        return result + delta.view(batch, seq, self.out_features).to(result.dtype)

    def _core(
        self, flat_x: torch.Tensor, plan: RoutingPlan, record: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Run :func:`mose_core` on this layer's parameters (compiled when ``compile``)."""
        weights = self.modality_weights
        args = (
            flat_x,
            self.lora_A,
            [self.gates[name].weight for name in self._column_order[: len(self.gates)]],
            [self.experts[name] for name in self._column_order],
            flat_x.new_ones(2) if weights is None else weights.weights().to(flat_x),
            plan.group,
            plan.columns,
            plan.one_hot,
            plan.count_div,
        )
        options = {
            "scaling": self.scaling,
            "dropout": self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0,
            "training": self.training,
            "gate_on_hidden": self.gate_input == "hidden",
            "n_groups": len(self.groups),
            "n_single": self._n_single,
            "top_k": self.top_k,
            "want_chosen": record and (self.record_dispatch or self.top_k is not None),
            "record": record,
            "track_contribution": self.track_contribution,
        }
        if self.compile:
            return _compiled_mose_core()(*args, **options)
        return mose_core(*args, **options, mix=self._mix_experts)

    def plan(self, batch: int, seq: int, device: torch.device) -> RoutingPlan:
        """The routing plan of the bound ``modality_ids`` for a ``(batch, seq)`` input."""
        ids = self.context.queries(seq)
        routing: RoutingCache = self.__dict__["_routing"]
        return routing.plan(ids, batch, device, self._codes, self._column_groups)

    def route(
        self, flat_x: torch.Tensor, h: torch.Tensor, plan: RoutingPlan
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate probabilities, mixing weights and chosen experts, ``(tokens, columns)`` each.

        See :func:`route_tokens`; ``h`` is the shared projection ``A x`` (the gate input when
        ``gate_input="shared_a"``).
        """
        gate_weights = [self.gates[name].weight for name in self._column_order[: len(self.gates)]]
        source = flat_x if self.gate_input == "hidden" else h
        probs, mix, chosen = route_tokens(
            source, gate_weights, plan.columns, self._n_single, self.top_k, want_chosen=True
        )
        return probs, mix, chosen

    def _mix_experts(
        self, h: torch.Tensor, coeff: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """Mix the experts (:func:`mix_experts`; the benchmark overrides it with a loop)."""
        return mix_experts(h, coeff, experts)

    # --- records for the gating loss and statistics ----------------------------------------

    def _record(
        self,
        plan: RoutingPlan,
        importance: torch.Tensor,
        usage: torch.Tensor,
        dispatch: torch.Tensor,
        contribution: torch.Tensor,
    ) -> LayerRecord:
        return LayerRecord(
            groups=tuple(g.name for g in self.groups),
            columns=tuple(self.columns[g.name] for g in self.groups),
            counts=tuple(plan.counts),
            importance=importance,
            usage=usage,
            dispatch=dispatch,
            contribution=contribution,
        )

    def pop_records(self) -> list[LayerRecord]:
        """Records of the training forwards since the last call (and forget them)."""
        records, self._records = self._records, []
        return records

    def clear_records(self) -> None:
        """Drop recorded forwards (their graphs are then freed after backward)."""
        self._records = []


def route_tokens(
    source: torch.Tensor,
    gate_weights: list[torch.Tensor],
    columns: torch.Tensor,
    n_single: int,
    top_k: int | None,
    want_chosen: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gate probabilities, mixing weights and chosen experts, ``(tokens, columns)`` each.

    The gated groups' logits come from one matmul with their stacked gate weights; the
    ``n_single`` single-expert groups' columns get the constant logit 0. Each token's softmax
    runs over its own group's columns only (``columns`` masks the rest), so one softmax serves
    every modality, a single expert gets probability 1, and rows of tokens that no group takes
    are all zero. With ``top_k`` the mixing weights keep the ``top_k`` most probable experts,
    renormalised; ``chosen`` marks the experts each token uses (the arg-max in dense mode).
    """
    if gate_weights:
        logits = F.pad(source @ torch.cat(gate_weights).t(), (0, n_single))
    else:
        logits = source.new_zeros(source.shape[0], n_single)
    masked = logits.float().masked_fill(~columns, torch.finfo(torch.float32).min)
    in_group = columns.float()
    probs = torch.softmax(masked, dim=-1) * in_group
    if top_k is None:
        if not want_chosen:
            return probs, probs, None
        chosen = torch.zeros_like(probs).scatter_(1, masked.argmax(-1, keepdim=True), 1.0)
        return probs, probs, chosen * in_group
    top = masked.topk(min(top_k, masked.shape[1]), dim=-1).indices
    chosen = torch.zeros_like(probs).scatter_(1, top, 1.0) * in_group
    kept = probs * chosen
    return probs, kept / kept.sum(-1, keepdim=True).clamp_min(1e-12), chosen


def mix_experts(h: torch.Tensor, coeff: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """``sum_e coeff[:, e] * (B_e @ h)`` for all experts in one matmul.

    ``sum_e c_e B_e h = [B_1 ... B_E] (c (x) h)``: a ``(tokens, E*r) @ (E*r, out)`` product.

    Args:
        h: ``(tokens, r)`` shared projection.
        coeff: ``(tokens, E)`` mixing weights (gate x scaling x modality weight).
        experts: ``(E, out, r)`` expert matrices.
    """
    n_experts, out, rank = experts.shape
    z = (coeff.to(h.dtype).unsqueeze(2) * h.unsqueeze(1)).reshape(-1, n_experts * rank)
    return z @ experts.transpose(1, 2).reshape(n_experts * rank, out)


def mose_core(
    flat_x: torch.Tensor,
    lora_A: torch.Tensor,
    gate_weights: list[torch.Tensor],
    experts: list[torch.Tensor],
    modality_weights: torch.Tensor,
    group: torch.Tensor,
    columns: torch.Tensor,
    one_hot: torch.Tensor,
    count_div: torch.Tensor,
    *,
    scaling: float,
    dropout: float,
    training: bool,
    gate_on_hidden: bool,
    n_groups: int,
    n_single: int,
    top_k: int | None,
    want_chosen: bool,
    record: bool,
    track_contribution: bool,
    mix: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = mix_experts,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The adapter output ``(tokens, out)`` of one MoSE layer and, if ``record``, its statistics.

    Pure tensor code with static options, shared by every layer, so that ``torch.compile``
    traces it once. ``experts`` and the gate weights come in column order; ``group`` and
    ``columns`` are the :class:`RoutingPlan`'s. Statistics: per-column sums of gate
    probabilities (graph) and of mixing weights, per-column dispatch counts, and per-group mean
    ``||delta||^2`` (graph when ``track_contribution``).
    """
    h = F.dropout(flat_x, dropout, training) @ lora_A.t()  # (tokens, r), shared by everyone
    source = flat_x if gate_on_hidden else h
    probs, mix_weights, chosen = route_tokens(
        source, gate_weights, columns, n_single, top_k, want_chosen
    )
    # scaling * w_m per token; groups are audio, visual[, text], then "no group" (weight 0).
    tail = F.pad(modality_weights.new_ones(n_groups - 2), (0, 1))
    table = torch.cat([modality_weights, tail]) * scaling
    coeff = mix_weights * table[group].unsqueeze(1)
    delta = mix(h, coeff, torch.cat(experts))
    if not record:
        return delta, ()
    importance = probs.sum(0)  # other groups' tokens are zero in a group's columns
    usage = mix_weights.detach().sum(0)
    dispatch = chosen.sum(0) if chosen is not None else torch.zeros_like(usage)
    # Attached to the graph, the contribution keeps delta alive until backward: on demand.
    source = delta if track_contribution else delta.detach()
    contribution = (source.float().pow(2).sum(-1) @ one_hot) / count_div
    return delta, (importance, usage, dispatch, contribution)


_COMPILED_CORE: Callable | None = None


def _compiled_mose_core() -> Callable:
    """:func:`mose_core` through ``torch.compile`` (dynamic token count), built on first use."""
    global _COMPILED_CORE
    if _COMPILED_CORE is None:
        _COMPILED_CORE = torch.compile(mose_core, dynamic=True)
    return _COMPILED_CORE


# --- injection and checkpoints -----------------------------------------------------------------

_LAYER_INDEX = re.compile(r"^\d+$")


def _layer_index(name: str) -> int | None:
    """The first all-digit component of a module path (``model.layers.3.self_attn.q_proj``)."""
    for part in name.split("."):
        if _LAYER_INDEX.match(part):
            return int(part)
    return None


def inject_mose(
    model: nn.Module,
    context: ModalityContext,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    layers: Sequence[int] | None = None,
    modality_weights: ModalityWeights | None = None,
    layer_cls: type[MoSELinear] | None = None,
    **mose_kwargs,
) -> list[MoSELinear]:
    """Replace the matching ``nn.Linear`` modules of ``model`` by :class:`MoSELinear`.

    Freezes every existing parameter of ``model``; afterwards only MoSE parameters (and learned
    modality weights) require grad. The modality weights are registered on ``model`` as
    ``mose_modality_weights``.

    Args:
        model: Any Hugging Face model (Llama, Qwen2, Mistral, ...) or other ``nn.Module``.
        context: The :class:`ModalityContext` the multimodal model binds ``modality_ids`` to.
        target_modules: Last component of the module names to adapt (``q_proj``, ``v_proj``).
        layers: Transformer layer indices to adapt (the first integer in the module path);
            ``None`` adapts every layer.
        modality_weights: Strategy for the audio/visual weights (default: constant 1).
        layer_cls: :class:`MoSELinear` or a subclass (the benchmark's per-expert loop).
        **mose_kwargs: Arguments of :class:`MoSELinear` (rank, alpha, n_audio_experts, ...).

    Returns:
        The new layers, in module order.
    """
    if any(isinstance(m, MoSELinear) for m in model.modules()):
        raise ValueError("inject_mose: the model already contains MoSE layers")
    targets = set(target_modules)
    if not targets:
        raise ValueError("inject_mose: target_modules is empty")
    wanted = None if layers is None else {int(i) for i in layers}
    matches: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        index = _layer_index(name)
        if wanted is not None and index not in wanted:
            continue
        if linear_features(module) is None:
            raise TypeError(
                f"inject_mose: {name} is a {type(module).__name__}, not nn.Linear or Conv1D; "
                "MoSE adapts linear layers only"
            )
        matches.append((name, module))
    if not matches:
        sample = [n for n, m in model.named_modules() if linear_features(m) is not None][:8]
        raise ValueError(
            f"inject_mose: no nn.Linear named {sorted(targets)} (layers={layers}) in "
            f"{type(model).__name__}; linear modules look like {sample}"
        )
    if wanted is not None:
        missing = wanted - {_layer_index(n) for n, _ in matches}
        if missing:
            raise ValueError(f"inject_mose: layers {sorted(missing)} have no {sorted(targets)}")

    model.requires_grad_(False)
    if modality_weights is None:
        modality_weights = FixedModalityWeights()
    base_param = next(iter(matches))[1].weight
    model.add_module(MODALITY_WEIGHTS_ATTR, modality_weights.to(base_param.device))
    routing = RoutingCache()
    new_layers = []
    for name, module in matches:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = (layer_cls or MoSELinear)(
            module, context, modality_weights=modality_weights, routing=routing, **mose_kwargs
        )
        setattr(parent, child, layer)
        new_layers.append(layer)
    return new_layers


def mose_layers(model: nn.Module) -> list[tuple[str, MoSELinear]]:
    """``(name, layer)`` of every MoSE layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoSELinear)]


def _is_mose_key(key: str, prefixes: tuple[str, ...], weights_prefix: str | None) -> bool:
    if weights_prefix is not None and key.startswith(weights_prefix):
        return True
    return any(key.startswith(p) and not key.startswith(p + "base_layer.") for p in prefixes)


def mose_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The MoSE part of ``model.state_dict()``: experts, shared ``A``, gates, modality weights.

    Keys are the usual state-dict names relative to ``model`` (for a Llama backbone:
    ``model.layers.0.self_attn.q_proj.lora_A``, ``...q_proj.experts.audio``,
    ``...q_proj.gates.audio.weight``, ``mose_modality_weights.logits`` / ``._w``).
    """
    prefixes = tuple(f"{n}." for n, _ in mose_layers(model))
    if not prefixes:
        raise ValueError(f"mose_state_dict: {type(model).__name__} has no MoSE layers")
    weights_prefix = _weights_prefix(model)
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if _is_mose_key(k, prefixes, weights_prefix)
    }


def load_mose_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a :func:`mose_state_dict` into a model with the same MoSE layout (strict)."""
    expected = set(mose_state_dict(model))
    given = set(state_dict)
    if expected != given:
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        raise KeyError(
            f"load_mose_state_dict: MoSE keys differ; missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    result = model.load_state_dict(state_dict, strict=False)
    if result.unexpected_keys:  # pragma: no cover - guarded by the key check above
        raise KeyError(f"load_mose_state_dict: unexpected keys {result.unexpected_keys[:5]}")


def _weights_prefix(model: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if name and isinstance(module, ModalityWeights):
            return f"{name}."
    return None
