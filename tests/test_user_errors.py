"""Bad input ends every command with one line on stderr naming the file or option and the field,
and exit status 2; untrained models are not evaluated as if they were trained."""

import csv
import sys

import mlflow
import pytest
import torch

from src.cli import main
from src.core.errors import condense_argument_error
from src.data.formats.rows import FormatError, iter_csv_rows
from tests.conftest import REPO
from tests.fault_injection import SMALL, expect_user_error, tiny_config

# ------------------------------------------------------------------ one line, exit status 2


def test_a_mistyped_option_is_an_error_not_an_abbreviation(workdir, capsys):
    config = str(tiny_config(workdir))
    line = expect_user_error(capsys, ["fit", "--config", config, "--trainer.max_epoch", "3"])
    assert "unrecognized arguments: --trainer.max_epoch 3" in line
    line = expect_user_error(capsys, ["compare", "--experiment", "[x]"])
    assert "--experiment" in line
    assert not (workdir / "data").exists()  # stopped before anything was built


def test_a_union_dump_is_condensed_to_the_key_and_the_cause(workdir, capsys):
    config = str(tiny_config(workdir))
    line = expect_user_error(capsys, ["fit", "--config", config, "--model.init_args.lr", "abc"])
    assert line.endswith("option model.lr: Expected a <class 'float'>. Got value: abc")
    line = expect_user_error(
        capsys, ["fit", "--config", config, "--model.init_args.backbone.init_args.config", "5"]
    )
    assert "option model.backbone.config: Expected a <class 'dict'>" in line
    assert "Subtypes" not in line and len(line) < 200
    # The reduction itself, on a message of the shape jsonargparse writes.
    dump = (
        'Parser key "data":\n  Does not validate against any of the Union subtypes\n'
        "  Subtypes: [A, <class 'NoneType'>]\n  Errors:\n"
        "    - Problem with given class_path 'm.D':\n"
        "        Parser key \"batch_size\":\n          Expected a <class 'int'>. Got value: x\n"
        "    - Expected a <class 'NoneType'>\n  Given value type: <class 'NestedArg'>\n"
    )
    assert condense_argument_error(dump) == (
        "option data.batch_size: Expected a <class 'int'>. Got value: x"
    )


def test_missing_folders_and_hub_ids_name_the_option(workdir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(workdir / "empty_hf_cache"))
    config = str(tiny_config(workdir, data={"synthetic": SMALL}))
    hub = ["--model.init_args.backbone.init_args.path", "meta-llama/Llama-2-7b-hf"]
    line = expect_user_error(capsys, ["fit", "--config", config, *hub])
    assert "model.backbone.path 'meta-llama/Llama-2-7b-hf' is neither a local directory" in line
    assert "`hf download" in line and "huggingface-cli" not in line
    (workdir / "data" / "camer_tiny" / "tokenizer" / "tokenizer.json").unlink()
    (workdir / "data" / "camer_tiny" / "tokenizer" / "tokenizer_config.json").unlink()
    line = expect_user_error(capsys, ["fit", "--config", config])
    assert "data.tokenizer_path" in line and "camer_tiny/tokenizer" in line


def test_compare_and_score_bad_input(workdir, capsys):
    line = expect_user_error(capsys, ["compare", "--experiments", "[nowhere]"])
    assert "--experiments: no MLflow experiment named ['nowhere']" in line
    predictions = workdir / "predictions.csv"
    predictions.write_text("name,label,prediction\na,happy,happy\nb,sad,happy\n")
    (workdir / "out").mkdir()
    capsys.readouterr()
    assert main(["score", "--predictions", str(predictions), "--output", "out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "score: error: --output out is a directory; give the JSON file to write"


def test_a_csv_field_over_the_field_size_limit_names_file_and_line(workdir, capsys):
    path = workdir / "manifest.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "split"])
        writer.writerow(["a", "train"])
        writer.writerow(["b", "x" * (csv.field_size_limit() + 10)])
    with pytest.raises(FormatError) as info:
        list(iter_csv_rows(path, ["name", "split"]))
    assert (info.value.file, info.value.field, info.value.line) == (str(path), "<row>", 3)
    assert "field larger than field limit" in str(info.value)
    # Through a command: the one line names the file and the line.
    capsys.readouterr()
    assert main(["score", "--predictions", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"{path}, line 3: field '<row>'" in err[-1]


# --------------------------------------------------------------------------------- untrained


def test_test_or_predict_without_a_checkpoint_is_refused(workdir, capsys):
    config = str(tiny_config(workdir))
    for command in ("test", "predict"):
        line = expect_user_error(capsys, [command, "--config", config])
        assert f"{command}: refusing to evaluate an untrained model" in line
        assert "no --ckpt_path was given" in line and "--allow_untrained true" in line
    assert not (workdir / "data").exists()  # refused before data and model were built
    zero = workdir / "zero.ckpt"
    torch.save({"state_dict": {}, "global_step": 0, "epoch": 0}, zero)
    line = expect_user_error(capsys, ["test", "--config", config, "--ckpt_path", str(zero)])
    assert f"--ckpt_path {zero} holds 0 training steps" in line


def test_fit_of_zero_epochs_is_not_tested_and_an_allowed_untrained_run_is_tagged(workdir, capsys):
    config = str(tiny_config(workdir, data={"synthetic": SMALL}))
    line = expect_user_error(capsys, ["fit", "--config", config, "--trainer.max_epochs", "0"])
    assert "refusing to evaluate an untrained model (the fit trained 0 steps" in line
    cli = main(["test", "--config", config, "--allow_untrained", "true"])
    client = mlflow.MlflowClient(cli.trainer.logger.tracking_uri)
    run = client.get_run(cli.trainer.logger.run_id)
    assert run.data.tags["mosear.untrained"] == "true" and "test/acc" in run.data.metrics


def test_the_cli_module_exits_with_the_status(workdir):
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "src.cli", "test", "--config", str(tiny_config(workdir))],
        cwd=workdir,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("python -m src.cli: error: test:")
    assert "Traceback" not in result.stderr
