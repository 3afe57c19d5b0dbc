"""Perplexity of the reference model on ``data/validation.txt``, next to a unigram baseline on the same tokens.

Text is packed the same way for training and evaluation: documents joined with ``</s>`` after each one, cut
into non-overlapping windows of ``seq_len − 1`` tokens, each window preceded by ``<s>``; every token after
``<s>`` is predicted. The unigram baseline counts the tokens of the train stream packed the same way, with
add-one smoothing. ``--probes N`` also scores N multiple-choice probes of each kind (see ``corpus.py``).

Usage: ``python eval/reference/evaluate_reference.py`` loads ``model/`` with stock transformers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations.bitnet import AutoBitLinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import PROBE_KINDS, Probe, generate_documents, generate_probes

HERE = Path(__file__).resolve().parent
SEQ_LEN = 256
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def read_documents(path: Path) -> list[str]:
    """One document per non-empty line."""
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pack(tokenizer: PreTrainedTokenizerBase, docs: list[str]) -> list[int]:
    """Token ids of ``docs`` concatenated, ``</s>`` after each document."""
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return ids


def windows(ids: list[int], bos_id: int, seq_len: int = SEQ_LEN, keep_partial: bool = True) -> list[torch.Tensor]:
    """Non-overlapping ``<s>``-prefixed windows of at most ``seq_len`` tokens (the last one may be shorter)."""
    step = seq_len - 1
    out = [torch.tensor([bos_id, *ids[i : i + step]]) for i in range(0, len(ids), step)]
    if out and (len(out[-1]) < 2 or (len(out[-1]) < seq_len and not keep_partial)):
        out.pop()
    return out


@torch.no_grad()
def perplexity(model: PreTrainedModel, wins: list[torch.Tensor], batch_size: int = 16) -> tuple[float, int]:
    """Token-level perplexity over every position after ``<s>``; returns ``(ppl, n_predicted_tokens)``."""
    model.eval()
    total, count = 0.0, 0
    full = [w for w in wins if len(w) == len(wins[0])]
    rest = [w.unsqueeze(0) for w in wins[len(full) :]]
    batches = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)] + rest
    for batch in batches:
        logits = model(input_ids=batch).logits.float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count), count


def unigram_perplexity(train_ids: list[int], wins: list[torch.Tensor], vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model estimated on ``train_ids``, over the same targets."""
    counts = torch.bincount(torch.tensor(train_ids), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    targets = torch.cat([w[1:] for w in wins])
    return math.exp(-logp[targets].mean().item())


@torch.no_grad()
def probe_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, probes: list[Probe]) -> float:
    """Share of probes whose right choice has the highest summed log-likelihood after ``<s> context``."""
    model.eval()
    right = 0
    for probe in probes:
        context = [tokenizer.bos_token_id, *tokenizer(probe.context, add_special_tokens=False)["input_ids"]]
        choices = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in probe.choices]
        width = len(context) + max(len(c) for c in choices)
        batch = torch.full((len(choices), width), tokenizer.pad_token_id)
        for row, choice in enumerate(choices):
            batch[row, : len(context) + len(choice)] = torch.tensor(context + choice)
        logp = model(input_ids=batch).logits.float().log_softmax(-1)
        scores = [
            logp[row, len(context) - 1 + torch.arange(len(choice)), torch.tensor(choice)].sum().item()
            for row, choice in enumerate(choices)
        ]
        right += max(range(len(scores)), key=scores.__getitem__) == probe.label
    return right / len(probes)


def check_autobitlinear(model: PreTrainedModel) -> int:
    """Raise unless every decoder linear loaded as an online ``AutoBitLinear``; return how many there are."""
    found = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in DECODER_LINEARS:
            if not (isinstance(module, AutoBitLinear) and module.online_quant):
                raise TypeError(f"{name} is {type(module).__name__}, expected an online AutoBitLinear")
            found += 1
    if isinstance(model.lm_head, AutoBitLinear):
        raise TypeError("lm_head must stay a plain nn.Linear")
    return found


def main() -> None:
    """Load the saved model with stock transformers and report validation and unigram perplexity."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=HERE / "model")
    parser.add_argument("--data", type=Path, default=HERE / "data" / "validation.txt")
    parser.add_argument("--unigram-docs", type=int, default=20000, help="train documents for the unigram counts")
    parser.add_argument("--probes", type=int, default=0, help="also score this many validation probes per kind")
    parser.add_argument("--metrics", type=Path, default=HERE / "train_metrics.json", help="compare with this")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    n_linears = check_autobitlinear(model)
    wins = windows(pack(tokenizer, read_documents(args.data)), tokenizer.bos_token_id)
    ppl, n_tokens = perplexity(model, wins)
    train_ids = pack(tokenizer, generate_documents("train", args.unigram_docs))
    result = {
        "validation_ppl": round(ppl, 4),
        "unigram_ppl": round(unigram_perplexity(train_ids, wins, len(tokenizer)), 4),
        "validation_tokens": n_tokens,
        "autobitlinear_layers": n_linears,
    }
    if args.probes:
        for kind in PROBE_KINDS:
            probes = generate_probes("validation", kind, args.probes)
            result[f"probe_accuracy_{kind}"] = round(probe_accuracy(model, tokenizer, probes), 3)
    if args.metrics.is_file():
        trained = json.loads(args.metrics.read_text())["validation_ppl_bf16"]
        result["train_script_ppl"] = trained
        result["relative_difference"] = round(abs(ppl - trained) / trained, 6)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
