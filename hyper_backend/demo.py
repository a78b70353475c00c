"""``python -m hyper_backend.demo``: a Llama-style model at long context, ``backend="hyper"`` vs ``"inductor"``.

The model is built from a ``LlamaConfig`` (random weights, nothing downloaded), small enough that exact
attention at 16k tokens finishes on two CPU cores in seconds. Both backends compile and run the same prefill
in this process; the demo prints what the hyper backend did to each attention site and the times.

Options: ``--seq N`` (default 16384), ``--quick`` (n = 2048, one timed run: a smoke test), ``--layers``,
``--heads``, ``--repeats``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def build_model(layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 64, max_len: int = 16384):
    """A ``LlamaForCausalLM`` with random weights, attention-heavy (small MLP and vocabulary), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=heads * head_dim, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=2 * heads * head_dim, vocab_size=1024,
                      max_position_embeddings=max(max_len, 4096), attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def prefill(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, logits_to_keep=1).logits


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def measure(model, ids, short, backend: str, repeats: int, progress) -> dict:
    """Compile time (a cold compile at a short length: first call minus a second), then ``repeats`` timed
    prefills at full length after one compiling call."""
    task = progress.add_task(f"backend={backend!r}: compiling", total=repeats + 2)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    first, _ = _timed(prefill, compiled, short)
    compile_s = max(first - _timed(prefill, compiled, short)[0], 0.0)
    progress.update(task, advance=1)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    _, out = _timed(prefill, compiled, ids)
    progress.update(task, advance=1, description=f"backend={backend!r}: running")
    runs = []
    for _ in range(repeats):
        runs.append(_timed(prefill, compiled, ids)[0])
        progress.update(task, advance=1)
    progress.update(task, description=f"backend={backend!r}: done")
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs), "compile": compile_s,
            "logits": out}


def main(argv=None) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    import hyper_backend
    from hyper_backend.report import collect

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=16384, help="prompt length (default 16384)")
    parser.add_argument("--quick", action="store_true", help="n=2048 and one timed run (a smoke test)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    seq, repeats = (2048, 1) if args.quick else (args.seq, args.repeats)

    console = Console()
    model = build_model(layers=args.layers, heads=args.heads, kv_heads=max(1, args.heads // 2), max_len=seq)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    console.print(f"[bold]hyper-backend {hyper_backend.__version__}[/bold]: Llama-style model, {args.layers} layers, "
                  f"{args.heads} heads (GQA {args.heads}:{max(1, args.heads // 2)}), head dim 64, random weights, "
                  f"prefill of {seq} tokens, torch {torch.__version__}, {torch.get_num_threads()} threads")
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    # cold compiles for both (no FX-graph / AOTAutograd cache hits), after one warm-up compile each, so that
    # neither pays the process's one-time costs in its compile time
    with Progress(*columns, console=console) as progress, \
            torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        warm = progress.add_task("warming up the compilers", total=2)
        for backend in ("hyper", "inductor"):
            torch._dynamo.reset()
            prefill(torch.compile(model, backend=backend), ids[:, :128])
            progress.update(warm, advance=1)
        with collect() as report:
            hyper = measure(model, ids, ids[:, :128], "hyper", repeats, progress)
        inductor = measure(model, ids, ids[:, :128], "inductor", repeats, progress)

    console.print(report)
    table = Table(title=f"prefill of {seq} tokens: median of {repeats} (min-max); cold compile at 128 tokens")
    for col in ("backend", "prefill s", "compile s"):
        table.add_column(col)
    for name, r in (("hyper", hyper), ("inductor", inductor)):
        table.add_row(name, f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})", f"{r['compile']:.1f}")
    console.print(table)
    speedup = inductor["median"] / hyper["median"]
    drift = (hyper["logits"] - inductor["logits"]).abs().max().item()
    scale = inductor["logits"].abs().max().item()
    console.print(f"prefill speedup: [bold]{speedup:.2f}x[/bold]; compile time ratio "
                  f"{hyper['compile'] / max(inductor['compile'], 1e-9):.2f}; last-token logits differ by at most "
                  f"{drift:.3g} (largest logit {scale:.3g}; exact below min_seq_len, approximate above)")


if __name__ == "__main__":
    main()
