"""Text for calibration and evaluation: the built-in reference corpus, local files, Hugging Face datasets."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import torch

from bitnet_convert.errors import DataError
from bitnet_convert.io.checkpoint import REPO_ROOT, shares_tokenizer
from bitnet_convert.notes import warn

BUILTIN_DATA = {"builtin:reference": REPO_ROOT / "eval" / "reference" / "data",
                "builtin:reference-text": REPO_ROOT / "eval" / "reference" / "data-text"}
#: How each built-in corpus cuts its files into documents. Each is named after the built-in model
#: (:data:`~bitnet_convert.io.checkpoint.BUILTIN_MODELS`) whose tokenizer it fits.
BUILTIN_DOCUMENTS = {"builtin:reference": "lines", "builtin:reference-text": "paragraphs"}
#: How a ``.txt`` file is cut into documents: ``paragraphs`` (the default: text as written, newlines kept,
#: documents separated by blank lines) or ``lines`` (one document per non-empty line).
TxtDocuments = Literal["paragraphs", "lines"]
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")


def load_texts(source: str, split: str = "validation", text_field: str = "text",
               txt_documents: TxtDocuments = "paragraphs") -> list[str]:
    """Documents from ``source``.

    ``builtin:reference`` (the generated corpus; splits ``calib``, ``validation``, ``test``; one document per line),
    ``builtin:reference-text`` (the King James Bible; splits ``calib``, ``train``, ``validation``, ``test``; one
    document per chapter, separated by blank lines), a ``.txt`` file
    (``txt_documents``: ``paragraphs`` — text as written, newlines kept, documents separated by blank lines — or
    ``lines``, one document per non-empty line), a ``.jsonl`` file (``text_field`` of each record, as written), or
    a hub dataset id (``split``). Raises :class:`DataError` naming the file for unreadable input.
    """
    if source in BUILTIN_DATA:
        file = BUILTIN_DATA[source] / f"{split}.txt"
        if not file.is_file():
            splits = sorted(p.stem for p in BUILTIN_DATA[source].glob("*.txt"))
            raise DataError(f"{source}: no split '{split}' (available: {', '.join(splits) or 'none'})")
        return _txt(file, BUILTIN_DOCUMENTS[source])
    path = Path(source).expanduser()
    if path.suffix in (".txt", ".jsonl") or path.exists():
        if path.is_dir():
            raise DataError(f"data file '{source}' is a directory; expected a .txt or .jsonl file")
        if not path.is_file():
            raise DataError(f"data file '{source}' does not exist")
        if path.suffix == ".jsonl":
            return _jsonl(path, text_field)
        if path.suffix == ".txt":
            return _txt(path, txt_documents)
        raise DataError(f"data file '{source}': expected a .txt or .jsonl file")
    return _hub_dataset(source, split, text_field)


def read_text(file: Path) -> str:
    """A file's UTF-8 text (one reader for every text format); :class:`DataError` naming the file and the byte
    offset when it is not UTF-8 text (a binary file included)."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise DataError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")  # a leading byte-order mark is not text
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if "\x00" in text:
        raise DataError(f"{file}: not UTF-8 text (a NUL byte at byte {data.index(0)}; a binary file?)")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # Windows and old Mac line ends


def _txt(file: Path, documents: TxtDocuments) -> list[str]:
    text = read_text(file)
    if documents == "lines":
        docs = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        docs = [doc.lstrip("\n").rstrip() for doc in _BLANK_LINES.split(text) if doc.strip()]
    if not docs:
        raise DataError(f"{file}: no text")
    return docs


def _jsonl(file: Path, field: str) -> list[str]:
    docs = []
    for number, line in enumerate(read_text(file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataError(f"{file}:{number}: expected an object with a string field '{field}'")
        if record[field].strip():
            docs.append(record[field])
    if not docs:
        raise DataError(f"{file}: no records with a non-empty '{field}' field")
    return docs


def _hub_dataset(name: str, split: str, field: str) -> list[str]:
    try:
        import datasets

        config, _, rest = name.partition(":")
        dataset = datasets.load_dataset(config, rest or None, split=split)
    except Exception as exc:  # datasets raises many types; all mean "could not load"
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise DataError(f"calibration data '{name}' is not a local .txt/.jsonl file and could not be loaded "
                        f"as a hub dataset: {first}") from None
    if field not in dataset.column_names:
        raise DataError(f"dataset '{name}' has no column '{field}' (columns: {', '.join(dataset.column_names)})")
    return [t for t in dataset[field] if t and t.strip()]


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents tokenized without special tokens and concatenated, each followed by EOS (when the
    tokenizer has one) — the packing BitNet-style pre-training uses."""
    ids: list[int] = []
    # verbose=False: long documents are cut into windows later, so "longer than the maximum" does not apply
    for encoded in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(encoded)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def checked_token_stream(checkpoint, tokenizer, data: str, split: str, text_field: str,
                         txt_documents: str = "paragraphs") -> torch.Tensor:
    """The token stream of a text source (:func:`token_stream`), checked against ``checkpoint``'s vocabulary:
    :class:`DataError` when the tokenizer produces an id the model does not have."""
    stream = token_stream(tokenizer, load_texts(data, split, text_field, txt_documents))
    vocab = checkpoint.config.get("vocab_size")
    if vocab is not None and stream.numel() and int(stream.max()) >= vocab:
        raise DataError(f"{checkpoint.path}: the tokenizer produces id {int(stream.max())} but the model's "
                        f"vocab_size is {vocab}; the tokenizer does not belong to this model")
    return stream


def describe_source(setting: str, data: str, split: str) -> str:
    """How an error or warning names a text source: the setting that chose it, the source, and its split (only a
    source with splits has one)."""
    return f"{setting} '{data}'" + (f" (split {split})" if data in BUILTIN_DATA else "")


def warn_builtin_data(model: Path, data: str, setting: str, hint: str) -> None:
    """One warning line when ``setting`` uses a built-in corpus on a model it was not made for (decided by the
    tokenizer: that of the built-in model the corpus is named after,
    :func:`~bitnet_convert.io.checkpoint.shares_tokenizer`); ``hint`` says what to give instead."""
    if data in BUILTIN_DATA and not shares_tokenizer(model, data):
        warn(f"{setting} is the built-in reference corpus ('{data}'), not text of the model '{model}'; {hint}")


def warn_positions(config: dict, seq_len: int, given: str, consequence: str = "") -> None:
    """One warning line when windows of ``seq_len`` tokens (``given``: the setting as the user wrote it) run past
    the model's ``max_position_embeddings``."""
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and seq_len > positions:
        warn(f"{given} is longer than the model's max_position_embeddings ({positions}): positions beyond it were "
             f"never trained{consequence}")


def warn_no_bos(tokenizer, model: Path, consequence: str) -> None:
    """One warning line when the tokenizer has no BOS token, so :func:`windows` cannot start windows with it."""
    if tokenizer.bos_token_id is None:
        warn(f"the tokenizer of {model} has no BOS token: {consequence}")


def windows(stream: torch.Tensor, seq_len: int, bos_id: int | None = None, source: str = "the data",
            setting: str = "seq_len") -> torch.Tensor:
    """Non-overlapping windows ``[n, seq_len]`` of a token stream, the ragged tail dropped. With ``bos_id``
    every window is BOS followed by the next ``seq_len − 1`` tokens of the stream. Too short a stream is a
    :class:`DataError` naming ``source`` (the data) and ``setting`` (the knob that sets ``seq_len``)."""
    body = seq_len - (bos_id is not None)
    n = stream.numel() // body if body > 0 else 0
    if n == 0:
        raise DataError(f"{source} gives only {stream.numel()} tokens; {setting}={seq_len} needs at least {body}: "
                        f"give more text or lower {setting}")
    chunks = stream[: n * body].view(n, body)
    if bos_id is None:
        return chunks
    return torch.cat([torch.full((n, 1), bos_id, dtype=stream.dtype), chunks], dim=1)


def sample_windows(
    stream: torch.Tensor, samples: int, seq_len: int, seed: int, bos_id: int | None = None,
    source: str = "the data", setting: str = "seq_len",
) -> torch.Tensor:
    """``samples`` windows drawn without replacement with a private generator (the global RNG is untouched);
    fewer when the stream holds fewer."""
    all_windows = windows(stream, seq_len, bos_id, source, setting)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(all_windows.shape[0], generator=generator)[:samples]
    return all_windows[order.sort().values]
