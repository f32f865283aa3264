"""`predict` on a user's own clips: ClipsDataModule (online encoders, training preprocessing) and
ClipReportWriter (one JSON record per clip, audio-alone / visual-alone evidence, conflict flag,
AR attention shares); on the six real MER2023 clips and on clips the tests write with PyAV."""

import json
from pathlib import Path

import av
import lightning as L
import numpy as np
import pytest
import torch

from src.callbacks.attention_reallocation import AttentionReallocation
from src.cli import main
from src.commands.extract import extract_features
from src.core.label_space import MER2023
from src.core.records import SampleRecord
from src.data.base_datamodule import EmotionDataModule
from src.data.camer.synthetic import PROMPT_WORDS
from src.data.clips_datamodule import ClipsDataModule, find_clips
from src.data.components.media import MediaDecodeError
from src.data.components.media_source import MediaSpec
from src.data.components.tokenizer import build_word_tokenizer
from src.data.formats.rows import FormatError
from src.evaluation.clip_evidence import clip_attention_shares, conflicts, js_divergence
from src.evaluation.clip_report_writer import ClipReportWriter, summary_line
from src.models.attention import SpanMass
from src.models.attention.share_monitor import ShareMonitor
from src.models.backbones.projected_causal_lm import ProjectedCausalLM
from src.models.emotion_module import EmotionLLMModule
from tests.conftest import REPO, TINY_CONFIG
from tests.data.components.test_media import write_clip
from tests.mini_mer import SSL_HOP320, STREAMS, load_encoders, save_encoders, write_mer2023

PREDICT_CLIPS = REPO / "conf" / "experiment" / "predict_clips.yaml"
CONF = REPO / "tests" / "conf"
# A wide initialisation makes label distributions far from uniform, so the tiny random model's
# answers depend on the clip (at the default 0.02 every clip gets the same near-uniform answer).
BACKBONE = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.5,
)
MEDIA = MediaSpec(strategy="middle", frame_size=32)  # one frame keeps the real clips cheap
RECORD_KEYS = {
    "name", "status", "clip", "subtitle", "subtitle_source", "prediction", "probabilities",
    "audio_alone", "visual_alone", "conflict", "attention", "text", "emotion_words",
}  # fmt: skip


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny encoders saved as local checkpoints and a word tokenizer (no real data needed)."""
    folder = tmp_path_factory.mktemp("kit")
    dirs = save_encoders(folder / "encoders", audio_config=SSL_HOP320)
    words = "so the first time i had a meal with you was also to thank hello".split()
    build_word_tokenizer([*PROMPT_WORDS, *words, *MER2023.labels], folder / "tokenizer")
    return {**dirs, "tokenizer": folder / "tokenizer"}


def clips_module(kit: dict[str, Path], clips: Path | str, **kwargs) -> ClipsDataModule:
    kwargs.setdefault("media", MEDIA)
    kwargs.setdefault("eval_batch_size", 4)
    return ClipsDataModule(
        clips=str(clips), tokenizer=str(kit["tokenizer"]), streams=STREAMS, **kwargs
    )


def tiny_module(kit: dict[str, Path]) -> EmotionLLMModule:
    torch.manual_seed(0)
    return EmotionLLMModule(
        backbone=ProjectedCausalLM(config=BACKBONE),
        tokenizer=str(kit["tokenizer"]),
        labels=list(MER2023.labels),
        streams=STREAMS,
        encoders=load_encoders(kit),
    )


def predict(module, data, output: Path, *callbacks, **writer_args) -> list[dict]:
    writer = ClipReportWriter(output=str(output), **writer_args)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[writer, *callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(output.parent),
    )
    trainer.predict(module, datamodule=data, return_predictions=False)
    lines = output.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == writer.records
    return writer.records


def by_name(records: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in records}


def probs(side: dict) -> np.ndarray:
    return np.array(list(side["probabilities"].values()))


def check_record(record: dict, labels: tuple[str, ...]) -> None:
    """Field names, types and the invariants every ``ok`` record keeps."""
    assert set(record) == RECORD_KEYS and record["status"] == "ok"
    assert isinstance(record["name"], str) and isinstance(record["clip"], str)
    assert Path(record["clip"]).stem == record["name"]
    assert isinstance(record["subtitle"], str)
    for side in (record, record["audio_alone"], record["visual_alone"]):
        assert list(side["probabilities"]) == list(labels)
        values = probs(side)
        assert all(isinstance(v, float) for v in values) and (values >= 0).all()
        assert abs(values.sum() - 1.0) < 1e-9
        assert side["prediction"] == labels[int(values.argmax())]
    conflict = record["conflict"]
    assert isinstance(conflict["flag"], bool) and 0.0 <= conflict["score"] <= 1.0
    audio, visual = record["audio_alone"]["prediction"], record["visual_alone"]["prediction"]
    assert conflict["flag"] == (audio != visual)
    expected = js_divergence(
        torch.tensor(probs(record["audio_alone"]))[None],
        torch.tensor(probs(record["visual_alone"]))[None],
    )
    assert abs(conflict["score"] - float(expected)) < 1e-9
    fused = record["prediction"]
    if conflict["flag"]:
        side = "audio" if fused == audio else "visual" if fused == visual else "neither"
    else:
        side = "both" if fused == audio else "neither"
    assert conflict["fused_follows"] == side


class StoreModule(EmotionDataModule):
    """The same clips read back from a feature store written by ``extract``."""

    def __init__(self, records: list[SampleRecord], **kwargs) -> None:
        super().__init__(**kwargs)
        self._records = records

    def load_records(self) -> list[SampleRecord]:
        return list(self._records)


def test_records_on_the_real_clips_match_the_feature_store(realdata, kit, tmp_path, capsys):
    mini = realdata / "mer2023-mini"
    data = clips_module(kit, mini / "video", subtitle_csv=str(mini / "transcription.csv"))
    module = tiny_module(kit)
    records = predict(module, data, tmp_path / "clips.jsonl")

    names = sorted(p.stem for p in (mini / "video").glob("*.mp4"))
    assert len(names) == 6 and [r["name"] for r in records] == names  # one record per clip
    for record in records:
        check_record(record, MER2023.labels)
        assert record["subtitle_source"] == "csv" and record["attention"] is None
        assert record["text"] is None and record["emotion_words"] is None
    assert by_name(records)["sample_00000167"]["subtitle"].startswith("So, the first time")
    # The answers depend on the clip (the test model is not degenerate).
    assert (
        len({r["audio_alone"]["prediction"] for r in records}) > 1
        or len({r["visual_alone"]["prediction"] for r in records}) > 1
    )
    out = capsys.readouterr().out
    assert all(out.count(f"{name}: ") == 1 for name in names)
    assert "clips: 6 predicted, 0 skipped" in out

    # The feature-store path: extract with the same encoders and decoding, predict from the
    # store (another batch size, so padding differs) with the same module: same probabilities.
    store = tmp_path / "store"
    result = extract_features(
        names, data.media_loader(), module.encoders, STREAMS, store, batch_size=3, progress=False
    )
    assert result.written == 6
    stored = StoreModule(
        data.load_records(),
        root=str(store),
        streams=STREAMS,
        tokenizer=str(kit["tokenizer"]),
        eval_batch_size=5,
    )
    from_store = by_name(predict(module, stored, tmp_path / "store.jsonl"))
    for record in records:
        twin = from_store[record["name"]]
        assert twin["prediction"] == record["prediction"]
        for key in ("probabilities", "audio_alone", "visual_alone"):
            side, other = (record, twin) if key == "probabilities" else (record[key], twin[key])
            np.testing.assert_allclose(probs(other), probs(side), atol=1e-5, rtol=0)


def remux(video_source: Path, audio_source: Path, output: Path) -> Path:
    """A clip with ``video_source``'s video packets and ``audio_source``'s audio packets, copied
    without re-encoding (the decoded tracks equal the sources')."""
    with (
        av.open(str(video_source)) as vin,
        av.open(str(audio_source)) as ain,
        av.open(str(output), "w") as out,
    ):
        sources = (vin.streams.video[0], ain.streams.audio[0])
        # Every stream before the first packet: the header is written at the first mux.
        targets = [out.add_stream_from_template(source) for source in sources]
        for source, target in zip(sources, targets, strict=True):
            for packet in source.container.demux(source):
                if packet.dts is not None:
                    packet.stream = target
                    out.mux(packet)
    return output


def test_a_clip_with_another_clips_audio_is_a_conflict(realdata, kit, tmp_path):
    video = realdata / "mer2023-mini" / "video"
    module = tiny_module(kit)
    sources = by_name(predict(module, clips_module(kit, video), tmp_path / "sources.jsonl"))
    names = sorted(sources)
    # Built to conflict: pair one clip's video with an audio track whose audio-alone answer
    # differs from that video's visual-alone answer (found from the sources, so it holds by
    # construction); and, when one exists, a pair that should agree.
    pairs = [(a, b) for a in names for b in names if a != b]
    visual = {n: sources[n]["visual_alone"]["prediction"] for n in names}
    audio = {n: sources[n]["audio_alone"]["prediction"] for n in names}
    clash = next((a, b) for a, b in pairs if visual[a] != audio[b])
    agree = next(((a, b) for a, b in pairs if visual[a] == audio[b]), None)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    built = {"clash": clash, **({"agree": agree} if agree else {})}
    for key, (a, b) in built.items():
        remux(video / f"{a}.mp4", video / f"{b}.mp4", mixed / f"{key}.mp4")
    records = by_name(predict(module, clips_module(kit, mixed), tmp_path / "mixed.jsonl"))
    for key, (a, b) in built.items():
        record = records[key]
        check_record(record, MER2023.labels)
        # The single-modality evidence follows the track it came from.
        np.testing.assert_allclose(
            probs(record["audio_alone"]), probs(sources[b]["audio_alone"]), atol=1e-5
        )
        np.testing.assert_allclose(
            probs(record["visual_alone"]), probs(sources[a]["visual_alone"]), atol=1e-5
        )
    assert records["clash"]["conflict"]["flag"] is True
    assert records["clash"]["conflict"]["fused_follows"] in ("audio", "visual", "neither")
    assert "CONFLICT" in summary_line(records["clash"])
    if agree:
        assert records["agree"]["conflict"]["flag"] is False


def test_attention_shares_per_clip_with_ar(realdata, kit, tmp_path):
    """AR span_mass toward equal audio and visual mass on each sequence's last row: every clip's
    share after is audio == visual; the per-clip records add up to the callback's totals, so the
    unimodal passes are kept out of them."""
    # only_away off: the point is the per-clip bookkeeping of an exact target, either direction.
    strategy = SpanMass(target="fixed", audio_share=0.5, query_rows="last", only_away=False)
    ar = AttentionReallocation(strategy, plot=False)
    data = clips_module(kit, realdata / "mer2023-mini" / "video")
    records = predict(tiny_module(kit), data, tmp_path / "ar.jsonl", ar)
    assert len(records) == 6
    totals = {"before": np.zeros(3), "after": np.zeros(3)}
    entries = 0
    for record in records:
        check_record(record, MER2023.labels)
        attention = record["attention"]
        assert set(attention) == {"before", "after", "entries"}
        # Label scoring runs the prompt once with every answer after it: one `last` row per clip
        # (the final answer's last token) x heads x layers.
        assert attention["entries"] == (
            BACKBONE["num_hidden_layers"] * BACKBONE["num_attention_heads"]
        )
        for stage in ("before", "after"):
            shares = attention[stage]
            assert list(shares) == ["audio", "visual", "text"]
            assert abs(sum(shares.values()) - 1.0) < 1e-6
            totals[stage] += attention["entries"] * np.array(list(shares.values()))
        entries += attention["entries"]
        # The audio share of the audio + visual mass: moved to one half (text keeps its mass).
        after, before = attention["after"], attention["before"]
        assert after["audio"] / (after["audio"] + after["visual"]) == pytest.approx(0.5)
        assert abs(before["audio"] / (before["audio"] + before["visual"]) - 0.5) > 0.01
        assert after["text"] == pytest.approx(before["text"])
        assert "attn audio" in summary_line(record)
    summary = ar.reallocator.monitor.summary()
    assert int(ar.reallocator.monitor.count.sum()) == entries
    for stage in ("before", "after"):
        np.testing.assert_allclose(
            totals[stage] / entries, list(summary[stage].values()), atol=1e-9
        )


def write_clips(folder: Path, names: list[str], suffix: str = ".mp4") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{n}{suffix}" for n in names]
    for i, path in enumerate(paths):
        write_clip(path, n_frames=4 + i, audio_seconds=0.3 + 0.1 * i)
    return paths


def test_clip_folders_subtitles_and_prompts(kit, tmp_path):
    """Recursive discovery by extension, hidden files left out, CSV then sidecar subtitles, the
    reasoning prompt beside the closed-set one, and the clear errors of bad folders."""
    root = tmp_path / "clips"
    write_clips(root, ["a"])
    write_clips(root / "sub", ["b"], suffix=".mkv")
    write_clips(root / "sub", ["c"], suffix=".avi")
    (root / "notes.txt").write_text("not a clip")
    (root / ".hidden.mp4").write_bytes(b"junk")
    (root / "sub" / "b.txt").write_text("  i said hello\n")
    (root / "a.txt").write_text("ignored: the csv has a")
    (tmp_path / "subs.csv").write_text("name,english\na,hello to you\nz,not a clip\n")
    assert sorted(find_clips(root, MEDIA.video_suffixes)) == ["a", "b", "c"]
    data = clips_module(kit, root, subtitle_csv=str(tmp_path / "subs.csv"))
    data.setup()
    dataset = data.datasets["test"]
    texts = {r.name: r.subtitle for r in dataset.records}
    assert texts == {"a": "hello to you", "b": "i said hello", "c": ""}
    assert data.subtitle_sources == {"a": "csv", "b": "sidecar", "c": "none"}
    assert all(r.label is None and r.subset is None for r in dataset.records)
    batch = data.collator([dataset[i] for i in range(3)])
    assert batch["frames"].shape == (3, 1, 3, 32, 32) and batch["audio"].shape[0] == 3
    assert batch["labels"].tolist() == [-1, -1, -1] and batch["subsets"] == [None] * 3
    assert batch["subtitles"] == ["hello to you", "i said hello", ""]
    reason = batch["reason_prompt"]
    assert reason["input_ids"].shape[0] == 3
    # Same media positions in both prompts, different instructions.
    assert (reason["modality_ids"] > 0).sum() == (batch["modality_ids"] > 0).sum()
    assert reason["input_ids"].shape != batch["input_ids"].shape or not torch.equal(
        reason["input_ids"], batch["input_ids"]
    )
    # A single file; a stem used twice; nothing to read.
    single = clips_module(kit, root / "sub" / "b.mkv")
    assert list(single.clip_paths) == ["b"] and single.root == root / "sub"
    write_clips(root / "other", ["b"])
    with pytest.raises(FormatError, match="two clips are named 'b'") as info:
        clips_module(kit, root).setup()
    assert info.value.field == "name" and "b.mkv" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .avi, .mkv, .mov, .mp4, .webm files"):
        clips_module(kit, tmp_path / "empty").setup()
    with pytest.raises(FileNotFoundError, match="neither a video file nor a folder"):
        clips_module(kit, tmp_path / "missing.mp4").setup()
    with pytest.raises(RuntimeError, match="predict only"):
        data.train_dataloader()


def test_undecodable_clips_raise_with_file_and_field_or_are_reported(kit, tmp_path, capsys):
    folder = tmp_path / "clips"
    write_clips(folder, ["good_0", "good_1"])
    junk = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    (folder / "broken.mp4").write_bytes(junk)
    module = tiny_module(kit)
    with pytest.raises(MediaDecodeError, match="broken.mp4: container: cannot open") as info:
        predict(module, clips_module(kit, folder), tmp_path / "out.jsonl")
    assert info.value.field == "container"

    records = predict(module, clips_module(kit, folder, on_error="skip"), tmp_path / "out.jsonl")
    assert [r["status"] for r in records] == ["ok", "ok", "skipped"]
    skipped = records[-1]
    assert skipped["name"] == "broken" and skipped["error"]["field"] == "container"
    assert skipped["error"]["file"].endswith("broken.mp4")
    out = capsys.readouterr().out
    assert "broken: SKIPPED (container: cannot open" in out
    assert "clips: 2 predicted, 1 skipped" in out

    # A stream truncated inside an intact container passes the header probe and stops the run
    # when decoded, naming the file and field (never skipped silently).
    whole = write_clip(tmp_path / "whole.mp4", n_frames=30, faststart=True).read_bytes()
    (folder / "broken.mp4").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MediaDecodeError, match="broken.mp4: video: truncated"):
        predict(module, clips_module(kit, folder, eval_batch_size=1), tmp_path / "out.jsonl")
    # `media_check: decode` finds it at setup, so `skip` reports it.
    data = clips_module(kit, folder, on_error="skip", media_check="decode")
    records = predict(module, data, tmp_path / "out.jsonl")
    assert records[-1]["error"]["field"] == "video" and len(records) == 3


def test_generation_writes_text_and_emotion_words(kit, tmp_path):
    write_clips(tmp_path / "clips", ["one", "two"])
    records = predict(
        tiny_module(kit),
        clips_module(kit, tmp_path / "clips"),
        tmp_path / "gen.jsonl",
        generate=True,
        max_new_tokens=6,
    )
    for record in records:
        check_record(record, MER2023.labels)
        assert isinstance(record["text"], str) and isinstance(record["emotion_words"], list)
        assert all(isinstance(w, str) for w in record["emotion_words"])


def test_predict_command_with_a_checkpoint_and_ar(workdir, capsys):
    """The documented command: a model trained on the tiny data (online encoders), then
    `predict --config ... --config conf/experiment/predict_clips.yaml --data.clips <folder>`;
    the training data module's streams, tokenizer and media settings carry over."""
    save_encoders(workdir / "encoders")
    write_mer2023(workdir / "mer2023_tiny", n_train=4, n_test=1)
    base = [
        "--config",
        str(TINY_CONFIG),
        "--data",
        str(CONF / "mer2023_tiny.yaml"),
        "--config",
        str(CONF / "online_encoders.yaml"),
    ]
    cli = main(["fit", *base, "--test_after_fit", "false", "--trainer.max_epochs", "1"])
    # Whichever checkpoint the training config keeps (the newest file).
    ckpt = str(max((workdir / "outputs").rglob("*.ckpt"), key=lambda p: p.stat().st_mtime))
    clips = workdir / "mine"
    write_clips(clips, ["first", "second"])
    (clips / "second.txt").write_text("i said hello")
    ar = "src.callbacks.attention_reallocation.AttentionReallocation"
    cli = main(
        [
            "predict",
            *base,
            "--config",
            str(PREDICT_CLIPS),
            "--ckpt_path",
            ckpt,
            "--data.clips",
            str(clips),
            f"--trainer.callbacks+={ar}",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    data = cli.datamodule
    assert isinstance(data, ClipsDataModule) and data.media.num_frames == 4
    assert [s.dim for s in data.streams] == [32, 32, 32]
    records = [
        json.loads(x)
        for x in (workdir / "predictions" / "clips.jsonl").read_text().split("\n")
        if x
    ]
    assert [r["name"] for r in records] == ["first", "second"]
    for record in records:
        check_record(record, MER2023.labels)
        assert record["attention"] is not None
    assert records[1]["subtitle_source"] == "sidecar"
    out = capsys.readouterr().out
    assert "first: " in out and "second: " in out and "clips: 2 predicted" in out
    # The checkpoint's trained weights were loaded (a fresh module would hold its own init).
    trained = torch.load(ckpt, weights_only=True)["state_dict"]
    key = next(k for k in trained if k.startswith("model.backbone.projectors."))
    torch.testing.assert_close(cli.model.state_dict()[key], trained[key])


def test_share_monitor_row_record():
    """Per-row sums add up to the per-layer sums, recording changes nothing else, and clips are
    read back from rows laid out sample-major (as label scoring repeats each prompt)."""
    gen = torch.Generator().manual_seed(0)
    plain, recording = ShareMonitor(2), ShareMonitor(2)
    recording.start_row_record()
    for layer in range(2):
        before = torch.rand(6, 2, 3, 3, generator=gen)
        after = torch.rand(6, 2, 3, 3, generator=gen)
        selected = torch.rand(6, 2, 3, generator=gen) > 0.3
        for monitor in (plain, recording):
            monitor.update(layer, before, after, selected)
    step = (torch.rand(2, 2, 1, 3, generator=gen), torch.rand(2, 2, 1, 3, generator=gen))
    recording.update(0, *step, torch.ones(2, 2, 1, dtype=torch.bool))
    plain.update(0, *step, torch.ones(2, 2, 1, dtype=torch.bool))
    torch.testing.assert_close(recording.state(), plain.state())
    rows = recording.take_row_record()
    assert set(rows) == {6, 2} and rows[6].shape == (6, 7)
    torch.testing.assert_close(rows[6].sum(0) + rows[2].sum(0), plain.state().sum(0))
    assert recording.take_row_record() == {}  # recording stopped
    shares = clip_attention_shares(rows, batch_size=2)
    first = rows[6][:3].sum(0) + rows[2][0]
    assert shares[0]["entries"] == int(first[-1])
    assert shares[0]["after"]["visual"] == pytest.approx(float(first[4] / first[-1]))
    with pytest.raises(ValueError, match="does not divide"):
        clip_attention_shares(rows, batch_size=4)


def test_conflict_definitions():
    uniform = torch.full((1, 4), 0.25)
    one_hot = torch.eye(4)
    assert float(js_divergence(uniform, uniform)) == pytest.approx(0.0, abs=1e-12)
    assert float(js_divergence(one_hot[:1], one_hot[1:2])) == pytest.approx(1.0)
    p, q = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.2, 0.5, 0.3]])
    assert float(js_divergence(p, q)) == pytest.approx(float(js_divergence(q, p)))
    fused = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.6, 0.3], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    audio = torch.tensor([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1], [0.6, 0.3, 0.1], [0.4, 0.35, 0.25]])
    visual = torch.tensor([[0.2, 0.7, 0.1], [0.2, 0.7, 0.1], [0.2, 0.7, 0.1], [0.45, 0.3, 0.25]])
    out = conflicts(fused, audio, visual)
    assert [c["fused_follows"] for c in out] == ["audio", "visual", "neither", "both"]
    assert [c["flag"] for c in out] == [True, True, True, False]
    strict = conflicts(fused, audio, visual, threshold=0.5)
    assert [c["flag"] for c in strict] == [False, False, False, False]
    assert strict[0]["fused_follows"] == "audio"  # still says where the fused answer went
    assert conflicts(fused, None, visual) == [None] * 4
