"""The prediction writer (single process, DDP, atomic replace) and the ``score`` command."""

import csv
import json
import os
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.utils.data import DataLoader

from src.core.label_space import MER2023
from src.core.records import SUBSETS
from src.evaluation.prediction_writer import (
    PredictionCSVWriter,
    atomic_open,
    merge_part_files,
    prediction_columns,
    prediction_rows,
)
from src.evaluation.score import main as score_main
from src.metrics.emotion_vocabulary import EmotionVocabulary
from src.metrics.open_vocabulary import (
    OpenVocabularySample,
    RuleBasedExtractor,
    open_vocabulary_metrics,
    read_openset_cell,
    text_to_label,
)

LABELS = MER2023.labels
N_SAMPLES = 11
TEXTS = (
    "He frowns and shouts. Therefore his emotional state is angry.",
    "She smiles warmly, she looks happy.",
    "The man stares at the wall.",  # no emotion word: unparsed
    "Her voice trembles; she is not happy but worried.",
)


def sample(i: int) -> dict:
    """Sample ``i`` of the toy data set: every 5th has no label, subsets cycle with a gap."""
    return {
        "name": f"clip_{i:03d}",
        "subset": (*SUBSETS, None)[i % 4],
        "label": -1 if i % 5 == 4 else (i * 5) % len(LABELS),
        "index": i,
    }


def collate(items: list[dict]) -> dict:
    return {
        "names": [x["name"] for x in items],
        "subsets": [x["subset"] for x in items],
        "labels": torch.tensor([x["label"] for x in items]),
        "index": torch.tensor([x["index"] for x in items]),
    }


def expected_scores(index: torch.Tensor) -> torch.Tensor:
    logits = torch.nn.functional.one_hot((index * 3 + 1) % len(LABELS), len(LABELS)) * 2.0
    return torch.log_softmax(logits + 0.1 * torch.arange(len(LABELS)), dim=-1)


class ToyModule(pl.LightningModule):
    """Stands in for EmotionLLMModule: same ``predict_step`` output, no LLM."""

    def __init__(self, generate: bool = True, fail_at_batch: int | None = None) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)  # DDP needs a parameter
        self.model = SimpleNamespace(label_space=MER2023)
        self.generate, self.fail_at_batch = generate, fail_at_batch

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        if batch_idx == self.fail_at_batch:
            raise RuntimeError("simulated crash")
        index = batch["index"]
        texts = [TEXTS[int(i) % len(TEXTS)] for i in index] if self.generate else None
        return {
            "names": batch["names"],
            "subsets": batch["subsets"],
            "labels": batch["labels"],
            "scores": expected_scores(index),
            "texts": texts,
        }


def loader(batch_size: int = 3) -> DataLoader:
    return DataLoader(
        [sample(i) for i in range(N_SAMPLES)], batch_size=batch_size, collate_fn=collate
    )


def run_predict(module: pl.LightningModule, writer: PredictionCSVWriter, **trainer_kwargs) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=trainer_kwargs.pop("devices", 1),
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[writer],
        **trainer_kwargs,
    )
    trainer.predict(module, dataloaders=loader(), return_predictions=False)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def check_written_file(path: Path) -> None:
    rows = read_rows(path)
    assert list(rows[0]) == prediction_columns(LABELS)
    assert [r["name"] for r in rows] == [sample(i)["name"] for i in range(N_SAMPLES)]
    scores = expected_scores(torch.arange(N_SAMPLES))
    extractor = RuleBasedExtractor()
    for i, row in enumerate(rows):
        truth = sample(i)
        assert row["subset"] == (truth["subset"] or "")
        assert row["label"] == (LABELS[truth["label"]] if truth["label"] >= 0 else "")
        assert row["prediction"] == LABELS[int(scores[i].argmax())]
        written = [float(row[f"score_{label}"]) for label in LABELS]
        assert written == pytest.approx(scores[i].tolist(), abs=1e-6)
        assert row["text"] == TEXTS[i % len(TEXTS)]
        assert json.loads(row["extracted"]) == extractor.extract(TEXTS[i % len(TEXTS)])
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "leftover files"


# ---------------------------------------------------------------------------- writer


def test_prediction_rows_from_scores_and_from_text():
    extractor = RuleBasedExtractor()
    out = {
        "names": ["a", "b", "c"],
        "subsets": ["consistent", None, "video_aligned"],
        "labels": torch.tensor([2, -1, 4]),
        "scores": None,
        "texts": ["She looks happy.", "Nothing to see here.", "happy or sad"],
    }
    rows = prediction_rows(out, MER2023, extractor)
    assert [r["prediction"] for r in rows] == ["happy", "", ""]  # unparsed stays empty
    assert [r["label"] for r in rows] == ["happy", "", "worried"]
    assert [r["subset"] for r in rows] == ["consistent", "", "video_aligned"]
    assert all(r["score_happy"] == "" for r in rows)
    assert json.loads(rows[2]["extracted"]) == ["happy", "sad"]
    with pytest.raises(ValueError, match="'scores' has shape"):
        prediction_rows({**out, "scores": torch.zeros(3, 4)}, MER2023, extractor)
    with pytest.raises(ValueError, match="'texts' has 2 entries"):
        prediction_rows({**out, "texts": ["x", "y"]}, MER2023, extractor)


def test_writer_single_process(tmp_path):
    writer = PredictionCSVWriter(tmp_path / "out" / "predictions.csv")
    run_predict(ToyModule(), writer)
    assert writer.written == [tmp_path / "out" / "predictions.csv"]
    check_written_file(tmp_path / "out" / "predictions.csv")


def test_writer_without_generation_leaves_text_empty(tmp_path):
    run_predict(ToyModule(generate=False), PredictionCSVWriter(tmp_path / "p.csv"))
    rows = read_rows(tmp_path / "p.csv")
    assert all(r["text"] == "" and r["extracted"] == "[]" for r in rows)
    assert all(r["prediction"] in LABELS for r in rows)


def test_writer_takes_labels_from_model_labels(tmp_path):
    module = ToyModule()
    module.model = SimpleNamespace(labels=list(LABELS))  # what MultimodalEmotionLLM exposes
    run_predict(module, PredictionCSVWriter(tmp_path / "p.csv"))
    check_written_file(tmp_path / "p.csv")
    module.model = SimpleNamespace()
    with pytest.raises(ValueError, match="needs label_names"):
        run_predict(module, PredictionCSVWriter(tmp_path / "q.csv"))
    run_predict(module, PredictionCSVWriter(tmp_path / "q.csv", label_names=LABELS))
    check_written_file(tmp_path / "q.csv")


def test_a_crash_leaves_the_previous_file_untouched(tmp_path):
    target = tmp_path / "predictions.csv"
    target.write_text("previous results\n")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_predict(ToyModule(fail_at_batch=2), PredictionCSVWriter(target))
    assert target.read_text() == "previous results\n"
    # The next run cleans up the parts the crashed run left and replaces the file.
    run_predict(ToyModule(), PredictionCSVWriter(target))
    check_written_file(target)


def test_atomic_open_replaces_only_on_success(tmp_path):
    target = tmp_path / "x.csv"
    target.write_text("old")
    with pytest.raises(KeyError):
        with atomic_open(target) as handle:
            handle.write("partial")
            raise KeyError("boom")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.csv"]
    with atomic_open(target) as handle:
        handle.write("new")
    assert target.read_text() == "new"


def test_merge_orders_by_index_and_drops_sampler_padding(tmp_path):
    columns = prediction_columns(LABELS)
    parts = []
    # Rank r got indices r, r+2, ...; the sampler padded rank 1 with a copy of index 0.
    for rank, indices in ((0, [0, 2, 4]), (1, [1, 3, 0])):
        part = tmp_path / f".p.csv.rank{rank}.part"
        with open(part, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*columns, "_index", "_rank"])
            writer.writeheader()
            for i in indices:
                writer.writerow(
                    {"name": f"s{i}", "prediction": "happy", "_index": i, "_rank": rank}
                )
        parts.append(part)
    assert merge_part_files(parts, tmp_path / "p.csv", columns) == 5
    rows = read_rows(tmp_path / "p.csv")
    assert [r["name"] for r in rows] == ["s0", "s1", "s2", "s3", "s4"]
    assert list(rows[0]) == columns


@pytest.mark.slow
def test_writer_under_ddp_merges_ranks(tmp_path):
    writer = PredictionCSVWriter(tmp_path / "predictions.csv")
    run_predict(ToyModule(), writer, devices=2, strategy="ddp_spawn")
    check_written_file(tmp_path / "predictions.csv")


# ---------------------------------------------------------------------------- score


def test_score_our_file_matches_sklearn(tmp_path, capsys):
    path = tmp_path / "predictions.csv"
    run_predict(ToyModule(), PredictionCSVWriter(path))
    rows = read_rows(path)
    # An answer outside the label space must be counted as unparsed, not mapped.
    rows[0]["prediction"] = "joyous"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "results.json"
    assert score_main(["--predictions", str(path), "--output", str(out), "--bootstrap", "500"]) == 0
    result = json.loads(out.read_text())
    metrics = result["metrics"]

    labelled = [r for r in rows if r["label"]]
    y = np.array([LABELS.index(r["label"]) for r in labelled])
    p = np.array(
        [LABELS.index(r["prediction"]) if r["prediction"] in LABELS else -1 for r in labelled]
    )
    assert metrics["test/acc"] == pytest.approx(accuracy_score(y, p))
    assert metrics["test/f1_weighted"] == pytest.approx(
        f1_score(y, p, labels=list(range(len(LABELS))), average="weighted", zero_division=0)
    )
    assert metrics["test/unparsed_rate"] == pytest.approx(np.mean(p == -1))
    subsets = np.array([SUBSETS.index(r["subset"]) if r["subset"] else -1 for r in labelled])
    for i, name in enumerate(SUBSETS):
        if (subsets == i).any():
            assert metrics[f"test/{name}/acc"] == pytest.approx(
                accuracy_score(y[subsets == i], p[subsets == i])
            )
            assert f"test/{name}/acc_ci_low" in metrics
    assert result["unknown_predictions"] == {"joyous": 1}
    assert result["counts"]["closed_unknown_label"] == 1
    assert result["label_space"]["name"] == "mer2023"
    assert result["bootstrap"] == {"resamples": 500, "seed": 0, "alpha": 0.05}
    printed = capsys.readouterr().out
    assert "test/acc" in printed and "'joyous' x1" in printed


def test_score_is_deterministic(tmp_path):
    path = tmp_path / "predictions.csv"
    run_predict(ToyModule(), PredictionCSVWriter(path))
    for name in ("a.json", "b.json"):
        assert score_main(["--predictions", str(path), "--output", str(tmp_path / name)]) == 0
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


def test_score_closed_set_from_generated_text(tmp_path):
    path = tmp_path / "predictions.csv"
    run_predict(ToyModule(), PredictionCSVWriter(path))
    out = tmp_path / "r.json"
    argv = ["--predictions", str(path), "--closed_from", "text", "--bootstrap", "0"]
    assert score_main([*argv, "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    labelled = [r for r in read_rows(path) if r["label"]]
    from_text = [text_to_label(r["text"], MER2023) for r in labelled]
    y = [LABELS.index(r["label"]) for r in labelled]
    p = [-1 if i is None else i for i in from_text]
    assert result["metrics"]["test/acc"] == pytest.approx(accuracy_score(y, p))
    assert result["metrics"]["test/unparsed_rate"] == pytest.approx(np.mean(np.array(p) == -1))
    assert 0 < result["metrics"]["test/unparsed_rate"] < 1
    assert result["closed_from"] == "text"
    assert score_main([*argv[:2], "--closed_from", "guess"]) == 2


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def camer_manifest(tmp_path) -> Path:
    return write_csv(
        tmp_path / "manifest.csv",
        ["name", "split", "subset", "label", "video_label", "audio_label", "reason"],
        [
            ["s1", "test", "video_aligned", "happy", "happy", "sad", "He is happy and relieved."],
            ["s2", "test", "audio_aligned", "sad", "happy", "sad", "Therefore he is sad."],
            ["s3", "test", "consistent", "angry", "angry", "angry", "She is angry."],
            ["s4", "test", "consistent", "worried", "worried", "worried", "He is worried."],
            ["t1", "train", "consistent", "sad", "sad", "sad", "Sad."],
        ],
    )


def test_score_emotion_llama_reasoning_file(tmp_path, camer_manifest):
    predictions = write_csv(
        tmp_path / "output_Emotion-LLaMA.csv",
        ["names", "chi_reasons"],
        [
            ["s1", "In the video he smiles; his emotional state is happy."],
            ["s2", "He frowns, so he is angry and sad."],
            ["s3", "The person walks away."],  # no emotion word: unparsed everywhere
            ["s4", "She looks worried, not angry."],
        ],
    )
    out = tmp_path / "r.json"
    rc = score_main(
        [
            "--predictions",
            str(predictions),
            "--references",
            str(camer_manifest),
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    metrics, counts = result["metrics"], result["counts"]
    # Closed set from text: s1 happy (right), s2 ambiguous (unparsed), s3 unparsed, s4 worried.
    assert metrics["test/acc"] == pytest.approx(2 / 4)
    assert metrics["test/unparsed_rate"] == pytest.approx(2 / 4)
    assert metrics["test/video_aligned/acc"] == 1.0
    assert metrics["test/audio_aligned/acc"] == 0.0
    assert metrics["test/modality_gap"] == -1.0
    # Open vocabulary, EMER-style: gold words extracted from the manifest's reasons.
    vocab = EmotionVocabulary.default()
    extractor = RuleBasedExtractor(vocab)
    reasons = {
        "s1": "He is happy and relieved.",
        "s2": "Therefore he is sad.",
        "s3": "She is angry.",
    }
    reasons["s4"] = "He is worried."
    texts = dict(
        s1="In the video he smiles; his emotional state is happy.",
        s2="He frowns, so he is angry and sad.",
    )
    texts.update(s3="The person walks away.", s4="She looks worried, not angry.")
    subset = {"s1": "video_aligned", "s2": "audio_aligned", "s3": "consistent", "s4": "consistent"}
    expected, _ = open_vocabulary_metrics(
        [
            OpenVocabularySample(
                n, extractor.extract(reasons[n]), extractor.extract(texts[n]), subset[n]
            )
            for n in reasons
        ],
        vocab,
    )
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value)
    assert metrics["test/ov_unparsed_rate"] == pytest.approx(1 / 4)
    assert counts["missing_predictions"] == 0  # t1 is a train row, not expected
    assert result["extractor"]["extractor"] == "rule_based"


def test_score_emotion_llama_classification_records(tmp_path):
    predictions = write_csv(
        tmp_path / "predictions.csv",
        ["instance_id", "sample_id", "dataset", "prediction", "target", "normalized_prediction"],
        [
            ["1", "a", "mer", "happy", "happy", "happy"],
            ["2", "b", "mer", "The emotion is sad.", "sad", "sad"],
            ["3", "c", "mer", "I'm not sure", "angry", ""],
            ["4", "d", "mer", "neutral", "worried", "neutral"],
        ],
    )
    out = tmp_path / "r.json"
    assert (
        score_main(
            ["--predictions", str(predictions), "--format", "emotion-llama", "--output", str(out)]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["metrics"]["test/acc"] == pytest.approx(2 / 4)
    assert result["metrics"]["test/unparsed_rate"] == pytest.approx(1 / 4)
    assert result["counts"]["closed_unparsed"] == 1
    assert result["inputs"]["format"] == "emotion-llama"


def test_score_bad_inputs_name_the_file(tmp_path, capsys):
    odd = write_csv(tmp_path / "odd.csv", ["id", "guess"], [["a", "happy"]])
    assert score_main(["--predictions", str(odd)]) == 2
    assert "odd.csv: cannot tell the prediction format" in capsys.readouterr().err
    bad_gold = write_csv(
        tmp_path / "gold.csv", ["name", "label", "prediction"], [["a", "elated", "happy"]]
    )
    assert score_main(["--predictions", str(bad_gold)]) == 2
    err = capsys.readouterr().err
    assert "gold.csv, line 2: field 'label'" in err and "'elated'" in err
    assert score_main(["--predictions", str(tmp_path / "none.csv")]) == 2
    assert "none.csv does not exist" in capsys.readouterr().err
    ok = write_csv(tmp_path / "ok.csv", ["name", "label", "prediction"], [["a", "happy", "happy"]])
    assert score_main(["--predictions", str(ok), "--judge", "org/some-hub-model"]) == 2
    assert "not a local directory" in capsys.readouterr().err


def test_score_with_the_local_judge_records_it(tmp_path, camer_manifest):
    from tests.metrics.test_open_vocabulary import build_tiny_judge

    judge = build_tiny_judge(tmp_path / "judge")
    predictions = write_csv(
        tmp_path / "out.csv", ["names", "chi_reasons"], [["s1", "He is happy."], ["s2", "Sad."]]
    )
    out = tmp_path / "results" / "r.json"
    argv = ["--predictions", str(predictions), "--references", str(camer_manifest)]
    argv += ["--judge", str(judge), "--judge_max_new_tokens", "4", "--output", str(out)]
    assert score_main(argv) == 0
    result = json.loads(out.read_text())
    assert result["extractor"]["extractor"] == "local_lm_judge"
    assert result["extractor"]["path"] == str(judge.resolve())
    cache = json.loads((tmp_path / "results" / "judge_cache.json").read_text())
    # Two generated texts and two reference reasons, each asked once.
    assert len(cache) == 4
    assert "test/ov_acc" in result["metrics"]
    assert score_main(argv) == 0  # second run answers from the cache
    assert json.loads(out.read_text()) == result


def test_score_is_registered_in_the_cli(tmp_path):
    from src.cli import main as cli_main

    ok = write_csv(tmp_path / "ok.csv", ["name", "label", "prediction"], [["a", "happy", "happy"]])
    assert cli_main(["score", "--predictions", str(ok), "--bootstrap", "0"]) == 0


def test_score_mer2024_files_end_to_end(tmp_path, realdata):
    root = realdata / "open-vocabulary"
    out = tmp_path / "r.json"
    argv = [
        "--predictions",
        str(root / "predict-openset.csv"),
        "--references",
        str(root / "check-openset.csv"),
    ]
    assert score_main([*argv, "--vocabulary", str(root / "format.csv"), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    vocab = EmotionVocabulary.from_format_csv(root / "format.csv")
    gold = {
        r["name"]: read_openset_cell(r["openset"], where="")
        for r in read_rows(root / "check-openset.csv")
    }
    pred = {
        r["name"]: read_openset_cell(r["openset"], where="")
        for r in read_rows(root / "predict-openset.csv")
    }
    expected, counts = open_vocabulary_metrics(
        [OpenVocabularySample(n, gold[n], pred[n]) for n in gold], vocab
    )
    assert result["metrics"] == pytest.approx(expected)
    assert result["counts"]["ov_scored"] == counts["ov_scored"] == 332
    assert result["vocabulary"]["source"] == str(root / "format.csv")
