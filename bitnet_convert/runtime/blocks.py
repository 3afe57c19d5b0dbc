"""Block-by-block execution: decoder blocks one at a time on a device, over block inputs cached on the CPU.

Layer-by-layer calibration, QwT and block-wise recovery all walk the decoder the same way: the block inputs of
the calibration windows are kept on the CPU (``[windows, seq, hidden]`` fp32, or a list of such batches); one
block at a time is moved to the device (:meth:`BlockRunner.onload`), the inputs go through it one batch at a time
(:meth:`BlockRunner.run`), its outputs come back to the CPU and become the next block's inputs, and the block goes
back to the CPU without its unpacked-weight caches. Device memory is one block, its trainer's state where it
trains, and one batch of activations, whatever the depth.

A block runs on its own as transformers runs it inside the model: rotary position embeddings of positions
``0 … seq−1``, causal attention (SDPA's own mask when no mask is given).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from bitnet_convert.runtime import distributed
from bitnet_convert.runtime.memory import trim_heap
from bitnet_convert.runtime.modeling import build_layer  # noqa: F401  (block-by-block work imports it here)


def run_layer(layer: torch.nn.Module, hidden: torch.Tensor, rotary: torch.nn.Module) -> torch.Tensor:
    """One decoder layer on its own: ``hidden [batch, seq, d]`` at positions 0.., causal (SDPA's own mask)."""
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    cos_sin = rotary(hidden, positions.expand(hidden.shape[0], -1))
    return layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)


def release_caches(block: nn.Module) -> None:
    """Drop every unpacked-weight cache of ``block`` (4 bytes per weight in fp32, 16× the packed buffer), which
    would otherwise grow the memory with depth in a block-by-block pass."""
    for module in block.modules():
        if hasattr(module, "release_dense"):
            module.release_dense()


@contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The whole ``model`` on ``device`` for a whole-model pass (the fine-tune), then back on the CPU without its
    unpacked-weight caches; on the CPU nothing moves."""
    if device.type == "cpu":
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to("cpu")
        release_caches(model)


class BlockRunner:
    """Runs decoder blocks on ``device`` over block inputs kept on the CPU.

    ``rotary`` is the model's rotary embedding module (copied to the device, the model's own is left where it
    is). ``batch_size`` windows go to the device at a time (``None``: each given tensor at once)."""

    def __init__(self, rotary: nn.Module, device: torch.device | str = "cpu", batch_size: int | None = None) -> None:
        self.device = torch.device(device)
        self.rotary = rotary if self.device.type == "cpu" else copy.deepcopy(rotary).to(self.device)
        self.batch_size = batch_size

    @contextmanager
    def onload(self, block: nn.Module) -> Iterator[nn.Module]:
        """``block`` on the device for the duration; then back on the CPU, its unpacked-weight caches dropped."""
        block.to(self.device)
        try:
            yield block
        finally:
            block.to("cpu")
            release_caches(block)
            trim_heap()  # the block's temporaries, freed, back to the system: memory stays flat in depth

    def forward(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``block`` on ``hidden`` ``[batch, seq, d]`` (moved to the device), output on the device, with autograd
        as the caller has it (the training step's forward)."""
        return run_layer(block, hidden.to(self.device, non_blocking=True), self.rotary)

    @torch.no_grad()
    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``block`` on ``hidden`` ``[n, seq, d]`` (CPU), ``batch_size`` windows at a time; output on the CPU."""
        step = self.batch_size or max(1, hidden.shape[0])
        outputs = [self.forward(block, hidden[s : s + step]).to("cpu") for s in range(0, hidden.shape[0], step)]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


@torch.no_grad()
def decoder_pass(model: nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device | str = "cpu",
                 on_layer: Callable[[str], None] | None = None, batch: list[int] | None = None) -> None:
    """The token ids ``ids [n, seq]`` through the decoder blocks of the in-memory causal LM ``model``, one block at
    a time on ``device`` (every batch through block 0, then block 1, …), for the forward hooks attached to its
    modules; the final norm and the output layer do not run. Each block's unpacked weights are made once and
    dropped when it is done, so memory holds one block's, not the whole model's. Under ``torchrun`` a process runs
    the batches it owns; ``batch[0]`` is set to the index of the batch running. ``on_layer(label)`` after each
    block."""
    owned = distributed.owned_batches(ids.shape[0], batch_size)
    hidden = [model.model.embed_tokens(ids[rows]) for rows in owned.values()]
    runner = BlockRunner(model.model.rotary_emb, device)
    layers = model.model.layers
    for index, layer in enumerate(layers):
        with runner.onload(layer):
            for position, number in enumerate(owned):
                if batch is not None:
                    batch[0] = number
                hidden[position] = runner.run(layer, hidden[position])
        if on_layer is not None:
            on_layer(f"layer {index + 1}/{len(layers)}")
