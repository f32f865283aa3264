"""The real CLI on the tiny config: fit then test, checkpoint evaluation, composition, MLflow."""

from pathlib import Path

import mlflow
import pytest
import yaml

from src.cli import main
from tests.conftest import REPO, TINY_CONFIG
from tests.fault_injection import expect_user_error

SUBSET_METRICS = [
    "test/acc",
    "test/f1_weighted",
    "test/video_aligned/acc",
    "test/audio_aligned/acc",
    "test/consistent/acc",
    "test/modality_gap",
]


def runs(workdir: Path, experiment: str = "tests"):
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=[experiment], order_by=["start_time ASC"])


def test_fit_tests_the_best_checkpoint_and_logs_everything_to_mlflow(workdir, capsys):
    cli = main(["fit", "--config", str(TINY_CONFIG)])
    out = capsys.readouterr().out
    assert (
        "video_aligned" in out and "modality_gap" in out and "mlflow ui --backend-store-uri" in out
    )
    frame = runs(workdir)
    assert len(frame) == 1
    run = frame.iloc[0]
    for name in [
        *SUBSET_METRICS,
        "val/acc",
        "val/video_aligned/acc",
        "val/modality_gap",
        "val/excess_gap",
        "val/bayes/modality_gap",
        "test/bayes/video_aligned/acc",
        "test/bayes/modality_gap",
        "test/bayes_train_prior/modality_gap",
        "test/excess_gap",
        "test/acc_shortfall",
        "train/loss",
    ]:
        assert f"metrics.{name}" in frame.columns, name
        assert run[f"metrics.{name}"] == run[f"metrics.{name}"], f"{name} is NaN"
    gap = run["metrics.test/audio_aligned/acc"] - run["metrics.test/video_aligned/acc"]
    assert run["metrics.test/modality_gap"] == pytest.approx(gap, abs=1e-6)
    excess = run["metrics.test/modality_gap"] - run["metrics.test/bayes/modality_gap"]
    assert run["metrics.test/excess_gap"] == pytest.approx(excess, abs=1e-6)
    assert "excess_gap" in out and "Bayes %" in out
    # Flattened hyper-parameters and the resolved config as an artifact.
    assert run["params.model.init_args.lr"] == "0.005"
    client = mlflow.MlflowClient()
    config_text = Path(
        client.download_artifacts(run.run_id, "config.yaml", str(workdir))
    ).read_text()
    assert yaml.safe_load(config_text)["model"]["init_args"]["lr"] == 0.005
    confusion = [a.path for a in client.list_artifacts(run.run_id, "confusion")]
    assert "confusion/confusion_test_all.png" in confusion, confusion
    assert "metrics.test/video_aligned/acc_ci_low" in frame.columns
    # The best checkpoint evaluates to the same test metrics through the `test` command.
    best = cli.trainer.checkpoint_callback.best_model_path
    assert Path(best).is_file()
    main(["test", "--config", str(TINY_CONFIG), "--ckpt_path", best])
    again = runs(workdir).iloc[-1]
    for name in SUBSET_METRICS:
        assert again[f"metrics.{name}"] == pytest.approx(run[f"metrics.{name}"], abs=1e-6), name


def test_checkpoint_holds_only_trainable_weights(workdir):
    import torch

    cli = main(["fit", "--config", str(TINY_CONFIG), "--test_after_fit", "false"])
    ckpt = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
    trainable = {n for n, p in cli.model.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable
    assert not any("embed_tokens" in k for k in ckpt["state_dict"])


def test_overrides_and_print_config(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(TINY_CONFIG),
                "--trainer.max_epochs",
                "3",
                "--model.init_args.lr",
                "0.01",
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["max_epochs"] == 3
    assert config["model"]["init_args"]["lr"] == 0.01
    assert config["data"]["init_args"]["synthetic"]["n_train"] == 48


def test_experiment_config_composes_the_config_groups(workdir, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "conf/experiment/lora.yaml"), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "src.models.emotion_module.EmotionLLMModule"
    assert config["model"]["init_args"]["adapter"] is None  # conf/model/ holds the backbone only
    assert config["method"]["adapter"]["class_path"].endswith("LoRAAdapter")
    assert config["data"]["init_args"]["synthetic"]["seed"] == 0
    # conf/trainer/ holds hardware only; the logger comes with the tracking group.
    assert config["trainer"]["logger"] is None
    assert config["tracking"]["logger"]["class_path"].endswith("MoSEARMLFlowLogger")


def test_default_config_is_used_without_config(workdir, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    # The demo: MoSEAR on the token_imbalance world.
    assert config["data"]["init_args"]["root"] == "data/worlds/token_imbalance/seed_0"
    assert config["data"]["init_args"]["synthetic"]["world"] == "token_imbalance"
    assert config["method"]["adapter"]["class_path"].endswith("MoSEAdapter")


@pytest.mark.parametrize("data", ["camer_real", "mer2023", "dfew"])
def test_paper_setting_configs_compose(workdir, capsys, data):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--trainer",
                str(REPO / "conf/trainer/gpu.yaml"),
                "--model",
                str(REPO / "conf/model/llama2_7b.yaml"),
                "--method",
                str(REPO / "conf/method/mose.yaml"),
                "--method.adapter",
                str(REPO / "conf/adapter/mose_7b.yaml"),
                "--data",
                str(REPO / f"conf/data/{data}.yaml"),
                "--print_config",
            ]
        )
    config = yaml.safe_load(capsys.readouterr().out)
    backbone = config["model"]["init_args"]["backbone"]
    assert backbone["class_path"] == "src.models.backbones.projected_causal_lm.ProjectedCausalLM"
    assert backbone["init_args"]["config"] is None
    assert backbone["init_args"]["dtype"] == "bfloat16"
    assert config["method"]["adapter"]["init_args"]["rank"] == 64
    assert config["trainer"]["precision"] == "bf16-mixed"


def test_method_group_places_adapter_and_callbacks(workdir):
    """`method` (adapter + callbacks) ends up as model.init_args.adapter and in
    trainer.callbacks, and the config logged with the run is a plain one."""
    from src.callbacks.attention_reallocation import AttentionReallocation
    from src.models.adapters.mose_adapter import MoSEAdapter

    cli = main(
        [
            "fit",
            "--config",
            str(TINY_CONFIG),
            "--model.init_args.adapter",
            "null",
            "--method",
            str(REPO / "conf/method/mosear.yaml"),
            "--method.adapter.init_args.rank",
            "2",
            "--trainer.fast_dev_run",
            "true",
            "--test_after_fit",
            "false",
        ]
    )
    assert isinstance(cli.model.adapter, MoSEAdapter)
    assert cli.model.adapter.layer_kwargs["rank"] == 2
    assert sum(isinstance(c, AttentionReallocation) for c in cli.trainer.callbacks) == 1
    placed = cli.config["fit"]
    assert placed["method"]["adapter"] is None and not placed["method"]["callbacks"]
    assert placed["model"]["init_args"]["adapter"]["class_path"].endswith("MoSEAdapter")


def test_swapping_the_method_drops_its_callbacks(workdir, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--method", str(REPO / "conf/method/lora.yaml"), "--print_config"])
    method = yaml.safe_load(capsys.readouterr().out)["method"]
    assert method["adapter"]["class_path"].endswith("LoRAAdapter") and method["callbacks"] == []


def test_an_adapter_given_twice_is_a_one_line_error(workdir, capsys):
    argv = ["fit", "--config", str(TINY_CONFIG), "--method", str(REPO / "conf/method/mose.yaml")]
    assert "the adapter is given twice" in expect_user_error(capsys, argv)


def test_tracking_group_places_logger_and_callbacks(workdir):
    """`tracking` (logger + run-keeping callbacks) becomes trainer.logger and the first
    trainer.callbacks, so that a hardware preset (conf/trainer/) can be swapped alone."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from src.callbacks.results_table import ResultsTable
    from src.tracking.mlflow_logger import MoSEARMLFlowLogger

    cli = main(
        [
            "fit",
            "--config",
            str(TINY_CONFIG),
            "--trainer",
            str(REPO / "conf/trainer/cpu.yaml"),
            "--trainer.logger",
            "null",
            "--trainer.callbacks",
            "[]",
            "--trainer.fast_dev_run",
            "true",
            "--tracking",
            str(REPO / "conf/tracking/mlflow.yaml"),
            "--test_after_fit",
            "false",
        ]
    )
    assert isinstance(cli.config_init["fit"]["trainer"]["logger"], MoSEARMLFlowLogger)
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert kinds.count(ModelCheckpoint) == 2
    assert LearningRateMonitor in kinds and ResultsTable in kinds
    placed = cli.config["fit"]
    assert placed["tracking"]["logger"] is None and not placed["tracking"]["callbacks"]


def test_hardware_presets_hold_no_logger_or_callbacks():
    for preset in sorted((REPO / "conf/trainer").glob("*.yaml")):
        settings = yaml.safe_load(preset.read_text())
        assert "logger" not in settings and "callbacks" not in settings, preset.name


def test_a_logger_given_twice_is_a_one_line_error(workdir, capsys):
    tracking = str(REPO / "conf/tracking/mlflow.yaml")
    argv = ["fit", "--config", str(TINY_CONFIG), "--tracking", tracking]
    assert "the logger is given twice" in expect_user_error(capsys, argv)


def test_the_old_logger_override_names_the_tracking_group(workdir, capsys):
    argv = ["fit", "--trainer.logger.init_args.experiment_name", "x", "--print_config"]
    assert "--tracking.logger.init_args.<key>" in expect_user_error(capsys, argv)
