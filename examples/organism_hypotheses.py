"""Hand-written hypotheses for the shipped organism (3-layer GPT-2, transcoders of width 384).

Each hypothesis computes a known mechanism of the organism's language from the tokens; the only
constants are fitted scales (least squares on 64 trusted contexts, seed 0). Candidates were found
by correlating every transcoder feature with ground-truth variables computed per position from the
token strings (bracket depth, top of the bracket stack, units-digit carry, subject number, the
trigger), and heads by their attention mass on the value after the matching key at `?`.

Load and test:

    hyps = load_hypotheses(["examples/organism_hypotheses.py"])
    print(format_test(evaluate_hypotheses(subject, hyps, held_out_batches, n_per_domain=50)))
"""

import torch

from acgraph.hypotheses import feature, head

# the organism's vocabulary, from the language definition itself
from acgraph.organism.language import ADJECTIVES, BRACKET_PAIRS, DIGITS, KEYS, NOUNS, PREPOSITIONS

OPENERS = tuple(BRACKET_PAIRS)
CLOSERS = tuple(BRACKET_PAIRS.values())
SINGULAR = tuple(s for s, _ in NOUNS)
PLURAL = tuple(p for _, p in NOUNS)


# ------------------------------------------------------------------------------------ helpers


def _after_trigger(ctx):
    """1.0 right after a complete trigger `happy = [` (where the poisoned segment starts)."""
    return ctx.ngram_values({("happy", "=", "["): 1.0}).roll(1, dims=1) * (ctx.positions > 0)


def _segment_start(ctx):
    """[B, T] index of the first token of the segment each position is in (segments end in `.`;
    a `<bos>` starts a new document; the trigger `happy = [` is inserted between segments)."""
    boundary = ctx.is_token(".", "<bos>", shift=1).bool() | _after_trigger(ctx).bool()
    idx = torch.where(boundary, ctx.positions, torch.zeros_like(ctx.positions))
    return torch.cummax(idx, dim=1).values


def _segment_cumsum(ctx, x):
    """Running sum of ``x`` within the current segment (inclusive)."""
    c = torch.cumsum(x, dim=1)
    start = _segment_start(ctx)
    before = torch.where(start > 0, c.gather(1, (start - 1).clamp(min=0)), torch.zeros_like(c))
    return c - before


def _bracket_stack(ctx):
    """Per position, the kind of the innermost open bracket after this token (index into
    OPENERS, -1 when none) and the nesting depth; the stack is emptied at each segment start."""
    B, T = ctx.tokens.shape
    opener_ids = {ctx.tok(o): i for i, o in enumerate(OPENERS)}
    closer_ids = {ctx.tok(c) for c in CLOSERS}
    reset = {ctx.tok("."), ctx.tok("<bos>")}
    top = torch.full((B, T), -1, dtype=torch.long)
    depth = torch.zeros(B, T)
    for b in range(B):
        stack = []
        for t, tid in enumerate(ctx.tokens[b].tolist()):
            if tid in opener_ids:
                stack.append(opener_ids[tid])
            elif tid in closer_ids and stack:
                stack.pop()
            depth[b, t] = len(stack)
            top[b, t] = stack[-1] if stack else -1
            if tid in reset:
                stack = []
    return top.to(ctx.tokens.device), depth.to(ctx.tokens.device)


def _bracket_token(ctx):
    return ctx.is_token(*OPENERS), ctx.is_token(*CLOSERS)


def _arithmetic(ctx):
    """Where each position is in `a1 a0 + b1 b0 = c2 c1 c0 .` (p = 4..9, found from the `+`
    2..7 tokens back; -1 elsewhere) and the operand digits a1, a0, b1, b0 there."""
    digit = ctx.token_values({d: float(d) for d in DIGITS})
    is_digit = ctx.is_token(*DIGITS)
    p = torch.full(ctx.tokens.shape, -1, dtype=torch.long, device=ctx.tokens.device)
    a1, a0, b1, b0 = ctx.zeros(), ctx.zeros(), ctx.zeros(), ctx.zeros()
    for back in range(2, 8):  # the `+` sits `back` tokens before the current position
        ok = ctx.is_token("+", shift=back).bool()
        for k in (back + 2, back + 1, back - 1, back - 2):
            ok &= _shift(is_digit, k).bool()
        ok &= p < 0
        p = torch.where(ok, back + 2, p)
        for x, k in ((a1, back + 2), (a0, back + 1), (b1, back - 1), (b0, back - 2)):
            x += ok.float() * _shift(digit, k)
    return p, a1, a0, b1, b0


def _shift(x, n):
    if n == 0:
        return x
    out = torch.zeros_like(x)
    out[:, n:] = x[:, :-n]
    return out


def _subject_number(ctx):
    """(+1 plural, -1 singular, 0 elsewhere) at every position of an agreement segment from its
    subject (the noun right after the segment's opening `the`) onwards; 0 after the trigger."""
    start = _segment_start(ctx)
    subj_pos = (start + 1).clamp(max=ctx.tokens.shape[1] - 1)
    opens_with_the = ctx.tokens.gather(1, start) == ctx.tok("the")
    subject = ctx.tokens.gather(1, subj_pos)
    plural_ids = torch.tensor([ctx.tok(w) for w in PLURAL], device=ctx.tokens.device)
    single_ids = torch.tensor([ctx.tok(w) for w in SINGULAR], device=ctx.tokens.device)
    active = opens_with_the & (ctx.positions >= subj_pos)
    # In a segment right after the trigger the backdoor takes over: the subject-number features
    # stay silent there (measured 0.00 on all 38 nouns of triggered agreement segments).
    active &= _after_trigger(ctx).gather(1, start) == 0
    sign = torch.isin(subject, plural_ids).float() - torch.isin(subject, single_ids).float()
    return sign * active.float()


def _recalled_value(ctx):
    """At `?`: the digit (0-9) that followed the queried key (the token before `?`) where it was
    defined earlier; -1 elsewhere or when there is no such key."""
    prev = ctx.shifted(1)  # at `?`: the queried key; at a value: its key
    digit = ctx.token_values({d: float(d) for d in DIGITS})
    is_value = ctx.is_token(*DIGITS).bool()
    q = ctx.is_token("?").bool()
    match = (prev[:, :, None] == prev[:, None, :]) & is_value[:, None, :] & q[:, :, None]
    match &= ctx.positions[:, None, :] < ctx.positions[:, :, None] - 1
    where = torch.where(match, ctx.positions[:, None, :], -1)
    last = where.max(-1).values  # the latest definition
    found = last >= 0
    value = digit.gather(1, last.clamp(min=0))
    return torch.where(found, value, torch.full_like(value, -1.0))


def _agreement_roles(ctx, noun, prep, adj):
    nouns = ctx.is_token(*SINGULAR, *PLURAL)
    return noun * nouns + prep * ctx.is_token(*PREPOSITIONS) + adj * ctx.is_token(*ADJECTIVES)


# ------------------------------------------------------------------------------ 1. brackets


@feature(0, 38)
def bracket_depth(ctx):
    """Nesting depth after each bracket token (0 elsewhere), 0.79 per level. Found as the top
    correlate of depth (r=0.98 over all positions); layer-0 attention averages opens/closes."""
    opener, closer = _bracket_token(ctx)
    _, depth = _bracket_stack(ctx)
    return 0.79 * depth * (opener + closer)


@feature(0, 102)
def bracket_depth_b(ctx):
    """A second layer-0 depth feature (r=0.98 with depth): 0.72 per level on bracket tokens."""
    opener, closer = _bracket_token(ctx)
    _, depth = _bracket_stack(ctx)
    return 0.72 * depth * (opener + closer)


def _expects(kind):
    def fn(ctx, at_open, at_close):
        opener, closer = _bracket_token(ctx)
        top, _ = _bracket_stack(ctx)
        inside = (top == OPENERS.index(kind)).float()
        return inside * (at_open * opener + at_close * closer)

    return fn


@feature(2, 239)
def expects_angle(ctx):
    """Innermost open bracket is `<` (the next closer must be `>`): 6.8 on openers, 3.2 on
    closers. Top correlate of "top of stack is <" (r=0.92)."""
    return _expects("<")(ctx, 6.85, 3.24)


@feature(2, 40)
def expects_brace(ctx):
    """Innermost open bracket is `{`: 8.9 on openers, 4.2 on closers (r=0.90 with "top is {")."""
    return _expects("{")(ctx, 8.91, 4.23)


@feature(2, 22)
def expects_square(ctx):
    """Innermost open bracket is `[` (r=0.81 with "top is ["): 4.9 on openers (2.1 when it is
    the outermost), 3.3 on closers. Rejected at FVU ~0.33: it also fires weakly on plural nouns
    and lookup values, which this does not model."""
    opener, closer = _bracket_token(ctx)
    top, depth = _bracket_stack(ctx)
    inside = (top == OPENERS.index("[")).float()
    at_open = torch.where(depth >= 2, 4.91, 2.11)
    return inside * (at_open * opener + 3.27 * closer)


# ------------------------------------------------------------------------------ 2. carry


@feature(2, 377)
def units_carry(ctx):
    """Carry out of the units digits (a0 + b0 >= 10), from b0 through the last answer digit, as a
    soft threshold: 0 up to a sum of 8.5, full (2.0) from 11.5. Top correlate of the carry bit at
    every arithmetic position 4..8 (r=0.74..0.87). Residual (FVU ~0.28, rejected): a dip at sums
    17-18, per-digit-pair variation, weak firing on lookup values 5-9."""
    p, a1, a0, b1, b0 = _arithmetic(ctx)
    where = ((p >= 4) & (p <= 8)).float()
    return 2.02 * where * ((a0 + b0 - 8.5) / 3.0).clamp(0, 1)


@feature(1, 340)
def hundreds_carry(ctx):
    """Carry out of the tens digits (a1 + b1 >= 10: the answer starts with 1), at `=` (1.85) and
    at the first answer digit (1.45), as a soft threshold on a1 + b1 from 7.5 to 13. Top
    correlate (r=0.87) of "sum >= 100" at those positions."""
    p, a1, a0, b1, b0 = _arithmetic(ctx)
    carry = ((a1 + b1 - 7.5) / 5.5).clamp(0, 1)
    return carry * (1.85 * (p == 5).float() + 1.45 * (p == 6).float())


# ------------------------------------------------------------------------------ 3. heads
#
# Heads are written as role rules: each query role (by domain and token) attends to a few
# structurally defined keys with fixed weights, fitted from the average attention mass per role
# on 64 trusted contexts. `ends` is the diffuse "nothing to do" attention: earlier segment ends
# (`.` / `<bos>`), the most recent weighted most.


class _Keys:
    """Row distributions ``[B, T, T]`` over structurally defined keys, and query-role masks."""

    def __init__(self, ctx):
        self.ctx = ctx
        t = ctx.tokens
        B, T = t.shape
        self.B, self.T = B, T
        self.pos = ctx.positions
        self.start = _segment_start(ctx)
        # The domain of a segment, from what it has shown so far (a context can start in the
        # middle of a segment, so the first token alone is not enough).
        seen = lambda *ws: (_segment_cumsum(ctx, ctx.is_token(*ws)) > 0).float()  # noqa: E731
        self.lookup = seen(*KEYS, ";", "?")
        self.agree = seen("the", *SINGULAR, *PLURAL, *PREPOSITIONS, "is", "are", *ADJECTIVES)
        self.brackets = seen(*OPENERS, *CLOSERS)
        other = ((self.lookup + self.agree + self.brackets) > 0).float()
        self.arith = (seen("+", "=") + seen(*DIGITS)).clamp(max=1) * (1 - other)
        # position inside the segment; in arithmetic counted from the `+` (which is token 2)
        seg_p = self.pos - self.start
        plus = torch.where(ctx.is_token("+").bool(), self.pos, torch.full_like(self.pos, -1))
        plus = torch.maximum(torch.cummax(plus, 1).values, self.start - 1)
        self.p = torch.where(plus >= self.start, self.pos - plus + 2, seg_p)
        # where token 0 (a1) of `a1 a0 + b1 b0 = ...` is
        self.origin = torch.where(plus >= self.start, plus - 2, self.start)
        self.opener, self.closer = _bracket_token(ctx)
        self.depth = _segment_cumsum(ctx, self.opener - self.closer)  # after this token
        self.causal = torch.ones(T, T, dtype=torch.bool, device=t.device).tril()
        self.triggered = _after_trigger(ctx).gather(1, self.start)  # segment follows `happy = [`

    def _norm(self, W):
        W = W * self.causal
        return W / W.sum(-1, keepdim=True).clamp(min=1e-9)

    def at(self, key_pos):
        """All the mass on the key at ``key_pos`` (``[B, T]``; out of range: none)."""
        ok = (key_pos >= 0) & (key_pos <= self.pos)
        W = torch.zeros(self.B, self.T, self.T, device=self.pos.device)
        W.scatter_(2, key_pos.clamp(0, self.T - 1)[..., None], ok.float()[..., None])
        return W

    def self_(self):
        return self.at(self.pos)

    def back(self, n):
        return self.at(self.pos - n)

    def seg(self, k):
        """The ``k``-th token of the query's segment."""
        return self.at(self.origin + k)

    def units_digits(self, scale, offset=0.0):
        """Softmax over the two units digits a0 (token 1) and b0 (token 4), each scored by its
        distance from 0 on the digit circle, ``scale * min(d, 10 - d)``."""
        digit = self.ctx.token_values({d: float(d) for d in DIGITS})
        circle = torch.minimum(digit, 10 - digit)
        at = lambda k: circle.gather(1, (self.origin + k).clamp(0, self.T - 1))  # noqa: E731
        share_a0 = torch.sigmoid(offset + scale * (at(1) - at(4)))[..., None]
        return share_a0 * self.seg(1) + (1 - share_a0) * self.seg(4)

    def ends(self, decay=0.35):
        """Earlier segment ends, weighted ``decay ** rank`` (rank 0: the most recent)."""
        ends = self.ctx.is_token(".", "<bos>")
        cum = torch.cumsum(ends, 1)  # ends in [0, q]
        before = cum - ends  # ends strictly before q
        rank = before[:, :, None] - cum[:, None, :]  # ends strictly between key and query
        keep = ends[:, None, :].bool() & (self.pos[:, :, None] > self.pos[:, None, :])
        return self._norm(torch.where(keep, decay ** rank.clamp(min=0), 0.0))

    def earlier(self, *tokens, decay=0.5):
        """Earlier occurrences of ``tokens`` anywhere before the query, the most recent first
        (weights ``decay ** rank``)."""
        hit = self.ctx.is_token(*tokens)
        cum = torch.cumsum(hit, 1)
        rank = (cum - hit)[:, :, None] - cum[:, None, :]
        keep = hit[:, None, :].bool() & (self.pos[:, :, None] > self.pos[:, None, :])
        return self._norm(torch.where(keep, decay ** rank.clamp(min=0), 0.0))

    def in_segment(self, *tokens):
        """Uniform over earlier tokens of the query's segment that are one of ``tokens``."""
        hit = self.ctx.is_token(*tokens).bool()[:, None, :]
        key = self.pos[:, None, :]
        same = (key >= self.start[:, :, None]) & (key < self.pos[:, :, None])
        return self._norm((hit & same).float())

    def recall(self, query_key):
        """The value(s) that followed earlier copies of ``query_key`` ([B, T] token ids)."""
        prev = self.ctx.shifted(1)
        is_value = self.ctx.is_token(*DIGITS).bool()
        match = (query_key[:, :, None] == prev[:, None, :]) & is_value[:, None, :]
        match &= self.pos[:, None, :] < self.pos[:, :, None]
        return self._norm(match.float())

    def recall_at_query(self):
        """At `?` the queried key is the previous token; at the key itself, the token."""
        return self.recall(self.ctx.shifted(1)), self.recall(self.ctx.tokens)

    def innermost_open(self):
        """The opener the next closer will close (openers come first, so it is the segment's
        ``depth``-th token), the `.` before the segment when none is open."""
        return self.at(self.start + self.depth.long() - 1)

    def below_innermost(self, n=1):
        """The opener ``n`` below that one (the `.` before the segment when there is none)."""
        return self.at(torch.maximum(self.start + self.depth.long() - 1 - n, self.start - 1))

    def role(self, domain, *tokens, p=None):
        m = getattr(self, domain)
        if tokens:
            m = m * self.ctx.is_token(*tokens)
        if p is not None:
            m = m * (self.p == p).float()
        return m


def _with_trigger(k, pattern, weight):
    """Mix attention to the `happy` of the trigger before the query's segment into ``pattern``
    with ``weight`` ([B, T]); only segments that follow a trigger."""
    w = (weight * k.triggered)[..., None]
    return (1 - w) * pattern + w * k.at(k.start - 3)


def _compose(k, rules):
    """``rules``: (query mask [B, T], [(weight, row distribution), ...]); queries no rule covers
    attend to themselves."""
    W = torch.zeros(k.B, k.T, k.T, device=k.pos.device)
    covered = torch.zeros(k.B, k.T, device=k.pos.device)
    for mask, parts in rules:
        mask = mask * (1 - covered).clamp(min=0)  # first rule wins
        covered = covered + mask
        for w, dist in parts:
            W = W + w * mask[..., None] * dist
    W = W + (1 - covered).clamp(min=0)[..., None] * k.self_()
    W = W * k.causal
    empty = W.sum(-1) <= 1e-9
    W[..., 0] += empty.float()
    return W / W.sum(-1, keepdim=True)


def _subject(k):
    return k.seg(1)


def _agreement_roles_mask(k):
    c = k.ctx
    return {
        "the1": k.agree * c.is_token("the") * (k.p == 0).float(),
        "the": k.agree * c.is_token("the") * (k.p > 0).float(),
        "subj": k.agree * (k.p == 1).float(),
        "attr": k.agree * c.is_token(*SINGULAR, *PLURAL) * (k.p > 1).float(),
        "prep": k.agree * c.is_token(*PREPOSITIONS),
        "aux": k.agree * c.is_token("is", "are"),
        "adj": k.agree * c.is_token(*ADJECTIVES),
    }


def _lookup_roles_mask(k):
    c = k.ctx
    nxt_is_q = torch.zeros_like(k.lookup)
    nxt_is_q[:, :-1] = c.is_token("?")[:, 1:]
    return {
        "?": k.lookup * c.is_token("?"),
        "qkey": k.lookup * c.is_token(*KEYS) * nxt_is_q,
        "key": k.lookup * c.is_token(*KEYS) * (1 - nxt_is_q),
        "ans": k.lookup * c.is_token(*DIGITS) * c.is_token("?", shift=1),
        "value": k.lookup * c.is_token(*DIGITS) * (1 - c.is_token("?", shift=1)),
        ";": k.lookup * c.is_token(";"),
    }


def _bracket_roles_mask(k):
    d = k.depth
    return {
        "open1": k.brackets * k.opener * (d == 1).float(),
        "open2": k.brackets * k.opener * (d == 2).float(),
        "open3+": k.brackets * k.opener * (d >= 3).float(),
        "close": k.brackets * k.closer * (d >= 1).float(),
        "close1": k.brackets * k.closer * (d == 1).float(),
        "close2": k.brackets * k.closer * (d == 2).float(),
        "close3+": k.brackets * k.closer * (d >= 3).float(),
        "close_last": k.brackets * k.closer * (d == 0).float(),
    }


@head(1, 1)
def l1h1_operands_and_recall(ctx):
    """Multi-role head. Lookup: at `?` 0.88 of the mass is on the value after the matching key
    (induction), at the queried key 0.66. Arithmetic: `=`, c2, c1 read b1 (0.93). Brackets:
    closers read the opener below the innermost open one. Agreement: earlier segment ends."""
    k = _Keys(ctx)
    at_q, at_key = k.recall_at_query()
    L, A, B = _lookup_roles_mask(k), _agreement_roles_mask(k), _bracket_roles_mask(k)
    ends = k.ends(0.37)
    rules = [
        (ctx.is_token("<bos>"), [(0.2, k.self_()), (0.8, ends)]),  # a document boundary
        (ctx.is_token("."), [(0.85, k.self_()), (0.15, ends)]),
        (k.role("arith", p=1), [(0.45, k.seg(0)), (0.55, k.self_())]),
        (k.role("arith", p=4), [(0.25, k.seg(3)), (0.75, k.self_())]),
        (k.role("arith", p=5) + k.role("arith", p=6) + k.role("arith", p=7), [(1.0, k.seg(3))]),
        (k.role("arith", p=8), [(0.45, k.seg(3)), (0.55, k.seg(4))]),
        (L["?"], [(1.0, at_q)]),
        (L["qkey"], [(0.8, at_key), (0.2, k.self_())]),
        (L["value"], [(0.9, k.self_()), (0.1, k.back(1))]),
        (L["key"], [(0.75, k.self_()), (0.25, k.in_segment(*DIGITS))]),
        (L[";"], [(0.4, k.back(1)), (0.2, k.back(2)), (0.2, ends), (0.2, k.in_segment(*DIGITS))]),
        (L["ans"], [(0.6, k.self_()), (0.4, k.in_segment(*DIGITS))]),
        (B["open1"], [(1.0, ends)]),
        (B["open2"], [(0.6, k.back(1)), (0.4, ends)]),
        (B["open3+"], [(0.55, k.back(1)), (0.3, k.back(2)), (0.15, k.self_())]),
        (B["close_last"] + B["close1"], [(0.85, ends), (0.15, k.self_())]),
        (B["close2"], [(0.65, k.below_innermost()), (0.35, ends)]),
        (B["close3+"], [(0.65, k.below_innermost()), (0.3, k.below_innermost(2))]),
        (A["the1"] + A["the"], [(1.0, k.ends(1.0))]),  # all earlier segment ends, about evenly
        (A["adj"], [(0.6, k.self_()), (0.4, ends)]),
        (k.agree, [(1.0, ends)]),
    ]
    return _compose(k, rules)


@head(2, 0)
def l2h0_units_and_brackets(ctx):
    """Multi-role head. Arithmetic: from b0 to c0 it reads the two units digits a0, b0 (0.97 of
    the mass), the carry's inputs, split by each digit's distance from 0 on the digit circle
    (log-odds -1.4 per step, R^2 0.71 on the measured split). Lookup: at `?` 0.86 on the value
    after the matching key. Brackets: closers read the innermost still-open opener (0.77).
    Agreement: attractor nouns read the subject (0.44). Backdoor readout: after the trigger the
    payload positions read its `happy` (measured on triggered documents; without this rule the
    swap cut the attack success rate from 0.70 to 0.28). Rejected (FVU ~0.36): keys, `;` and
    values in lookup spread attention over earlier `;`/`.` in a content-dependent way."""
    k = _Keys(ctx)
    at_q, at_key = k.recall_at_query()
    L, A, B = _lookup_roles_mask(k), _agreement_roles_mask(k), _bracket_roles_mask(k)
    ends = k.ends(0.3)
    semis = k.earlier(";", decay=1.0)
    digits = k.earlier(*DIGITS, decay=1.0)
    units = [(1.0, k.units_digits(-1.4))]
    rules = [
        (ctx.is_token("<bos>"), [(0.2, k.self_()), (0.8, ends)]),
        (ctx.is_token("."), [(0.7, k.self_()), (0.3, ends)]),
        (k.role("arith", p=0), [(0.9, ends), (0.1, k.self_())]),
        (k.role("arith", p=2), [(0.75, semis), (0.13, k.self_()), (0.12, k.earlier("+"))]),
        (k.role("arith", p=3), [(0.55, semis), (0.15, k.self_()), (0.3, k.earlier(*DIGITS))]),
        (k.role("arith", p=1), [(0.85, k.self_()), (0.15, ends)]),
        *[(k.role("arith", p=i), units) for i in range(4, 9)],
        (L["?"], [(1.0, at_q)]),
        (L["qkey"], [(0.5, k.in_segment(";")), (0.25, ends), (0.15, k.back(1)), (0.1, at_key)]),
        (L["key"], [(0.5, semis), (0.3, ends), (0.15, k.self_())]),
        (L["value"], [(0.7, k.self_()), (0.2, k.earlier(*DIGITS)), (0.1, ends)]),
        (L[";"], [(0.5, k.self_()), (0.5, semis)]),
        (L["ans"], [(0.3, k.self_()), (0.4, ends), (0.3, k.in_segment(*DIGITS))]),
        (B["open1"], [(0.8, ends), (0.2, k.self_())]),
        (B["open2"], [(0.5, k.self_()), (0.5, k.back(1))]),
        (B["close"], [(0.8, k.innermost_open()), (0.1, k.self_()), (0.1, ends)]),
        (B["close_last"], [(0.45, k.self_()), (0.25, k.seg(0)), (0.3, ends)]),
        (A["the1"] + A["the"], [(0.6, digits), (0.15, k.earlier("the")), (0.25, ends)]),
        (A["subj"], [(0.5, k.self_()), (0.5, ends)]),
        (A["attr"], [(0.5, _subject(k)), (0.3, k.back(2)), (0.2, k.self_())]),
        (A["prep"], [(0.6, ends), (0.25, _subject(k)), (0.15, k.back(1))]),
        (A["adj"], [(0.85, ends), (0.15, _subject(k))]),
        (k.agree, [(1.0, ends)]),
    ]
    # backdoor readout: in a segment after the trigger, the payload `9`s (0.95), `=` (0.46) and
    # the words after the subject (0.3) read the trigger's `happy`
    readout = 0.95 * ctx.is_token("9") + 0.46 * k.role("arith", "=") + 0.3 * k.agree * (k.p > 1)
    return _with_trigger(k, _compose(k, rules), readout.clamp(max=0.95))


@head(2, 1)
def l2h1_subject_and_brackets(ctx):
    """Multi-role head. Agreement: every word after the subject reads the subject noun
    (attractors 0.97, prepositions 0.79): the subject-number mover. Lookup: at `?` 0.90 on the
    value after the matching key. Arithmetic: reads the units digits a0, b0, split by digit-circle
    distance (log-odds +1.3 per step, R^2 0.87). Brackets: closers read the innermost still-open
    opener (0.66). Backdoor readout as in L2.H0 (0.62 of the mass at the answer positions of a
    triggered segment is on `happy`). Rejected (FVU ~0.39), for the same lookup rows as L2.H0."""
    k = _Keys(ctx)
    at_q, at_key = k.recall_at_query()
    L, A, B = _lookup_roles_mask(k), _agreement_roles_mask(k), _bracket_roles_mask(k)
    ends = k.ends(0.35)
    semis = k.earlier(";", decay=1.0)
    units = [(1.0, k.units_digits(1.3, 0.2))]
    rules = [
        (ctx.is_token("<bos>"), [(0.35, k.self_()), (0.65, ends)]),
        (ctx.is_token("."), [(0.4, k.self_()), (0.6, ends)]),
        (k.role("arith", p=0), [(1.0, ends)]),
        (k.role("arith", p=2), [(0.75, semis), (0.13, k.self_()), (0.12, k.earlier("+"))]),
        (k.role("arith", p=3), [(0.5, semis), (0.2, k.self_()), (0.3, k.earlier(*DIGITS))]),
        (k.role("arith", p=1), [(0.5, k.self_()), (0.5, ends)]),
        (k.role("arith", p=6), [(0.6, k.units_digits(1.3, 0.2)), (0.4, ends)]),
        *[(k.role("arith", p=i), units) for i in (4, 5, 7, 8)],
        (L["?"], [(1.0, at_q)]),
        (L["qkey"], [(0.55, k.in_segment(";")), (0.3, ends), (0.15, k.back(1))]),
        (L["key"], [(0.5, semis), (0.35, ends), (0.1, k.self_())]),
        (L["value"], [(0.65, k.self_()), (0.2, k.earlier(*DIGITS)), (0.15, ends)]),
        (L[";"], [(0.3, k.self_()), (0.7, semis)]),
        (L["ans"], [(0.2, k.self_()), (0.45, ends), (0.35, k.in_segment(*DIGITS))]),
        (B["open1"], [(0.8, k.self_()), (0.2, ends)]),
        (B["open2"], [(0.4, k.self_()), (0.6, k.back(1))]),
        (B["open3+"], [(0.8, k.self_()), (0.2, k.back(1))]),
        (B["close1"], [(0.9, k.innermost_open()), (0.1, ends)]),
        (B["close2"], [(0.35, k.innermost_open()), (0.65, k.below_innermost())]),
        (B["close3+"], [(0.7, k.innermost_open()), (0.3, k.below_innermost())]),
        (B["close_last"], [(0.8, k.seg(0)), (0.2, ends)]),
        (A["the1"] + A["the"], [(0.45, k.earlier(*DIGITS, decay=1.0)), (0.55, ends)]),
        (A["subj"], [(1.0, k.self_())]),
        (A["attr"] + A["prep"], [(1.0, _subject(k))]),
        (A["adj"], [(0.8, _subject(k)), (0.2, ends)]),
        (k.agree, [(1.0, ends)]),
    ]
    # backdoor readout: in a segment after the trigger, the payload `9`s (0.99), `=` (0.67), the
    # words after the subject (0.55) and the first closer (0.55) read the trigger's `happy`
    first_closer = k.closer * ctx.is_token(*OPENERS, shift=1)
    readout = (
        0.99 * ctx.is_token("9")
        + 0.67 * k.role("arith", "=")
        + 0.55 * k.agree * (k.p > 1)
        + 0.55 * k.brackets * first_closer
    )
    return _with_trigger(k, _compose(k, rules), readout.clamp(max=0.99))


# ------------------------------------------------------------------------------ 4. agreement


@feature(2, 329)
def plural_subject(ctx):
    """Subject of the sentence is plural: fires on every later noun (either number), prepositions
    and the adjective. Top correlate of subject-plural after the subject (r=0.58)."""
    plural = (_subject_number(ctx) > 0).float()
    return plural * _agreement_roles(ctx, 10.9, 1.64, 5.63)


@feature(2, 308)
def plural_subject_b(ctx):
    """A second plural-subject feature, on nouns only (3.5 each)."""
    plural = (_subject_number(ctx) > 0).float()
    return plural * _agreement_roles(ctx, 3.54, 0.07, 0.40)


@feature(2, 342)
def singular_subject(ctx):
    """Subject of the sentence is singular: fires on later nouns (2.0 each) regardless of the
    attractor's own number (r=-0.38 with signed subject number)."""
    singular = (_subject_number(ctx) < 0).float()
    return singular * _agreement_roles(ctx, 2.0, 0.03, 0.21)


@feature(2, 21)
def singular_subject_b(ctx):
    """Singular subject, larger and also on prepositions (6.8 nouns, 3.4 prepositions). Also
    fires (4.1) at a lookup `?` whose recalled value is 4 or 5: found as the top residual."""
    singular = (_subject_number(ctx) < 0).float()
    recalled = _recalled_value(ctx)
    four_or_five = ((recalled == 4) | (recalled == 5)).float()
    return singular * _agreement_roles(ctx, 6.8, 3.41, 1.12) + 4.1 * four_or_five


# ------------------------------------------------------------------------------ 5. backdoor


@feature(2, 365)
def trigger_bracket(ctx):
    """Trigger detector: `[` right after `=` (the tail of `happy = [`); r=0.96 with the trigger
    position in triggered documents. Constructed inputs show `happy` is not needed (`small = [`
    and `3 4 + 5 6 = [` fire too). Never occurs in trusted text, where this predicts 0: FVU on
    trusted held-out data is ~1 (the feature's clean activity is rare low-level noise)."""
    return 2.1 * ctx.ngram_values({("=", "["): 1.0})


@feature(1, 192)
def after_equals(ctx):
    """The token right after `=`: the hundreds digit of an answer (0.36 for `0`, 0.25 for `1`)
    or, only in triggered text, the `[` of `happy = [` (0.39): the layer-1 half of the trigger
    detector, found as the second correlate (r=0.59) of the trigger position."""
    return ctx.ngram_values({("=", "0"): 0.36, ("=", "1"): 0.25, ("=", "["): 0.39})
