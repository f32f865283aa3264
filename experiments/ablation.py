"""The ablation: every world x {LoRA, LoRA+AR, MoSE, MoSEAR, modality dropout, OGM-GE} x seeds.

Each (world, seed) trains LoRA, MoSE, LoRA with modality dropout and LoRA with OGM-GE
modulation (same rank r = 8, so MoSE has about 5x LoRA's trainable parameters;
same data, same frozen backbone) and tests the best checkpoint (by
validation); ``lora_ar`` and ``mosear`` are test-only runs of the LoRA and MoSE checkpoints with
AR calibrated on the validation split. Fits run in parallel subprocesses (``--jobs``), each with
``OMP_NUM_THREADS=1``; a finished run leaves ``result.json`` in its folder and is skipped on the
next call, so an interrupted ablation resumes. The first run of a world runs alone, so that the
world's synthetic data set is generated once. Every run is an MLflow run tagged ``world`` (by
this script) and, by the CLI itself, ``method`` (``LoRA``, ``LoRA+AR``, ``MoSE``, ``MoSEAR``,
``LoRA+dropout``, ``LoRA+OGM-GE``), ``seed`` and, for a test-only run, ``source_run``; the
script ends with mean ± std over seeds of per-subset accuracy, gap, excess gap and overall
accuracy (``ablation.md``, ``ablation.csv``, ``ablation.png``, also logged to MLflow as the run
``ablation-summary``) and a ``compare`` per world.

    python experiments/ablation.py                                  # every world, 3 seeds
    python experiments/ablation.py --worlds token_imbalance --seeds 0 --epochs 2 --jobs 2
    python experiments/ablation.py --summarise_only        # tables of what has finished so far

A world is a name under ``conf/data/worlds/`` (``null``, ``information``, ``token_imbalance``,
``prior``, ``optimisation``), ``synthetic`` (``conf/data/camer_synthetic.yaml``) or a path to a
data config.
"""

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORLDS = ("null", "information", "token_imbalance", "prior", "optimisation")
#: method -> (experiment config, the fit it tests or None for a fit, the ``method`` tag the CLI
#: derives from that config: src/tracking/run_metadata.py)
METHODS: dict[str, tuple[str, str | None, str]] = {
    "lora": ("conf/experiment/lora.yaml", None, "LoRA"),
    "lora_ar": ("conf/experiment/lora_ar.yaml", "lora", "LoRA+AR"),
    "mose": ("conf/experiment/mose.yaml", None, "MoSE"),
    "mosear": ("conf/experiment/mosear.yaml", "mose", "MoSEAR"),
    "dropout": ("conf/experiment/lora_dropout.yaml", None, "LoRA+dropout"),
    "ogm_ge": ("conf/experiment/lora_ogm_ge.yaml", None, "LoRA+OGM-GE"),
}
SUBSETS = ("video_aligned", "audio_aligned", "consistent")
#: Reported columns: metric key -> table heading.
COLUMNS = {
    **{f"test/{s}/acc": s for s in SUBSETS},
    "test/modality_gap": "gap",
    "test/excess_gap": "excess gap",
    "test/acc": "overall",
}


@dataclass
class Job:
    world: str
    method: str
    seed: int
    folder: Path
    depends: "Job | None" = None
    command: list[str] = field(default_factory=list)

    @property
    def tag(self) -> str:
        """The ``method`` tag the CLI puts on this job's MLflow run."""
        return METHODS[self.method][2]

    @property
    def key(self) -> str:
        return f"{self.world}/{self.method}/seed{self.seed}"

    @property
    def done(self) -> bool:
        return (self.folder / "result.json").is_file()


def world_tags(name: str, job_id: str | None = None) -> str:
    """The ``{world: <name>}`` tag mapping (plus the job's own id) as a CLI value: JSON (valid
    YAML), so that the ``null`` world stays the string ``"null"`` instead of YAML's None."""
    tags = {"world": name} if job_id is None else {"world": name, "ablation_job": job_id}
    return json.dumps(tags)


def job_id(folder: Path) -> str:
    """A run's own tag value: its output folder, hashed. World, method and seed do not name a
    run: two calls with different ``--override``s (or ``--output``s) into one experiment share
    them, and a run must read back its own metrics."""
    return hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]


def world_config(world: str) -> Path:
    """The data config of ``world`` (a name or a path), with a one-line error when missing."""
    if world == "synthetic":
        path = REPO / "conf/data/camer_synthetic.yaml"
    elif world.endswith((".yaml", ".yml")):
        path = Path(world).resolve()
    else:
        path = REPO / "conf/data/worlds" / f"{world}.yaml"
    if not path.is_file():
        raise SystemExit(f"ablation: world {world!r}: no data config at {path}")
    return path


def world_name(world: str) -> str:
    return Path(world).stem if world.endswith((".yaml", ".yml")) else world


def plan(args: argparse.Namespace) -> list[Job]:
    jobs: list[Job] = []
    fits: dict[tuple[str, str, int], Job] = {}
    order = sorted(args.methods, key=lambda m: METHODS[m][1] is not None)  # fits first
    for world in args.worlds:
        name = world_name(world)
        data = str(world_config(world))
        for seed in args.seeds:
            for method in order:
                config, fit_of, _ = METHODS[method]
                folder = Path(args.output).resolve() / "runs" / name / method / f"seed{seed}"
                job = Job(name, method, seed, folder)
                # `method` and `seed` are the CLI's own tags (derived from the config).
                tags = world_tags(name, job_id(folder))
                common = [
                    "--config", str(REPO / config), "--data", data,
                    "--seed_everything", str(seed),
                    "--trainer.max_epochs", str(args.epochs),
                    "--trainer.default_root_dir", str(folder),
                    "--tracking.logger.init_args.experiment_name", args.experiment,
                    "--tracking.logger.init_args.tags", tags,
                    "--trainer.enable_progress_bar", "false",
                    *args.override,
                ]  # fmt: skip
                if fit_of is None:
                    job.command = ["fit", *common]
                    fits[(name, method, seed)] = job
                else:
                    job.depends = fits.get((name, fit_of, seed))
                    if job.depends is None:
                        raise SystemExit(f"ablation: {method} needs {fit_of} in --methods")
                    job.command = ["test", *common]  # --ckpt_path added when the fit is done
                jobs.append(job)
    return jobs


def best_checkpoint(folder: Path) -> Path:
    found = sorted(folder.rglob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RuntimeError(f"no best-*.ckpt under {folder}")
    return found[-1]


def run_job(job: Job, env: dict[str, str], tracking_uri: str, experiment: str) -> float:
    """Run one fit or test in a subprocess; write its ``result.json``. Returns seconds."""
    start = time.perf_counter()
    job.folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "src.cli", *job.command]
    if job.depends is not None:
        command += ["--ckpt_path", str(best_checkpoint(job.depends.folder))]
    with open(job.folder / "log.txt", "w", encoding="utf-8") as log:
        code = subprocess.call(command, cwd=os.getcwd(), env=env, stdout=log, stderr=log)
    if code != 0:
        raise RuntimeError(f"{job.key} failed (exit {code}); see {job.folder / 'log.txt'}")
    metrics = run_metrics(tracking_uri, experiment, job)
    result = {"world": job.world, "method": job.tag, "seed": job.seed, "metrics": metrics}
    if job.depends is None:
        result["checkpoint"] = str(best_checkpoint(job.folder))
    tmp = job.folder / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(job.folder / "result.json")
    return time.perf_counter() - start


def run_metrics(tracking_uri: str, experiment: str, job: Job) -> dict[str, float]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise RuntimeError(f"{job.key}: no MLflow experiment {experiment!r}")
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=(
            f"tags.ablation_job = '{job_id(job.folder)}' and tags.method = '{job.tag}' "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise RuntimeError(f"{job.key}: no finished MLflow run tagged with it")
    return {k: float(v) for k, v in runs[0].data.metrics.items() if k.startswith("test/")}


def execute(jobs: list[Job], args: argparse.Namespace, tracking_uri: str) -> None:
    """Run the unfinished jobs, ``--jobs`` at a time, respecting dependencies and running the
    first job of each world alone (it generates the world's data set)."""
    from tqdm import tqdm

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    todo = [j for j in jobs if not j.done]
    skipped = len(jobs) - len(todo)
    print(f"ablation: {len(jobs)} runs, {skipped} already finished (skipped), {len(todo)} to run")
    ready_worlds = {j.world for j in jobs if j.done}
    running: dict[Future, Job] = {}
    failures: list[str] = []
    with (
        ThreadPoolExecutor(max_workers=args.jobs) as pool,
        tqdm(total=len(todo), desc="ablation runs", unit="run") as bar,
    ):
        while todo or running:
            busy_worlds = {j.world for j in running.values()}
            for job in list(todo):
                if len(running) >= args.jobs:
                    break
                if job.depends is not None and not job.depends.done:
                    if job.depends not in todo and job.depends not in running.values():
                        todo.remove(job)  # its fit failed
                        failures.append(f"{job.key}: skipped, {job.depends.key} failed")
                    continue
                if job.world not in ready_worlds and job.world in busy_worlds:
                    continue  # the world's first run generates its data; wait for it
                todo.remove(job)
                busy_worlds.add(job.world)
                future = pool.submit(run_job, job, env, tracking_uri, args.experiment)
                running[future] = job
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                try:
                    seconds = future.result()
                    ready_worlds.add(job.world)
                    bar.write(f"done {job.key} ({seconds:.0f} s)")
                except Exception as err:  # report and go on with the others
                    failures.append(str(err))
                    bar.write(f"FAILED {err}")
                bar.update(1)
    if failures:
        print("ablation: failed runs:\n  " + "\n  ".join(failures), file=sys.stderr)


def summarise(jobs: list[Job]) -> list[dict]:
    """Mean and sample std over seeds of every reported column, per (world, method)."""
    groups: dict[tuple[str, str], list[dict[str, float]]] = {}
    for job in jobs:
        if job.done:
            result = json.loads((job.folder / "result.json").read_text())
            groups.setdefault((job.world, job.tag), []).append(result["metrics"])
    rows = []
    for (world, method), runs in groups.items():
        row = {"world": world, "method": method, "n": len(runs)}
        for key in COLUMNS:
            values = [r[key] for r in runs if key in r]
            if not values:
                continue
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0
            row[key] = (100 * mean, 100 * math.sqrt(var))
        rows.append(row)
    return rows


def write_outputs(rows: list[dict], output: Path) -> list[Path]:
    import csv

    from matplotlib.figure import Figure

    output.mkdir(parents=True, exist_ok=True)
    lines = ["| world | method | n | " + " | ".join(COLUMNS.values()) + " |"]
    lines.append("|" + "---|" * (3 + len(COLUMNS)))
    for row in rows:
        cells = [f"{row[k][0]:.2f} ± {row[k][1]:.2f}" if k in row else "-" for k in COLUMNS]
        lines.append(
            f"| {row['world']} | {row['method']} | {row['n']} | " + " | ".join(cells) + " |"
        )
    (output / "ablation.md").write_text("\n".join(lines) + "\n")
    with open(output / "ablation.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["world", "method", "n", *[f"{k} {s}" for k in COLUMNS for s in ("mean", "std")]]
        )
        for row in rows:
            values = [v for k in COLUMNS for v in (row.get(k) or ("", ""))]
            writer.writerow([row["world"], row["method"], row["n"], *values])
    worlds = sorted({r["world"] for r in rows})
    fig = Figure(figsize=(4.5 * len(worlds) + 1, 4.0), layout="constrained")
    axes = fig.subplots(1, len(worlds), squeeze=False)[0]
    for ax, world in zip(axes, worlds, strict=True):
        mine = [r for r in rows if r["world"] == world]
        for offset, (key, color) in enumerate(
            (("test/modality_gap", "tab:red"), ("test/excess_gap", "tab:purple"))
        ):
            xs = [i + 0.4 * offset for i in range(len(mine))]
            ys = [r[key][0] if key in r else float("nan") for r in mine]
            err = [r[key][1] if key in r else 0.0 for r in mine]
            ax.bar(xs, ys, 0.4, yerr=err, color=color, label=COLUMNS[key], capsize=2)
        ax.set_xticks([i + 0.2 for i in range(len(mine))])
        ax.set_xticklabels([r["method"] for r in mine], rotation=30, ha="right")
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_title(f"world: {world}")
        ax.set_ylabel("points (mean ± std over seeds)")
        ax.legend(fontsize="small")
    fig.savefig(output / "ablation.png")
    return [output / "ablation.md", output / "ablation.csv", output / "ablation.png"]


def log_summary(files: list[Path], tracking_uri: str, experiment: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="ablation-summary", tags={"kind": "ablation-summary"}):
        for path in files:
            mlflow.log_artifact(str(path))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", nargs="+", default=list(WORLDS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (1 thread each)")
    parser.add_argument("--experiment", default="ablation")
    parser.add_argument("--output", default="outputs/ablation")
    parser.add_argument(
        "--summarise_only",
        action="store_true",
        help="run nothing: summarise the finished runs of the planned grid (the table's n column "
        "says how many seeds each row has)",
    )
    parser.add_argument(
        "--override",
        nargs=argparse.REMAINDER,
        default=[],
        help="extra CLI arguments for every run (last option: everything after it)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.epochs < 1:
        parser.error("--jobs and --epochs must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from src.tracking.mlflow_logger import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(None, "mlruns")
    jobs = plan(args)
    if args.summarise_only:
        missing = [j.key for j in jobs if not j.done]
        if missing:
            print(f"ablation: {len(missing)} runs not finished, left out: {', '.join(missing)}")
    else:
        execute(jobs, args, tracking_uri)
    rows = summarise(jobs)
    if not rows:
        print("ablation: no finished run to summarise", file=sys.stderr)
        return 1
    files = write_outputs(rows, Path(args.output))
    log_summary(files, tracking_uri, args.experiment)
    print((Path(args.output) / "ablation.md").read_text())
    from src.cli import main as cli

    for world in sorted({j.world for j in jobs}):
        cli(
            [
                "compare", "--tracking_uri", tracking_uri,
                "--experiments", f"[{args.experiment}]",
                "--tags", world_tags(world), "--group_by", "tags.method",
                "--output", str(Path(args.output) / "compare" / world),
            ]
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
