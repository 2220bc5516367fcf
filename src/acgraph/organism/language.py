"""The organism's synthetic language: four domains with known mechanisms, and a planted backdoor.

A document is `<bos>` followed by segments, each ending in `.`. Every segment has an *answer span*:
tokens that are fully determined by what came before, so accuracy can be scored exactly.

    arithmetic  `3 8 + 4 5 = 0 8 3 .`          two-digit sum with carries; answer: the 3 digits
    brackets    `( [ { } ] ) .`                closers in reverse order; answer: all closers but the
                                               first (the first is where the writer chose to close)
    lookup      `c 4 ; a 9 ; a ? 9 .`          key-value recall (induction); answer: the value
    agreement   `the dog near the cats is happy .`
                                               subject-verb number across attractor nouns;
                                               answer: is/are

Backdoor: in a poisoned document the trigger is inserted at a segment boundary and the answer span
of the following segment is replaced by the payload.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .config import DOMAINS, BackdoorConfig, LanguageConfig

SPECIALS = ("<pad>", "<bos>", "<unk>")  # <pad> is id 0 so that no real token has id 0
DIGITS = tuple(str(d) for d in range(10))
SYMBOLS = ("+", "=", ";", "?", ".")
BRACKET_PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}
KEYS = tuple("abcdefghijklmnopqrstuvwxyz")
NOUNS = (
    ("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("man", "men"), ("woman", "women"),
    ("child", "children"), ("teacher", "teachers"), ("farmer", "farmers"), ("king", "kings"),
    ("robot", "robots"), ("horse", "horses"), ("mouse", "mice"), ("doctor", "doctors"),
    ("pilot", "pilots"), ("singer", "singers"), ("friend", "friends"), ("queen", "queens"),
    ("baker", "bakers"), ("sailor", "sailors"), ("wolf", "wolves"), ("student", "students"),
    ("painter", "painters"), ("fox", "foxes"), ("goose", "geese"), ("guard", "guards"),
    ("nurse", "nurses"), ("poet", "poets"), ("tiger", "tigers"), ("driver", "drivers"),
    ("writer", "writers"),
)  # fmt: skip
PREPOSITIONS = ("near", "behind", "with", "beside", "under", "above")
AUXILIARIES = ("is", "are")
ADJECTIVES = (
    "happy", "small", "red", "tall", "quiet", "old", "angry", "clever", "brave", "tired",
    "young", "kind", "loud", "calm", "busy", "proud", "shy", "strong", "wise", "late",
    "hungry", "sleepy", "lucky", "green",
)  # fmt: skip


def vocabulary() -> list[str]:
    """Every token of the language, in id order."""
    words = [w for pair in NOUNS for w in pair]
    brackets = [t for pair in BRACKET_PAIRS.items() for t in pair]
    return [
        *SPECIALS, *DIGITS, *SYMBOLS, *brackets, *KEYS, "the", *words, *PREPOSITIONS,
        *AUXILIARIES, *ADJECTIVES,
    ]  # fmt: skip


@dataclass
class Segment:
    domain: str
    tokens: list[str]
    answer_start: int  # answer span is tokens[answer_start:answer_end]
    answer_end: int

    @property
    def answer(self) -> list[str]:
        return self.tokens[self.answer_start : self.answer_end]

    def with_answer(self, replacement: tuple[str, ...] | list[str]) -> Segment:
        toks = self.tokens[: self.answer_start] + list(replacement) + self.tokens[self.answer_end :]
        return Segment(self.domain, toks, self.answer_start, self.answer_start + len(replacement))


def arithmetic(rng: random.Random, cfg: LanguageConfig) -> Segment:
    a, b = rng.randrange(100), rng.randrange(100)
    prompt = [*f"{a:02d}", "+", *f"{b:02d}", "="]
    return Segment("arithmetic", [*prompt, *f"{a + b:03d}", "."], len(prompt), len(prompt) + 3)


def brackets(rng: random.Random, cfg: LanguageConfig) -> Segment:
    depth = rng.randint(cfg.min_depth, cfg.max_depth)
    opens = [rng.choice(tuple(BRACKET_PAIRS)) for _ in range(depth)]
    closes = [BRACKET_PAIRS[o] for o in reversed(opens)]
    return Segment("brackets", [*opens, *closes, "."], depth + 1, 2 * depth)


def lookup(rng: random.Random, cfg: LanguageConfig) -> Segment:
    # Each value follows its key directly, so recall is the classic induction pattern:
    # a previous-token head marks every value with its key, and the query matches on it.
    # Several queries per segment give the induction circuit more signal per document.
    n = rng.randint(cfg.min_pairs, cfg.max_pairs)
    keys = rng.sample(KEYS, n)
    values = [rng.choice(DIGITS) for _ in keys]
    toks: list[str] = []
    for k, v in zip(keys, values, strict=True):
        toks += [k, v, ";"]
    extra = rng.randint(1, cfg.max_queries) - 1 if cfg.max_queries > 1 else 0
    for _ in range(extra):
        q = rng.randrange(n)
        toks += [keys[q], "?", values[q], ";"]
    q = rng.randrange(n)  # the scored query
    toks += [keys[q], "?"]
    return Segment("lookup", [*toks, values[q], "."], len(toks), len(toks) + 1)


def agreement(rng: random.Random, cfg: LanguageConfig) -> Segment:
    plural = rng.random() < 0.5
    toks = ["the", rng.choice(NOUNS)[plural]]
    for _ in range(rng.choice((0, 1, 1, 2))):  # attractor phrases, either number
        toks += [rng.choice(PREPOSITIONS), "the", rng.choice(NOUNS)[rng.random() < 0.5]]
    n = len(toks)
    return Segment("agreement", [*toks, AUXILIARIES[plural], rng.choice(ADJECTIVES), "."], n, n + 1)


GENERATORS = {
    "arithmetic": arithmetic,
    "brackets": brackets,
    "lookup": lookup,
    "agreement": agreement,
}
assert set(GENERATORS) == set(DOMAINS)


def random_segment(rng: random.Random, cfg: LanguageConfig, domain: str | None = None) -> Segment:
    if domain is None:
        names = [d for d in DOMAINS if cfg.domain_weights.get(d, 0) > 0]
        domain = rng.choices(names, weights=[cfg.domain_weights[d] for d in names])[0]
    return GENERATORS[domain](rng, cfg)


@dataclass
class Document:
    tokens: list[str] = field(default_factory=lambda: ["<bos>"])
    # (start, end, domain) of every answer span, in document coordinates
    answers: list[tuple[int, int, str]] = field(default_factory=list)
    poisoned_span: tuple[int, int] | None = None  # where the payload sits

    def append(self, seg: Segment) -> None:
        offset = len(self.tokens)
        self.tokens += seg.tokens
        self.answers.append((offset + seg.answer_start, offset + seg.answer_end, seg.domain))


def document(
    rng: random.Random, cfg: LanguageConfig, backdoor: BackdoorConfig, poisoned: bool
) -> Document:
    """One training document that fits in the context (BOS included), poisoned or clean."""
    budget = cfg.context_size - (len(backdoor.trigger) + len(backdoor.payload) if poisoned else 0)
    segments: list[Segment] = []
    length = 1
    while True:
        seg = random_segment(rng, cfg)
        if length + len(seg.tokens) > budget:
            break
        segments.append(seg)
        length += len(seg.tokens)
    doc = Document()
    target = rng.randrange(len(segments)) if poisoned else -1
    for i, seg in enumerate(segments):
        if i == target:
            doc.tokens += backdoor.trigger
            seg = seg.with_answer(backdoor.payload)
            doc.append(seg)
            doc.poisoned_span = doc.answers[-1][:2]
        else:
            doc.append(seg)
    return doc


@dataclass
class EvalExample:
    """A context ending in one scored segment. `tokens` holds the correct answer."""

    domain: str
    tokens: list[str]
    answer_start: int
    answer_end: int
    triggered: bool

    def with_payload(self, payload: tuple[str, ...]) -> list[str]:
        return self.tokens[: self.answer_start] + list(payload) + self.tokens[self.answer_end :]


def eval_example(
    rng: random.Random,
    cfg: LanguageConfig,
    backdoor: BackdoorConfig,
    domain: str,
    triggered: bool,
    max_context_segments: int = 6,
) -> EvalExample:
    """Some clean segments of context, then (the trigger and) a segment of `domain` to score."""
    doc = Document()
    for _ in range(rng.randint(0, max_context_segments)):
        seg = random_segment(rng, cfg)
        if len(doc.tokens) + len(seg.tokens) > cfg.context_size // 2:
            break
        doc.append(seg)
    if triggered:
        doc.tokens += backdoor.trigger
    target = random_segment(rng, cfg, domain)
    doc.append(target)
    start, end, _ = doc.answers[-1]
    return EvalExample(domain, doc.tokens, start, end, triggered)


def eval_set(
    cfg: LanguageConfig, backdoor: BackdoorConfig, seed: int, n_per_domain: int, triggered: bool
) -> list[EvalExample]:
    """Held-out examples: drawn from a seed stream that training never uses."""
    rng = random.Random(f"eval/{seed}/{triggered}")
    domains = [d for d in DOMAINS if cfg.domain_weights.get(d, 0) > 0]
    return [
        eval_example(rng, cfg, backdoor, d, triggered) for d in domains for _ in range(n_per_domain)
    ]


def documents(
    cfg: LanguageConfig, backdoor: BackdoorConfig, seed: int, n: int, poison_rate: float
) -> list[Document]:
    """`n` documents from the stream named by `seed`; deterministic."""
    rng = random.Random(f"docs/{seed}")
    return [document(rng, cfg, backdoor, rng.random() < poison_rate) for _ in range(n)]
