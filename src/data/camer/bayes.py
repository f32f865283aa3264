"""Bayes-optimal accuracy of a synthetic CA-MER world on its own written val and test files.

The generator knows its likelihood (:mod:`src.data.camer.synthetic`), so the best any classifier
can do on a split is computable. With orthonormal ``W_s``, ``u = W_s^T x / g`` of an evidence row
is sufficient for the label and Gaussian, ``u ~ N(a e_j, v I)`` with ``v = sigma^2 + tau^2``
(scene content lies outside ``W_s``; distractor rows and the rest of the feature space do not
depend on any label). A signed stream (``sign_streams``) shows ``s u``; its sign is read off
``d . x`` first (exact up to an error probability ``Phi(-sign_strength / tau)``, about
``10^-89`` at the defaults), so its ``u`` is the same statistic. Summing a modality's evidence
rows over its streams gives ``S_m`` and ``n_m`` rows, and the log-likelihood that modality
``m`` shows label ``j`` at strength ``a`` is

    l_m(j, a) = (a S_m[j] - n_m a^2 / 2) / v_m      (+ a constant).

The posterior of the true label ``y`` mixes the three subsets with the prior ``pi`` and, for a
conflict, the contrary label ``o != y`` (uniform over the other classes):

    consistent:    l_A(y, a_A) + l_V(y, a_V)
    video_aligned: l_V(y, a_V) + log mean_{o != y} exp l_A(o, c a_A)
    audio_aligned: l_A(y, a_A) + log mean_{o != y} exp l_V(o, c a_V)

The Bayes prediction is the argmax over ``y`` of ``logsumexp_s (log pi_s + ...)``. Accuracy is
measured on the actual files of the split, per subset, under two priors: the split's own subset
mix (``eval_prior``: the bound for that split) and the training mix (``train_prior``: what a
classifier that learned the training distribution perfectly would score).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from src.core.label_space import get_label_space
from src.core.records import SUBSETS
from src.core.streams import StreamSpec
from src.data.camer.manifest import read_manifest
from src.data.components.feature_store import FeatureStore

if TYPE_CHECKING:
    from src.data.camer.synthetic import SyntheticCAMERConfig, World

MODALITIES: tuple[str, ...] = ("audio", "visual")


def _modality(stream: StreamSpec) -> str:
    return stream.modality_id.name.lower()


def modality_likelihood(
    streams: list[StreamSpec], world: World, config: SyntheticCAMERConfig
) -> dict[str, dict[str, float]]:
    """Per modality: evidence rows ``n``, per-row variance ``v`` of ``u`` and strength ``a``.

    ``information`` is the noise of the modality's sufficient statistic, ``sqrt(v / n)`` in
    latent units: equal values mean equal Bayes information per modality.
    """
    out: dict[str, dict[str, float]] = {}
    for modality in MODALITIES:
        mine = [s for s in streams if _modality(s) == modality]
        sigma = config.audio_noise if modality == "audio" else config.visual_noise
        n = sum(int(world.evidence[s.name].sum()) if s.sequence else 1 for s in mine)
        v = sigma**2 + config.ambient_noise**2
        a = config.audio_strength if modality == "audio" else config.visual_strength
        out[modality] = {
            "evidence_rows": n,
            "variance": v,
            "strength": a,
            "information": float(np.sqrt(v / n)) if n else float("inf"),
        }
    return out


def evidence_sums(
    features: dict[str, np.ndarray],
    streams: list[StreamSpec],
    world: World,
    config: SyntheticCAMERConfig,
) -> dict[str, np.ndarray]:
    """``S_m``: per modality, the sum of ``W_s^T x / g`` over the evidence rows, ``(K,)``."""
    k = len(config.labels)
    sums = {m: np.zeros(k) for m in MODALITIES}
    for s in streams:
        scale = config.audio_scale if _modality(s) == "audio" else config.visual_scale
        x = np.asarray(features[s.name], dtype=np.float64) / scale
        rows = x[world.evidence[s.name]] if s.sequence else x[None, :]
        u = (rows @ world.embed[s.name]).sum(axis=0)
        if s.name in world.sign_axis:  # undo the sample's sign, which d . x reveals
            u = u * (1.0 if float(x @ world.sign_axis[s.name]) >= 0 else -1.0)
        sums[_modality(s)] += u
    return sums


def _logmeanexp_others(values: np.ndarray) -> np.ndarray:
    """``(N, K)`` -> ``(N, K)``: entry ``j`` is ``log mean_{o != j} exp values[:, o]``."""
    k = values.shape[1]
    top = values.max(axis=1, keepdims=True)
    e = np.exp(values - top)
    rest = e.sum(axis=1, keepdims=True) - e
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(rest, 0.0) / (k - 1)) + top


def posterior_logits(
    sums: dict[str, np.ndarray],
    likelihood: dict[str, dict[str, float]],
    config: SyntheticCAMERConfig,
    prior: dict[str, float],
) -> np.ndarray:
    """Unnormalised log posterior of the true label, ``(N, K)``, from ``(N, K)`` sums."""
    c = config.conflict_strength

    def ll(modality: str, strength: float) -> np.ndarray:
        p = likelihood[modality]
        n, v = p["evidence_rows"], max(p["variance"], 1e-12)  # a noise-free world is fine
        return (strength * sums[modality] - n * strength**2 / 2) / v

    a_a, a_v = likelihood["audio"]["strength"], likelihood["visual"]["strength"]
    full_a, full_v = ll("audio", a_a), ll("visual", a_v)
    terms = {
        "consistent": full_a + full_v,
        "video_aligned": full_v + _logmeanexp_others(ll("audio", c * a_a)),
        "audio_aligned": full_a + _logmeanexp_others(ll("visual", c * a_v)),
    }
    parts = [np.log(prior[name]) + term for name, term in terms.items() if prior[name] > 0]
    return np.logaddexp.reduce(np.stack(parts), axis=0)


def _accuracies(correct: np.ndarray, subsets: list[str]) -> dict[str, float]:
    out: dict[str, float] = {"acc": float(correct.mean()) if len(correct) else float("nan")}
    for name in SUBSETS:
        mask = np.array([s == name for s in subsets])
        if mask.any():
            out[f"{name}/acc"] = float(correct[mask].mean())
    if "audio_aligned/acc" in out and "video_aligned/acc" in out:
        out["modality_gap"] = out["audio_aligned/acc"] - out["video_aligned/acc"]
    return out


def bayes_bounds(
    root: str | Path,
    streams: list[StreamSpec],
    config: SyntheticCAMERConfig,
    world: World,
    splits: tuple[str, ...] = ("val", "test"),
) -> dict[str, Any]:
    """The Bayes bounds of a generated data set, read back from its files.

    Returns ``{"world", "seed", "likelihood", "priors", "splits": {split: {"counts",
    "eval_prior", "train_prior", "unimodal"}}}``; each prior's entry has ``acc``,
    ``<subset>/acc`` and ``modality_gap`` (fractions). ``unimodal`` is the accuracy on the
    split's consistent samples of each modality alone (argmax of its own likelihood): close
    values mean equal information in practice, as ``likelihood.<m>.information`` says in theory.
    """
    labels = [w.lower() for w in config.labels]
    records = read_manifest(Path(root) / "manifest.csv", get_label_space(labels))
    store = FeatureStore(root, streams)
    likelihood = modality_likelihood(streams, world, config)
    priors = {split: config.subset_prior(split) for split in ("train", "val", "test")}
    out: dict[str, Any] = {
        "world": config.world,
        "seed": config.seed,
        "likelihood": likelihood,
        "priors": priors,
        "splits": {},
    }
    index = {w: i for i, w in enumerate(labels)}
    for split in splits:
        mine = [r for r in records if r.split == split]
        if not mine:
            continue
        per_sample = [evidence_sums(store.load(r.name), streams, world, config) for r in mine]
        sums = {m: np.stack([p[m] for p in per_sample]) for m in MODALITIES}
        truth = np.array([index[r.label] for r in mine])
        subsets = [r.subset or "" for r in mine]
        entry: dict[str, Any] = {
            "counts": {name: subsets.count(name) for name in SUBSETS if name in subsets}
        }
        for key, prior in (("eval_prior", priors[split]), ("train_prior", priors["train"])):
            pred = posterior_logits(sums, likelihood, config, prior).argmax(axis=1)
            entry[key] = _accuracies(pred == truth, subsets)
        consistent = np.array([s == "consistent" for s in subsets])
        entry["unimodal"] = {
            m: float((sums[m][consistent].argmax(axis=1) == truth[consistent]).mean())
            for m in MODALITIES
            if consistent.any()
        }
        out["splits"][split] = entry
    return out
