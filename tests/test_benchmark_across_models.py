"""One benchmark command across models: ``python -m src.cli test`` gives the same CA-MER table
for a trained ProjectedCausalLM checkpoint, a converted Emotion-LLaMA checkpoint and a
Qwen2.5-Omni thinker on the same data, logged to one MLflow experiment, and ``compare`` lists
the three side by side.

The three read one synthetic CA-MER (one manifest, labels and subtitles): it is written once with
every model's feature streams, and each model reads its own layout of it (pooled projector
features, Emotion-LLaMA's five streams, the thinker's processor features) through the plain
CA-MER data module. The tiny models are the ones of their own tests."""

from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from src.cli import main
from src.core.records import SUBSETS
from src.core.streams import StreamSpec
from src.data.camer.synthetic import SyntheticCAMERConfig, generate_synthetic_camer
from tests.conftest import REPO, TINY_CONFIG
from tests.families import save_family
from tests.models import test_emotion_llama as emotion_llama
from tests.models import test_qwen_omni as qwen_omni

EXPERIMENT = "benchmark"
AR_FILE = REPO / "conf" / "callbacks" / "attention_reallocation.yaml"
AR_LAYER = {"method": {"callbacks": [str(AR_FILE)]}}  # the same fixed AR for every model
#: The CA-MER table every run logs: per-subset accuracy with its bootstrap interval, the
#: modality gap with its interval, and (AR on) the attention shares before and after AR.
TABLE = {
    "test/acc",
    *(f"test/{s}/acc{ci}" for s in SUBSETS for ci in ("", "_ci_low", "_ci_high")),
    *(f"test/modality_gap{ci}" for ci in ("", "_ci_low", "_ci_high")),
    *(f"test/attn_share{when}/{m}" for when in ("", "_before") for m in ("audio", "visual")),
}
BACKBONES = {
    "ProjectedCausalLM": "src.models.backbones.projected_causal_lm.ProjectedCausalLM",
    "EmotionLLaMA": "src.models.backbones.emotion_llama.EmotionLLaMA",
    "QwenOmniThinker": "src.models.backbones.qwen_omni.QwenOmniThinker",
}

# Each model's streams over the one data set (their own tests' sizes).
PROJECTED = [
    {"name": "face", "feature_dir": "pcl_face", "modality": "visual", "dim": 16, "tokens": 4},
    {"name": "video", "feature_dir": "pcl_video", "modality": "visual", "dim": 16, "tokens": 4},
    {"name": "audio", "feature_dir": "pcl_audio", "modality": "audio", "dim": 16, "tokens": 1},
]
EMOTION_LLAMA = [
    {"name": "image", "feature_dir": "eva_clip_g_patches", "modality": "visual",
     "dim": 4 * emotion_llama.EVA, "tokens": emotion_llama.PATCHES // 4, "sequence": True},
    *({"name": n, "feature_dir": d, "modality": m, "dim": emotion_llama.FEAT}
      for n, d, m in [("face", "mae_340_UTT", "visual"), ("video", "maeV_399_UTT", "visual"),
                      ("audio", "HL-UTT", "audio")]),
    {"name": "cls", "feature_dir": "eva_clip_g_cls", "modality": "visual",
     "dim": emotion_llama.EVA},
]  # fmt: skip


def write_data(root: Path) -> None:
    """One synthetic CA-MER holding every model's feature folders (each stream named by its
    folder, so the union has unique names); half the training samples are conflicts."""
    union = [StreamSpec(**{**s, "name": s["feature_dir"]})
             for s in (*PROJECTED, *EMOTION_LLAMA, *qwen_omni.STREAMS)]  # fmt: skip
    config = SyntheticCAMERConfig(seed=0, n_train=24, n_val=12, n_test=18, train_conflict_ratio=0.5)
    generate_synthetic_camer(root, union, config)


def camer(root: Path, **init_args) -> dict:
    """The plain CA-MER data module (no generator settings) on ``root``."""
    return {
        "class_path": "src.data.camer.datamodule.CAMERDataModule",
        "init_args": {"root": str(root), "label_space": "mer2023", **init_args},
    }


def dump(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def logged(run_id: str) -> set[str]:
    return set(mlflow.MlflowClient().get_run(run_id).data.metrics)


@pytest.mark.slow
def test_one_test_command_gives_the_same_camer_table_for_three_models(workdir, capsys):
    root = workdir / "camer"
    write_data(root)
    ar = dump(workdir / "ar.yaml", AR_LAYER)
    logger = ["--trainer.logger.init_args.experiment_name", EXPERIMENT]
    tested = {}

    # (1) Our own model: trained projectors + LoRA over a tiny LLaMA, then tested.
    projected = yaml.safe_load(TINY_CONFIG.read_text())
    projected["data"] = camer(root, streams=PROJECTED, batch_size=16)
    projected = dump(workdir / "projected.yaml", projected)
    fit = main(["fit", "--config", projected, *logger, "--trainer.limit_train_batches", "2",
                "--test_after_fit", "false"])  # fmt: skip
    best = fit.trainer.checkpoint_callback.best_model_path
    tested["ProjectedCausalLM"] = main(
        ["test", "--config", projected, "--config", ar, *logger, "--ckpt_path", best]
    )

    # (2) Emotion-LLaMA: a tiny checkpoint in the released layout, converted, as released.
    lm_dir = save_family("llama", workdir / "llama2")
    state = emotion_llama.released_state(lm_dir)
    torch.save({"model": state}, workdir / "emotion_llama.pth")
    data = dump(workdir / "camer_data.yaml", camer(root, batch_size=8, eval_batch_size=16))
    argv = emotion_llama.convert(lm_dir, workdir / "emotion_llama.pth", workdir / "converted")
    assert main([*argv[: argv.index("--data") + 1], data, *argv[argv.index("--data") + 2 :]]) == 0
    converted = workdir / "converted"
    tested["EmotionLLaMA"] = main([
        "test", "--config", str(converted / "test_ar_fixed.yaml"),
        "--tracking.logger.init_args.experiment_name", EXPERIMENT,
        "--ckpt_path", str(converted / "emotion_llama.ckpt"),
    ])  # fmt: skip

    # (3) Qwen2.5-Omni's thinker, zero-shot (its LoRA freshly initialised: the model as is).
    omni_dir = qwen_omni.write_omni_dir(workdir / "omni")
    omni = yaml.safe_load(Path(qwen_omni.config_file(workdir, omni_dir)).read_text())
    init = {k: v for k, v in omni["data"]["init_args"].items() if k not in ("root", "synthetic")}
    omni["data"] = camer(root, **init)  # its streams, prompts and placeholder tokens
    omni = dump(workdir / "omni.yaml", omni)
    tested["QwenOmniThinker"] = main(
        ["test", "--config", omni, "--config", ar, *logger, "--allow_untrained", "true"]
    )

    # The same data split for all three: names, labels and subsets.
    splits = {
        model: [(r.name, r.label, r.subset) for r in cli.datamodule.datasets["test"].records]
        for model, cli in tested.items()
    }
    first = splits["ProjectedCausalLM"]
    assert len(first) == 18 and {s for _, _, s in first} == set(SUBSETS)
    assert all(split == first for split in splits.values())

    # The same CA-MER table in each run of the one experiment.
    runs = {model: cli.trainer.logger.run_id for model, cli in tested.items()}
    uri = tested["ProjectedCausalLM"].trainer.logger.tracking_uri
    mlflow.set_tracking_uri(uri)
    for model, run_id in runs.items():
        run = mlflow.MlflowClient().get_run(run_id)
        assert mlflow.MlflowClient().get_experiment(run.info.experiment_id).name == EXPERIMENT
        assert run.data.params["model.init_args.backbone.class_path"] == BACKBONES[model]
        assert TABLE <= logged(run_id), (model, TABLE - logged(run_id))
    tables = {model: {k for k in logged(r) if k in TABLE} for model, r in runs.items()}
    assert all(keys == TABLE for keys in tables.values())

    # `compare` over the experiment: the three test runs side by side, one row per backbone.
    capsys.readouterr()
    metrics = ["test/video_aligned/acc", "test/audio_aligned/acc", "test/consistent/acc",
               "test/modality_gap", "test/attn_share/audio"]  # fmt: skip
    by = "params.model.init_args.backbone.class_path"
    assert main(["compare", "--tracking_uri", uri, "--experiments", f"[{EXPERIMENT}]",
                 "--tags", "{command: test}", "--group_by", by,
                 "--metrics", f"[{','.join(metrics)}]", "--output", "cmp"]) == 0  # fmt: skip
    table = (workdir / "cmp" / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if any(c in line for c in BACKBONES.values())]
    assert len(rows) == 3 and all(any(c in row for row in rows) for c in BACKBONES.values())
    assert "3 run(s)" in capsys.readouterr().out
