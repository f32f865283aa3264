"""experiments/ablation.py on one tiny world, one seed, one epoch: every method runs (fits in
parallel subprocesses, +AR variants test-only on the fit's checkpoint), the summary and the
compare outputs exist, and a second call skips every finished run."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

METHODS = ["lora", "lora_ar", "mose", "mosear", "dropout", "ogm_ge"]
#: The `method` tag the CLI derives from each method's config (what the tables group by).
TAGS = ["LoRA", "LoRA+AR", "MoSE", "MoSEAR", "LoRA+dropout", "LoRA+OGM-GE"]


def ablation(workdir, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, str(REPO / "experiments/ablation.py"),
        "--worlds", str(REPO / "tests/conf/world_tiny.yaml"), "--seeds", "0", "--epochs", "1",
        "--jobs", "2", "--output", "abl", "--experiment", "abl", *extra,
    ]  # fmt: skip
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_ablation_runs_every_method_and_resumes(workdir):
    first = ablation(workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "6 runs, 0 already finished (skipped), 6 to run" in first.stdout
    runs = workdir / "abl" / "runs" / "world_tiny"
    results = {m: json.loads((runs / m / "seed0" / "result.json").read_text()) for m in METHODS}
    for method, result in results.items():
        assert {"test/acc", "test/modality_gap"} <= set(result["metrics"]), method
    # The +AR variants are test-only runs of the fit's checkpoint, with calibrated AR whose
    # choice sits beside that checkpoint.
    for ar, fit in (("lora_ar", "lora"), ("mosear", "mose")):
        assert not list((runs / ar).rglob("*.ckpt"))
        ckpt = results[fit]["checkpoint"]
        assert list((runs / fit).rglob("*.ar-*.json")), f"no calibration record beside {ckpt}"
        assert "AR: " in (runs / ar / "seed0" / "log.txt").read_text()
        assert "test/attn_share/audio" in results[ar]["metrics"]
    for method, tag in zip(METHODS, TAGS, strict=True):
        assert results[method]["method"] == tag
    table = (workdir / "abl" / "ablation.md").read_text()
    for tag in TAGS:
        assert f"| world_tiny | {tag} | 1 |" in table
    assert (workdir / "abl" / "ablation.png").stat().st_size > 0
    assert (workdir / "abl" / "compare" / "world_tiny" / "comparison.md").is_file()
    # Resumable: nothing is run again.
    second = ablation(workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "6 runs, 6 already finished (skipped), 0 to run" in second.stdout
    # --summarise_only runs nothing and names what is missing from the planned grid.
    partial = ablation(workdir, "--seeds", "0", "1", "--summarise_only")
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert "6 runs not finished, left out: world_tiny/lora/seed1" in partial.stdout
    assert not (runs / "lora" / "seed1").exists()
    assert "| world_tiny | LoRA | 1 |" in (workdir / "abl" / "ablation.md").read_text()


def test_the_null_world_is_tagged_as_a_string():
    """YAML reads a bare `null` as None: the world tag must stay the world's name."""
    import yaml

    sys.path.insert(0, str(REPO / "experiments"))
    from ablation import world_tags

    assert yaml.safe_load(world_tags("null")) == {"world": "null"}


def test_each_run_reads_back_its_own_metrics(tmp_path):
    """Two calls into one experiment with the same world, method and seed (another
    ``--override`` or ``--output``) tag their runs apart, and each run's metrics are looked up
    by its own tag, not by the latest run with its world, method and seed."""
    import yaml

    sys.path.insert(0, str(REPO / "experiments"))
    import ablation as script

    def tags_of(output: str) -> dict:
        args = script.parse(["--worlds", "null", "--seeds", "0", "--methods", "lora",
                                  "--output", str(tmp_path / output)])  # fmt: skip
        (job,) = script.plan(args)
        command = job.command
        return yaml.safe_load(command[command.index("--tracking.logger.init_args.tags") + 1])

    first, second = tags_of("a"), tags_of("b")
    assert first["world"] == second["world"] == "null"
    assert first["ablation_job"] != second["ablation_job"]
    assert first == tags_of("a")  # stable: a resumed call finds its runs
