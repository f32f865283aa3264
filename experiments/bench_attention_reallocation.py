"""Benchmark: inference time per batch, AR in each mode vs no AR (SDPA) vs eager PAI baseline.

A mid-size Llama built from config (random init; hidden 512, 4 layers, 8 heads), batches of
Emotion-LLaMA-shaped sequences: a text prefix, 1 audio token, 256 visual tokens and a text suffix
(about 300 tokens). Two workloads: ``score`` (one forward over the batch, as label scoring does)
and ``generate`` (prefill + greedy decoding with a KV cache). All variants run interleaved in
the same process, median over repeats after warm-up; ratios are against no-AR SDPA and against
the eager PAI-style baseline (``logit_scale``) of the same run.

    .venv/bin/python experiments/bench_attention_reallocation.py            # CPU, defaults
    .venv/bin/python experiments/bench_attention_reallocation.py --device cuda --dtype bfloat16
"""

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from src.core.modality import Modality
from src.models.attention import build_reallocator, reallocated
from src.models.modality_context import ModalityContext

#: name -> (attention implementation without AR, Reallocator settings or None)
VARIANTS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "sdpa (no AR)": ("sdpa", None),
    "eager (no AR)": ("eager", None),
    "reweight": ("sdpa", {"mode": "reweight", "multipliers": {"audio": 0.5, "visual": 2.0}}),
    "reweight+monitor": (
        "sdpa",
        {"mode": "reweight", "multipliers": {"audio": 0.5, "visual": 2.0}},
    ),
    "span_mass": ("sdpa", {"mode": "span_mass", "target": "proportional"}),
    "span_mass+monitor": ("sdpa", {"mode": "span_mass", "target": "proportional"}),
    "logit_scale (PAI, eager)": ("sdpa", {"mode": "logit_scale", "alpha": 0.5}),
}


def build_inputs(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    text, audio, visual = int(Modality.TEXT), int(Modality.AUDIO), int(Modality.VISUAL)
    layout = [text] * args.prefix + [audio] * args.audio + [visual] * args.visual
    layout += [text] * args.suffix
    ids = torch.tensor([layout] * args.batch)
    mask = torch.ones_like(ids)
    if args.padding:  # left padding of 0, 2, 4, ... tokens, as batched generation has
        for row in range(args.batch):
            pad = 2 * row
            ids[row] = torch.tensor([int(Modality.PAD)] * pad + layout[: len(layout) - pad])
            mask[row, :pad] = 0
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, args.vocab, ids.shape, generator=generator) * mask
    return {
        "input_ids": tokens.to(device),
        "attention_mask": mask.to(device),
        "modality_ids": ids.to(device),
    }


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prefix", type=int, default=8, help="text tokens before the media")
    parser.add_argument("--audio", type=int, default=1)
    parser.add_argument("--visual", type=int, default=256)
    parser.add_argument("--suffix", type=int, default=32, help="text tokens after the media")
    parser.add_argument("--padding", action="store_true", help="left-pad the batch rows")
    parser.add_argument("--query-rows", default="text", choices=["last", "text", "all"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--new-tokens", type=int, default=16, help="0 skips the generate workload")
    parser.add_argument("--gen-repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3 // 64 * 64),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    context = ModalityContext()
    batch = build_inputs(args, device)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def score() -> None:
        model(**inputs)

    def generate() -> None:
        model.generate(
            **inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
            do_sample=False,
        )  # fmt: skip

    workloads = {"score": (score, args.repeats)}
    if args.new_tokens:
        workloads["generate"] = (generate, args.gen_repeats)

    reallocators = {}
    for name, (_, settings) in VARIANTS.items():
        if settings is not None:
            monitor = name.endswith("+monitor")
            reallocator = build_reallocator(**settings, query_rows=args.query_rows, monitor=monitor)
            reallocators[name] = reallocator.bind(context, args.layers)

    def run_variant(name: str, fn: Callable[[], None]) -> float:
        implementation, settings = VARIANTS[name]
        model.set_attn_implementation(implementation)
        with torch.inference_mode(), context.bind(batch["modality_ids"]):
            if settings is None:
                return timed(fn, device)
            with reallocated(model, reallocators[name]):
                return timed(fn, device)

    results: dict[str, dict[str, Any]] = {}
    names = list(VARIANTS)
    for workload, (fn, repeats) in workloads.items():
        times: dict[str, list[float]] = {name: [] for name in names}
        for step in range(args.warmup + repeats):
            # Rotate the order each round so drift on a shared machine hits every variant alike.
            for name in names[step % len(names) :] + names[: step % len(names)]:
                seconds = run_variant(name, fn)
                if step >= args.warmup:
                    times[name].append(seconds)
        medians = {name: statistics.median(values) for name, values in times.items()}
        base, pai = medians["sdpa (no AR)"], medians["logit_scale (PAI, eager)"]
        results[workload] = {
            name: {
                "median_ms": 1000 * medians[name],
                "vs_sdpa": medians[name] / base,
                "vs_pai_eager": medians[name] / pai,
            }
            for name in names
        }

    shares = {name: r.monitor.summary() for name, r in reallocators.items() if r.monitor}
    report = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": args.dtype,
        "tokens_per_sample": int(batch["modality_ids"].shape[1]),
        "args": vars(args),
        "results": results,
        "monitored_shares": shares,
    }
    print(f"device={report['gpu'] or report['cpu']} threads={report['torch_threads']} "
          f"dtype={args.dtype} batch={args.batch} tokens={report['tokens_per_sample']} "
          f"query_rows={args.query_rows} padding={args.padding}")  # fmt: skip
    for workload, table in results.items():
        print(f"\n{workload}: median over {workloads[workload][1]} repeats")
        print(f"{'variant':<26}{'ms/batch':>10}{'vs SDPA':>10}{'vs PAI':>10}")
        for name, row in table.items():
            print(
                f"{name:<26}{row['median_ms']:>10.1f}{row['vs_sdpa']:>10.3f}"
                f"{row['vs_pai_eager']:>10.3f}"
            )
    for name, summary in shares.items():
        fmt = {k: {m: round(v, 4) for m, v in s.items()} for k, s in summary.items()}
        print(f"\n{name} shares: {fmt}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
