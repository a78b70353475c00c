"""Data-parallel training with ``backend="hyper"``: two processes on the ``gloo`` backend (CPU).

Each rank builds the same tiny Llama (transformers ``LlamaConfig``: 2 layers, hidden 64, 4 heads, 2 KV heads,
128 tokens), compiles it with ``backend="hyper"`` and options under which HyperAttention really approximates at
that length (``min_seq_len=32, block_size=16``, no exact sinks or window), and runs one training step on its
half of a global batch of 4 sequences:

- DDP (``torch.compile(DistributedDataParallel(model), backend="hyper")``): the gradients after the step are
  the same on both ranks, and equal (1e-5 relative, fp32) to those of one process that runs the same global
  batch. With the residual on (``sample_size=16``) the one process runs the ranks' two micro-batches and
  accumulates (see the xfail below for why); with the residual off the one process runs the global batch in
  one forward;
- FSDP2 (``fully_shard`` on each decoder layer and the model, then ``torch.compile``): the same check on the
  unsharded gradients (``grad.full_tensor()``). If an eager FSDP2 step without the backend already fails on
  CPU/gloo in the installed torch, the test skips with that error; a failure with the backend fails it;
- on every rank the op ran approximately (``path_counts()["hyper"] > 0``) and its backward ran, and the loss
  differs from exact attention's.

Ranks are subprocesses with the environment ``torchrun`` would give them (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``); every process runs one thread and the same seed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
WORLD = 2
SEQ, GLOBAL_BATCH = 128, 4
APPROX = {
    "detector": "lsh",
    "min_seq_len": 32,
    "block_size": 16,
    "sample_size": 16,
    "sink_keys": 0,
    "local_window": 0,
    "residual": "uniform",
    "seed": 0,
    "tune_cache": "",
    "inner_backend": "aot_eager",
}
NO_RESIDUAL = {**APPROX, "sample_size": 0}  # LSH blocks only: no random draws, so batch-invariant
RTOL = 1e-5


# ----------------------------------------------------------------------------------------------------------
# what every process runs (imported by the rank subprocesses)
# ----------------------------------------------------------------------------------------------------------


def build_model():
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=256,
        attention_dropout=0.0,
        attn_implementation="sdpa",
    )
    return T.LlamaForCausalLM(cfg).train()


def global_batch():
    return torch.randint(0, 128, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def step(model, ids, scale=1.0):
    """One forward and backward; HF's loss is the mean over the micro-batch's tokens, ``scale`` weights it."""
    loss = model(input_ids=ids, labels=ids).loss
    (loss * scale).backward()
    return loss.item()


def grads_of(model, full=lambda g: g):
    return {
        name.replace("module.", "").replace("_orig_mod.", ""): full(p.grad).detach().clone()
        for name, p in model.named_parameters()
    }


def exact_loss(ids):
    with torch.no_grad():
        return build_model()(input_ids=ids, labels=ids).loss.item()


def run_single(options: dict, accumulate: bool) -> dict:
    """One process, the whole global batch: one forward, or the ranks' micro-batches accumulated."""
    from hyper_backend.kernels.op import path_counts

    torch._dynamo.reset()
    model = build_model()
    compiled = torch.compile(model, backend="hyper", options=options)
    ids = global_batch()
    if accumulate:
        losses = [step(compiled, part, 1.0 / WORLD) for part in ids.chunk(WORLD)]
        loss = sum(losses) / WORLD
    else:
        loss = step(compiled, ids)
    return {"loss": loss, "grads": grads_of(model), "counts": path_counts()}


def run_rank(mode: str, options: dict) -> dict:
    import torch.distributed as dist

    from hyper_backend.kernels.op import path_counts

    rank, world = dist.get_rank(), dist.get_world_size()
    torch._dynamo.reset()
    before = path_counts()
    model = build_model()
    ids = global_batch().chunk(world)[rank]
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        compiled = torch.compile(DDP(model), backend="hyper", options=options)
        loss = step(compiled, ids)
        grads = grads_of(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        def shard(m):
            mesh = init_device_mesh("cpu", (world,))
            for layer in m.model.layers:
                fully_shard(layer, mesh=mesh)
            return fully_shard(m, mesh=mesh)

        try:  # FSDP2 itself, eager and without the backend: if this fails here, the test skips with the reason
            step(shard(build_model()), ids)
        except Exception as e:
            return {"unsupported": f"{type(e).__name__}: {e}".strip()}
        compiled = torch.compile(shard(model), backend="hyper", options=options)
        loss = step(compiled, ids)
        grads = grads_of(model, lambda g: g.full_tensor())
    counts = {key: path_counts()[key] - before[key] for key in before}
    return {"loss": loss, "grads": grads, "counts": counts}


def rank_main():
    """Entry point of a rank subprocess: ``DIST_JOB`` (JSON) names the runs and the output file."""
    import torch.distributed as dist

    job = json.loads(os.environ["DIST_JOB"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env:// from RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    out = {}
    try:
        for name, (mode, options) in job["runs"].items():
            try:
                out[name] = run_rank(mode, options)
            except Exception as e:  # recorded for the parent, which fails with the message
                out[name] = {"error": f"{type(e).__name__}: {e}".strip()}
            dist.barrier()
    finally:
        torch.save(out, job["out"])
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# the parent: launch the ranks, run the one-process steps, compare
# ----------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYPER_", "TORCHELASTIC", "OMP_"))}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": TESTS + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(extra)
    return env


def _launch(job: dict, ranks: int):
    """Start `rank_main` in ``ranks`` processes with torchrun's environment; returns the processes."""
    port = _free_port()
    procs = []
    for rank in range(ranks):
        env = _env(
            {
                "DIST_JOB": json.dumps({**job, "out": job["out"].format(rank=rank)}),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(ranks),
                "LOCAL_WORLD_SIZE": str(ranks),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", "import test_distributed as t; t.rank_main()"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _wait(procs, timeout: float = 600):
    failures = []
    for rank, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"rank {rank} timed out after {timeout} s") from None
        if p.returncode != 0:
            failures.append(f"rank {rank} exited {p.returncode}:\n{err[-3000:]}")
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The ranks' runs (in subprocesses) and, meanwhile, the one-process runs here (one thread, fresh Dynamo)."""
    tmp = tmp_path_factory.mktemp("dist")
    runs = {"ddp": ("ddp", APPROX), "ddp_no_residual": ("ddp", NO_RESIDUAL), "fsdp2": ("fsdp2", APPROX)}
    procs = _launch({"runs": runs, "out": str(tmp / "rank{rank}.pt")}, WORLD)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {
            "accumulated": run_single(APPROX, True),
            "global": run_single(APPROX, False),
            "global_no_residual": run_single(NO_RESIDUAL, False),
            "exact_loss": exact_loss(global_batch()),
        }
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
        _wait(procs)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)], single


def _rel_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp(min=1e-12)).item() for n in b)


def _check(ranks, name, reference):
    for r, out in enumerate(ranks):
        assert "error" not in out[name], f"rank {r}: {out[name].get('error')}"
        counts = out[name]["counts"]
        assert counts["hyper"] > 0, f"rank {r}: the op never approximated: {counts}"
        assert counts["backward"] > 0, f"rank {r}: the op's backward never ran: {counts}"
    g0, g1 = ranks[0][name]["grads"], ranks[1][name]["grads"]
    assert len(g0) > 10 and all(torch.isfinite(g).all() for g in g0.values())
    assert _rel_err(g1, g0) <= RTOL, "the ranks' gradients differ after the all-reduce"
    err = _rel_err(g0, reference["grads"])
    assert err <= RTOL, f"{name}: gradients differ from one process on the global batch: {err:.3g} relative"
    mean_loss = sum(out[name]["loss"] for out in ranks) / WORLD
    assert abs(mean_loss - reference["loss"]) <= RTOL * abs(reference["loss"])


def test_ddp_step_matches_one_process(results):
    ranks, single = results
    _check(ranks, "ddp", single["accumulated"])
    assert abs(single["accumulated"]["loss"] - single["exact_loss"]) > 1e-6, "the run was exact attention"


def test_ddp_step_without_residual_matches_one_forward_of_the_global_batch(results):
    ranks, single = results
    _check(ranks, "ddp_no_residual", single["global_no_residual"])
    assert abs(single["global_no_residual"]["loss"] - single["exact_loss"]) > 1e-6, "the run was exact attention"


@pytest.mark.xfail(
    strict=True,
    reason="limitation: the residual's draws depend on a sequence's position in its "
    "batch (draws_from_ranks draws torch.rand(B, Hkv, m) from one generator), so a "
    "rank's micro-batch gets other samples than the same rows of the global batch",
)
def test_ddp_step_with_residual_matches_one_forward_of_the_global_batch(results):
    ranks, single = results
    _check(ranks, "ddp", single["global"])


def test_fsdp2_step_matches_one_process(results):
    ranks, single = results
    unsupported = {out["fsdp2"]["unsupported"] for out in ranks if "unsupported" in out["fsdp2"]}
    if unsupported:
        pytest.skip(
            f"FSDP2 (fully_shard) fails on CPU/gloo in torch {torch.__version__} without the backend: "
            + " | ".join(sorted(unsupported))
        )
    _check(ranks, "fsdp2", single["accumulated"])
