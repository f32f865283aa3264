"""Benchmark: closed-set label scoring, today's method vs one pass, against one prompt forward.

A Llama built from config (random init; default hidden 512, 4 layers, 8 heads, vocabulary 32000)
inside :class:`~src.models.multimodal_llm.MultimodalEmotionLLM`, batches of right-padded
Emotion-LLaMA-shaped prompts (BOS and a text prefix, 1 audio token, visual tokens, a text suffix;
rows 0..3 tokens shorter than the longest, as collated batches are) of ``P`` tokens, and ``L``
one-word labels (each answer: the word and EOS, 2 tokens). Per ``(L, P)`` it times, interleaved
in one process (median over repeats after warm-up):

- ``prompt``: one forward of the prompts alone (logits of the last row only): the physical limit
  of any scoring that reads every prompt;
- ``repeated``: the method before issue 18 (``score_labels_repeated``: each prompt repeated once
  per label, ``B x L`` rows);
- ``tree``: ``score_labels`` (each prompt once, all answers after it under a tree-shaped mask);
- ``kv``: the other one-prompt-pass design, measured for the choice: the prompts run once into
  a KV cache, the cache is expanded over the labels and the answers run as ``B x L`` short rows;
- ``generate``: greedy generation of 30 new tokens (``min_new_tokens`` = 30, so a random model's
  early EOS does not shorten it), the open-ended alternative to scoring.

Printed per row: ms of each, ``tree / prompt`` (goal <= 1.2 for L <= 13), ``kv / prompt``,
``repeated / tree`` (the speed-up), ``generate / tree`` (goal >= 5), and the largest score
difference of ``tree`` and ``kv`` against ``repeated`` (they must agree).

    python experiments/bench_scoring.py --threads 2                 # CPU, defaults
    python experiments/bench_scoring.py --device cuda --dtype bfloat16 --hidden 4096 \\
        --intermediate 11008 --heads 32 --kv-heads 32 --batch 8
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.core.modality import Modality  # noqa: E402
from src.core.streams import StreamSpec  # noqa: E402
from src.data.components.tokenizer import build_word_tokenizer  # noqa: E402
from src.models.backbones.projected_causal_lm import ProjectedCausalLM  # noqa: E402
from src.models.multimodal_llm import MultimodalEmotionLLM  # noqa: E402

#: 13 label words; L labels are the first L (6: MER2023's, 7: DFEW's size).
LABEL_WORDS = (
    "neutral angry happy sad worried surprise disgust fear contempt calm bored confused excited"
).split()
TEXT_WORDS = "the person in video says which emotion does show choose one of answer".split()
AUDIO_TOKENS = 1
TEXT_TOKENS = 43  # BOS + prefix + suffix, as the default prompt template


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1344)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--labels", default="6,7,13", help="label counts L")
    p.add_argument("--prompts", default="64,300,1024", help="prompt lengths P")
    p.add_argument("--gen-tokens", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, tokenizer: Any, n_labels: int, visual: int):
    config = dict(
        model_type="llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    backbone = ProjectedCausalLM(config=config, dtype=args.dtype, attn_implementation="sdpa")
    streams = [
        StreamSpec("audio", "audio", "audio", 16, AUDIO_TOKENS),
        StreamSpec("visual", "visual", "visual", 16, visual),
    ]
    llm = MultimodalEmotionLLM(backbone, tokenizer, streams, LABEL_WORDS[:n_labels])
    return llm.to(args.device).eval()


def build_batch(args: argparse.Namespace, prompt: int, visual: int) -> dict[str, Any]:
    """Right-padded prompts of ``prompt - row % 4`` tokens (row 0 is the longest)."""
    g = torch.Generator().manual_seed(0)
    text, audio, vis = int(Modality.TEXT), int(Modality.AUDIO), int(Modality.VISUAL)
    prefix = 8
    rows = args.batch
    modality = torch.full((rows, prompt), int(Modality.PAD))
    streams = torch.full((rows, prompt), -1)
    for row in range(rows):
        suffix = TEXT_TOKENS - prefix - (row % 4)
        layout = [text] * prefix + [audio] * AUDIO_TOKENS + [vis] * visual + [text] * suffix
        modality[row, : len(layout)] = torch.tensor(layout)
        streams[row, prefix : prefix + AUDIO_TOKENS] = 0
        streams[row, prefix + AUDIO_TOKENS : prefix + AUDIO_TOKENS + visual] = 1
    real = modality != int(Modality.PAD)
    input_ids = torch.randint(4, 4 + len(TEXT_WORDS), (rows, prompt), generator=g) * real
    features = {
        "audio": torch.randn(rows, 16, generator=g),
        "visual": torch.randn(rows, 16, generator=g),
    }
    batch = {
        "input_ids": input_ids,
        "attention_mask": real.long(),
        "modality_ids": modality,
        "stream_ids": streams,
        "features": features,
    }
    return {
        k: ({n: t.to(args.device) for n, t in v.items()} if k == "features" else v.to(args.device))
        for k, v in batch.items()
    }


def prompt_forward(llm: MultimodalEmotionLLM, batch: dict[str, Any]) -> torch.Tensor:
    """One forward of the prompts alone (the last row's logits): the physical limit."""
    return llm.run_backbone(
        batch["input_ids"],
        batch["attention_mask"],
        batch["modality_ids"],
        batch["stream_ids"],
        batch["features"],
        logits_to_keep=1,
        use_cache=False,
    ).logits


def kv_cache_run(llm: MultimodalEmotionLLM, batch: dict[str, Any]) -> torch.Tensor:
    """Both passes of the KV design (the prompt pass also gives the first-token logits)."""
    lengths = (batch["modality_ids"] != int(Modality.PAD)).sum(1)
    cache = DynamicCache()
    out = llm.run_backbone(
        batch["input_ids"],
        batch["attention_mask"],
        batch["modality_ids"],
        batch["stream_ids"],
        batch["features"],
        cache=cache,
        use_cache=True,
        logits_to_keep=(lengths - 1)[:, None],
    )
    first = torch.log_softmax(out.logits[:, 0].float(), dim=-1)
    return _kv_answers(llm, batch, cache, first)


def _kv_answers(
    llm: MultimodalEmotionLLM, batch: dict[str, Any], cache: DynamicCache, first: torch.Tensor
) -> torch.Tensor:
    rows, _ = batch["input_ids"].shape
    answers = llm.label_answer_ids
    n_labels, longest = len(answers), max(len(a) for a in answers)
    device = batch["input_ids"].device
    cache.batch_repeat_interleave(n_labels)
    lengths = (batch["modality_ids"] != int(Modality.PAD)).sum(1).repeat_interleave(n_labels)
    ids = torch.full((n_labels, longest), llm.tokenizer.pad_token_id, dtype=torch.long)
    on = torch.zeros(n_labels, longest, dtype=torch.long)
    for label, answer in enumerate(answers):
        ids[label, : len(answer)] = torch.tensor(answer)
        on[label, : len(answer)] = 1
    ids, on = ids.to(device).repeat(rows, 1), on.to(device).repeat(rows, 1)
    mask = torch.cat([batch["attention_mask"].repeat_interleave(n_labels, 0), on], dim=1)
    positions = lengths[:, None] + torch.arange(longest, device=device)[None]
    modality = torch.cat(
        [
            batch["modality_ids"].repeat_interleave(n_labels, 0),
            torch.where(on.bool(), int(Modality.TEXT), int(Modality.PAD)),
        ],
        dim=1,
    )
    with llm.modality_context.bind(modality):
        out = llm.language_model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=longest,
        )
    rest = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)  # predicts tokens 1..C-1
    head = first.repeat_interleave(n_labels, 0).gather(1, ids[:, :1]).squeeze(1)
    tail = (rest.gather(2, ids[:, 1:, None]).squeeze(2) * on[:, 1:]).sum(1)
    return (head + tail).view(rows, n_labels)


def methods(
    llm: MultimodalEmotionLLM, batch: dict[str, Any], gen_tokens: int
) -> dict[str, Callable[[], Any]]:
    """The timed calls, by name."""
    return {
        "prompt": lambda: prompt_forward(llm, batch),
        "repeated": lambda: llm.score_labels_repeated(batch),
        "tree": lambda: llm.score_labels(batch),
        "kv": lambda: kv_cache_run(llm, batch),
        "generate": lambda: llm.generate(batch, max_new_tokens=gen_tokens),
    }


def time_call(fn: Callable[[], Any], device: str, store: list[float]) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    store.append(1e3 * (time.perf_counter() - start))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    label_counts = [int(x) for x in args.labels.split(",")]
    prompts = [int(x) for x in args.prompts.split(",")]
    if max(label_counts) > len(LABEL_WORDS):
        raise SystemExit(f"at most {len(LABEL_WORDS)} labels")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_word_tokenizer(TEXT_WORDS + list(LABEL_WORDS), tmp)
    print(
        f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
        f"hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} "
        f"vocab={args.vocab} batch={args.batch} answers=2 tokens, generate {args.gen_tokens} "
        f"tokens; median of {args.repeats} after {args.warmup} warm-up"
    )
    header = (
        f"{'L':>3} {'P':>5} {'prompt':>9} {'repeated':>9} {'tree':>9} {'kv':>9} {'generate':>9}"
        f" {'tree/prm':>8} {'kv/prm':>7} {'rep/tree':>8} {'gen/tree':>8} {'max|diff|':>9}"
    )
    print(header + "\n" + "-" * len(header))
    results = []
    for prompt in prompts:
        visual = prompt - TEXT_TOKENS - AUDIO_TOKENS
        if visual < 1:
            raise SystemExit(f"prompt length {prompt} leaves no visual tokens")
        for n_labels in label_counts:
            llm = build_model(args, tokenizer, n_labels, visual)
            llm.language_model.generation_config.min_new_tokens = args.gen_tokens
            batch = build_batch(args, prompt, visual)
            fns = methods(llm, batch, args.gen_tokens)
            times: dict[str, list[float]] = {k: [] for k in fns}
            with torch.inference_mode():
                reference = llm.score_labels_repeated(batch)
                diff = max(
                    float((llm.score_labels(batch) - reference).abs().max()),
                    float((kv_cache_run(llm, batch) - reference).abs().max()),
                )
                for i in range(args.warmup + args.repeats):
                    order = list(fns)[i % len(fns) :] + list(fns)[: i % len(fns)]
                    for name in order:
                        store: list[float] = [] if i < args.warmup else times[name]
                        time_call(fns[name], args.device, store)
            ms = {k: statistics.median(v) for k, v in times.items()}
            row = {"labels": n_labels, "prompt": prompt, "ms": ms, "max_abs_diff": diff}
            row |= {
                "tree_over_prompt": ms["tree"] / ms["prompt"],
                "kv_over_prompt": ms["kv"] / ms["prompt"],
                "repeated_over_prompt": ms["repeated"] / ms["prompt"],
                "repeated_over_tree": ms["repeated"] / ms["tree"],
                "generate_over_tree": ms["generate"] / ms["tree"],
            }
            results.append(row)
            print(
                f"{n_labels:>3} {prompt:>5} {ms['prompt']:>9.1f} {ms['repeated']:>9.1f} "
                f"{ms['tree']:>9.1f} {ms['kv']:>9.1f} {ms['generate']:>9.1f} "
                f"{row['tree_over_prompt']:>8.2f} {row['kv_over_prompt']:>7.2f} "
                f"{row['repeated_over_tree']:>8.2f} {row['generate_over_tree']:>8.2f} "
                f"{diff:>9.1e}",
                flush=True,
            )
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": results})
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
