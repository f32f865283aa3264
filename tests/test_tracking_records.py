"""What the CLI records in MLflow: params, tags, run names, the logged model, URIs, exports."""

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from src.cli import main
from src.tracking.compare import one_per_model
from src.tracking.run_metadata import flatten_config, method_name, run_tags
from tests.conftest import REPO, TINY_CONFIG

MOSE_ADAPTER = (
    "--model.init_args.adapter={class_path: src.models.adapters.mose_adapter.MoSEAdapter, "
    "init_args: {rank: 4, n_audio_experts: 2, n_visual_experts: 3}}"
)


def store(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"


def all_runs(workdir: Path) -> pd.DataFrame:
    mlflow.set_tracking_uri(store(workdir))
    return mlflow.search_runs(experiment_names=["tests"], order_by=["start_time ASC"])


def test_flatten_config_keeps_the_experiment_and_drops_private_and_invocation_keys():
    config = {
        "config": ["a.yaml"],
        "ckpt_path": "x.ckpt",
        "seed_everything": 3,
        "model": {"init_args": {"lr": 0.1, "_instantiator": "x", "adapter": None}},
        "trainer": {
            "callbacks": [{"class_path": "a.B", "init_args": {"k": 1}}],
            "logger": {"init_args": {"tags": {"a": "b"}, "run_name": "n", "save_dir": "m"}},
            "devices": [0, 1],
        },
        "__path__": "p",
    }
    assert flatten_config(config) == {
        "seed_everything": "3",
        "model.init_args.lr": "0.1",
        "model.init_args.adapter": "None",
        "trainer.callbacks.0.class_path": "a.B",
        "trainer.callbacks.0.init_args.k": "1",
        "trainer.logger.init_args.save_dir": "m",
        "trainer.devices": "[0, 1]",
    }


@pytest.mark.parametrize(
    ("adapter", "ar", "method"),
    [
        ("src.models.adapters.lora.LoRAAdapter", False, "LoRA"),
        ("src.models.adapters.lora.LoRAAdapter", True, "LoRA+AR"),
        ("src.models.adapters.mose_adapter.MoSEAdapter", False, "MoSE"),
        ("src.models.adapters.mose_adapter.MoSEAdapter", True, "MoSEAR"),
        ("src.models.adapters.modality_dropout.ModalityDropoutLoRAAdapter", False, "LoRA+dropout"),
        ("src.models.adapters.ogm_ge.OGMGELoRAAdapter", False, "LoRA+OGM-GE"),
        ("src.models.adapters.ogm_ge.OGMGELoRAAdapter", True, "LoRA+OGM-GE+AR"),
        ("my.pkg.FancyAdapter", False, "Fancy"),
        ("src.models.adapters.base.NoAdapter", False, "projectors"),
        (None, False, "projectors"),
    ],
)
def test_method_follows_the_adapter_class_and_the_ar_callback(adapter, ar, method):
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}]
    if ar:
        callbacks.append(
            {"class_path": "src.callbacks.attention_reallocation.AttentionReallocation"}
        )
    config = {
        "model": {"init_args": {"adapter": {"class_path": adapter} if adapter else None}},
        "trainer": {"callbacks": callbacks},
        "data": {"init_args": {"root": "data/camer_x", "synthetic": {"world": "token_imbalance"}}},
        "seed_everything": 2,
    }
    assert method_name(config) == method
    tags = run_tags(config, "test", source_run="abc")
    assert tags["method"] == method and tags["command"] == "test" and tags["seed"] == "2"
    assert tags["dataset"] == "camer_x" and tags["world"] == "token_imbalance"
    assert tags["source_run"] == "abc"
    # A world's per-seed data folder is not the data set's name.
    config["data"]["init_args"]["root"] = "data/worlds/token_imbalance/seed_3"
    assert run_tags(config, "fit")["dataset"] == "token_imbalance"
    assert len(tags["git_commit"]) == 40 and tags["git_dirty"] in ("true", "false")


def test_tags_and_params_follow_the_method_group_as_placed(workdir):
    """`--method` puts its adapter and callbacks into model/trainer before the run is described:
    the tag names them, the params hold them there and no empty `method.*` keys."""
    main(
        [
            "validate",
            "--config",
            str(TINY_CONFIG),
            "--model.init_args.adapter",
            "null",
            "--method",
            str(REPO / "conf/method/lora_dropout.yaml"),
            "--method.adapter.init_args.r",
            "2",
            "--method.callbacks",
            f"[{REPO / 'conf/callbacks/attention_reallocation.yaml'}]",
        ]
    )
    run = MlflowClient(store(workdir)).get_run(all_runs(workdir).iloc[-1].run_id)
    assert run.data.tags["method"] == "LoRA+dropout+AR" and run.data.tags["command"] == "validate"
    params = run.data.params
    assert params["model.init_args.adapter.class_path"].endswith("ModalityDropoutLoRAAdapter")
    assert params["model.init_args.adapter.init_args.r"] == "2"
    assert any(v.endswith("AttentionReallocation") for v in params.values())
    assert not [k for k in params if k.startswith("method")]


def test_bad_checkpoint_uri_and_used_export_folder_are_one_line_errors(workdir, capsys):
    (workdir / "mlruns").mkdir()
    code = main(
        ["test", "--config", str(TINY_CONFIG), "--ckpt_path", "runs:/0123abcd/checkpoints/x.ckpt"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--ckpt_path runs:/0123abcd/checkpoints/x.ckpt: cannot download it" in err
    (workdir / "used").mkdir()
    (workdir / "used" / "mine.txt").write_text("keep me")
    code = main(
        ["export", "--config", str(TINY_CONFIG), "--ckpt_path", "x.ckpt", "--output", "used"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith("--output used: exists and is not an empty folder")
    assert (workdir / "used" / "mine.txt").read_text() == "keep me"


def test_one_sample_per_trained_model_in_each_group():
    frame = pd.DataFrame(
        {
            "run_id": ["fitA", "testA", "testA2", "predA", "fitB"],
            "start_time": pd.to_datetime([1, 2, 3, 4, 5], unit="s"),
            "tags.method": ["LoRA", "LoRA", "LoRA+AR", "LoRA", "LoRA"],
            "tags.source_run": [None, "fitA", "fitA", "fitA", None],
            "metrics.test/acc": [0.5, 0.5, 0.6, None, 0.7],
        }
    )
    kept = one_per_model(frame, ["test/acc"], "tags.method")
    # fitA and its re-test are one LoRA sample (newest kept), the AR test of it is its own
    # group, the predict run (no metric) is out, fitB is the second LoRA sample.
    assert sorted(kept["run_id"]) == ["fitB", "testA", "testA2"]


def test_fit_test_predict_and_export_record_everything(workdir, capsys):
    fit = main(
        [
            "fit",
            "--config",
            str(TINY_CONFIG),
            "--register_as",
            "tiny-lora",
            "--trainer.logger.init_args.log_system_metrics",
            "true",
            "--trainer.logger.init_args.system_metrics_interval",
            "0.2",
        ]
    )
    out = capsys.readouterr().out
    fit_run = all_runs(workdir).iloc[-1]
    client = MlflowClient(store(workdir))
    run_id = fit_run.run_id
    # Params: the resolved config, flattened, nothing private.
    params = client.get_run(run_id).data.params
    assert params["model.init_args.adapter.class_path"] == "src.models.adapters.lora.LoRAAdapter"
    assert params["model.init_args.adapter.init_args.r"] == "4"
    assert params["trainer.max_epochs"] == "1" and params["seed_everything"] == "0"
    assert params["data.init_args.synthetic.n_train"] == "48"
    assert not [k for k in params if "_instantiator" in k or k.startswith("_")]
    assert "lr" not in params  # the module's init args are in the config params already
    # Tags and a readable name.
    tags = client.get_run(run_id).data.tags
    assert tags["command"] == "fit" and tags["method"] == "LoRA" and tags["seed"] == "0"
    assert tags["dataset"] == "camer_tiny" and len(tags["git_commit"]) == 40
    assert fit_run["tags.mlflow.runName"].startswith("LoRA camer_tiny fit ")
    # The best checkpoint, its logged model and the registered version.
    best = Path(fit.trainer.checkpoint_callback.best_model_path)
    logged = [a.path for a in client.list_artifacts(run_id, "checkpoints")]
    assert logged == [f"checkpoints/{best.name}"]
    (output,) = client.get_run(run_id).outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.source_run_id == run_id and model.name == "model"
    version = client.get_model_version("tiny-lora", "1")
    assert version.run_id == run_id and version.source == model.artifact_location
    # System metrics were sampled.
    assert any(k.startswith("system/cpu_utilization") for k in client.get_run(run_id).data.metrics)
    # Console: the results table, then where the run is; no Lightning table or adverts.
    assert "Test metric" not in out and "Tip:" not in out and "GPU available" not in out
    tail = out[out.index("modality_gap") :]
    assert "MLflow run 'LoRA camer_tiny fit" in tail and "-m mlflow ui" in tail
    assert "models:/tiny-lora/1" in tail

    # `test` of the registered version: same weights, same metrics; names its fit run.
    main(["test", "--config", str(TINY_CONFIG), "--ckpt_path", "models:/tiny-lora/1"])
    test_run = all_runs(workdir).iloc[-1]
    assert test_run["tags.command"] == "test" and test_run["tags.source_run"] == run_id
    assert test_run["tags.source_checkpoint"] == "models:/tiny-lora/1"
    assert test_run["metrics.test/acc"] == pytest.approx(fit_run["metrics.test/acc"], abs=1e-6)
    assert test_run["tags.mlflow.runName"] != fit_run["tags.mlflow.runName"]
    assert (workdir / "outputs" / "mlflow_downloads" / "models" / "tiny-lora" / "1").is_dir()

    # `predict` of the run's checkpoint artifact: a new predictions CSV, its path printed.
    capsys.readouterr()
    uri = f"runs:/{run_id}/checkpoints/{best.name}"
    main(["predict", "--config", str(TINY_CONFIG), "--ckpt_path", uri])
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.startswith("predictions: "))
    predictions = pd.read_csv(line.removeprefix("predictions: "))
    assert len(predictions) == 36 and set(predictions["prediction"]) <= {
        "neutral", "angry", "happy", "sad", "worried", "surprise"
    }  # fmt: skip
    assert all_runs(workdir).iloc[-1]["tags.source_run"] == run_id

    # compare: the fit and the test of one model are one LoRA sample; predict is not counted.
    assert main(["compare", "--experiments", "[tests]", "--output", "cmp"]) == 0
    table = pd.read_csv(workdir / "cmp" / "comparison.csv")
    assert list(table["tags.method"]) == ["LoRA"] and list(table["n"]) == [1]

    # export: a peft adapter folder that PeftModel loads, with the trained LoRA weights.
    from peft import PeftModel

    assert main(["export", "--config", str(TINY_CONFIG), "--ckpt_path", str(best),
                 "--output", "export"]) == 0  # fmt: skip
    base = fit.model.model.language_model
    fresh = type(base)(base.config)
    peft_model = PeftModel.from_pretrained(fresh, str(workdir / "export"))
    trained = {k.replace(".default", ""): v for k, v in base.state_dict().items() if "lora_" in k}
    loaded = {
        k.removeprefix("base_model.model.").replace(".default", ""): v
        for k, v in peft_model.state_dict().items()
        if "lora_" in k
    }
    assert trained.keys() == loaded.keys() and trained
    for key, value in trained.items():
        assert torch.equal(value, loaded[key]), key
    manifest = json.loads((workdir / "export" / "export.json").read_text())
    assert "projectors.safetensors" in manifest["files"]


def test_mose_exports_its_safetensors_layout_and_plots_usage_around_uniform(workdir):
    from safetensors.torch import load_file

    from src.models.mose import mose_state_dict

    fit = main(["fit", "--config", str(TINY_CONFIG), MOSE_ADAPTER, "--test_after_fit", "false"])
    run = all_runs(workdir).iloc[-1]
    assert run["tags.method"] == "MoSE"
    best = fit.trainer.checkpoint_callback.best_model_path
    assert main(["export", "--config", str(TINY_CONFIG), MOSE_ADAPTER, "--ckpt_path", best,
                 "--output", "mose"]) == 0  # fmt: skip
    weights = load_file(str(workdir / "mose" / "mose_adapter.safetensors"))
    expected = mose_state_dict(fit.model.model.language_model)
    assert weights.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(weights[key], value), key
    settings = json.loads((workdir / "mose" / "mose_config.json").read_text())
    assert settings["format"] == "mosear-mose/1"
    assert settings["layer_kwargs"]["n_visual_experts"] == 3
    # The usage plot: a diverging scale centred on uniform use, the value in every cell.
    figure = fit.model.adapter.figures()["expert_usage.png"]
    axes = [ax for ax in figure.axes if ax.images]
    for ax in axes:
        n_experts = ax.images[0].get_array().shape[1]
        assert ax.images[0].norm.vcenter == pytest.approx(1 / n_experts)
        assert len(ax.texts) == ax.images[0].get_array().size
