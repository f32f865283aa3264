"""A deterministic synthetic CA-MER, written to disk in the layout the real loaders read.

Generative model (documented in ``docs/worlds.md`` and the README, "The synthetic CA-MER"): every
evidence token of a stream of modality ``m`` draws a latent emotion vector in label space,

    z = a * e_{y_m} + sigma_m * eps,   eps ~ N(0, I_K)

where ``e_k`` is the one-hot vector of class ``k``, ``y_m`` the emotion that modality shows and
``a`` its strength; the stored feature is ``x = g_m (W_s z + tau * eta)`` with a fixed random
orthonormal ``W_s`` (dim x K) per stream, a little ambient noise ``tau`` and the modality's feature
scale ``g_m``. A pooled stream stores one such vector; a sequence stream stores ``(tokens, dim)``
rows of which ``evidence_tokens`` (fixed positions per world) carry the emotion and the others a
distractor emotion (a random label at ``distractor_strength``) plus scene content in feature
directions outside the label subspace. In a consistent sample both modalities show the true label
with full strength. In a conflict sample the aligned modality shows the true label with full
strength and the other shows a different label with the weaker ``conflict_strength`` (a masked
feeling), so the truth is recoverable from both streams together.

The knobs make a family of *worlds* (``conf/data/worlds/``), each with one stated cause of an
audio bias; :mod:`src.data.camer.bayes` computes each world's Bayes-optimal accuracy on the
written files from this likelihood (``bayes.json`` beside the manifest).
"""

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock

from src.core.errors import UserError
from src.core.label_space import MER2023
from src.core.records import SampleRecord
from src.core.streams import StreamSpec
from src.data.camer.bayes import bayes_bounds
from src.data.camer.manifest import write_manifest
from src.data.components.tokenizer import build_word_tokenizer
from src.io.atomic import atomic_open, atomic_write_text, sync_all

# 2: val mirrors the test's subset mix, worlds (sequence streams, distractors, scene, scales,
# training prior), bayes.json.
GENERATOR_VERSION = 2
DONE_MARKER = "generator.json"
BAYES_FILE = "bayes.json"
#: Scene directions (outside the label subspace) of a sequence stream.
SCENE_DIMS = 8
#: Written first, into an empty folder: the folder is the generator's, it may write there.
OWNER_MARKER = ".synthetic_camer_owner"
LOCK_NAME = ".generate.lock"


class ForeignDataError(UserError, FileExistsError):
    """The generator was pointed at a folder holding files it did not write (real data?)."""

    def __init__(self, root: Path, files: list[str]) -> None:
        shown = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
        super().__init__(
            f"{root}: root: holds files the synthetic generator did not write ({shown}); "
            "it writes only into an empty folder or one it made. For real data use a data "
            "module without `synthetic` settings (e.g. conf/data/camer_real.yaml); for the "
            "synthetic set choose an empty data.root"
        )
        self.root, self.files = root, files


def _foreign_files(root: Path) -> list[str]:
    """Entries of ``root`` the generator may not write over: all of them, unless ``root`` is
    empty (our lock file aside) or holds the generator's marker."""
    if (root / OWNER_MARKER).is_file():
        return []
    return sorted(p.name for p in root.iterdir() if p.name != LOCK_NAME)


def claim_folder(root: Path) -> None:
    """Mark ``root`` as the generator's; raises :class:`ForeignDataError` (writing nothing) when
    it holds files the generator did not write."""
    foreign = _foreign_files(root)
    if foreign:
        raise ForeignDataError(root, foreign)
    if not (root / OWNER_MARKER).is_file():
        marker = {"written_by": "src.data.camer.synthetic", "version": GENERATOR_VERSION}
        atomic_write_text(root / OWNER_MARKER, json.dumps(marker, sort_keys=True) + "\n")


# Words with no emotional content: subtitles carry no label information in the synthetic set.
SUBTITLE_WORDS: tuple[str, ...] = tuple(
    """i you we they he she it the a this that there here today tomorrow yesterday now then
    went came saw said told asked called moved opened closed took gave made kept left found
    house office street car train phone letter table window door meeting plan report paper
    time day week morning evening number name city road room box bag coat book list""".split()
)

# Prompt words the default template uses; the tokenizer covers them so nothing maps to <unk>.
PROMPT_WORDS: tuple[str, ...] = tuple(
    """[inst] [/inst] <video> </video> <audio> </audio> the person in video says : . , which
    emotion does show ? choose one of answer""".split()
)

#: Mean valence per MER2023 label, for the ``valence`` column of the label CSV.
VALENCE = {
    "neutral": 0.0,
    "angry": -3.0,
    "happy": 3.0,
    "sad": -2.5,
    "worried": -1.5,
    "surprise": 1.0,
}


@dataclass
class SyntheticCAMERConfig:
    """Knobs of the synthetic CA-MER generator (defaults: the ``information`` world).

    Args:
        seed: Seed of everything random; same seed, same bytes.
        n_train: Training samples.
        n_val: Validation samples (for checkpoint selection and every choice made on data).
        n_test: Test samples; conflicts split evenly between video_aligned and audio_aligned.
        labels: Label words (class order); defaults to MER2023's six classes.
        train_conflict_ratio: Fraction of conflict samples in train.
        test_conflict_ratio: Fraction of conflict samples in test.
        val_conflict_ratio: Fraction of conflict samples in val, split evenly like the test's;
            ``None``: the test's ratio, so that validation mirrors the test's subset mix.
        train_audio_share: Fraction of the training conflicts that are audio_aligned (0.5:
            even, like val and test; the ``prior`` world skews it).
        audio_strength: Strength ``a`` of the emotion audio shows when it tells the truth.
        visual_strength: Strength ``a`` of the emotion the visual streams show when truthful.
        conflict_strength: Strength of the contrary cue, as a fraction of the modality's strength.
        audio_noise: Latent noise ``sigma`` of each audio evidence token (a pooled vector is one).
        visual_noise: Latent noise ``sigma`` of each visual evidence token.
        ambient_noise: Noise ``tau`` added in feature space.
        evidence_tokens: Sequence stream name -> how many of its rows carry the emotion (fixed
            positions, drawn once per seed); the other rows are distractor and scene content.
            Streams not named: every row is evidence.
        distractor_strength: Strength of the random emotion (independent of every label) that
            each non-evidence row of a sequence stream shows.
        scene_strength: Standard deviation of the scene content every row of a sequence stream
            carries in feature directions outside the label subspace.
        audio_scale: Factor ``g`` on every stored audio feature (same information).
        visual_scale: Factor ``g`` on every stored visual feature (same information).
        sign_streams: Pooled streams whose label evidence is multiplied by a random sign
            ``s = +-1`` per sample, which the stream also stores along a fixed direction ``d``
            orthogonal to ``W_s`` (``x = g (s W_s z + sign_strength s d + tau eta)``): the label
            is readable only through the product of the two, a non-linear read-out, with the
            same Bayes information (``d . x`` reveals ``s``; wrong with probability
            ``Phi(-sign_strength / tau)``).
        sign_strength: Length of the sign's direction ``d`` in feature space.
        subtitle_words: Range (min, max) of subtitle length in words.
        world: Name of the world these settings make (``conf/data/worlds/<world>.yaml``).
    """

    seed: int = 0
    n_train: int = 1200
    n_val: int = 240
    n_test: int = 600
    labels: list[str] = field(default_factory=lambda: list(MER2023.labels))
    train_conflict_ratio: float = 0.1
    test_conflict_ratio: float = 2 / 3
    val_conflict_ratio: float | None = None
    train_audio_share: float = 0.5
    audio_strength: float = 1.0
    visual_strength: float = 1.0
    conflict_strength: float = 0.6
    audio_noise: float = 0.45
    visual_noise: float = 1.0
    ambient_noise: float = 0.05
    evidence_tokens: dict[str, int] | None = None
    distractor_strength: float = 0.0
    scene_strength: float = 0.0
    audio_scale: float = 1.0
    visual_scale: float = 1.0
    sign_streams: list[str] | None = None
    sign_strength: float = 1.0
    subtitle_words: tuple[int, int] = (4, 10)
    world: str = "information"

    def __post_init__(self) -> None:
        ratios = ("train_conflict_ratio", "test_conflict_ratio", "train_audio_share")
        for name in (*ratios, "conflict_strength", "val_conflict_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"synthetic.{name} must be in [0, 1], got {value}")
        for name in ("audio_noise", "visual_noise", "ambient_noise", "distractor_strength"):
            if getattr(self, name) < 0:
                raise ValueError(f"synthetic.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("scene_strength", "audio_scale", "visual_scale", "sign_strength"):
            if getattr(self, name) < 0 or (name != "scene_strength" and getattr(self, name) == 0):
                raise ValueError(f"synthetic.{name} must be positive, got {getattr(self, name)}")
        if len(self.labels) < 2:
            raise ValueError("synthetic.labels needs at least two classes for conflicts")

    @property
    def val_ratio(self) -> float:
        """The val split's conflict ratio (the test's unless set)."""
        ratio = self.val_conflict_ratio
        return self.test_conflict_ratio if ratio is None else ratio

    def split_plan(self) -> list[tuple[str, int, float, float]]:
        """``(split, samples, conflict ratio, audio_aligned share of the conflicts)``."""
        return [
            ("train", self.n_train, self.train_conflict_ratio, self.train_audio_share),
            ("val", self.n_val, self.val_ratio, 0.5),
            ("test", self.n_test, self.test_conflict_ratio, 0.5),
        ]

    def subset_prior(self, split: str) -> dict[str, float]:
        """The probability of each subset in ``split`` by these settings."""
        _, _, ratio, share = next(p for p in self.split_plan() if p[0] == split)
        return {
            "video_aligned": ratio * (1 - share),
            "audio_aligned": ratio * share,
            "consistent": 1 - ratio,
        }


@dataclass
class World:
    """The fixed random parts of a world, drawn from the seed before any sample.

    Args:
        embed: Stream name -> orthonormal ``(dim, K)`` label embedding ``W_s``.
        evidence: Sequence stream name -> boolean ``(tokens,)`` mask of the evidence rows.
        scene: Sequence stream name -> orthonormal ``(dim, r)`` scene basis, orthogonal to
            ``W_s`` (only when ``scene_strength > 0``).
        sign_axis: ``sign_streams`` name -> unit ``(dim,)`` direction ``d`` orthogonal to
            ``W_s`` that stores each sample's sign.
    """

    embed: dict[str, np.ndarray]
    evidence: dict[str, np.ndarray]
    scene: dict[str, np.ndarray]
    sign_axis: dict[str, np.ndarray] = field(default_factory=dict)


def build_world(
    streams: list[StreamSpec], config: SyntheticCAMERConfig
) -> tuple[World, np.random.Generator]:
    """The world's fixed parts and the generator's random stream, positioned after them.

    The embeddings come first from ``default_rng(seed)`` (as in version 1, so a world of pooled
    streams draws the same bytes); evidence positions and scene bases come from a second stream
    ``default_rng([seed, 1])`` so they never shift the samples' draws.
    """
    rng = np.random.default_rng(config.seed)
    side = np.random.default_rng([config.seed, 1])
    k = len(config.labels)
    names = {s.name for s in streams}
    unknown = sorted(set(config.evidence_tokens or {}) - names)
    if unknown:
        raise ValueError(f"synthetic.evidence_tokens names unknown streams {unknown}")
    embed: dict[str, np.ndarray] = {}
    evidence: dict[str, np.ndarray] = {}
    scene: dict[str, np.ndarray] = {}
    for s in streams:
        if s.dim < k:
            raise ValueError(f"stream {s.name!r}: dim {s.dim} is smaller than {k} labels")
        q, _ = np.linalg.qr(rng.standard_normal((s.dim, k)))
        embed[s.name] = q
    for s in streams:
        count = (config.evidence_tokens or {}).get(s.name)
        if not s.sequence:
            if count not in (None, 1):
                raise ValueError(
                    f"synthetic.evidence_tokens.{s.name}: {s.name!r} is a pooled stream (one "
                    "vector); evidence tokens need a sequence stream"
                )
            continue
        count = s.tokens if count is None else count
        if not 1 <= count <= s.tokens:
            raise ValueError(
                f"synthetic.evidence_tokens.{s.name}: {count} is not in [1, {s.tokens}]"
            )
        mask = np.zeros(s.tokens, dtype=bool)
        mask[side.choice(s.tokens, size=count, replace=False)] = True
        evidence[s.name] = mask
        if config.scene_strength > 0:
            r = min(SCENE_DIMS, s.dim - k)
            if r < 1:
                raise ValueError(
                    f"stream {s.name!r}: scene content needs dim > {k} labels, got {s.dim}"
                )
            w = embed[s.name]
            a = side.standard_normal((s.dim, r))
            basis, _ = np.linalg.qr(a - w @ (w.T @ a))
            scene[s.name] = basis
    # Drawn after every other fixed part, so that worlds without signed streams keep their bytes.
    sign_axis: dict[str, np.ndarray] = {}
    for name in config.sign_streams or []:
        s = next((s for s in streams if s.name == name), None)
        if s is None or s.sequence or s.dim <= k:
            raise ValueError(
                f"synthetic.sign_streams: {name!r} must be a pooled stream with dim > {k} labels"
            )
        w = embed[name]
        a = side.standard_normal(s.dim)
        d = a - w @ (w.T @ a)
        sign_axis[name] = d / np.linalg.norm(d)
    return World(embed, evidence, scene, sign_axis), rng


def _subsets(
    n: int, conflict_ratio: float, audio_share: float, rng: np.random.Generator
) -> list[str]:
    n_conflict = int(round(n * conflict_ratio))
    # Rounds half down, so an even split gives video n // 2 as in version 1.
    n_video = math.floor(n_conflict * (1 - audio_share) + 0.5 - 1e-9)
    subsets = (
        ["video_aligned"] * n_video
        + ["audio_aligned"] * (n_conflict - n_video)
        + ["consistent"] * (n - n_conflict)
    )
    return [subsets[i] for i in rng.permutation(n)]


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with atomic_open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def generate_synthetic_camer(
    root: str | Path, streams: list[StreamSpec], config: SyntheticCAMERConfig
) -> Path:
    """Write the synthetic data set under ``root`` and return ``root``.

    Layout: ``manifest.csv`` (CA-MER manifest), ``label.csv`` (MER2023 ``name,discrete,valence``),
    ``transcription.csv`` (``name,english``), one folder per stream of ``<name>.npy`` float32
    arrays (``stream.shape``), ``tokenizer/``, ``bayes.json`` (the Bayes bounds of the val and
    test files, :func:`~src.data.camer.bayes.bayes_bounds`) and ``generator.json`` (the
    config; written last, marks completion). ``root`` must be empty or already the
    generator's (:func:`claim_folder`): files of others are never replaced.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    claim_folder(root)
    world, rng = build_world(streams, config)
    labels = [w.lower() for w in config.labels]
    k = len(labels)
    for s in streams:
        (root / s.feature_dir).mkdir(exist_ok=True)

    records: list[SampleRecord] = []
    label_rows: list[list[object]] = []
    subtitle_rows: list[list[object]] = []
    index = 0
    for split, n, ratio, audio_share in config.split_plan():
        for subset in _subsets(n, ratio, audio_share, rng):
            name = f"camer_{index:06d}"
            index += 1
            y = int(rng.integers(k))
            other = int((y + rng.integers(1, k)) % k)  # uniform over the other classes
            video_y, audio_y = (y, other) if subset == "video_aligned" else (y, y)
            if subset == "audio_aligned":
                video_y, audio_y = other, y
            for s in streams:
                is_audio = s.modality_id.name == "AUDIO"
                shown = audio_y if is_audio else video_y
                strength = config.audio_strength if is_audio else config.visual_strength
                if shown != y:
                    strength *= config.conflict_strength
                x = _draw_stream(s, world, config, shown, strength, rng)
                # Thousands of small files: synced once, before the completion marker.
                with atomic_open(root / s.feature_dir / f"{name}.npy", "wb", fsync=False) as f:
                    np.save(f, x.astype(np.float32))
            lo, hi = config.subtitle_words
            words = rng.choice(SUBTITLE_WORDS, size=int(rng.integers(lo, hi + 1)))
            subtitle = " ".join(words) + " ."
            valence = VALENCE.get(labels[y], 0.0) + float(rng.normal(0, 0.5))
            records.append(
                SampleRecord(
                    name=name,
                    split=split,
                    label=labels[y],
                    subset=subset,
                    video_label=labels[video_y],
                    audio_label=labels[audio_y],
                    subtitle=subtitle,
                )
            )
            label_rows.append([name, labels[y], f"{valence:.3f}"])
            subtitle_rows.append([name, subtitle])

    write_manifest(root / "manifest.csv", records)
    _write_csv(root / "label.csv", ["name", "discrete", "valence"], label_rows)
    _write_csv(root / "transcription.csv", ["name", "english"], subtitle_rows)
    build_word_tokenizer([*SUBTITLE_WORDS, *PROMPT_WORDS, *labels], root / "tokenizer")
    sync_all()  # the feature files are on disk before anything says the set is complete
    # The Bayes bounds read back the files just written (what a model will see).
    bounds = bayes_bounds(root, streams, config, world)
    with atomic_open(root / BAYES_FILE, "w") as f:
        f.write(json.dumps(bounds, indent=2, sort_keys=True) + "\n")
    meta = {
        "version": GENERATOR_VERSION,
        "config": asdict(config),
        "streams": [asdict(s) for s in streams],
    }
    with atomic_open(root / DONE_MARKER, "w") as f:
        f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return root


def _draw_stream(
    stream: StreamSpec,
    world: World,
    config: SyntheticCAMERConfig,
    shown: int,
    strength: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """One sample's feature of ``stream``: ``(dim,)`` pooled or ``(tokens, dim)`` sequence."""
    is_audio = stream.modality_id.name == "AUDIO"
    sigma = config.audio_noise if is_audio else config.visual_noise
    scale = config.audio_scale if is_audio else config.visual_scale
    k = len(config.labels)
    w = world.embed[stream.name]
    if not stream.sequence:
        # Version 1's draws exactly: a pooled world keeps its bytes.
        z = sigma * rng.standard_normal(k)
        z[shown] += strength
        if stream.name in world.sign_axis:  # the label only through a product with the sign
            sign = 1.0 if rng.random() < 0.5 else -1.0
            z = sign * z
            x = w @ z + config.sign_strength * sign * world.sign_axis[stream.name]
            x = x + config.ambient_noise * rng.standard_normal(stream.dim)
            return x * scale if scale != 1.0 else x
        x = w @ z + config.ambient_noise * rng.standard_normal(stream.dim)
        return x * scale if scale != 1.0 else x
    evidence = world.evidence[stream.name]
    z = sigma * rng.standard_normal((stream.tokens, k))
    z[evidence, shown] += strength
    if config.distractor_strength > 0:
        others = np.flatnonzero(~evidence)
        z[others, rng.integers(k, size=others.size)] += config.distractor_strength
    x = z @ w.T + config.ambient_noise * rng.standard_normal((stream.tokens, stream.dim))
    if stream.name in world.scene:
        basis = world.scene[stream.name]
        x += config.scene_strength * rng.standard_normal((stream.tokens, basis.shape[1])) @ basis.T
    return x * scale if scale != 1.0 else x


def ensure_synthetic_camer(
    root: str | Path, streams: list[StreamSpec], config: SyntheticCAMERConfig
) -> Path:
    """Generate the data set unless ``root`` already holds one made with the same settings.

    A file lock makes this safe when several processes (DDP ranks) start at once. A folder
    holding files the generator did not write is refused before anything (the lock file
    included) is written there.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    wanted = {
        "version": GENERATOR_VERSION,
        "config": asdict(config),
        "streams": [asdict(s) for s in streams],
    }
    marker = root / DONE_MARKER
    if not marker.is_file():
        foreign = _foreign_files(root)
        if foreign:
            raise ForeignDataError(root, foreign)
    with FileLock(str(root / LOCK_NAME)):
        if marker.is_file():
            existing = json.loads(marker.read_text())
            if json.loads(json.dumps(wanted)) == existing:
                return root
            raise FileExistsError(
                f"{root} holds a synthetic CA-MER made with other settings ({marker}); "
                "choose another data.root or delete that folder"
            )
        return generate_synthetic_camer(root, streams, config)
