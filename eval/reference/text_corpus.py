"""Copy the real-English corpus of the real-text reference model into ``data-text/`` and cut its calibration split.

The corpus is the King James Bible (public domain; Project Gutenberg EBook #10900), one verse per line, one
document per chapter, documents separated by blank lines, split by book into ``train.txt`` / ``validation.txt`` /
``test.txt`` (see ``data-text/README.md``). ``calib.txt`` is 64 chapters of the train split taken at an even stride
(every ``len(train) // 64``-th chapter, from the first), so calibration sees every part of the train books.

Usage: ``python eval/reference/text_corpus.py --source DIR`` (``DIR`` holds the three split files).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: bitnet_convert
from bitnet_convert.io.data import load_texts

HERE = Path(__file__).resolve().parent
SPLITS = ("train", "validation", "test")
CALIB_DOCUMENTS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="directory with train/validation/test.txt")
    parser.add_argument("--out", type=Path, default=HERE / "data-text")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        source = args.source / f"{split}.txt"
        if not source.is_file():
            raise SystemExit(f"error: {source} does not exist; --source must hold {', '.join(SPLITS)} .txt files")
        shutil.copyfile(source, args.out / f"{split}.txt")
        (args.out / f"{split}.txt").chmod(0o644)
    train = load_texts(str(args.out / "train.txt"))  # documents separated by blank lines
    calib = train[:: max(1, len(train) // CALIB_DOCUMENTS)][:CALIB_DOCUMENTS]
    (args.out / "calib.txt").write_text("\n\n".join(calib) + "\n", encoding="utf-8")
    print(f"{len(train)} train documents; calib.txt: {len(calib)} of them; written to {args.out}")


if __name__ == "__main__":
    main()
