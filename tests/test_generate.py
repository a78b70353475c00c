"""``model.generate`` through ``backend="hyper"``: the prefill runs ``hyper::attention`` approximately, every decode
step runs it exactly, and one graph per phase serves every token and every prompt length.

The model is a tiny random-weight Llama (no download). The forward is compiled with ``dynamic=True``, so the
prefill is one graph for any prompt length and the decode step one graph for any cache length (a single query is a
size-1 dimension, which Dynamo specialises: hence one graph per phase). The op decides exact or approximate from
the call's actual lengths at run time: a prompt above ``min_seq_len`` is approximated, a decode step (one query)
is exact.

To compare with eager greedy decoding (its tokens, and its logits at every step: a random model's greedy tokens
barely depend on attention, and a crude approximation keeps them), the approximation is made exact without making
its plan exact: with ``detector="lsh"`` the causal prefill is split into HyperAttention quadrants, each keeping its last
``local_window - 1`` keys exact, and a window longer than every prompt puts every key in that exact part. The
counters show the plan approximated (``op_hyper``). The default detector (``"topk"``) has no such setting (a plan
in which it selects every key is an exact plan), so its case checks the counters and the compiles, not the tokens.
"""

from __future__ import annotations

import pytest
import torch
import zoo
from torch._dynamo.utils import counters

transformers = pytest.importorskip("transformers")

LAYERS = 2
PROMPTS = ((192, 8), (160, 12))  # (prompt length, new tokens): the second run changes both
EXACT_PARTS = dict(detector="lsh", min_seq_len=64, block_size=32, sample_size=16, local_window=1 << 20)
TOPK = dict(min_seq_len=64, top_k=32, query_block=16, sample_size=16, local_window=16)


def generate(model, ids, new):
    """Greedy ``(tokens, logits [new, 1, vocab])``."""
    out = model.generate(ids, max_new_tokens=new, do_sample=False, return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits)


@pytest.fixture(scope="module")
def model_and_prompts():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    prompts = [(torch.randint(0, config.vocab_size, (1, n)), new) for n, new in PROMPTS]
    with torch.no_grad():
        eager = [generate(model, ids, new) for ids, new in prompts]
    return model, prompts, eager


@pytest.mark.parametrize(
    "options, inner, graphs, same_tokens",
    [
        # inductor returns the prefill's keys and values in the projection's layout; the first decode step appends
        # to that cache and every later step to the contiguous cache torch.cat made, a second decode graph
        # (backend="inductor" alone compiles the same three)
        pytest.param(EXACT_PARTS, "inductor", 3, True, id="exact-parts-inductor"),
        pytest.param(TOPK, "aot_eager", 2, False, id="topk-aot_eager"),
    ],
)
def test_generate(model_and_prompts, options, inner, graphs, same_tokens):
    model, prompts, eager = model_and_prompts
    with zoo.fresh_compiles():
        compiled = torch.compile(
            model.forward, backend="hyper", dynamic=True, options={**options, "inner_backend": inner, "tune_cache": ""}
        )
        model.forward = compiled
        try:
            for (ids, new), want in zip(prompts, eager):
                counters["hyper"].clear()
                with torch.no_grad():
                    got, logits = generate(model, ids, new)
                calls = counters["hyper"]
                assert calls["op_hyper"] == LAYERS, dict(calls)  # the prefill, approximated, one call per layer
                assert calls["op_exact"] == LAYERS * (new - 1), dict(calls)  # every decode step, exact
                assert got.shape == want[0].shape
                if same_tokens:
                    assert torch.equal(got, want[0]), (got[0, -new:].tolist(), want[0][0, -new:].tolist())
                    err, scale = (logits - want[1]).abs().max().item(), want[1].abs().max().item()
                    assert err <= 1e-4 * scale, f"logits differ from eager by {err:.3g} (largest {scale:.3g})"
                assert counters["stats"]["unique_graphs"] == graphs  # the same after more tokens, another length
                assert counters["hyper_backend"]["graphs"] == graphs  # every graph went through the backend
        finally:
            del model.forward  # the class's forward again
