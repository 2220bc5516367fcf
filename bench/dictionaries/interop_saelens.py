"""Check that a SAELens-layout folder written by acgraph loads and runs in SAELens
(runs in bench/peers/saelens).

    bench/peers/saelens/bin/python bench/dictionaries/interop_saelens.py \
        --folder DIR [--reference REF.safetensors] --out result.json

``DIR`` holds ``cfg.json`` + ``sae_weights.safetensors``. It is loaded with SAELens's own
``SAE.load_from_disk(DIR)`` (the 6.x loader; it dispatches on ``architecture``) and run on
activations. ``REF.safetensors`` (written by acgraph, see run.py ``interop``) holds ``x`` (input
rows) and ``y_hat`` (acgraph's own output for them) and optionally ``y`` (the true target rows):
the check reports the largest difference between SAELens's and acgraph's outputs, and the FVU of
each when ``y`` is there. Without a reference it runs SAELens on random inputs of width ``d_in``
(a load-and-run smoke test). Exit status 0 = loaded and (with a reference) matched to --atol.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402

pc.set_offline_env()

import torch  # noqa: E402


def check(
    folder: str | Path,
    reference: str | Path | None = None,
    atol: float = 1e-4,
    fvu_tolerance: float | None = None,
) -> dict:
    """Load ``folder`` with SAELens and compare its forward with the reference outputs.

    A file that acgraph marks as an approximation in SAELens (``acgraph.saelens_approximation``:
    a TopK transcoder written as a JumpReLU one) passes when SAELens's FVU is within
    ``fvu_tolerance`` of acgraph's (it needs ``y`` in the reference), not on exact outputs.
    """
    from sae_lens import SAE
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    approximation = (cfg.get("acgraph") or {}).get("saelens_approximation")
    result: dict = {
        "folder": str(folder),
        "architecture": cfg.get("architecture"),
        "acgraph_activation": ((cfg.get("acgraph") or {}).get("config") or {}).get("activation"),
        "saelens_approximation": approximation,
        "hook_name": (cfg.get("metadata") or {}).get("hook_name", cfg.get("hook_name")),
    }
    try:
        sae = SAE.load_from_disk(str(folder), device="cpu")
    except Exception as err:  # report, don't crash: this is what the check is for
        result.update(
            loaded=False,
            ok=False,
            error=f"{type(err).__name__}: {err}",
            traceback=traceback.format_exc(limit=3),
        )
        return result
    sae.eval()
    result.update(loaded=True, saelens_class=type(sae).__name__)
    with torch.no_grad():
        if reference is None:
            x = torch.randn(256, int(cfg["d_in"]))
            out = sae(x)
            result.update(ok=bool(torch.isfinite(out).all()), rows=x.shape[0], reference=None)
            return result
        ref = load_file(str(reference))
        x, y_hat = ref["x"], ref["y_hat"]
        out = sae(x)
        acts = sae.encode(x)
        diff = float((out - y_hat).abs().max())
        result.update(
            rows=int(x.shape[0]),
            reference=str(reference),
            max_abs_diff=diff,
            rel_diff=diff / max(float(y_hat.abs().max()), 1e-12),
            saelens_l0=float((acts != 0).sum(-1).double().mean()),
            ok=diff <= atol,
        )
        if "y" in ref:
            fv_theirs, fv_ours = pc.FVU(), pc.FVU()
            fv_theirs.update(ref["y"], out)
            fv_ours.update(ref["y"], y_hat)
            result.update(fvu_saelens=fv_theirs.value(), fvu_acgraph=fv_ours.value())
        with torch.no_grad():
            ours_l0 = ref.get("l0")
        if ours_l0 is not None:
            result["acgraph_l0"] = float(ours_l0)
        if approximation is not None and fvu_tolerance is not None and "y" in ref:
            gap = abs(result["fvu_saelens"] - result["fvu_acgraph"])
            result.update(fvu_gap=gap, fvu_tolerance=fvu_tolerance, ok=gap <= fvu_tolerance)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="load an acgraph SAELens-layout folder in SAELens")
    p.add_argument("--folder", type=Path, required=True)
    p.add_argument("--reference", type=Path, default=None)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument(
        "--fvu-tolerance",
        type=float,
        default=None,
        help="for files acgraph marks as a SAELens approximation: pass when SAELens's FVU is "
        "within this of acgraph's",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    result = check(args.folder, args.reference, args.atol, args.fvu_tolerance)
    result["environment"] = pc.environment(["sae-lens", "torch"])
    if args.out:
        pc.write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("environment", "traceback")}))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
