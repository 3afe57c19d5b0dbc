"""Block-by-block execution (``runtime/blocks.py``): a decoder layer run on its own, or one read alone from the
checkpoint, gives the hidden states the whole model computes; the block pass runs every layer once per batch in
order and leaves no unpacked-weight cache behind."""

from __future__ import annotations

import pytest
import torch

from bitnet_convert.io.checkpoint import open_checkpoint
from bitnet_convert.quant.linear import QuantLinear
from bitnet_convert.quant.schemes import PRESETS
from bitnet_convert.runtime.blocks import BlockRunner, build_layer, decoder_pass
from bitnet_convert.runtime.modeling import build_model


@pytest.fixture(scope="module")
def a48_model(reference_dir):
    return build_model(open_checkpoint(reference_dir), PRESETS["a48"])


@pytest.fixture(scope="module")
def whole_model_states(a48_model, reference_ids):
    """The hidden states after each decoder layer but the last (the model's last entry has the final norm)."""
    with torch.no_grad():
        return a48_model(reference_ids, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("batch_size", [None, 1])
def test_blocks_one_at_a_time_give_the_whole_models_hidden_states(a48_model, reference_ids, whole_model_states,
                                                                  batch_size):
    runner = BlockRunner(a48_model.model.rotary_emb, "cpu", batch_size)
    hidden = whole_model_states[0]
    for index, layer in enumerate(a48_model.model.layers[:-1]):
        with runner.onload(layer):
            hidden = runner.run(layer, hidden)
        torch.testing.assert_close(hidden, whole_model_states[index + 1], rtol=1e-5, atol=1e-5)


def test_a_layer_read_alone_from_the_checkpoint_computes_the_models_layer(reference_dir, a48_model,
                                                                          whole_model_states):
    layer = build_layer(open_checkpoint(reference_dir), 1, PRESETS["a48"])
    runner = BlockRunner(a48_model.model.rotary_emb)
    expected = runner.run(a48_model.model.layers[1], whole_model_states[1])
    assert torch.equal(runner.run(layer, whole_model_states[1]), expected)
    assert not any(p.requires_grad for p in layer.parameters()) and not layer.training


def test_decoder_pass_runs_each_layer_once_per_batch_in_order_and_drops_the_caches(a48_model, reference_ids):
    calls, labels, batches = [], [], [0]
    hooks = [layer.register_forward_hook(lambda _m, _i, out, index=index: calls.append((index, batches[0])))
             for index, layer in enumerate(a48_model.model.layers)]
    try:
        decoder_pass(a48_model, reference_ids, batch_size=1, on_layer=labels.append, batch=batches)
    finally:
        for hook in hooks:
            hook.remove()
    depth = len(a48_model.model.layers)
    assert calls == [(layer, batch) for layer in range(depth) for batch in range(reference_ids.shape[0])]
    assert labels == [f"layer {i + 1}/{depth}" for i in range(depth)]
    assert all(m._dense is None for m in a48_model.modules() if isinstance(m, QuantLinear))
