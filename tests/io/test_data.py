"""Calibration / evaluation text sources (a ``.txt`` is text as written) and token windows."""

from __future__ import annotations

import json

import pytest
import torch

from bitnet_convert.errors import DataError
from bitnet_convert.io.data import load_texts, sample_windows, windows


def test_builtin_reference_splits_are_distinct():
    validation = load_texts("builtin:reference", "validation")
    test = load_texts("builtin:reference", "test")
    assert len(validation) > 100 and not set(validation) & set(test)
    with pytest.raises(DataError, match="no split 'train'"):
        load_texts("builtin:reference", "train")


def test_builtin_text_corpus_is_chapters_split_by_book():
    splits = {split: load_texts("builtin:reference-text", split) for split in ("train", "validation", "test", "calib")}
    assert [len(splits[s]) for s in ("train", "validation", "test", "calib")] == [934, 162, 93, 64]
    assert splits["train"][0].startswith("Genesis, chapter 1\n1:1 In the beginning God created")  # verses kept
    books = {split: {doc.split(", chapter")[0] for doc in docs} for split, docs in splits.items()}
    assert not books["train"] & books["validation"] and not books["train"] & books["test"]
    assert set(splits["calib"]) <= set(splits["train"])


def test_each_builtin_corpus_fits_its_own_builtin_model_only():
    from bitnet_convert import notes
    from bitnet_convert.io.checkpoint import BUILTIN_MODELS
    from bitnet_convert.io.data import warn_builtin_data

    synthetic, text = BUILTIN_MODELS["builtin:reference"], BUILTIN_MODELS["builtin:reference-text"]
    for model, data, warned in [(synthetic, "builtin:reference", False), (text, "builtin:reference-text", False),
                                (synthetic, "builtin:reference-text", True), (text, "builtin:reference", True)]:
        with notes.collect() as messages:
            warn_builtin_data(model, data, "calibration.data", "give your own text")
        assert bool(messages) is warned, (model, data)
        if warned:
            assert messages == [f"calibration.data is the built-in reference corpus ('{data}'), not text of the "
                                f"model '{model}'; give your own text"]


def test_txt_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\n\n  second doc  \n")
    assert load_texts(str(txt)) == ["first doc", "  second doc"]  # text as written, blank lines between documents
    assert load_texts(str(txt), txt_documents="lines") == ["first doc", "second doc"]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"body": "x y"}) + "\n\n" + json.dumps({"body": "z"}) + "\n")
    assert load_texts(str(jsonl), text_field="body") == ["x y", "z"]
    with pytest.raises(DataError, match=r"a\.jsonl:1: expected an object with a string field 'text'"):
        load_texts(str(jsonl))
    jsonl.write_text("{not json\n")
    with pytest.raises(DataError, match=r"a\.jsonl:1: not valid JSON"):
        load_texts(str(jsonl))


def test_missing_file_and_offline_dataset(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_texts(str(tmp_path / "none.txt"))
    with pytest.raises(DataError, match="could not be loaded as a hub dataset"):
        load_texts("someone/some-dataset-not-cached", "train")


def test_windows_and_seeded_sampling_leave_global_rng_alone():
    stream = torch.arange(103)
    assert windows(stream, 10).shape == (10, 10)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = sample_windows(stream, 4, 10, seed=3)
    b = sample_windows(stream, 4, 10, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, sample_windows(stream, 4, 10, seed=4))
    assert torch.equal(torch.get_rng_state(), state)
    assert (a[:, 1:] - a[:, :-1] == 1).all()  # windows are contiguous runs of the stream
    with pytest.raises(DataError, match="the data gives only 103 tokens; seq_len=200 needs at least 200"):
        windows(stream, 200)
    with_bos = windows(stream, 10, bos_id=-1)
    assert with_bos.shape == (11, 10) and (with_bos[:, 0] == -1).all()
    assert torch.equal(with_bos[:, 1:].flatten(), stream[:99])


def test_token_stream_ends_every_document_with_eos(reference_dir):
    from bitnet_convert.io.data import token_stream
    from bitnet_convert.io.load import load_tokenizer

    tokenizer = load_tokenizer(reference_dir)
    stream = token_stream(tokenizer, ["Anna is kind.", "Tom sleeps."])
    assert (stream == tokenizer.eos_token_id).sum().item() == 2 and stream[-1].item() == tokenizer.eos_token_id
    assert tokenizer.bos_token_id not in stream.tolist()


def test_txt_is_text_as_written(tmp_path):
    verse = "The sea is calm,\n  the moon is high.\n\n\nA second poem\nends here.\r\n \nLast."
    file = tmp_path / "verse.txt"
    file.write_bytes(verse.encode())
    assert load_texts(str(file)) == ["The sea is calm,\n  the moon is high.", "A second poem\nends here.", "Last."]
    assert load_texts(str(file), txt_documents="lines") == [
        "The sea is calm,", "the moon is high.", "A second poem", "ends here.", "Last."]
    file.write_bytes(b"\xef\xbb\xbfOne\rtwo\r\rThree")  # a byte-order mark and old Mac line ends
    assert load_texts(str(file)) == ["One\ntwo", "Three"]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "x"}\n')
    assert load_texts(str(jsonl)) == ["x"]
