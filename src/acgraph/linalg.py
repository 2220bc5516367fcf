"""Solving the symmetric positive (semi)definite systems that least-squares fits produce.

torch 2.13's batched CPU LU, behind ``torch.linalg.solve`` on a batch of matrices larger
than about 150×150, calls MKL's ``getrf`` from several threads at once, and the row swaps
collide: MKL prints "Parameter 6 was incorrect on entry to DLASWP", and the call returns wrong
numbers or never returns (pytorch/pytorch#142815). Normal equations are symmetric positive
definite, so they go through Cholesky, which is unaffected and about twice as fast.
"""

from __future__ import annotations

import torch
from torch import Tensor


def solve_spd(a: Tensor, b: Tensor) -> Tensor:
    """``x`` with ``a @ x = b`` for a batch of symmetric positive semidefinite ``a``
    [..., n, n] and ``b`` [..., n] or [..., n, m]. A system Cholesky cannot factor (singular:
    no ridge and a repeated column) gets the least-squares solution, one matrix at a time."""
    vector = b.dim() == a.dim() - 1
    rhs = b[..., None] if vector else b
    chol, info = torch.linalg.cholesky_ex(a)
    x = torch.cholesky_solve(rhs, chol)
    for i in (info != 0).nonzero().tolist():
        x[tuple(i)] = torch.linalg.lstsq(a[tuple(i)], rhs[tuple(i)]).solution
    return x[..., 0] if vector else x
