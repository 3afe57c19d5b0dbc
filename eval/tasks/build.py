"""Write the offline lm-eval data of the reference tasks from the reference corpus generator.

``data/reference_ppl.jsonl``: the documents of ``eval/reference/data/test.txt`` (``{"text"}``), scored with
``loglikelihood_rolling``. ``data/reference_agreement.jsonl``: subject–verb agreement items from the *test*
probe stream and ``data/reference_wordclass.jsonl``: word-class items from the *test* word-class probe
stream (both ``{"context", "choices", "label"}``), scored as multiple choice. ``data/reference_text_ppl.jsonl``:
the chapters of ``eval/reference/data-text/test.txt`` (the real-text model's test split, one chapter per
blank-line-separated paragraph), scored with ``loglikelihood_rolling``.

Usage: ``python eval/tasks/build.py`` (deterministic; the committed files are its output).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "reference"))
from corpus import generate_probes, generate_wordclass_probes  # noqa: E402


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "data")
    parser.add_argument("--ppl-docs", type=int, default=100)
    parser.add_argument("--agreement-items", type=int, default=300)
    parser.add_argument("--wordclass-items", type=int, default=300)
    args = parser.parse_args()
    docs = (HERE.parent / "reference" / "data" / "test.txt").read_text(encoding="utf-8").splitlines()
    write_jsonl(args.out / "reference_ppl.jsonl", [{"text": d} for d in docs[: args.ppl_docs] if d.strip()])
    chapters = (HERE.parent / "reference" / "data-text" / "test.txt").read_text(encoding="utf-8").split("\n\n")
    write_jsonl(args.out / "reference_text_ppl.jsonl", [{"text": c.strip("\n")} for c in chapters if c.strip()])
    for name, probes in (
        ("agreement", generate_probes("test", "agreement", args.agreement_items)),
        ("wordclass", generate_wordclass_probes("test", args.wordclass_items)),
    ):
        items = [{"context": p.context, "choices": list(p.choices), "label": p.label} for p in probes]
        write_jsonl(args.out / f"reference_{name}.jsonl", items)


if __name__ == "__main__":
    main()
