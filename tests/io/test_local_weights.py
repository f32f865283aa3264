"""Hub ids resolve from the local Hugging Face cache (offline); others fail naming `hf download`."""

import pytest

from src.cli import main
from src.core.errors import MissingInputError
from src.io.local_weights import resolve_local
from tests.conftest import TINY_CONFIG
from tests.families import save_family

REPO_ID = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """A fake HF_HOME whose hub cache holds REPO_ID in huggingface_hub's layout, offline."""
    home = tmp_path / "hf_home"
    repo = home / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    save_family("llama", repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_hub_id_resolves_to_the_cached_snapshot(hf_home):
    assert resolve_local(REPO_ID, "model.backbone.path") == (
        hf_home / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    )


def test_fit_from_a_hub_id_in_the_cache(hf_home, workdir):
    cli = main([
        # The short form of --model.init_args.backbone.init_args.path (jsonargparse's).
        "fit", "--config", str(TINY_CONFIG), "--model.backbone.path", REPO_ID,
        "--data.init_args.tokenizer", REPO_ID,
        "--trainer.fast_dev_run", "1",
    ])  # fmt: skip
    assert cli.trainer.state.finished
    assert str(hf_home) in cli.model.model.language_model.name_or_path


def test_hub_id_not_in_the_cache_is_one_line_naming_hf_download(hf_home, workdir, capsys):
    with pytest.raises(MissingInputError, match="hf download"):
        resolve_local("other-org/absent", "model.backbone.path")
    assert main([
        "fit", "--config", str(TINY_CONFIG),
        "--model.init_args.backbone.init_args.path", "other-org/absent",
    ]) == 2  # fmt: skip
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert "'other-org/absent'" in errors[0] and "`hf download" in errors[0]
    assert str(hf_home / "hub") in errors[0]  # where it looked
