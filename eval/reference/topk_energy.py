"""The share of each o_proj input's energy that a4.8's top-50% drops, per decoder layer, on held-out text.

For every converted or b1.58 model given: the validation split of ``--data``, the first ``--windows`` windows of
256 tokens (each starting with BOS), and for each layer ``Σ x² over the dropped entries / Σ x²`` of the o_proj input
(after the attention sub-norm, before its quantizer) under the a4.8 top-K (``topk_mask`` at 0.5). This is the
measurement behind docs/recovery.md "Recovery on real text": a real-text model's first attention output is denser
than the synthetic model's, and a plain straight-through top-K gradient makes a fine-tune spread it further.

Usage::

    python eval/reference/topk_energy.py out/a48-kd-text --data builtin:reference-text
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bitnet_convert.io.data import load_texts, token_stream
from bitnet_convert.io.load import load, load_tokenizer
from bitnet_convert.quant.functional import topk_mask

SEQ_LEN = 256


def dropped_energy(path: str, data: str, windows: int, ratio: float = 0.5) -> list[float]:
    """Per layer, the share of the o_proj input's energy outside the top-``ratio`` entries of each token."""
    model, tokenizer = load(path), load_tokenizer(path)
    body = SEQ_LEN - 1
    ids = token_stream(tokenizer, load_texts(data, "validation"))[: windows * body].reshape(windows, body)
    ids = torch.cat([torch.full((windows, 1), tokenizer.bos_token_id), ids], dim=1)
    shares: dict[int, float] = {}

    def hook(index: int):
        def record(_module, inputs):
            x = inputs[0].float()
            dropped = x.masked_fill(topk_mask(x, ratio), 0.0)
            shares[index] = float(dropped.pow(2).sum() / x.pow(2).sum())
        return record

    for index, layer in enumerate(model.model.layers):
        layer.self_attn.o_proj.register_forward_pre_hook(hook(index))
    with torch.no_grad():
        model(ids)
    return [shares[i] for i in range(len(shares))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", default="builtin:reference-text")
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args()
    for path in args.models:
        shares = dropped_energy(path, args.data, args.windows)
        print(f"{path}: " + ", ".join(f"layer {i} {s:.1%}" for i, s in enumerate(shares)))


if __name__ == "__main__":
    main()
