"""The CPU path: HyperAttention as a few batched calls to aten's fused flash attention for CPU.

- `calls`: the entry points, executing a `plan.CallPlan` part by part;
- `hyper`: a non-causal HyperAttention part (LSH-sorted blocks and residual in two fused calls);
- `band`: exact banded attention in tiles (the local window of self-attention, the window op's tiled schedule);
- `window`: ``hyper::window_attention`` and its schedule;
- `threads`: bookkeeping on one thread, the fused calls on all, and the merge of two parts.
"""

from .calls import attention_backward, attention_forward
from .window import window_backward, window_forward, window_schedule

__all__ = ["attention_backward", "attention_forward", "window_backward", "window_forward", "window_schedule"]
