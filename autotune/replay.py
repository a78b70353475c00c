"""Running a model's body on one window for the calibration: SDPA calls routed to HyperAttention site by site,
the layers before the first swapped site replayed from a recorded pass, the loss computed only where needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hyper_backend.config import HyperConfig

from .models import body_and_head, position_nll


@dataclass
class Pass:
    """One forward: per-position NLL (NaN where not computed yet: `Runner.fill`), final hidden states, and
    (when recorded) the input of every layer, and per site the layer it ran in and the path of the module
    whose forward made the call (as the body's ``named_modules()`` names it)."""

    nll: torch.Tensor
    hidden: torch.Tensor
    ids: torch.Tensor | None = None
    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    site_layers: dict[int, int | None] = field(default_factory=dict)
    site_modules: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0


class Runner:
    """Runs the model's body on one window under an SDPA handler (`hyper_backend.capture.AttentionSites`).

    ``start``: the decoder layers before it do not run; the first of them returns ``start_input`` (the hidden
    state the exact pass recorded entering layer ``start``) and the rest return their input, so only the layers
    from ``start`` on compute. The output head (the costliest part of a long window: ``[n, vocab]`` logits) runs
    only where asked: ``loss=True`` everywhere; else nowhere (`fill` computes positions later). `changed`
    tells which positions a swap moved."""

    def __init__(self, model, chunk: int = 512):
        self.model = model
        self.body, self.head, self.softcap = body_and_head(model)
        layers = getattr(self.body, "layers", None)
        self.layers = list(layers) if isinstance(layers, torch.nn.ModuleList) else []
        self.chunk = chunk

    def run(
        self,
        ids: torch.Tensor,
        handler: Callable = lambda call: None,
        *,
        record: bool = False,
        start: int = 0,
        start_input: torch.Tensor | None = None,
        first_site: int = 0,
        loss: bool = True,
    ) -> Pass:
        from hyper_backend.capture import AttentionSites

        out = Pass(torch.empty(0), torch.empty(0))
        current = [None]
        running: list[str] = [""]  # the modules whose forward is running, innermost last ("": the body)
        hooks, patched = [], []

        def enter(j):
            def hook(module, args, kwargs):
                current[0] = j
                if record:
                    h = args[0] if args else kwargs["hidden_states"]
                    out.layer_inputs[j] = h.detach().clone()

            return hook

        def wrapped(call):
            if record:
                out.site_layers[call.index] = current[0]
                out.site_modules[call.index] = running[-1]
            return handler(call)

        for j, layer in enumerate(self.layers):
            hooks.append(layer.register_forward_pre_hook(enter(j), with_kwargs=True))

        def push(name):
            def hook(module, args):  # returns None: the input is left as it is
                running.append(name)

            return hook

        def pop(module, args, output):  # returns None: the output is left as it is
            running.pop()

        if record:
            for name, module in self.body.named_modules():
                if name:
                    hooks.append(module.register_forward_pre_hook(push(name)))
                    hooks.append(module.register_forward_hook(pop, always_call=True))
        if start > 0:
            if start_input is None or not self.layers:
                raise ValueError("start > 0 needs the decoder layers and the input of layer start")
            for j in range(start):
                if j == start - 1:
                    layer_fn = lambda *a, **k: start_input
                else:
                    layer_fn = lambda hidden_states=None, *a, **k: hidden_states
                self.layers[j].forward = layer_fn
                patched.append(self.layers[j])
        mode = AttentionSites(wrapped)
        mode.count = first_site
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), mode:
                hidden = self.body(input_ids=ids, use_cache=False).last_hidden_state
            out.hidden, out.ids = hidden.detach(), ids
            out.nll = torch.full((ids.shape[1] - 1,), float("nan"), dtype=torch.float64)
            if loss:
                self.fill(out, torch.arange(ids.shape[1] - 1))
        finally:
            for hk in hooks:
                hk.remove()
            for layer in patched:
                del layer.forward
        out.seconds = time.perf_counter() - t0
        return out

    def fill(self, p: Pass, positions: torch.Tensor) -> None:
        """Compute ``p``'s NLL at ``positions`` where it is not computed yet."""
        todo = positions[torch.isnan(p.nll[positions])]
        if todo.numel():
            with torch.no_grad():
                h, targets = p.hidden[0, :-1][todo], p.ids[0, 1:][todo]
                p.nll[todo] = position_nll(h[None], targets[None], self.head, self.softcap, self.chunk)

    @staticmethod
    def changed(p: Pass, ref: Pass) -> torch.Tensor:
        """Positions (predicting the next token) whose final hidden state in ``p`` differs from ``ref``'s by more
        than float noise (1e-5 of the row's largest entry)."""
        h, r = p.hidden[0, :-1], ref.hidden[0, :-1]
        return ((h - r).abs().amax(-1) > 1e-5 * r.abs().amax(-1).clamp_min(1e-30)).nonzero()[:, 0]

    def delta(self, p: Pass, ref: Pass, stride: int = 1) -> float:
        """Mean loss increase per position of ``p`` over ``ref``: exact on the positions that moved (every
        ``stride``-th of them, scaled up, when ``stride > 1``); the others are equal by construction."""
        moved = self.changed(p, ref)
        if not moved.numel():
            return 0.0
        sampled = moved[::stride]
        self.fill(p, sampled)
        self.fill(ref, sampled)
        total = float((p.nll[sampled] - ref.nll[sampled]).sum()) * moved.numel() / sampled.numel()
        return total / p.nll.numel()


def swap_handler(assignment: dict[int, HyperConfig]) -> Callable:
    """An SDPA handler that routes the sites of ``assignment`` to `hyper_attention` with their configs."""
    from hyper_backend.attention import hyper_attention

    def handler(call):
        c = assignment.get(call.index)
        if c is None:
            return None
        return hyper_attention(call.query, call.key, call.value, config=c, **call.sdpa_kwargs())

    return handler


def run_assignment(runner: Runner, ids: torch.Tensor, exact: Pass, assignment: dict[int, HyperConfig]) -> Pass:
    """The model on ``ids`` with ``assignment`` swapped in, from the layer of its first site on."""
    first = min(assignment)
    layer = exact.site_layers.get(first)
    if layer is None or layer not in exact.layer_inputs:
        return runner.run(ids, swap_handler(assignment), loss=False)
    before = sum(1 for i, lay in exact.site_layers.items() if lay is not None and lay < layer)
    return runner.run(
        ids, swap_handler(assignment), start=layer, start_input=exact.layer_inputs[layer], first_site=before, loss=False
    )
