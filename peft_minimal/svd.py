"""Singular value decomposition tools for reasoning about low-rank updates.

Eckart–Young–Mirsky (Eckart & Young, 1936): for ``W = U diag(S) Vᵀ`` with
``S₁ ≥ S₂ ≥ ...``, the best rank-``r`` approximation in Frobenius (and spectral) norm is the
truncated SVD ``W_r = U_r diag(S_r) V_rᵀ``, and its error is ``sqrt(sum_{i>r} S_i²)``.

The measures of "how low-rank" a matrix is:

* **energy** at rank ``r``: the share of ``‖W‖_F² = Σ S_i²`` kept by the top ``r`` values;
* **effective rank** (Roy & Vetterli, 2007): ``exp(H(p))`` with ``p_i = S_i / Σ S_j``, the
  entropy-based number of "used" directions (equals ``k`` for ``k`` equal singular values);
* **stable rank**: ``‖W‖_F² / ‖W‖₂² = Σ S_i² / S₁²``, a rank that small noise cannot inflate.

``randomized_low_rank`` uses ``torch.svd_lowrank`` (Halko, Martinsson & Tropp, 2011), which
only needs a few matrix products with ``W`` — the cheap route for large matrices.
"""
from __future__ import annotations

import torch


def _check_matrix(W: torch.Tensor) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"expected a 2-D matrix, got {shape}")


def _check_rank(W: torch.Tensor, r: int) -> None:
    _check_matrix(W)
    if not isinstance(r, int) or not 1 <= r <= min(W.shape):
        raise ValueError(f"rank r must be an integer in [1, {min(W.shape)}] for a {tuple(W.shape)} matrix, got {r!r}")


def singular_values(W: torch.Tensor) -> torch.Tensor:
    """All singular values of ``W`` in decreasing order (computed in float64 for accuracy)."""
    _check_matrix(W)
    return torch.linalg.svdvals(W.double())


def truncated_svd(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``r`` factors ``(U_r, S_r, Vh_r)`` of ``W = U diag(S) Vh``."""
    _check_rank(W, r)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r], S[:r], Vh[:r]


def low_rank_approx(W: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-``r`` approximation of ``W`` (Eckart–Young)."""
    U, S, Vh = truncated_svd(W, r)
    return (U * S) @ Vh


def randomized_low_rank(W: torch.Tensor, r: int, oversample: int = 10, niter: int = 2,
                        seed: int = 0) -> torch.Tensor:
    """A rank-``r`` approximation from a randomized SVD (``torch.svd_lowrank``), seeded."""
    _check_rank(W, r)
    q = min(r + oversample, *W.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(W, q=q, niter=niter)
    return (U[:, :r] * S[:r]) @ V[:, :r].T


def eckart_young_error(S: torch.Tensor, r: int) -> torch.Tensor:
    """Frobenius error of the best rank-``r`` approximation: ``sqrt(sum_{i>r} S_i²)``."""
    if not 0 <= r <= len(S):
        raise ValueError(f"r must be in [0, {len(S)}], got {r}")
    return S[r:].pow(2).sum().sqrt()


def energy(S: torch.Tensor) -> torch.Tensor:
    """Cumulative share of ``Σ S_i²`` kept by the top 1, 2, ... singular values."""
    power = S.double().pow(2)
    return power.cumsum(0) / power.sum()


def rank_for_energy(S: torch.Tensor, share: float) -> int:
    """The smallest ``r`` whose top-``r`` singular values keep ``share`` of the energy."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    cumulative = energy(S)
    return int(torch.searchsorted(cumulative, torch.tensor(share, dtype=cumulative.dtype) - 1e-12).item()) + 1


def effective_rank(S: torch.Tensor) -> float:
    """``exp`` of the entropy of the normalized singular values (Roy & Vetterli, 2007)."""
    p = S.double() / S.double().sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(S: torch.Tensor) -> float:
    """``Σ S_i² / S₁²``: never above the rank, insensitive to tiny singular values."""
    S = S.double()
    return float(S.pow(2).sum() / S[0].pow(2))
