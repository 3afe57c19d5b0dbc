"""Train a reference b1.58 model with quantization-aware training, deterministically, on CPU.

``--family bitnet`` (the default, ``model/``): ``transformers.BitNetForCausalLM`` in the shape of
bitnet-b1.58-2B-4T scaled down (relu² GLU, attention and FFN sub-norms, GQA, tied embeddings), saved like the public
"-bf16" release: bfloat16 master weights and a ``quantization_config`` that makes stock transformers load every
decoder linear as an online ``AutoBitLinear``.

``--family llama`` (``model-llama/``): ``LlamaForCausalLM`` (SwiGLU, no sub-norms, untied lm_head), saved like
Falcon3-*-1.58bit: packed uint8 ternary weights with ``weight_scale`` = 1/α (the ``bitlinear`` convention, no
``linear_class`` key), bfloat16 everything else, ``quant_method: bitnet`` with lm_head not converted.

``--family 1bitllm`` (``model-1bitllm/``): the 1bitLLM/bitnet_b1_58 graph (Llama with SiLU GLU plus the sub-norms
``self_attn.inner_attn_ln`` and ``mlp.ffn_layernorm``, untied lm_head), saved like those releases: float16 latent
masters, ``architectures: [BitnetForCausalLM]``, ``weight_bits: 1``, ``input_bits: 8`` and no
``quantization_config``.

In every family each decoder linear computes ``F.linear(Q_INT8(x), Q_w(W))`` with the b1.58 quantizers of
``bitnet_convert.quant.functional`` and a straight-through gradient (b1.58, arXiv 2402.17764); embeddings, norms and
lm_head stay full precision.

``--train-file data-text/train.txt`` (``model-text/``, with its own tokenizer): the ``bitnet`` family trained on
real English (the King James Bible, split by book) instead of the generated corpus.

Usage: ``python eval/reference/train.py [--family llama --out eval/reference/model-llama ...]`` (needs the
tokenizer in ``model/``; see README.md for the exact commands of the committed checkpoints).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoTokenizer,
    BitNetConfig,
    BitNetForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: bitnet_convert
sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import iter_documents
from evaluate_reference import DECODER_LINEARS, SEQ_LEN, pack, perplexity, read_documents, windows

from bitnet_convert.io.data import load_texts
from bitnet_convert.quant.functional import (
    int8_absmax,
    int8_absmax_ste,
    ternary_absmean,
    ternary_absmean_fake,
    ternary_absmean_ste,
)
from bitnet_convert.quant.packing import pack_ternary

HERE = Path(__file__).resolve().parent
QUANTIZATION_CONFIG = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
#: Falcon3-*-1.58bit style: packed, ``weight_scale`` = 1/α (transformers' default ``linear_class: bitlinear``)
PACKED_BITLINEAR_CONFIG = {"quant_method": "bitnet", "modules_to_not_convert": ["lm_head"]}
#: 1bitLLM's stored names of the two sub-norms (transformers' BitNet names them attn_sub_norm / ffn_sub_norm)
ONEBITLLM_NAMES = {"attn_sub_norm": "inner_attn_ln", "ffn_sub_norm": "ffn_layernorm"}


class BitLinearQAT(nn.Linear):
    """``nn.Linear`` computing ``F.linear(Q_INT8(x), Q_w(W))``: straight-through in training, exact in eval.

    In eval mode it matches transformers' online ``AutoBitLinear`` exactly.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return F.linear(int8_absmax_ste(x), ternary_absmean_ste(self.weight), self.bias)
        return F.linear(int8_absmax(x), ternary_absmean_fake(self.weight), self.bias)


def make_qat(model: nn.Module) -> int:
    """Swap every decoder linear of ``model`` for a :class:`BitLinearQAT` sharing its weight; return the count."""
    swaps = [
        (parent, child_name, child)
        for parent in model.modules()
        for child_name, child in parent.named_children()
        if child_name in DECODER_LINEARS and type(child) is nn.Linear
    ]
    for parent, child_name, child in swaps:
        qat = BitLinearQAT(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
        qat.weight = child.weight
        qat.bias = child.bias
        setattr(parent, child_name, qat)
    return len(swaps)


def make_config(tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace) -> PretrainedConfig:
    """The family's architecture scaled down; every linear's out_features is a multiple of 4 (2-bit packing)."""
    config_class = LlamaConfig if args.family == "llama" else BitNetConfig
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        hidden_act="relu2" if args.family == "bitnet" else "silu",
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=args.family == "bitnet",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    return config


def file_windows(tokenizer: PreTrainedTokenizerBase, path: Path, n_windows: int, seed: int
                 ) -> tuple[torch.Tensor, int]:
    """``n_windows`` full windows of the documents of the text file ``path`` (separated by blank lines), packed
    once; the windows of each pass over the file in an order drawn from a generator seeded by ``(seed, pass)``
    (the global RNG untouched). Returns the windows and the file's document count."""
    docs = load_texts(str(path))
    every = torch.stack(windows(pack(tokenizer, docs), tokenizer.bos_token_id, keep_partial=False))
    order: list[torch.Tensor] = []
    for epoch in range(-(-n_windows // len(every))):
        order.append(torch.randperm(len(every), generator=torch.Generator().manual_seed(seed * 1000 + epoch)))
    return every[torch.cat(order)[:n_windows]], len(docs)


def train_windows(tokenizer: PreTrainedTokenizerBase, n_windows: int, seed: int) -> tuple[torch.Tensor, int]:
    """The first ``n_windows`` full windows of the packed train stream, and how many documents they used."""
    docs, ids = iter_documents("train", seed), []
    n_docs, needed = 0, n_windows * (SEQ_LEN - 1)
    while len(ids) < needed:
        chunk = [next(docs) for _ in range(256)]
        ids += pack(tokenizer, chunk)
        n_docs += len(chunk)
    return torch.stack(windows(ids[:needed], tokenizer.bos_token_id, keep_partial=False)), n_docs


def learning_rate(step: int, total: int, warmup: int, peak: float, final_ratio: float) -> float:
    """Linear warm-up to ``peak``, then cosine decay to ``final_ratio · peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace) -> dict[str, float | int | str]:
    """Train, round the masters to bfloat16, measure validation perplexity, save; return the metrics."""
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    model_class = LlamaForCausalLM if args.family == "llama" else BitNetForCausalLM
    model = model_class(make_config(tokenizer, args))
    n_qat = make_qat(model)
    n_params = sum(p.numel() for p in model.parameters())
    if args.train_file is not None:
        data, n_docs = file_windows(tokenizer, args.train_file, args.steps * args.batch, args.seed)
    else:
        data, n_docs = train_windows(tokenizer, args.steps * args.batch, args.seed)
    print(f"{n_params:,} parameters, {n_qat} BitLinearQAT layers; {data.numel():,} train tokens from {n_docs} docs")

    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = max(1, int(args.warmup * args.steps))

    model.train()
    t0, tokens = time.perf_counter(), 0
    for step in range(args.steps):
        lr = learning_rate(step, args.steps, warmup, args.lr, args.final_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data[step * args.batch : (step + 1) * args.batch]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        tokens += batch.numel()
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - t0
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}  {tokens / elapsed:,.0f} tok/s  {elapsed:.0f}s")
    train_seconds = time.perf_counter() - t0

    validation = load_texts(str(args.validation)) if args.train_file is not None else read_documents(args.validation)
    val = windows(pack(tokenizer, validation), tokenizer.bos_token_id)
    ppl_fp32, n_val = perplexity(model, val)
    stored = torch.float16 if args.family == "1bitllm" else torch.bfloat16
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(stored).float())
    ppl_bf16, _ = perplexity(model, val)
    print(f"validation ppl: fp32 masters {ppl_fp32:.4f}, {stored} masters {ppl_bf16:.4f} ({n_val:,} tokens)")

    if args.family == "bitnet":
        model.to(torch.bfloat16)
        model.config.quantization_config = dict(QUANTIZATION_CONFIG)
        model.config.dtype = torch.bfloat16
        model.save_pretrained(args.out)
        (args.out / "model.safetensors").chmod(0o644)  # written through a private (0600) temporary file
    else:
        save_family(model, args)
    if args.out.resolve() != args.tokenizer.resolve():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(args.tokenizer / name, args.out / name)
    return {
        "parameters": n_params,
        "train_tokens": data.numel(),
        "train_documents": n_docs,
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": SEQ_LEN,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "validation_tokens": n_val,
        "validation_ppl_fp32": round(ppl_fp32, 4),
        f"validation_ppl_{'fp16' if args.family == '1bitllm' else 'bf16'}": round(ppl_bf16, 4),
    }


def save_family(model: torch.nn.Module, args: argparse.Namespace) -> None:
    """Write the ``llama`` (packed ``bitlinear``) or ``1bitllm`` (float16 latent masters) checkpoint layout."""
    args.out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    for key in ("transformers_version", "torch_dtype", "_name_or_path", "id2label", "label2id", "problem_type",
                "chunk_size_feed_forward", "is_encoder_decoder", "output_attentions", "output_hidden_states",
                "return_dict"):
        config.pop(key, None)
    rope = config.pop("rope_parameters")  # the releases' (pre-transformers-5) key, which transformers still reads
    config.update(rope_theta=rope["rope_theta"], rope_scaling=None)
    tensors = {}
    for name, tensor in model.state_dict().items():
        module = name.removesuffix(".weight")
        if args.family == "llama" and module.rsplit(".", 1)[-1] in DECODER_LINEARS:
            codes, alpha = ternary_absmean(tensor.float())
            tensors[name] = pack_ternary(codes)
            tensors[f"{module}.weight_scale"] = (1.0 / alpha).to(torch.bfloat16).reshape(1)
            continue
        if args.family == "1bitllm":
            for ours, theirs in ONEBITLLM_NAMES.items():
                name = name.replace(f".{ours}.", f".{theirs}.")
        tensors[name] = tensor.to(torch.bfloat16 if args.family == "llama" else torch.float16).contiguous()
    if args.family == "llama":
        config.update(architectures=["LlamaForCausalLM"], model_type="llama", dtype="bfloat16",
                      quantization_config=dict(PACKED_BITLINEAR_CONFIG))
    else:
        config.update(architectures=["BitnetForCausalLM"], model_type="llama", dtype="float16", weight_bits=1,
                      input_bits=8)
    save_file(tensors, args.out / "model.safetensors", metadata={"format": "pt"})
    (args.out / "model.safetensors").chmod(0o644)  # safetensors writes through a private (0600) temporary file
    (args.out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(args.out)


def main() -> None:
    """Parse the training options (defaults: the committed model), train, save, write the metrics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("bitnet", "llama", "1bitllm"), default="bitnet")
    parser.add_argument("--out", type=Path, default=HERE / "model")
    parser.add_argument("--tokenizer", type=Path, default=HERE / "model")
    parser.add_argument("--validation", type=Path, default=HERE / "data" / "validation.txt")
    parser.add_argument("--metrics", type=Path, default=HERE / "train_metrics.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-file", type=Path, help="train on this .txt file (documents separated by blank "
                        "lines; --validation then in the same format) instead of the generated corpus")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--final-lr-ratio", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=0.05, help="share of steps")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args()
    metrics = train(args)
    args.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
