"""Stream model activations through a bounded shuffle buffer, deterministically.

The token contexts are visited in a seeded order (a fresh permutation per epoch). They are
grouped into *blocks* of ``ceil(buffer_tokens / context_size)`` contexts. For each block the
model runs once (one forward per ``model_batch_size`` contexts, hooks capture every requested
hook at once, later layers are skipped; ``acgraph.models.lean`` where it applies),
BOS/separator/padding positions are dropped, and the rows (one per kept token, all hooks
aligned) are shuffled with a generator seeded by ``(seed, block)``. Training batches are
consecutive slices of ``batch_size`` rows; the ragged end of a block (fewer than
``batch_size`` rows) is dropped.

So the data of every step is a pure function of (model, tokens, seed, block, batch-in-block):
a resumed run regenerates the current block and continues exactly where it stopped. The
buffer holds one block (``buffer_tokens`` tokens per hook).

Optional on-disk shards (``shard_dir``): each block's masked, unshuffled rows are saved as
``block_{b:07d}.safetensors`` (one tensor per hook) with a ``manifest.json`` fingerprint (model
weights, tokens, hooks, seed, block size). A later run with the same fingerprint reads the
block instead of running the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from acgraph.errors import ArtifactError, ConfigError
from acgraph.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from acgraph.models import lean

SHARD_FORMAT_VERSION = 1
# model-forward precisions a stream can run under (None: the model's own dtype)
AUTOCAST_DTYPES: dict[str | None, torch.dtype | None] = {None: None, "bfloat16": torch.bfloat16}
# how the model runs: the lean forward (exact, where it applies; else TransformerLens), the same
# compiled by torch.compile (~25 s to compile; then about 2x faster again with bf16 weights, little
# in fp32, where the forward is matmul-bound), or TransformerLens
FORWARDS = ("lean", "compiled", "transformer_lens")
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")


def special_token_ids(tokenizer: Any) -> list[int]:
    """BOS, EOS and padding ids of a Hugging Face tokenizer (none when it is None)."""
    if tokenizer is None:
        return []
    ids = set()
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, attr, None)
        if token_id is not None:
            ids.add(int(token_id))
    return sorted(ids)


def stop_layer(hooks: Iterable[str]) -> int | None:
    """The ``stop_at_layer`` that still runs every hook (None: run the whole model)."""
    layers = []
    for hook in hooks:
        match = _BLOCK_HOOK.match(hook)
        if match is None:
            if hook.startswith("hook_embed") or hook.startswith("hook_pos_embed"):
                layers.append(0)
                continue
            return None
        layers.append(int(match.group(1)))
    return max(layers) + 1 if layers else None


@torch.no_grad()
def capture_hooks(
    model: Any,
    tokens: Tensor,
    hooks: Sequence[str],
    *,
    stop: bool = True,
    autocast: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """One forward of ``tokens [batch, pos]``; returns ``{hook: [batch, pos, d]}``.

    ``autocast``: run the forward under ``torch.autocast`` to that dtype (matmuls in bf16 on
    CPUs with bf16 instructions are about twice as fast; the residual stream stays fp32)."""
    captured: dict[str, Tensor] = {}

    def make(name: str):
        def hook_fn(value: Tensor, hook: Any) -> None:
            captured[name] = value.detach()

        return hook_fn

    kwargs: dict[str, Any] = {"return_type": None}
    layer = stop_layer(hooks) if stop else None
    if layer is not None and layer < model.cfg.n_layers:
        kwargs["stop_at_layer"] = layer
    precision = (
        contextlib.nullcontext()
        if autocast is None
        else torch.autocast(torch.device(tokens.device).type, dtype=autocast)
    )
    with precision:
        model.run_with_hooks(tokens, fwd_hooks=[(h, make(h)) for h in hooks], **kwargs)
    missing = [h for h in hooks if h not in captured]
    if missing:
        raise ArtifactError(f"the model never ran hooks {missing}")
    return captured


def check_hooks_exist(model: Any, hooks: Iterable[str]) -> None:
    names = set(model.hook_dict)
    for hook in hooks:
        if hook not in names:
            raise ArtifactError(
                f"hook {hook!r} does not exist in model {model.cfg.model_name!r} "
                f"({model.cfg.n_layers} layers); e.g. blocks.0.ln2.hook_normalized, "
                "blocks.0.hook_mlp_out, blocks.0.hook_resid_post"
            )


def model_fingerprint(model: Any) -> str:
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        digest.update(name.encode())
        digest.update(
            param.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()[:32]


def tokens_fingerprint(tokens: Tensor) -> str:
    return hashlib.sha256(tokens.cpu().contiguous().numpy().tobytes()).hexdigest()[:32]


@dataclass(frozen=True)
class StreamPosition:
    """Where the stream stands: the next batch is batch ``batch`` of block ``block``."""

    block: int = 0
    batch: int = 0


def _mix(seed: int, *values: int) -> int:
    digest = hashlib.sha256(repr((seed, *values)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ActivationStream:
    """Deterministic, resumable batches of aligned activations for several hooks."""

    def __init__(
        self,
        model: Any,
        tokens: Tensor,
        hooks: Sequence[str],
        *,
        batch_size: int,
        buffer_tokens: int = 65_536,
        model_batch_size: int = 32,
        exclude_token_ids: Iterable[int] = (),
        seed: int = 0,
        shard_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        autocast: torch.dtype | None = None,
        forward: str = "lean",
    ):
        if forward not in FORWARDS:
            raise ConfigError(f"forward must be one of {FORWARDS}, got {forward!r}")
        if tokens.dim() != 2 or tokens.shape[0] < 1:
            raise ConfigError(
                f"tokens must be [n_contexts, context_size], got {tuple(tokens.shape)}"
            )
        for name, value in (
            ("batch_size", batch_size),
            ("buffer_tokens", buffer_tokens),
            ("model_batch_size", model_batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.model = model
        self.tokens = tokens
        self.hooks = list(dict.fromkeys(hooks))
        self.batch_size = batch_size
        self.context_size = tokens.shape[1]
        self.contexts_per_block = max(1, math.ceil(buffer_tokens / self.context_size))
        if self.contexts_per_block * self.context_size < batch_size:
            raise ConfigError(
                f"buffer_tokens={buffer_tokens} is smaller than one batch ({batch_size} tokens)"
            )
        self.model_batch_size = model_batch_size
        self.exclude_token_ids = sorted({int(i) for i in exclude_token_ids})
        self.seed = int(seed)
        self.device = device if device is not None else model.cfg.device
        self.shard_dir = Path(shard_dir) if shard_dir is not None else None
        self.autocast = autocast
        self.forward = forward
        self._lean: Any = None  # LeanForward.run (compiled or not), built on first use
        self._perms: dict[int, Tensor] = {}
        self._block_cache: tuple[int, dict[str, Tensor]] | None = None
        self._compute_hooks = list(self.hooks)  # a shard folder may hold more hooks
        check_hooks_exist(model, self.hooks)
        if self.shard_dir is not None:
            self._check_manifest()

    # ------------------------------------------------------------ context order

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(_mix(self.seed, 0, epoch))
            self._perms = {epoch: torch.randperm(self.tokens.shape[0], generator=gen)}
        return self._perms[epoch]

    def block_contexts(self, block: int) -> Tensor:
        """The token contexts ``[contexts_per_block, context_size]`` of ``block``."""
        n = self.tokens.shape[0]
        start = block * self.contexts_per_block
        rows = []
        for g in range(start, start + self.contexts_per_block):
            rows.append(int(self._perm(g // n)[g % n]))
        return self.tokens[torch.tensor(rows)]

    # ------------------------------------------------------------ blocks

    def _contexts_for_rows(self, block: int, max_rows: int | None) -> int | None:
        """How many of ``block``'s contexts give at least ``max_rows`` rows (None: all)."""
        if max_rows is None:
            return None
        contexts = self.block_contexts(block)
        excluded = torch.tensor(self.exclude_token_ids, dtype=contexts.dtype)
        rows = (~torch.isin(contexts, excluded)).sum(1).cumsum(0)
        enough = int(torch.searchsorted(rows, torch.tensor(max_rows)))  # first index >= max_rows
        n = enough + 1
        return None if n >= contexts.shape[0] else n

    def _compute_block(self, block: int, n_contexts: int | None = None) -> dict[str, Tensor]:
        contexts = self.block_contexts(block)[:n_contexts]
        excluded = torch.tensor(self.exclude_token_ids, dtype=contexts.dtype)
        hooks = self._compute_hooks
        parts: dict[str, list[Tensor]] = {h: [] for h in hooks}
        for start in range(0, contexts.shape[0], self.model_batch_size):
            chunk = contexts[start : start + self.model_batch_size]
            keep = ~torch.isin(chunk, excluded).reshape(-1)
            acts = self._run(chunk.to(self.device), hooks)
            for hook in hooks:
                value = acts[hook]
                flat = value.reshape(-1, value.shape[-1])
                parts[hook].append(flat[keep.to(flat.device)].float())
        return {h: torch.cat(parts[h]) for h in hooks}

    def _run(self, chunk: Tensor, hooks: list[str]) -> dict[str, Tensor]:
        """One model forward: the lean forward where it applies, else TransformerLens."""
        if self.forward == "transformer_lens" or self.autocast is not None:
            return capture_hooks(self.model, chunk, hooks, autocast=self.autocast)
        if not lean.supports(self.model, hooks):
            return capture_hooks(self.model, chunk, hooks)
        if self._lean is None:
            run = lean.LeanForward(self.model, lean.layers_needed(hooks)).run
            self._lean = torch.compile(run, dynamic=False) if self.forward == "compiled" else run
        n = chunk.shape[0]
        if self.forward == "compiled" and n < self.model_batch_size:
            # one shape for the whole run: a short last chunk is padded, not recompiled
            pad = chunk[:1].expand(self.model_batch_size - n, -1)
            return {h: v[:n] for h, v in self._lean(torch.cat([chunk, pad]), hooks).items()}
        return self._lean(chunk, hooks)

    def raw_block(self, block: int, n_contexts: int | None = None) -> dict[str, Tensor]:
        """Masked, unshuffled rows of ``block`` (from a shard when one exists), or of its
        first ``n_contexts`` contexts (computed alone; never written as a shard)."""
        path = self._shard_path(block)
        if path is None:
            data = self._compute_block(block, n_contexts)
            return {h: data[h] for h in self.hooks}
        if path.is_file():
            data = load_tensors(path)
            missing = [h for h in self.hooks if h not in data]
            if missing:
                raise ArtifactError(f"activation shard {path} lacks hooks {missing}")
        else:  # shards always hold whole blocks, for later (longer) runs
            data = self._compute_block(block)
            atomic_save_tensors(path, data)
        if n_contexts is not None:  # the rows of the first n_contexts contexts
            contexts = self.block_contexts(block)[:n_contexts]
            excluded = torch.tensor(self.exclude_token_ids, dtype=contexts.dtype)
            n_rows = int((~torch.isin(contexts, excluded)).sum())
            data = {h: v[:n_rows] for h, v in data.items()}
        return {h: data[h].to(self.device) for h in self.hooks}

    def block(self, block: int, max_rows: int | None = None) -> dict[str, Tensor]:
        """Shuffled rows of ``block``; the most recent block is kept in memory.

        ``max_rows``: only the block's first contexts that give at least this many rows (the
        last block of a run needs no more: the model does not run on contexts never trained on).
        """
        n_contexts = self._contexts_for_rows(block, max_rows)
        key = (block, n_contexts)
        if self._block_cache is not None and self._block_cache[0] == key:
            return self._block_cache[1]
        data = self.raw_block(block, n_contexts)
        n_rows = next(iter(data.values())).shape[0]
        gen = torch.Generator().manual_seed(_mix(self.seed, 1, block))
        order = torch.randperm(n_rows, generator=gen).to(next(iter(data.values())).device)
        shuffled = {h: v[order] for h, v in data.items()}
        self._block_cache = (key, shuffled)
        return shuffled

    def cached_block(self) -> dict[str, Tensor] | None:
        """The block held in memory (the one the last batch came from), if any."""
        return None if self._block_cache is None else self._block_cache[1]

    def batches_in_block(self, block: int) -> int:
        n_rows = next(iter(self.block(block).values())).shape[0]
        return n_rows // self.batch_size

    def batches(
        self,
        position: StreamPosition = StreamPosition(),
        *,
        total_batches: int | None = None,
        batches_done: int = 0,
    ) -> Iterator[tuple[StreamPosition, dict[str, Tensor]]]:
        """Yield ``(position_after_this_batch, {hook: [batch_size, d]})`` forever.

        With ``total_batches`` (the run's length) and ``batches_done`` (batches already taken
        before ``position``), a block is computed only as far as the remaining batches need:
        its contexts are cut after the first ones that give enough rows, a pure function of
        (block, batches remaining when the block starts), so a resumed run cuts it the same way.
        """
        block, batch = position.block, position.batch
        block_start = batches_done - batch  # batches taken before this block
        empty_blocks = 0
        while True:
            max_rows = None
            if total_batches is not None:
                max_rows = max(total_batches - block_start, 1) * self.batch_size
            data = self.block(block, max_rows)
            n_batches = next(iter(data.values())).shape[0] // self.batch_size
            if n_batches == 0:
                empty_blocks += 1
                if empty_blocks > 3:
                    raise ConfigError(
                        "blocks hold fewer rows than one batch after dropping special tokens; "
                        "raise buffer_tokens or lower batch_size"
                    )
            else:
                empty_blocks = 0
            while batch < n_batches:
                rows = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
                batch += 1
                nxt = (
                    StreamPosition(block, batch)
                    if batch < n_batches
                    else StreamPosition(block + 1, 0)
                )
                yield nxt, {h: v[rows] for h, v in data.items()}
            block, batch = block + 1, 0
            block_start += n_batches

    # ------------------------------------------------------------ shards

    def fingerprint(self) -> dict[str, Any]:
        return {
            "format_version": SHARD_FORMAT_VERSION,
            "model": model_fingerprint(self.model),
            "model_name": str(self.model.cfg.model_name),
            "tokens": tokens_fingerprint(self.tokens),
            "seed": self.seed,
            "contexts_per_block": self.contexts_per_block,
            "exclude_token_ids": self.exclude_token_ids,
            "autocast": None if self.autocast is None else str(self.autocast),
        }

    def _check_manifest(self) -> None:
        assert self.shard_dir is not None
        manifest = self.shard_dir / "manifest.json"
        mine = self.fingerprint()
        if manifest.is_file():
            theirs = read_json(manifest)
            stored_hooks = theirs.get("hooks", []) if isinstance(theirs, dict) else []
            same = isinstance(theirs, dict) and all(theirs.get(k) == v for k, v in mine.items())
            if not same:
                diff = [
                    k for k, v in mine.items() if not isinstance(theirs, dict) or theirs.get(k) != v
                ]
                raise ArtifactError(
                    f"activation shards in {self.shard_dir} were made for different settings "
                    f"({', '.join(diff)} differ); use another --shards folder"
                )
            missing = [h for h in self.hooks if h not in stored_hooks]
            if missing:
                raise ArtifactError(
                    f"activation shards in {self.shard_dir} hold hooks {stored_hooks}, "
                    f"not {missing}; use another --shards folder"
                )
            self._compute_hooks = list(stored_hooks)
            return
        atomic_write_json(manifest, {**mine, "hooks": self.hooks})

    def _shard_path(self, block: int) -> Path | None:
        if self.shard_dir is None:
            return None
        return self.shard_dir / f"block_{block:07d}.safetensors"
