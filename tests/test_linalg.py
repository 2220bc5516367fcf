"""solve_spd: batched normal equations solved right with several threads (where torch's
batched LU breaks, pytorch/pytorch#142815), singular systems included."""

import subprocess
import sys

import torch

from acgraph.linalg import solve_spd

_TWO_THREADS = """
import torch
from acgraph.linalg import solve_spd
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
x = torch.randn(4, 400, 200, generator=g, dtype=torch.float64)
a = x.transpose(1, 2) @ x
b = torch.randn(4, 200, generator=g, dtype=torch.float64)
sol = solve_spd(a, b)
torch.set_num_threads(1)
ref = torch.stack([torch.linalg.solve(a[i], b[i]) for i in range(4)])
print(float((sol - ref).abs().max() / ref.abs().max()))
"""


def test_batched_large_systems_with_two_threads_match_one_at_a_time():
    run = subprocess.run(
        [sys.executable, "-c", _TWO_THREADS], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "DLASWP" not in run.stderr
    assert float(run.stdout.strip()) < 1e-9


def test_singular_system_gets_the_least_squares_solution_and_the_rest_cholesky():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 50, 3, generator=g, dtype=torch.float64)
    x[1, :, 2] = x[1, :, 0]  # a repeated column: Cholesky cannot factor the second system
    a = x.transpose(1, 2) @ x
    y = torch.randn(2, 50, generator=g, dtype=torch.float64)
    b = (x.transpose(1, 2) @ y[..., None])[..., 0]
    sol = solve_spd(a, b)
    assert torch.allclose(a[0] @ sol[0], b[0], atol=1e-10)
    # the least-squares fit of the singular system is as good as with the column dropped
    fitted = x[1] @ sol[1]
    kept = torch.linalg.lstsq(x[1][:, :2], y[1][:, None]).solution[:, 0]
    assert torch.allclose(fitted, x[1][:, :2] @ kept, atol=1e-8)
    # matrix right-hand sides keep their shape
    assert solve_spd(a, b[..., None]).shape == (2, 3, 1)
