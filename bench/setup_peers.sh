#!/usr/bin/env bash
# Create the peers' virtual environments for the dictionary benchmark, each in its own venv under
# bench/peers/ (git-ignored). Idempotent: a venv whose stamp file exists is skipped.
#
#   bash bench/setup_peers.sh                 # all three: saelens, sparsify, circuit_tracer
#   bash bench/setup_peers.sh saelens         # just one
#
# torch is installed FIRST and pinned through a constraints file (torch==2.13.0, the CPU wheel),
# so a peer's looser requirement can never pull a multi-GB CUDA build or upgrade it. Every other
# package is pinned to the versions we tested, listed in bench/peer_pins/<peer>.txt.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEERS="$HERE/peers"
PINS="$HERE/peer_pins"
PY="${PY:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

declare -A TOP=(
  [saelens]="sae-lens==6.54.12"
  [sparsify]="eai-sparsify==1.3.3"
  [circuit_tracer]="circuit-tracer==0.5.0"
)

setup_one() {
  local name="$1" venv="$PEERS/$1" stamp="$PEERS/$1/.installed"
  if [[ -f "$stamp" ]]; then
    echo "[setup_peers] $name: already installed ($venv)"
    return 0
  fi
  echo "[setup_peers] $name: creating $venv"
  mkdir -p "$PEERS"
  [[ -x "$venv/bin/python" ]] || "$PY" -m venv "$venv"
  local pip=("$venv/bin/python" -m pip --disable-pip-version-check)
  "${pip[@]}" install -q --upgrade pip
  # 1. torch first, pinned (CPU wheel; PIP_FIND_LINKS may point at a local copy).
  "${pip[@]}" install -q -c "$PINS/torch.txt" "torch==2.13.0"
  # 2. the peer, with every dependency constrained to what we tested.
  local cons=(-c "$PINS/torch.txt")
  [[ -f "$PINS/$name.txt" ]] && cons+=(-c "$PINS/$name.txt")
  "${pip[@]}" install -q "${cons[@]}" "${TOP[$name]}"
  # 3. make sure nothing moved torch.
  "$venv/bin/python" - <<'PYEOF'
import torch, sys
v = torch.__version__
if not v.startswith("2.13.0"):
    sys.exit(f"torch changed to {v}; expected 2.13.0")
if torch.version.cuda is not None:
    sys.exit(f"a CUDA torch build was installed ({torch.version.cuda}); expected the CPU wheel")
PYEOF
  "${pip[@]}" freeze > "$venv/freeze.txt"
  touch "$stamp"
  echo "[setup_peers] $name: done"
}

names=("$@")
[[ ${#names[@]} -eq 0 ]] && names=(saelens sparsify circuit_tracer)
for n in "${names[@]}"; do
  [[ -n "${TOP[$n]:-}" ]] || { echo "unknown peer: $n (saelens | sparsify | circuit_tracer)"; exit 2; }
  setup_one "$n"
done
