"""Synthetic worlds: Bayes bounds against a Monte-Carlo estimate, determinism of every world's
generator, validation that mirrors the test's subset mix, the world configs' promises."""

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from scipy.special import logsumexp

from src.cli import main
from src.core.label_space import get_label_space
from src.core.streams import StreamSpec
from src.data.camer.manifest import read_manifest
from src.data.camer.synthetic import (
    BAYES_FILE,
    SyntheticCAMERConfig,
    build_world,
    generate_synthetic_camer,
)
from tests.conftest import REPO, TINY_CONFIG

WORLDS = ("null", "information", "token_imbalance", "prior", "optimisation")
LABELS = ["neutral", "angry", "happy"]

# A small world with every mechanism on: a sequence stream whose evidence is 2 of 4 rows with
# distractors and scene content, a pooled visual stream whose evidence carries a random sign
# (stored along its own direction: a non-linear read-out), a scaled pooled audio stream.
SMALL_STREAMS = [
    StreamSpec("face", "mae_340_UTT", "visual", 8, 4, sequence=True),
    StreamSpec("video", "maeV_399_UTT", "visual", 6, 2),
    StreamSpec("audio", "HL-UTT", "audio", 6, 1),
]
SMALL_WORLD = SyntheticCAMERConfig(
    n_train=60,
    n_val=30,
    n_test=900,
    labels=LABELS,
    audio_noise=0.7,
    visual_noise=1.1,
    conflict_strength=0.6,
    evidence_tokens={"face": 2},
    distractor_strength=0.5,
    scene_strength=1.0,
    audio_scale=3.0,
    train_conflict_ratio=0.2,
    train_audio_share=0.8,
    sign_streams=["video"],
    sign_strength=0.3,
)


def world_config(name: str) -> tuple[dict, list[StreamSpec], SyntheticCAMERConfig]:
    init = yaml.safe_load((REPO / "conf/data/worlds" / f"{name}.yaml").read_text())["init_args"]
    return (
        init,
        [StreamSpec(**s) for s in init["streams"]],
        SyntheticCAMERConfig(**init["synthetic"]),
    )


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


_DENSITY: dict = {}


def _density(s: StreamSpec, world, config: SyntheticCAMERConfig):
    """Scale, embedding, inverse covariance and log-determinant of an evidence row's density."""
    key = (id(world), s.name)
    if key not in _DENSITY:
        is_audio = s.modality == "audio"
        g = config.audio_scale if is_audio else config.visual_scale
        sigma = config.audio_noise if is_audio else config.visual_noise
        w = world.embed[s.name]
        cov = sigma**2 * w @ w.T + config.ambient_noise**2 * np.eye(s.dim)
        if s.name in world.scene:
            u = world.scene[s.name]
            cov = cov + config.scene_strength**2 * u @ u.T
        cov = g**2 * cov
        _DENSITY[key] = (g, w, np.linalg.inv(cov), np.linalg.slogdet(cov)[1])
    return _DENSITY[key]


def brute_force_logpost(
    x: dict[str, np.ndarray], world, config: SyntheticCAMERConfig, prior: dict[str, float]
) -> np.ndarray:
    """Log posterior of the true label from the FULL feature vectors of the evidence rows:
    each row's Gaussian density with its full covariance, every (subset, contrary label)
    hypothesis enumerated. Independent of the sufficient-statistic shortcut under test."""
    k = len(config.labels)
    c = config.conflict_strength

    def stream_ll(s: StreamSpec, shown: int, strength: float) -> float:
        g, w, inv, logdet = _density(s, world, config)
        rows = x[s.name][world.evidence[s.name]] if s.sequence else x[s.name][None]
        if s.name not in world.sign_axis:
            diff = rows - g * strength * w[:, shown]
            return float(-0.5 * (np.einsum("ti,ij,tj->", diff, inv, diff) + len(rows) * logdet))
        # A signed stream: the mean is s (a w_shown + m d), s = +-1 equally likely.
        mean = g * (strength * w[:, shown] + config.sign_strength * world.sign_axis[s.name])
        lls = [-0.5 * (float((r - sign * mean) @ inv @ (r - sign * mean)) + logdet)
               for r in rows for sign in (1.0, -1.0)]  # fmt: skip
        return float(logsumexp(lls) + np.log(0.5))

    def modality_ll(modality: str, shown: int, strength: float) -> float:
        return sum(stream_ll(s, shown, strength) for s in SMALL_STREAMS if s.modality == modality)

    a_a, a_v = config.audio_strength, config.visual_strength
    out = np.zeros(k)
    for y in range(k):
        terms = []
        if prior["consistent"] > 0:
            ll = modality_ll("audio", y, a_a) + modality_ll("visual", y, a_v)
            terms.append(np.log(prior["consistent"]) + ll)
        others = [o for o in range(k) if o != y]
        for subset, truthful, contrary, a_t, a_c in (
            ("video_aligned", "visual", "audio", a_v, a_a),
            ("audio_aligned", "audio", "visual", a_a, a_v),
        ):
            if prior[subset] <= 0:
                continue
            for o in others:
                ll = modality_ll(truthful, y, a_t) + modality_ll(contrary, o, c * a_c)
                terms.append(np.log(prior[subset] / len(others)) + ll)
        out[y] = logsumexp(terms)
    return out


def simulate(world, config: SyntheticCAMERConfig, subset: str, rng: np.random.Generator):
    """One fresh sample of the world, written from the generative model's definition."""
    k = len(config.labels)
    y = int(rng.integers(k))
    o = int((y + rng.integers(1, k)) % k)
    shown = {"visual": y, "audio": y}
    if subset == "video_aligned":
        shown["audio"] = o
    elif subset == "audio_aligned":
        shown["visual"] = o
    x = {}
    for s in SMALL_STREAMS:
        m = s.modality
        a = config.audio_strength if m == "audio" else config.visual_strength
        a = a if shown[m] == y else a * config.conflict_strength
        sigma = config.audio_noise if m == "audio" else config.visual_noise
        g = config.audio_scale if m == "audio" else config.visual_scale
        w = world.embed[s.name]
        rows = s.tokens if s.sequence else 1
        z = sigma * rng.standard_normal((rows, k))
        evidence = world.evidence[s.name] if s.sequence else np.ones(1, bool)
        z[evidence, shown[m]] += a
        z[~evidence, rng.integers(k, size=int((~evidence).sum()))] += config.distractor_strength
        if s.name in world.sign_axis:
            sign = 1.0 if rng.random() < 0.5 else -1.0
            z = sign * z
            f = z @ w.T + config.sign_strength * sign * world.sign_axis[s.name]
            f = f + config.ambient_noise * rng.standard_normal((rows, s.dim))
        else:
            f = z @ w.T + config.ambient_noise * rng.standard_normal((rows, s.dim))
        if s.name in world.scene:
            u = world.scene[s.name]
            f += config.scene_strength * rng.standard_normal((rows, u.shape[1])) @ u.T
        x[s.name] = g * (f if s.sequence else f[0])
    return y, x


@pytest.mark.slow
def test_bayes_bounds_match_brute_force_on_the_files_and_a_monte_carlo_estimate(tmp_path):
    root = generate_synthetic_camer(tmp_path, SMALL_STREAMS, SMALL_WORLD)
    bounds = json.loads((root / BAYES_FILE).read_text())
    test = bounds["splits"]["test"]
    assert test["counts"] == {"video_aligned": 300, "audio_aligned": 300, "consistent": 300}
    world, _ = build_world(SMALL_STREAMS, SMALL_WORLD)
    prior = SMALL_WORLD.subset_prior("test")
    # 1. The same decisions as a brute-force full-covariance posterior on the written files.
    records = [
        r
        for r in read_manifest(root / "manifest.csv", get_label_space(LABELS))
        if r.split == "test"
    ]
    correct = {name: [] for name in ("video_aligned", "audio_aligned", "consistent")}
    for r in records:
        x = {s.name: np.load(root / s.feature_dir / f"{r.name}.npy") for s in SMALL_STREAMS}
        post = brute_force_logpost(x, world, SMALL_WORLD, prior)
        correct[r.subset].append(int(post.argmax()) == LABELS.index(r.label))
    for subset, hits in correct.items():
        assert np.mean(hits) == pytest.approx(test["eval_prior"][f"{subset}/acc"], abs=1 / 300)
    # 2. The expected Bayes accuracy by Monte Carlo on fresh draws agrees within 4 SE.
    rng = np.random.default_rng(123)
    n = 1200
    for subset in correct:
        hits = []
        for _ in range(n):
            y, x = simulate(world, SMALL_WORLD, subset, rng)
            hits.append(int(brute_force_logpost(x, world, SMALL_WORLD, prior).argmax()) == y)
        mc = float(np.mean(hits))
        se = np.sqrt(mc * (1 - mc) / n + mc * (1 - mc) / 300)
        assert abs(test["eval_prior"][f"{subset}/acc"] - mc) < 4 * se, (subset, mc)
    # 3. Under the training prior (conflicts mostly audio_aligned) the bound leans to audio.
    train = test["train_prior"]
    assert train["modality_gap"] > test["eval_prior"]["modality_gap"]


def test_a_skewed_training_prior_is_what_the_manifest_shows(tmp_path):
    config = replace(SMALL_WORLD, n_train=200, n_test=30, n_val=30)
    root = generate_synthetic_camer(tmp_path, SMALL_STREAMS, config)
    train = [
        r.subset
        for r in read_manifest(root / "manifest.csv", get_label_space(LABELS))
        if r.split == "train"
    ]
    assert train.count("audio_aligned") == 32 and train.count("video_aligned") == 8


@pytest.mark.parametrize("name", WORLDS)
def test_every_world_generates_the_same_bytes_per_seed(tmp_path, name):
    init, streams, config = world_config(name)
    assert init["root"] == f"data/worlds/{name}/seed_${{.synthetic.seed}}"
    assert config.world == name
    small = replace(config, n_train=12, n_val=9, n_test=9)
    a = digest(generate_synthetic_camer(tmp_path / "a", streams, small))
    b = digest(generate_synthetic_camer(tmp_path / "b", streams, small))
    c = digest(generate_synthetic_camer(tmp_path / "c", streams, replace(small, seed=1)))
    assert a == b
    assert a["HL-UTT/camer_000000.npy"] != c["HL-UTT/camer_000000.npy"]
    assert BAYES_FILE in a and "generator.json" in a
    for s in streams:
        x = np.load(tmp_path / "a" / s.feature_dir / "camer_000000.npy")
        assert x.shape == s.shape and x.dtype == np.float32


@pytest.mark.parametrize("name", ["null", "token_imbalance", "prior", "optimisation"])
def test_equal_information_worlds_have_equal_information(tmp_path, name):
    """The worlds meant to be fair per modality are, by their own likelihood."""
    _, streams, config = world_config(name)
    small = replace(config, n_train=3, n_val=3, n_test=3)
    root = generate_synthetic_camer(tmp_path, streams, small)
    info = json.loads((root / BAYES_FILE).read_text())["likelihood"]
    assert info["audio"]["information"] == pytest.approx(info["visual"]["information"], rel=1e-3)
    if name == "token_imbalance":
        # Diffuse visual evidence (half of 32 weak rows) against one concentrated audio token.
        assert info["visual"]["evidence_rows"] == 16
        assert sum(s.tokens for s in streams if s.modality == "visual") == 32
        assert sum(s.tokens for s in streams if s.modality == "audio") == 1


def test_information_world_keeps_the_original_bytes(tmp_path):
    """The `information` world is the original generator's: its train and test files equal the
    ones the default synthetic config (conf/data/camer_synthetic.yaml) writes."""
    init, streams, config = world_config("information")
    demo = yaml.safe_load((REPO / "conf/data/camer_synthetic.yaml").read_text())["init_args"]
    demo_streams = [StreamSpec(**s) for s in demo["streams"]]
    assert demo_streams == streams
    small = dict(n_train=10, n_val=5, n_test=12)
    a = generate_synthetic_camer(tmp_path / "a", streams, replace(config, **small))
    b = generate_synthetic_camer(
        tmp_path / "b", demo_streams, SyntheticCAMERConfig(**demo["synthetic"], **small)
    )
    records = read_manifest(a / "manifest.csv", get_label_space("mer2023"))
    for r in records:
        if r.split != "val":
            for s in streams:
                path = f"{s.feature_dir}/{r.name}.npy"
                assert (a / path).read_bytes() == (b / path).read_bytes()


def test_validation_mirrors_the_test_subset_mix(tmp_path):
    config = SyntheticCAMERConfig(n_train=40, n_val=30, n_test=30, labels=LABELS)
    streams = [StreamSpec("face", "f", "visual", 4), StreamSpec("audio", "a", "audio", 4)]

    def mix(root: Path, split: str) -> dict[str, int]:
        subsets = [
            r.subset
            for r in read_manifest(root / "manifest.csv", get_label_space(LABELS))
            if r.split == split
        ]
        return {s: subsets.count(s) for s in ("video_aligned", "audio_aligned", "consistent")}

    root = generate_synthetic_camer(tmp_path / "default", streams, config)
    assert (
        mix(root, "val")
        == mix(root, "test")
        == {
            "video_aligned": 10,
            "audio_aligned": 10,
            "consistent": 10,
        }
    )
    assert mix(root, "train")["consistent"] == 36
    root = generate_synthetic_camer(
        tmp_path / "set", streams, replace(config, val_conflict_ratio=0.2)
    )
    assert mix(root, "val") == {"video_aligned": 3, "audio_aligned": 3, "consistent": 24}
    bounds = json.loads((root / BAYES_FILE).read_text())
    assert bounds["priors"]["val"]["consistent"] == pytest.approx(0.8)
    assert bounds["splits"]["val"]["counts"]["consistent"] == 24


def test_world_settings_are_checked():
    with pytest.raises(ValueError, match="val_conflict_ratio"):
        SyntheticCAMERConfig(val_conflict_ratio=1.5)
    with pytest.raises(ValueError, match="evidence_tokens.audio"):
        build_world(
            [StreamSpec("audio", "a", "audio", 8)],
            SyntheticCAMERConfig(evidence_tokens={"audio": 2}),
        )
    with pytest.raises(ValueError, match=r"evidence_tokens.face: 5 is not in \[1, 4\]"):
        build_world(
            [StreamSpec("face", "f", "visual", 8, 4, sequence=True)],
            SyntheticCAMERConfig(evidence_tokens={"face": 5}),
        )


def test_cli_fits_a_sequence_stream_world_and_logs_the_bounds(workdir, capsys):
    """A tiny token-imbalance world end to end: sequence streams through the real CLI, the
    Bayes bounds and the excess over them logged for val and test and printed."""
    streams = (
        "[{name: face, feature_dir: mae_340_UTT, modality: visual, dim: 16, tokens: 6, "
        "sequence: true}, {name: video, feature_dir: maeV_399_UTT, modality: visual, dim: 16, "
        "tokens: 4}, {name: audio, feature_dir: HL-UTT, modality: audio, dim: 16, tokens: 1}]"
    )
    cli = main(
        [
            "fit",
            "--config",
            str(TINY_CONFIG),
            "--data.init_args.streams",
            streams,
            "--data.init_args.synthetic.evidence_tokens",
            "{face: 2}",
            "--data.init_args.synthetic.distractor_strength",
            "0.5",
            "--data.init_args.synthetic.scene_strength",
            "1.0",
        ]
    )
    out = capsys.readouterr().out
    assert "excess_gap" in out and "Bayes %" in out
    assert cli.model.model.backbone.projectors["face"].net.in_features == 16  # one row -> one token
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["tests"]).iloc[0]
    metrics = {k.removeprefix("metrics."): v for k, v in run.items() if k.startswith("metrics.")}
    for split in ("val", "test"):
        bounds = json.loads((workdir / "data/camer_tiny" / BAYES_FILE).read_text())
        expected = bounds["splits"][split]["eval_prior"]["modality_gap"]
        assert metrics[f"{split}/bayes/modality_gap"] == pytest.approx(expected, abs=1e-6)
        gap = metrics[f"{split}/modality_gap"] - expected
        assert metrics[f"{split}/excess_gap"] == pytest.approx(gap, abs=1e-6)


def test_a_signed_stream_needs_a_non_linear_read_out(tmp_path):
    """The `optimisation` world's visual stream: its Bayes information equals audio's, but a
    linear read-out of the visual features alone is at chance, while undoing the sign first
    (a product of two feature directions) reads the label as well as audio's linear one."""
    init, streams, config = world_config("optimisation")
    assert config.sign_streams == ["face"]
    small = replace(config, n_train=1200, n_val=3, n_test=600)
    root = generate_synthetic_camer(tmp_path, streams, small)
    world, _ = build_world(streams, small)
    records = read_manifest(root / "manifest.csv", get_label_space(config.labels))
    labels = [w.lower() for w in config.labels]

    def arrays(split: str, stream: str):
        mine = [r for r in records if r.split == split and r.subset == "consistent"]
        feature_dir = next(s.feature_dir for s in streams if s.name == stream)
        x = np.stack([np.load(root / feature_dir / f"{r.name}.npy") for r in mine])
        return x, np.array([labels.index(r.label) for r in mine])

    def linear_accuracy(stream: str, transform=lambda x: x) -> float:
        (x, y), (xt, yt) = arrays("train", stream), arrays("test", stream)
        design = np.c_[transform(x), np.ones(len(x))]
        coef, *_ = np.linalg.lstsq(design, np.eye(len(labels))[y], rcond=None)
        return float(((np.c_[transform(xt), np.ones(len(xt))] @ coef).argmax(1) == yt).mean())

    chance = 1 / len(labels)
    assert abs(linear_accuracy("face") - chance) < 0.08  # linear: the sign hides the label
    d = world.sign_axis["face"]
    unsigned = linear_accuracy("face", lambda x: x * np.sign(x @ d)[:, None])
    audio = linear_accuracy("audio")
    assert unsigned > chance + 0.3 and abs(unsigned - audio) < 0.1
    with pytest.raises(ValueError, match="sign_streams: 'audio' must be a pooled stream"):
        build_world(
            [StreamSpec("audio", "a", "audio", 3)],  # no room beside 3 label directions
            SyntheticCAMERConfig(labels=LABELS, sign_streams=["audio"]),
        )
