"""Benchmark: MoSE vs peft LoRA train steps, and batched experts vs a per-expert loop.

One run measures every variant on the same random Llama backbone and the same batch, with the
steps of all variants interleaved (round robin) so that machine noise hits them alike; the table
reports each variant's median step time and its ratio to peft LoRA. Peak memory is that of one
warm step above what was allocated before it: ``torch.cuda.max_memory_allocated`` on CUDA, the
peak of the torch profiler's memory timeline on CPU.

Equal trainable parameters: ``mose_split`` gives each of a modality's ``E`` experts (and the
shared ``A``) rank ``r / E``; the peft LoRA baseline ``lora`` gets the rank whose trainable
parameter count is closest to ``mose_split``'s (shared ``A``, all expert ``B``'s and the gates
counted), so the two compare at equal parameters (``--lora-rank`` overrides it). ``lora_r`` is a
LoRA of rank ``r`` itself (the "same rank units per token" budget, fewer parameters than MoSE).
``mose_full`` gives every expert rank ``r`` (HydraLoRA-style, about ``E`` times the parameters):
reported separately, it is not parameter-matched. ``mose_loop`` is ``mose_split`` computing the
experts one by one; ``mose_compiled`` is ``mose_split`` with ``compile=True`` (``torch.compile``
of the adapter math, the GPU path: it fuses the ~20 small kernels of a MoSE layer).

    python experiments/bench_mose.py                       # CPU defaults (see --help)
    python experiments/bench_mose.py --device cuda --dtype bfloat16 --hidden 4096 \
        --intermediate 11008 --layers 4 --heads 32 --kv-heads 32 --vocab 32000 --rank 64 \
        --variants lora,mose_split,mose_compiled,mose_full --steps 30 --warmup 10
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.core.modality import Modality  # noqa: E402
from src.models.modality_context import ModalityContext  # noqa: E402
from src.models.mose import MoSELinear, inject_mose  # noqa: E402
from src.models.mose_regularizer import MoSEGateLoss  # noqa: E402

VARIANTS = ("lora", "lora_r", "mose_split", "mose_full", "mose_loop", "mose_compiled")
DEFAULT_VARIANTS = ("lora", "mose_split", "mose_compiled", "mose_full", "mose_loop")


class LoopMoSELinear(MoSELinear):
    """MoSE computing each expert with its own matmul (the reference the batched form replaces)."""

    def _mix_experts(
        self, h: torch.Tensor, coeff: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        out = h.new_zeros(h.shape[0], experts.shape[1])
        for e in range(experts.shape[0]):
            out = out + coeff[:, e : e + 1].to(h.dtype) * (h @ experts[e].t())
        return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=None, help="default: 2 x hidden")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--visual", type=int, default=256, help="visual tokens per sample")
    p.add_argument("--audio", type=int, default=1, help="audio tokens per sample")
    p.add_argument("--text", type=int, default=43, help="text tokens per sample")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16, help="rank budget r (MoSE experts: r / E)")
    p.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="rank of the `lora` baseline (default: matched to mose_split's trainable parameters)",
    )
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--experts", type=int, default=4, help="experts per modality (audio, visual)")
    p.add_argument("--text-mode", default="lora", choices=("experts", "lora", "none"))
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--balance-weight", type=float, default=0.01)
    p.add_argument("--modality-balance-weight", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"among {VARIANTS}")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.rank % args.experts:
        p.error(f"--rank {args.rank} must be divisible by --experts {args.experts}")
    return args


def build(args: argparse.Namespace, variant: str) -> tuple[torch.nn.Module, Any]:
    """The backbone with one adapter, an optimizer step closure and its parameter count."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.visual + args.audio + args.text + 8,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(args.device, getattr(torch, args.dtype))
    ctx = ModalityContext()
    layers: list[MoSELinear] = []
    if variant in ("lora", "lora_r"):
        rank = args.rank if variant == "lora_r" else args.lora_rank
        lora = LoraConfig(
            r=rank,
            lora_alpha=args.alpha * rank / args.rank,  # same scaling alpha / r for every variant
            target_modules=["q_proj", "v_proj"],
            lora_dropout=0,
        )
        # get_peft_model keeps the adapter in float32 on a half-precision backbone
        # (autocast_adapter_dtype), as MoSE does; only the LoRA parameters train.
        model = get_peft_model(model, lora)
    else:
        rank = args.rank if variant == "mose_full" else args.rank // args.experts
        layers = inject_mose(
            model,
            ctx,
            rank=rank,
            alpha=args.alpha * rank / args.rank,  # same scaling alpha / r as the LoRA
            n_audio_experts=args.experts,
            n_visual_experts=args.experts,
            text_mode=args.text_mode,
            top_k=args.top_k,
            track_contribution=args.modality_balance_weight > 0,
            compile=variant == "mose_compiled",
            layer_cls=LoopMoSELinear if variant == "mose_loop" else None,
        )
        # Trained experts are non-zero; zero B's would let some kernels take shortcuts.
        with torch.no_grad():
            for layer in layers:
                for p in layer.experts.values():
                    p.normal_(std=0.01)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gate_loss = MoSEGateLoss(
        balance_weight=args.balance_weight, modality_balance_weight=args.modality_balance_weight
    )
    batch = make_batch(args)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with ctx.bind(batch["modality_ids"]):
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        if layers:
            records = [r for layer in layers for r in layer.pop_records()]
            loss = loss + gate_loss(records).loss
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in params)


def matched_lora_rank(args: argparse.Namespace) -> int:
    """The LoRA rank whose trainable parameter count is closest to ``mose_split``'s."""
    _, mose = build(args, "mose_split")
    probe = argparse.Namespace(**{**vars(args), "lora_rank": 1})
    _, per_rank = build(probe, "lora")  # LoRA parameters grow linearly with the rank
    return max(1, round(mose / per_rank))


def make_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """[text prefix | audio | visual | text] per row, as the collator lays out a prompt."""
    g = torch.Generator().manual_seed(0)
    prefix = args.text // 2
    row = (
        [int(Modality.TEXT)] * prefix
        + [int(Modality.AUDIO)] * args.audio
        + [int(Modality.VISUAL)] * args.visual
        + [int(Modality.TEXT)] * (args.text - prefix)
    )
    modality_ids = torch.tensor([row] * args.batch)
    input_ids = torch.randint(0, args.vocab, modality_ids.shape, generator=g)
    labels = input_ids.masked_fill(modality_ids != int(Modality.TEXT), -100)
    return {
        "modality_ids": modality_ids.to(args.device),
        "input_ids": input_ids.to(args.device),
        "labels": labels.to(args.device),
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variants(
    args: argparse.Namespace, variants: list[str]
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Median step time of each variant, steps interleaved across variants."""
    built = {v: build(args, v) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(args.warmup + args.steps):
        for v in variants:
            step = built[v][0]
            sync(args.device)
            start = time.perf_counter()
            step()
            sync(args.device)
            if i >= args.warmup:
                times[v].append(time.perf_counter() - start)
    results = {
        v: {"step_ms": 1e3 * statistics.median(times[v]), "trainable": built[v][1]}
        for v in variants
    }
    return results, {v: built[v][0] for v in variants}


def step_peak_mib(step: Any, device: str) -> float:
    """Peak memory (MiB) of one (warm) train step above the memory held before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the peak of the torch profiler's memory
    timeline (every tensor allocation and free of the step, by category).
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # export_memory_timeline is deprecated
        with profile(
            activities=[ProfilerActivity.CPU],
            profile_memory=True,
            record_shapes=True,
            with_stack=True,
        ) as prof:
            step()
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    totals = [sum(row) for row in sizes]
    return (max(totals) - totals[0]) / 2**20


def time_layer_experts(args: argparse.Namespace) -> dict[str, float]:
    """Forward + backward of one ``hidden -> hidden`` MoSE layer: batched vs per-expert loop."""
    batch = make_batch(args)
    ctx = ModalityContext()
    dtype = getattr(torch, args.dtype)
    x = torch.randn(*batch["modality_ids"].shape, args.hidden, device=args.device, dtype=dtype)
    layers = {}
    for name, cls in (("batched", MoSELinear), ("loop", LoopMoSELinear)):
        torch.manual_seed(0)
        base = torch.nn.Linear(args.hidden, args.hidden, bias=False).to(args.device, dtype)
        layers[name] = cls(
            base,
            ctx,
            rank=args.rank // args.experts,
            n_audio_experts=args.experts,
            n_visual_experts=args.experts,
            text_mode=args.text_mode,
            top_k=args.top_k,
        ).train()
        with torch.no_grad():
            for p in layers[name].experts.values():
                p.normal_(std=0.01)
    times: dict[str, list[float]] = {name: [] for name in layers}
    with ctx.bind(batch["modality_ids"]):
        for i in range(args.warmup + 5 * args.steps):
            for name, layer in layers.items():
                sync(args.device)
                start = time.perf_counter()
                layer(x).float().square().mean().backward()
                layer.clear_records()
                sync(args.device)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown or "lora" not in variants:
        raise SystemExit(f"--variants must include lora and be among {VARIANTS}, got {variants}")
    if args.lora_rank is None:
        args.lora_rank = matched_lora_rank(args)
    results, steps = time_variants(args, variants)
    for v in variants:
        results[v]["peak_mib"] = step_peak_mib(steps[v], args.device)
    base = results["lora"]
    seq = args.visual + args.audio + args.text
    print(
        f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
        f"hidden={args.hidden} layers={args.layers} batch={args.batch} seq={seq} "
        f"(visual {args.visual}, audio {args.audio}, text {args.text}) rank budget r={args.rank} "
        f"lora rank={args.lora_rank} (parameter-matched to mose_split) "
        f"experts={args.experts} text_mode={args.text_mode} top_k={args.top_k} "
        f"gate_loss=({args.balance_weight}, {args.modality_balance_weight}) "
        f"steps={args.steps} (median after {args.warmup} warm-up)"
    )
    header = f"{'variant':<13} {'trainable':>10} {'x LoRA':>7} {'step ms':>9} {'x LoRA':>7} "
    header += f"{'peak MiB':>9} {'x LoRA':>7}"
    print(header)
    for v in variants:
        r = results[v]
        print(
            f"{v:<13} {r['trainable']:>10,} {r['trainable'] / base['trainable']:>7.2f} "
            f"{r['step_ms']:>9.2f} "
            f"{r['step_ms'] / base['step_ms']:>7.2f} {r['peak_mib']:>9.1f} "
            f"{r['peak_mib'] / max(base['peak_mib'], 1e-9):>7.2f}"
        )
    if "mose_loop" in results and "mose_split" in results:
        ratio = results["mose_loop"]["step_ms"] / results["mose_split"]["step_ms"]
        print(f"per-expert loop / batched experts, whole train step: {ratio:.2f}")
    layer = time_layer_experts(args)
    results["layer_ms"] = layer
    print(
        f"one MoSE layer fwd+bwd ({args.hidden} -> {args.hidden}, rank {args.rank // args.experts}"
        f" x {args.experts} experts): batched {layer['batched']:.3f} ms, loop "
        f"{layer['loop']:.3f} ms, loop / batched {layer['loop'] / layer['batched']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
