"""Write fitted hypotheses as a readable Python file the user can edit and re-test."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .families import Fitted


def _num(x: float) -> str:
    return f"{x:.4g}"


def _feature_body(f: Fitted, names: list[str]) -> list[str]:
    p = f.params
    if f.family == "token":
        items = ", ".join(f"{names[k]!r}: {_num(v)}" for k, v in _by_size(p["table"]))
        return [f"return ctx.token_values({{{items}}})"]
    if f.family == "ngram":
        toks = ", ".join(f"{names[k]!r}: {_num(v)}" for k, v in _by_size(p["table"]))
        grams = ", ".join(
            f"({names[a]!r}, {names[b]!r}): {_num(v)}" for (a, b), v in _by_size(p["grams"])
        )
        return [
            f"by_token = ctx.token_values({{{toks}}})",
            f"return by_token + ctx.ngram_values({{{grams}}})  # correction after a given token",
        ]
    if f.family == "position":
        items = ", ".join(f"{k}: {_num(v)}" for k, v in sorted(p["table"].items()))
        return [f"return ctx.position_values({{{items}}})"]
    if f.family == "linear":
        lines = ["pre = (", f"    {_num(p['bias'])}"]
        for (m, h, j, i), w in sorted(
            zip(p["terms"], p["weights"], strict=True), key=lambda t: -abs(t[1])
        ):
            src = f"ctx.is_token({names[i]!r})" if j < 0 else f"ctx.feature({j}, {i})"
            if m is not None:
                src = f"ctx.attend({m}, {h}, {src})"
            lines.append(f"    {'+' if w >= 0 else '-'} {_num(abs(w))} * {src}")
        return [*lines, ")", f"return ctx.jump(pre, {_num(p['threshold'])})"]
    raise ValueError(f.family)


def _by_size(table: dict) -> list[tuple[Any, float]]:
    return sorted(table.items(), key=lambda kv: -abs(kv[1]))


_PATTERNS = {"same_token": "ctx.same_token()", "induction": "ctx.induction()", "bos": "ctx.bos()"}


def _head_body(f: Fitted) -> list[str]:
    if f.family == "keyed":
        keys = ", ".join(f"{k!r}: {_num(v)}" for k, v in _by_size(f.params["keys"]))
        offs = ", ".join(f"{d}: {_num(v)}" for d, v in sorted(f.params["offsets"].items()))
        return [
            f"keys = {{{keys}}}  # score of attending to each token",
            f"offsets = {{{offs}}}  # score by distance (the last: that far or farther)",
            "return ctx.softmax_pattern(keys, offsets)",
        ]
    parts = [
        (w, _PATTERNS.get(name) or f"ctx.offset({int(name[6:])})")
        for name, w in sorted(f.params["mix"].items(), key=lambda kv: -kv[1])
    ]
    if len(parts) == 1:
        return [f"return {parts[0][1]}"]
    return ["return ctx.mix(", *(f"    ({_num(w)}, {p})," for w, p in parts), ")"]


def render(fitted: Sequence[Fitted], vocab: dict[str, int], header: str = "") -> str:
    """Python source defining every fitted hypothesis (dead features as one ``zero`` call per
    layer); each carries its family and validation FVU as metadata."""
    names = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        names[i] = tok
    out = ['"""' + (header or "Fitted hypotheses.") + '"""', ""]
    out += ["from acgraph.hypotheses import feature, head, zero", ""]
    dead: dict[int, list[int]] = {}
    for f in fitted:
        t = f.target
        if f.family == "dead":
            dead.setdefault(t.layer, []).append(t.index)
            continue
        if t.kind == "pattern":
            deco, fn, body = f"head({t.layer}, {t.index}", f"L{t.layer}_h{t.index}", _head_body(f)
        else:
            deco, fn = f"feature({t.layer}, {t.index}", f"L{t.layer}_f{t.index}"
            body = _feature_body(f, names)
        out += [
            "",
            f'@{deco}, family="{f.family}", val_fvu={f.fvu:.4f})',
            f"def {fn}(ctx):",
            *("    " + line for line in body),
            "",
        ]
    for layer, ids in sorted(dead.items()):
        out += ["", "# never fired on the fitting data", f"zero({layer}, {ids})", ""]
    return "\n".join(out).rstrip() + "\n"
