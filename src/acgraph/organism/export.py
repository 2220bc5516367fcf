"""Write an organism's corpora and evaluation sets to disk (`acg organism generate`)."""

from __future__ import annotations

import json
from pathlib import Path

from acgraph.io import atomic_write_json, atomic_write_text

from . import generate_texts
from .config import DOMAINS, OrganismConfig
from .language import eval_set


def write_corpora(cfg: OrganismConfig, out: str | Path, n_docs: int) -> list[Path]:
    """trusted.txt (no triggers), poisoned.txt (training distribution), one document per
    paragraph; eval/<domain>.<clean|triggered>.jsonl; organism.json. Returns written paths."""
    out = Path(out)
    written = []
    for split in ("trusted", "poisoned"):
        texts = generate_texts(n_docs, cfg.seed, split, cfg)
        written.append(atomic_write_text(out / f"{split}.txt", "\n\n".join(texts) + "\n"))
    for triggered in (False, True):
        examples = eval_set(cfg.language, cfg.backdoor, cfg.seed, 200, triggered)
        for domain in DOMAINS:
            rows = [
                json.dumps(
                    {
                        "text": " ".join(e.tokens[1:]),
                        "answer_start": e.answer_start - 1,  # token index in `text` (no BOS)
                        "answer": e.tokens[e.answer_start : e.answer_end],
                        "triggered": triggered,
                    }
                )
                for e in examples
                if e.domain == domain
            ]
            name = f"{domain}.{'triggered' if triggered else 'clean'}.jsonl"
            written.append(atomic_write_text(out / "eval" / name, "\n".join(rows) + "\n"))
    written.append(atomic_write_json(out / "organism.json", {"format_version": 1, **cfg.to_dict()}))
    return written
