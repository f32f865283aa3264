"""A deterministic synthetic CA-MER, written to disk in the layout the real loaders read.

Generative model (documented in the README, "The synthetic CA-MER"): every stream of modality
``m`` draws a latent emotion vector in label space,

    z = a * e_{y_m} + sigma_m * eps,   eps ~ N(0, I_K)

where ``e_k`` is the one-hot vector of class ``k``, ``y_m`` the emotion that modality shows and
``a`` its strength; the stored feature is ``x = W_s z + tau * eta`` with a fixed random
orthonormal ``W_s`` (dim x K) per stream and a little ambient noise ``tau``. In a consistent
sample both modalities show the true label with full strength. In a conflict sample the aligned
modality shows the true label with full strength and the other shows a different label with the
weaker ``conflict_strength`` (a masked feeling), so the truth is recoverable from both streams
together. Audio is cleaner than visual and conflicts are rare in training, as in real data: a
model fitted to mostly consistent samples learns to trust audio, which is the bias CA-MER exposes.
"""

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock

from src.core.label_space import MER2023
from src.core.records import SampleRecord
from src.core.streams import StreamSpec
from src.data.camer.manifest import write_manifest
from src.data.components.tokenizer import build_word_tokenizer
from src.io.atomic import atomic_open

GENERATOR_VERSION = 1
DONE_MARKER = "generator.json"

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
    """Knobs of the synthetic CA-MER generator (defaults reproduce the audio bias).

    Args:
        seed: Seed of everything random; same seed, same bytes.
        n_train: Training samples.
        n_val: Validation samples (same distribution as training, for checkpoint selection).
        n_test: Test samples; conflicts split evenly between video_aligned and audio_aligned.
        labels: Label words (class order); defaults to MER2023's six classes.
        train_conflict_ratio: Fraction of conflict samples in train and val.
        test_conflict_ratio: Fraction of conflict samples in test.
        audio_strength: Strength ``a`` of the emotion audio shows when it tells the truth.
        visual_strength: Strength ``a`` of the emotion the visual streams show when truthful.
        conflict_strength: Strength of the contrary cue, as a fraction of the modality's strength.
        audio_noise: Latent noise ``sigma`` of the audio stream.
        visual_noise: Latent noise ``sigma`` of each visual stream.
        ambient_noise: Noise ``tau`` added in feature space.
        subtitle_words: Range (min, max) of subtitle length in words.
    """

    seed: int = 0
    n_train: int = 1200
    n_val: int = 240
    n_test: int = 600
    labels: list[str] = field(default_factory=lambda: list(MER2023.labels))
    train_conflict_ratio: float = 0.1
    test_conflict_ratio: float = 2 / 3
    audio_strength: float = 1.0
    visual_strength: float = 1.0
    conflict_strength: float = 0.6
    audio_noise: float = 0.45
    visual_noise: float = 1.0
    ambient_noise: float = 0.05
    subtitle_words: tuple[int, int] = (4, 10)

    def __post_init__(self) -> None:
        for name in ("train_conflict_ratio", "test_conflict_ratio", "conflict_strength"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"synthetic.{name} must be in [0, 1], got {getattr(self, name)}")
        if len(self.labels) < 2:
            raise ValueError("synthetic.labels needs at least two classes for conflicts")


def _subsets(n: int, conflict_ratio: float, rng: np.random.Generator) -> list[str]:
    n_conflict = int(round(n * conflict_ratio))
    n_video = n_conflict // 2
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
    vectors, ``tokenizer/`` and ``generator.json`` (the config; written last, marks completion).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    labels = [w.lower() for w in config.labels]
    k = len(labels)
    # A fixed random orthonormal embedding of label space per stream.
    embed = {}
    for s in streams:
        if s.dim < k:
            raise ValueError(f"stream {s.name!r}: dim {s.dim} is smaller than {k} labels")
        q, _ = np.linalg.qr(rng.standard_normal((s.dim, k)))
        embed[s.name] = q
        (root / s.feature_dir).mkdir(exist_ok=True)

    records: list[SampleRecord] = []
    label_rows: list[list[object]] = []
    subtitle_rows: list[list[object]] = []
    index = 0
    plan = [
        ("train", config.n_train, config.train_conflict_ratio),
        ("val", config.n_val, config.train_conflict_ratio),
        ("test", config.n_test, config.test_conflict_ratio),
    ]
    for split, n, ratio in plan:
        for subset in _subsets(n, ratio, rng):
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
                sigma = config.audio_noise if is_audio else config.visual_noise
                z = sigma * rng.standard_normal(k)
                z[shown] += strength
                x = embed[s.name] @ z + config.ambient_noise * rng.standard_normal(s.dim)
                with atomic_open(root / s.feature_dir / f"{name}.npy", "wb") as f:
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
    meta = {
        "version": GENERATOR_VERSION,
        "config": asdict(config),
        "streams": [asdict(s) for s in streams],
    }
    with atomic_open(root / DONE_MARKER, "w") as f:
        f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return root


def ensure_synthetic_camer(
    root: str | Path, streams: list[StreamSpec], config: SyntheticCAMERConfig
) -> Path:
    """Generate the data set unless ``root`` already holds one made with the same settings.

    A file lock makes this safe when several processes (DDP ranks) start at once.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    wanted = {
        "version": GENERATOR_VERSION,
        "config": asdict(config),
        "streams": [asdict(s) for s in streams],
    }
    with FileLock(str(root / ".generate.lock")):
        marker = root / DONE_MARKER
        if marker.is_file():
            existing = json.loads(marker.read_text())
            if json.loads(json.dumps(wanted)) == existing:
                return root
            raise FileExistsError(
                f"{root} holds a synthetic CA-MER made with other settings ({marker}); "
                "choose another data.root or delete that folder"
            )
        return generate_synthetic_camer(root, streams, config)
