"""The retrieval bench (bench/retrieval.py, hyper_backend/needles.py) on a character-level toy tokenizer and a
tiny random Gemma-3: the prompt builder, the teacher-forced and greedy scoring (against the model's own logits and
``generate``), the options text, the result cache, and the report (table, JSON, picture)."""

from __future__ import annotations

import importlib.util
import io
import os
import sys

import pytest
import torch

from hyper_backend import needles

transformers = pytest.importorskip("transformers")

_BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "retrieval.py")
_spec = importlib.util.spec_from_file_location("bench_retrieval", _BENCH)
retrieval = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = retrieval  # dataclasses look their module up
_spec.loader.exec_module(retrieval)

VOCAB = 128  # the toy tokenizer: one token per ASCII character


def tokenize(text: str) -> list[int]:
    return [ord(c) for c in text]


def token_text(i: int) -> str:
    return chr(i)


def decode(ids) -> str:
    return "".join(chr(i) for i in ids)


def filler(need: int = 4000) -> needles.Filler:
    return needles.repeat_filler(tokenize, token_text, need)


# ----------------------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", needles.TASKS)
@pytest.mark.parametrize("length", [700, 1001, 2048])
def test_prompt_has_the_length_the_needle_and_the_answer(task, length):
    f = filler()
    depths = (0.0, 0.1, 0.25, 0.5, 0.9, 1.0)
    prompts = [needles.build(task, length, d, 3, f, tokenize, bos=1) for d in depths]
    for p in prompts:
        assert len(p.ids) + len(p.answer) == length
        assert p.ids[0] == 1
        text = decode(p.ids[1:])
        value = p.values[0]
        assert decode(p.answer) == " " + value == p.answer_text
        line = (
            f" The pass key is {value}. Remember it. {value} is the pass key."
            if task == "passkey"
            else f" The special magic number for {p.query} is {value}."
        )
        assert decode(p.ids[p.needles[0] : p.needles[0] + len(line)]) == line  # the queried needle sits there
        assert text.count(value) == (2 if task == "passkey" else 1)  # passkey: said twice in its line
        if task == "niah":
            assert len(p.values) == len(set(p.values)) == len(p.needles) == 4
            assert all(len(v) == 7 for v in p.values)
            assert text.endswith(f"The special magic number for {p.query} is")
            for v in p.values[1:]:  # distractors are in the prompt, at their own positions
                assert v in text
        else:
            assert len(p.values[0]) == 5 and text.endswith("What is the pass key? The pass key is")
    starts = [p.needles[0] for p in prompts]
    if task == "passkey":  # niah: distractor lines before the needle move it by up to three lines
        assert starts == sorted(starts)
    first, last = prompts[0], prompts[-1]
    intro = decode(first.ids[1 : starts[0]])  # depth 0: right after the intro line (passkey: none)
    assert intro == "" if task == "passkey" else (intro.count("\n") == 1 and intro.endswith("\n"))
    after = decode(last.ids[starts[-1] + len(line) :])  # depth 1: at most one filler sentence, then the question
    assert after.index("\n") < 25
    lines = 0 if task == "passkey" else 3 * 45  # the distractor lines, 45 characters each at most
    for p, d in zip(prompts[1:-1], depths[1:-1]):  # within a sentence (and the distractors) of the asked depth
        assert abs(p.needle_depth - d) < 0.05 + (120 + lines) / length


def test_prompts_are_pure_functions_of_their_arguments():
    f = filler()
    a = needles.build("niah", 1500, 0.4, 7, f, tokenize, bos=None)
    assert a == needles.build("niah", 1500, 0.4, 7, f, tokenize, bos=None)
    assert a.digest == needles.build("niah", 1500, 0.4, 7, f, tokenize, bos=None).digest
    others = [
        needles.build("niah", 1500, 0.4, 8, f, tokenize, None),
        needles.build("niah", 1500, 0.5, 7, f, tokenize, None),
    ]
    assert all(o.digest != a.digest and o.values != a.values for o in others)
    assert needles.build("niah", 1500, 0.4, 7, f, tokenize, None, keys=2).digest != a.digest


def test_needles_go_after_sentence_ends_only():
    f = filler()
    assert f.cuts and all(token_text(f.ids[c - 1]) in ".!?\n:;" for c in f.cuts)
    text = needles.text_filler("book", tokenize("one two. three four\nfive six; seven"), token_text)
    assert [decode(text.ids[:c])[-1] for c in text.cuts] == [".", "\n", ";"]


def test_prompt_errors_name_the_problem():
    f = filler(200)
    with pytest.raises(ValueError, match="unknown task"):
        needles.build("qa", 1000, 0.5, 0, f, tokenize, None)
    with pytest.raises(ValueError, match="depth"):
        needles.build("passkey", 1000, 1.5, 0, f, tokenize, None)
    with pytest.raises(ValueError, match="too short"):
        needles.build("niah", 300, 0.5, 0, f, tokenize, None)
    with pytest.raises(ValueError, match="filler has"):
        needles.build("passkey", 5000, 0.5, 0, f, tokenize, None)


# ----------------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_score_answer_is_the_log_softmax_of_the_head(softcap):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 16, generator=g)
    head = torch.nn.Linear(16, VOCAB, bias=False)
    logits = head(hidden).detach()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    best = logits.argmax(-1).tolist()
    got = needles.score_answer(hidden, best, head, softcap)
    want = torch.log_softmax(logits.double(), -1)[torch.arange(4), best].sum().item()
    assert got["hit"] and got["argmax"] == best and got["logprob"] == pytest.approx(want, abs=1e-5)
    wrong = list(best)
    wrong[2] = (wrong[2] + 1) % VOCAB
    miss = needles.score_answer(hidden, wrong, head, softcap)
    assert not miss["hit"] and miss["logprob"] < got["logprob"] and miss["argmax"] == best


def tiny_gemma():
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=1024,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def test_teacher_forced_and_greedy_score_the_answer_positions():
    """The score reads the positions that predict the answer: it equals the model's own logits there, and the
    greedy check continues the prompt as ``generate`` on the whole prompt does."""
    model = tiny_gemma()
    engine = retrieval.Engine(model, decode)
    p = needles.build("passkey", 300, 0.5, 0, filler(), tokenize, bos=None)
    got = engine.teacher_forced(engine.body, p)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p.ids + p.answer])).logits[0].float()
    rows = logits[len(p.ids) - 1 : len(p.ids) - 1 + len(p.answer)]
    want = torch.log_softmax(rows.double(), -1)[torch.arange(len(p.answer)), list(p.answer)]
    assert got["logprob"] == pytest.approx(want.sum().item(), abs=1e-4)
    assert got["argmax"] == rows.argmax(-1).tolist() and got["argmax_text"] == decode(got["argmax"])
    assert got["hit"] == (got["argmax"] == list(p.answer))

    greedy = engine.greedy(engine.body, p)
    with torch.no_grad():
        ids = torch.tensor([p.ids])
        full = model.generate(input_ids=ids, max_new_tokens=len(p.answer) + 2, do_sample=False, top_p=None, top_k=None)
    assert greedy["tokens"] == full[0, len(p.ids) :].tolist()
    assert greedy["text"] == decode(greedy["tokens"])
    assert greedy["hit"] == (retrieval.first_number(greedy["text"]) == p.values[0])


def test_exact_side_compiles_to_the_eager_result():
    """``backend="hyper", layers="none"`` (the exact reference) scores a prompt as the uncompiled model does."""
    model = tiny_gemma()
    engine = retrieval.Engine(model, decode)
    p = needles.build("niah", 700, 0.3, 1, filler(), tokenize, bos=None)
    eager = engine.teacher_forced(engine.body, p)
    side = retrieval.Side.make("exact", retrieval.EXACT_OPTIONS)
    compiled = engine.teacher_forced(engine.compile(side), p)
    torch._dynamo.reset()
    assert compiled["argmax"] == eager["argmax"]
    assert compiled["logprob"] == pytest.approx(eager["logprob"], abs=1e-4)


# ----------------------------------------------------------------------------------------------------------
# options, cache, resumption
# ----------------------------------------------------------------------------------------------------------


def test_parse_options():
    got = retrieval.parse_options("block_size=128, layers=5,11,residual=stratified,enabled=false,causal_depth=none")
    assert got == {
        "block_size": 128,
        "layers": "5,11",
        "residual": "stratified",
        "enabled": False,
        "causal_depth": None,
    }
    assert retrieval.parse_options("") == {}
    with pytest.raises(ValueError, match="key=value"):
        retrieval.parse_options("128")
    side = retrieval.Side.make("hyper", {})
    assert side.option_dict == {"tune_cache": ""} and side.label() == "defaults"
    assert retrieval.Side.make("hyper", {"sample_size": 512}).label() == "sample_size=512"


class FakeEngine:
    """Counts the forwards; scores from the side so the two sides differ."""

    def __init__(self):
        self.calls = []

    def compile(self, side):
        return side

    def warm_up(self, body, ids):
        return 0.0

    def teacher_forced(self, body, p):
        self.calls.append((body.name, "teacher", p.depth))
        return {"hit": body.name == "exact", "logprob": -1.0 if body.name == "exact" else -9.0, "argmax": [],
                "argmax_text": "12", "seconds": 0.0}  # fmt: skip

    def greedy(self, body, p):
        self.calls.append((body.name, "generate", p.depth))
        return {"hit": True, "text": " 1", "tokens": [], "seconds": 0.0}


def test_cache_computes_each_cell_once_and_hyper_again_when_the_code_changes(tmp_path):
    f = filler()
    prompts = [needles.build("passkey", 600, d, 0, f, tokenize, None) for d in (0.1, 0.9)]
    jobs = [retrieval.Job(p, "teacher") for p in prompts] + [retrieval.Job(prompts[0], "generate")]
    sides = [retrieval.Side.make("exact", retrieval.EXACT_OPTIONS), retrieval.Side.make("hyper", {})]
    path = str(tmp_path / "cache.json")
    engine = FakeEngine()

    def run(revision, recompute=(), options=None):
        s = sides if options is None else [sides[0], retrieval.Side.make("hyper", options)]
        cache = retrieval.Cache(path)  # reloaded from the file, as a resumed run does
        return retrieval.run_jobs(lambda: engine, jobs, s, cache, "toy", revision, set(recompute), say=lambda t: None)

    assert run("rev1") == 6 and len(engine.calls) == 6
    assert run("rev1") == 0  # resumed: nothing left to do
    assert run("rev2") == 3 and all(side == "hyper" for side, _, _ in engine.calls[6:])  # code changed
    assert run("rev2", options={"sample_size": 512}) == 3  # other options: the hyper side again
    assert run("rev2", recompute={"exact"}) == 3
    assert run(None) == 3 and run(None) == 3  # no revision: hyper cells are never reused

    cache = retrieval.Cache(path)
    side = sides[1]
    rows = retrieval.collect_cells(prompts, {"exact": sides[0], "hyper": side}, cache, "toy", "rev1", "teacher")
    assert [r["exact"]["hit"] for r in rows] == [True, True] and [r["hyper"]["hit"] for r in rows] == [False, False]
    assert rows[0]["hyper"]["revision"] == "rev1" and rows[0]["exact"]["options"] == "layers=none"
    stats = retrieval.summary(rows)
    assert stats == {"cells": 2, "done": 2, "exact_hits": 2, "hyper_hits": 0, "lost": 2, "max_logprob_drop": 8.0}
    missing = retrieval.collect_cells(prompts, {"exact": sides[0], "hyper": side}, cache, "toy", "rev9", "teacher")
    assert all(r["hyper"] is None for r in missing) and retrieval.summary(missing)["done"] == 0


def test_report_renders_table_and_picture(tmp_path):
    from rich.console import Console

    f = filler()
    prompts = [needles.build(t, 600, d, 0, f, tokenize, None) for t in needles.TASKS for d in (0.1, 0.5, 0.9)]
    rows = []
    for i, p in enumerate(prompts):
        hit = {"hit": True, "logprob": -1.2, "argmax_text": p.answer_text, "seconds": 1.0}
        miss = {"hit": False, "logprob": -14.0, "argmax_text": " " + (p.values[-1]), "seconds": 0.5}
        rows.append({"task": p.task, "length": p.length, "depth": p.depth, "seed": 0, "needle_token": p.needles[0],
                     "answer": p.values[0], "distractors": list(p.values[1:]), "exact": hit,
                     "hyper": None if i == 0 else miss})  # fmt: skip
    buf = io.StringIO()
    Console(file=buf, width=200).print(retrieval.table(rows, "toy"))
    text = buf.getvalue()
    assert "miss -14.00" in text and "-12.80" in text and "(a distractor)" in text
    png = str(tmp_path / "grid.png")
    retrieval.heatmap(rows, png, "toy")
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_code_revision_hashes_the_sources_that_compute():
    rev = retrieval.code_revision()
    assert rev == retrieval.code_revision() and len(rev) == 12 and int(rev, 16) >= 0
    assert "demo.py" in retrieval.NOT_NUMERICS  # editing the demo does not rerun the hyper cells
