"""Shared fixtures: the tiny CLI config, a clean working folder per test, the real-data folder."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "tests" / "conf" / "tiny.yaml"
REALDATA_ENV = "MOSEAR_REALDATA"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a fresh folder: relative data/, mlruns/ and outputs/ paths land in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def realdata() -> Path:
    """``$MOSEAR_REALDATA`` (../shared/realdata): skip when unset, fail when set but missing."""
    value = os.environ.get(REALDATA_ENV)
    if not value:
        pytest.skip(f"{REALDATA_ENV} is not set (CI sets it to ../shared/realdata)")
    root = Path(value)
    expected = ["mer2023-mini/label.csv", "emer/gt-eng.csv", "dfew/DFEW_set_1_test.txt"]
    missing = [p for p in expected if not (root / p).is_file()]
    if missing:
        pytest.fail(f"{REALDATA_ENV}={root} is set but lacks {missing}")
    return root
