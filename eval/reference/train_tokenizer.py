"""Train the reference model's byte-level BPE tokenizer on the train stream of the corpus.

Usage: ``python eval/reference/train_tokenizer.py`` saves the tokenizer files into ``model/`` beside this file;
``--train-file data-text/train.txt --validation-file data-text/validation.txt --out model-text`` trains the
real-text reference model's on a text file (documents separated by blank lines) instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import generate_documents

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: bitnet_convert
from bitnet_convert.io.data import load_texts

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, UNK, PAD]  # ids 0, 1, 2, 3


def train_tokenizer(docs: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE with ``vocab_size`` entries whose encoding starts with ``<s>`` when special tokens are on."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


def check_round_trip(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> None:
    """Raise if any document does not survive encode → decode, or does not start with ``<s>``."""
    for doc in docs:
        ids = tokenizer(doc)["input_ids"]
        if ids[0] != tokenizer.bos_token_id:
            raise AssertionError("encoding does not start with <s>")
        if tokenizer.decode(ids, skip_special_tokens=True) != doc:
            raise AssertionError(f"round trip failed for: {doc[:80]!r}")


def main() -> None:
    """Train on the first ``--n-docs`` train documents, check round trips on validation text, save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "model")
    parser.add_argument("--n-docs", type=int, default=20000)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-file", type=Path, help="a .txt file (documents separated by blank lines) to train "
                        "on instead of the generated corpus")
    parser.add_argument("--validation-file", type=Path, help="with --train-file: its held-out text, for the checks")
    args = parser.parse_args()
    if args.train_file is not None:
        if args.validation_file is None:
            parser.error("--train-file needs --validation-file")
        tokenizer = train_tokenizer(load_texts(str(args.train_file)), args.vocab_size)
        valid = load_texts(str(args.validation_file))
    else:
        tokenizer = train_tokenizer(generate_documents("train", args.n_docs, args.seed), args.vocab_size)
        valid = generate_documents("validation", 200, args.seed)
    check_round_trip(tokenizer, valid)
    n_tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in valid)
    n_words = sum(len(d.split()) for d in valid)
    tokenizer.save_pretrained(args.out)
    print(f"vocab {len(tokenizer)}; {n_tokens / n_words:.3f} tokens per word on validation; saved to {args.out}")


if __name__ == "__main__":
    main()
