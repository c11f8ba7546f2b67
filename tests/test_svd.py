import pytest
import torch

from peft_minimal import svd


@pytest.fixture
def W():
    g = torch.Generator().manual_seed(0)
    return torch.randn(30, 20, generator=g, dtype=torch.float64)


def test_factors_are_orthonormal_and_reconstruct(W):
    U, S, Vh = svd.truncated_svd(W, 20)
    eye = torch.eye(20, dtype=W.dtype)
    torch.testing.assert_close(U.T @ U, eye)
    torch.testing.assert_close(Vh @ Vh.T, eye)
    torch.testing.assert_close((U * S) @ Vh, W)
    assert torch.all(S[:-1] >= S[1:])


@pytest.mark.parametrize("r", [1, 3, 10])
def test_eckart_young_error_and_optimality(W, r):
    S = svd.singular_values(W)
    approx = svd.low_rank_approx(W, r)
    assert torch.linalg.matrix_rank(approx) == r
    err = torch.linalg.norm(W - approx)
    torch.testing.assert_close(err, svd.eckart_young_error(S, r))
    g = torch.Generator().manual_seed(r)
    for _ in range(20):  # random rank-r matrices, and perturbations of the optimum, are worse
        other = torch.randn(30, r, generator=g, dtype=W.dtype) @ torch.randn(r, 20, generator=g, dtype=W.dtype)
        assert torch.linalg.norm(W - other) > err
        U, s, Vh = svd.truncated_svd(W, r)
        nudged = ((U + 0.01 * torch.randn(U.shape, generator=g, dtype=W.dtype)) * s) @ Vh
        assert torch.linalg.norm(W - nudged) > err


def test_randomized_close_to_exact_on_low_rank_plus_noise():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(200, 8, generator=g) @ torch.randn(8, 150, generator=g) + 0.01 * torch.randn(200, 150, generator=g)
    exact = torch.linalg.norm(M - svd.low_rank_approx(M, 8))
    randomized = torch.linalg.norm(M - svd.randomized_low_rank(M, 8))
    assert exact <= randomized <= exact * 1.05
    assert torch.equal(svd.randomized_low_rank(M, 8, seed=1), svd.randomized_low_rank(M, 8, seed=1))


def test_energy_and_rank_for_energy():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])
    torch.testing.assert_close(svd.energy(S), torch.tensor([9, 13, 14, 14], dtype=torch.float64) / 14)
    assert svd.rank_for_energy(S, 9 / 14) == 1
    assert svd.rank_for_energy(S, 0.9) == 2
    assert svd.rank_for_energy(S, 1.0) == 3
    with pytest.raises(ValueError, match="share"):
        svd.rank_for_energy(S, 0.0)


def test_effective_and_stable_rank():
    assert svd.effective_rank(torch.ones(7)) == pytest.approx(7)
    assert svd.effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1)
    assert svd.stable_rank(torch.tensor([2.0, 2.0, 0.0])) == pytest.approx(2)
    S = torch.tensor([10.0, 1.0, 0.1])
    assert 1 < svd.stable_rank(S) < svd.effective_rank(S) < 3


@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(2, 3, 4)])
def test_non_matrix_is_refused(bad):
    with pytest.raises(ValueError, match="2-D"):
        svd.singular_values(bad)


@pytest.mark.parametrize("r", [0, 21, 2.0])
def test_bad_rank_is_refused(W, r):
    with pytest.raises(ValueError, match=r"rank r must be an integer in \[1, 20\]"):
        svd.low_rank_approx(W, r)
