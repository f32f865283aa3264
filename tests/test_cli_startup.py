"""Commands that do not train start without importing the libraries they do not use.

Each command runs in a fresh interpreter (this test process has imported everything already)
and reports which heavy libraries ended up in ``sys.modules``.
"""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

HEAVY = ("lightning", "peft", "transformers", "torch", "torchmetrics", "mlflow", "pandas")

PROBE = """
import json, sys
from src.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "loaded": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def loaded_by(*argv: str) -> tuple[int, list[str], str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report["code"], report["loaded"], proc.stdout


@pytest.mark.parametrize(
    ("argv", "allowed"),
    [
        (["--help"], ()),
        (["build-camer", "--help"], ()),
        # compare reads runs with MLflow and score counts with torchmetrics (which imports
        # transformers itself), but only once their options are parsed: their help needs neither.
        (["compare", "--help"], ()),
        (["score", "--help"], ()),
    ],
)
def test_commands_that_do_not_train_skip_heavy_imports(argv, allowed):
    code, loaded, out = loaded_by(*argv)
    assert code in (0, None)
    assert "usage" in out.lower()
    assert set(loaded) <= set(allowed), f"{argv} imported {sorted(set(loaded) - set(allowed))}"
    if argv == ["--help"]:
        for command in ("fit", "validate", "test", "predict", "score", "compare", "build-camer"):
            assert f"  {command} " in out


def test_no_command_prints_the_help_and_fails():
    proc = subprocess.run(
        [sys.executable, "-m", "src.cli"], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 2
    assert "fit" in proc.stderr and "build-camer" in proc.stderr


def test_score_loads_torchmetrics_only_when_it_scores(tmp_path):
    """The lazy imports still score: a closed-set file gives its accuracy."""
    predictions = tmp_path / "predictions.csv"
    predictions.write_text("name,label,prediction\na,happy,happy\nb,sad,happy\n")
    code, loaded, out = loaded_by(
        "score", "--predictions", str(predictions), "--labels", "happy,sad", "--bootstrap", "0"
    )
    assert code == 0
    assert "torchmetrics" in loaded
    assert "test/acc" in out and "0.5000" in out
