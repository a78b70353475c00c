"""A zoo of attention layers written the ways real models write them, plus tiny HF transformers models.

Each hand-written layer maps ``x [B, N, C]`` to ``[B, N, C]`` through q/k/v projections, one attention and an
output projection. ``EXPECT`` says what the backend must do with each: ``"hyper"`` (the site is lowered) or
``"exact"`` (it must stay exact), and the kind it reports.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


@contextlib.contextmanager
def fresh_compiles():
    """No Dynamo state and no inductor FX-graph / AOTAutograd cache hits: every compile happens (and is counted)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield


class _Layer(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, causal: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.causal = heads, dim // heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v  # [B, H, N, D] each

    def merge(self, o):
        B, H, N, D = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, N, H * D))

    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(self.attend(q, k, v))


class MatmulMulScale(_Layer):
    """``softmax(q @ kᵀ * s) @ v``."""

    def attend(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * (self.head_dim**-0.5), dim=-1) @ v


class MatmulDivScale(_Layer):
    """``softmax(q @ kᵀ / sqrt(d)) @ v`` with ``torch.matmul`` and ``F.softmax``."""

    def attend(self, q, k, v):
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        return torch.matmul(F.softmax(scores, dim=-1), v)


class ScaleQueryFirst(_Layer):
    """The scale applied to q before the product, ``Tensor.softmax`` method."""

    def attend(self, q, k, v):
        q = q * self.head_dim**-0.5
        return (q @ k.transpose(-1, -2)).softmax(dim=-1) @ v


class Baddbmm(_Layer):
    """Old GPT-NeoX style: 3-D ``baddbmm`` with alpha, then ``bmm``."""

    def attend(self, q, k, v):
        B, H, N, D = q.shape
        q3, k3, v3 = q.reshape(B * H, N, D), k.reshape(B * H, N, D), v.reshape(B * H, N, D)
        zeros = torch.zeros(B * H, N, N, dtype=q.dtype, device=q.device)
        scores = torch.baddbmm(zeros, q3, k3.transpose(1, 2), beta=1.0, alpha=1.0 / math.sqrt(D))
        return torch.bmm(torch.softmax(scores, dim=-1), v3).view(B, H, N, D)


class Fp32Softmax(_Layer):
    """HF Llama style upcast: ``softmax(scores, dtype=float32).to(q.dtype)`` (run it in bf16)."""

    def attend(self, q, k, v):
        scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim**-0.5
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)


class AdditiveCausal(_Layer):
    """An additive causal mask built in forward: ``triu(full(-inf), 1)``."""

    def attend(self, q, k, v):
        n = q.shape[-2]
        mask = torch.triu(torch.full((n, n), float("-inf"), device=q.device), diagonal=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim) + mask
        return torch.softmax(scores, dim=-1) @ v


class MaskedFillCausal(_Layer):
    """``masked_fill(triu(ones, 1).bool(), -inf)``."""

    def attend(self, q, k, v):
        n = q.shape[-2]
        scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5
        upper = torch.ones(n, n, device=q.device).triu(1).bool()
        scores = scores.masked_fill(upper, float("-inf"))
        return scores.softmax(-1) @ v


class BufferCausal(_Layer):
    """GPT-2 style: a causal buffer sliced to the length, ``where(mask, scores, finfo.min)``."""

    def __init__(self, dim: int = 64, heads: int = 4, max_positions: int = 1024):
        super().__init__(dim, heads)
        bias = torch.tril(torch.ones(max_positions, max_positions, dtype=torch.bool))
        self.register_buffer("bias", bias.view(1, 1, max_positions, max_positions), persistent=False)

    def attend(self, q, k, v):
        nq, nk = q.shape[-2], k.shape[-2]
        w = torch.matmul(q, k.transpose(-1, -2)) / torch.full([], v.size(-1) ** 0.5, dtype=q.dtype, device=q.device)
        causal = self.bias[:, :, nk - nq : nk, :nk]
        fill = torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device)
        w = torch.where(causal, w.to(w.dtype), fill)
        w = nn.functional.softmax(w, dim=-1).type(v.dtype)
        return torch.matmul(w, v)


class DropoutAttention(_Layer):
    """Attention-probability dropout: a no-op in eval mode (or with p=0)."""

    def __init__(self, dim: int = 64, heads: int = 4, p: float = 0.1):
        super().__init__(dim, heads)
        self.drop = nn.Dropout(p)

    def attend(self, q, k, v):
        probs = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim**-0.5, dim=-1)
        return self.drop(probs) @ v


# ----------------------------------------------------------------------------------------------------------
# negative cases: these must stay exact
# ----------------------------------------------------------------------------------------------------------


class GeneralMask(_Layer):
    """An arbitrary additive mask given as an input."""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5 + mask
        return self.merge(torch.softmax(scores, dim=-1) @ v)


class ScoresReused(_Layer):
    """The scores are used again after the softmax (an auxiliary term)."""

    def attend(self, q, k, v):
        scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5
        out = torch.softmax(scores, dim=-1) @ v
        return out + scores.mean(-1, keepdim=True)


class SoftmaxOverQueries(_Layer):
    """Softmax over the query dimension (dim -2): not attention over keys."""

    def attend(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * self.head_dim**-0.5, dim=-2) @ v


class SlidingWindow(_Layer):
    """A causal sliding-window mask: causal only while n <= window, so it must never be treated as causal."""

    def __init__(self, dim: int = 64, heads: int = 4, window: int = 48):
        super().__init__(dim, heads)
        self.window = window

    def attend(self, q, k, v):
        n = q.shape[-2]
        i = torch.arange(n, device=q.device)
        keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)
        scores = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).masked_fill(~keep, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


class Stack(nn.Module):
    """``depth`` layers of one kind with residuals: sites are numbered 0 .. depth-1."""

    def __init__(self, layer_cls, depth: int = 2, **kw):
        super().__init__()
        self.layers = nn.ModuleList(layer_cls(**kw) for _ in range(depth))

    def forward(self, x, *extra):
        for layer in self.layers:
            x = x + layer(x, *extra)
        return x


HANDWRITTEN = {
    MatmulMulScale: (False, torch.float32),
    MatmulDivScale: (False, torch.float32),
    ScaleQueryFirst: (False, torch.float32),
    Baddbmm: (False, torch.float32),
    Fp32Softmax: (False, torch.bfloat16),
    AdditiveCausal: (True, torch.float32),
    MaskedFillCausal: (True, torch.float32),
    BufferCausal: (True, torch.float32),
    DropoutAttention: (False, torch.float32),
}
"""Positive layers: ``cls -> (causal, dtype to test in)``."""

NEGATIVE = (ScoresReused, SoftmaxOverQueries, SlidingWindow)
"""Layers with one attention-like site that must stay exact (`GeneralMask` takes an extra input)."""


# ----------------------------------------------------------------------------------------------------------
# tiny HF transformers models (random weights, built from configs: no downloads)
# ----------------------------------------------------------------------------------------------------------


def _tiny(layers=2, **kw):
    base = dict(
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=2048,
        attention_dropout=0.0,
    )
    base.update(kw)
    return base


def hf_model(name: str, attn: str = "sdpa", layers: int = 2):
    """``(model, make_inputs(n, batch) -> kwargs, attention sites)`` for a tiny HF model in eval mode.

    Every dropout probability is 0, so train mode computes what eval mode does (a training step can be
    compared with eager, and SDPA sites see ``dropout_p=0``).
    """
    import transformers as T

    torch.manual_seed(0)
    ids = lambda n, b: {"input_ids": torch.randint(0, 128, (b, n))}  # noqa: E731
    if name == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(**_tiny(layers, num_key_value_heads=2), attn_implementation=attn))
        return m.eval(), ids, layers
    if name == "mistral":
        m = T.MistralForCausalLM(
            T.MistralConfig(**_tiny(layers, num_key_value_heads=2, sliding_window=None), attn_implementation=attn)
        )
        return m.eval(), ids, layers
    if name == "gemma3":  # sliding-window layers (window 16) between global ones: sites 0, 2 band, 1, 3 causal
        cfg = T.Gemma3TextConfig(
            **_tiny(
                layers,
                num_key_value_heads=1,
                head_dim=16,
                sliding_window=16,
                layer_types=["sliding_attention", "full_attention"] * (layers // 2),
            ),
            attn_implementation=attn,
        )
        return T.Gemma3ForCausalLM(cfg).eval(), ids, layers
    if name == "mistral_window":  # every layer a sliding window of 16 keys
        m = T.MistralForCausalLM(
            T.MistralConfig(**_tiny(layers, num_key_value_heads=2, sliding_window=16), attn_implementation=attn)
        )
        return m.eval(), ids, layers
    if name == "qwen2":
        m = T.Qwen2ForCausalLM(T.Qwen2Config(**_tiny(layers, num_key_value_heads=2), attn_implementation=attn))
        return m.eval(), ids, layers
    if name == "gpt2":
        m = T.GPT2LMHeadModel(
            T.GPT2Config(
                n_embd=64,
                n_layer=2,
                n_head=4,
                vocab_size=128,
                n_positions=2048,
                attn_pdrop=0.0,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                bos_token_id=0,
                eos_token_id=0,
                attn_implementation=attn,
            )
        )
        return m.eval(), ids, 2
    if name == "gpt_neox":
        m = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**_tiny(layers, hidden_dropout=0.0), attn_implementation=attn))
        return m.eval(), ids, layers
    if name == "phi":
        m = T.PhiForCausalLM(T.PhiConfig(**_tiny(layers, resid_pdrop=0.0, embd_pdrop=0.0), attn_implementation=attn))
        return m.eval(), ids, layers
    if name == "bert":
        m = T.BertModel(
            T.BertConfig(**_tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), attn_implementation=attn),
            add_pooling_layer=False,
        )

        def padded(n, b):
            mask = torch.ones(b, n, dtype=torch.long)
            mask[-1, n - n // 4 :] = 0  # the last sequence is padded
            return {"input_ids": torch.randint(0, 128, (b, n)), "attention_mask": mask}

        return m.eval(), padded, 2
    if name == "vit":
        cfg = T.ViTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=64,
            patch_size=4,
            num_channels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            attn_implementation=attn,
        )
        m = T.ViTModel(cfg, add_pooling_layer=False)

        def images(n, b):  # n is ignored: the sequence is (64/4)^2 + 1 = 257 tokens
            return {"pixel_values": torch.randn(b, 3, 64, 64)}

        return m.eval(), images, 2
    if name == "bart":
        cfg = T.BartConfig(
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            vocab_size=128,
            max_position_embeddings=2048,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            attn_implementation=attn,
        )
        m = T.BartModel(cfg)

        def seq2seq(n, b):  # decoder length n // 4: cross-attention has n_q != n_k
            return {"input_ids": torch.randint(0, 128, (b, n)), "decoder_input_ids": torch.randint(0, 128, (b, n // 4))}

        return m.eval(), seq2seq, 6
    raise KeyError(name)


HF_SDPA = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "phi", "bert", "vit", "bart")
HF_EAGER = ("llama", "mistral", "qwen2")
