"""Generate every synthetic world (conf/data/worlds/) and print its Bayes bounds as a table.

    python experiments/world_bayes.py --seeds 0 1 2 [--out docs/worlds_bayes.md]

Each world is generated into its own config's root (``data/worlds/<world>/seed_<seed>``), so a
later training run on the same world and seed reuses the files. Numbers are accuracies in % on
the written test (and val) files: the Bayes-optimal classifier under the split's own subset mix
(``eval``) and under the training mix (``train prior``), plus each modality alone on the
consistent samples.
"""

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from src.core.streams import StreamSpec  # noqa: E402
from src.data.camer.synthetic import (  # noqa: E402
    BAYES_FILE,
    SyntheticCAMERConfig,
    ensure_synthetic_camer,
)

WORLDS = ("null", "information", "token_imbalance", "prior", "optimisation")


def world_settings(world: str, seed: int) -> tuple[Path, list[StreamSpec], SyntheticCAMERConfig]:
    config = yaml.safe_load((ROOT / "conf/data/worlds" / f"{world}.yaml").read_text())["init_args"]
    synthetic = SyntheticCAMERConfig(**{**config["synthetic"], "seed": seed})
    root = ROOT / config["root"].replace("${.synthetic.seed}", str(seed))
    return root, [StreamSpec(**s) for s in config["streams"]], synthetic


def row(world: str, seed: int, bounds: dict, split: str) -> str:
    entry = bounds["splits"][split]
    e, t, u = entry["eval_prior"], entry["train_prior"], entry["unimodal"]
    info = bounds["likelihood"]
    cells = [
        world,
        str(seed),
        split,
        *(f"{100 * e[k]:.1f}" for k in ("video_aligned/acc", "audio_aligned/acc")),
        f"{100 * e['consistent/acc']:.1f}",
        f"{100 * e['acc']:.1f}",
        f"{100 * e['modality_gap']:.1f}",
        f"{100 * t['modality_gap']:.1f}",
        f"{100 * u['audio']:.1f} / {100 * u['visual']:.1f}",
        f"{info['audio']['information']:.3f} / {info['visual']['information']:.3f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--worlds", nargs="+", default=list(WORLDS))
    parser.add_argument("--splits", nargs="+", default=["test"])
    args = parser.parse_args()
    header = (
        "| world | seed | split | video_aligned | audio_aligned | consistent | overall | gap | "
        "gap (train prior) | unimodal audio / visual | information audio / visual |"
    )
    lines = [header, "|" + "---|" * 11]
    for world in args.worlds:
        for seed in args.seeds:
            root, streams, synthetic = world_settings(world, seed)
            ensure_synthetic_camer(root, streams, synthetic)
            bounds = json.loads((root / BAYES_FILE).read_text())
            for split in args.splits:
                lines.append(row(world, seed, bounds, split))
                print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
