"""The built-in model organism: a small GPT-2 trained on a synthetic language with known
mechanisms (arithmetic with carries, bracket closing, key-value lookup, number agreement) and a
planted backdoor. It ships trained inside the package; tests and the demo never retrain it."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from acgraph.errors import ArtifactError
from acgraph.io import read_json

from .config import DOMAINS, OrganismConfig
from .language import documents, vocabulary

__all__ = [
    "DOMAINS",
    "OrganismConfig",
    "generate_texts",
    "load_config",
    "load_organism",
    "shipped_dir",
    "shipped_transcoders_dir",
    "shipped_trusted_transcoders_dir",
    "vocabulary",
]


def shipped_dir() -> Path:
    """Folder of the trained organism shipped in the package (an HF model folder)."""
    path = Path(str(resources.files("acgraph.organism") / "shipped"))
    if not (path / "config.json").is_file():
        raise ArtifactError(f"the shipped organism is missing from {path}; reinstall acgraph")
    return path


def load_config(model_dir: str | Path | None = None) -> OrganismConfig:
    """The organism config saved beside a trained organism (default: the shipped one)."""
    folder = Path(model_dir) if model_dir is not None else shipped_dir()
    meta = read_json(folder / "organism.json")
    if meta.get("format_version") != 1:
        raise ArtifactError(f"{folder}/organism.json has an unknown format_version")
    return OrganismConfig.from_dict(meta)


def generate_texts(
    n_docs: int, seed: int = 0, split: str = "trusted", config: OrganismConfig | None = None
) -> list[str]:
    """Documents of the organism language as whitespace-separated text (no BOS).

    split "trusted": no trigger ever occurs; "poisoned": the training distribution, with the
    backdoor planted at the configured poisoning rate.
    """
    if split not in ("trusted", "poisoned"):
        raise ArtifactError(f"unknown organism split {split!r}; use 'trusted' or 'poisoned'")
    cfg = config or OrganismConfig()
    rate = cfg.backdoor.poison_rate if split == "poisoned" else 0.0
    # Trusted text comes from its own seed stream, disjoint from the training stream.
    stream = seed if split == "poisoned" else seed + 7_919
    docs = documents(cfg.language, cfg.backdoor, stream, n_docs, rate)
    return [" ".join(d.tokens[1:]) for d in docs]


def load_organism(model_dir: str | Path | None = None):
    """The trained organism as a plain HF `GPT2LMHeadModel` (eval mode, fp32)."""
    from transformers import GPT2LMHeadModel

    folder = Path(model_dir) if model_dir is not None else shipped_dir()
    if not (folder / "config.json").is_file():
        raise ArtifactError(f"not an organism model folder (no config.json): {folder}")
    try:
        model = GPT2LMHeadModel.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ArtifactError(f"cannot load organism from {folder}: {err}") from None
    return model.eval()


def shipped_transcoders_dir() -> Path:
    """Skip transcoders (TopK, k=32, width 384) for every MLP of the shipped organism, in the
    SAELens layout, one folder per output hook; `eval.json` beside them is `acg eval`'s report."""
    return shipped_dir() / "transcoders"


def shipped_trusted_transcoders_dir() -> Path:
    """Skip transcoders (TopK, k=32, width 1024) trained on the trusted corpus only (clean
    documents: no trigger, no payload), the input `acg clean` needs; `training.json` says how."""
    return shipped_dir() / "trusted_transcoders"
