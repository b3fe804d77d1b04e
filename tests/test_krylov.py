import pytest
import torch
from oracles import relative_error

from lightning_dtda.curvature.krylov import conjugate_gradients, lanczos_functions, nystrom, nystrom_preconditioner


def operator(num=120, zeros=20, seed=0):
    """A PSD matrix with a wide spectrum (1e-4 .. 1e2) and a null space, like a converged net's GGN."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(num, num, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(-4, 2, num, dtype=torch.float64)
    eigenvalues[:zeros] = 0
    return (basis * eigenvalues) @ basis.T, basis, eigenvalues


def phi(time):
    return lambda c: torch.where(
        c * time > 1e-12, -torch.expm1(-time * c) / c.clamp(min=1e-300), torch.full_like(c, time)
    )


def test_block_conjugate_gradients_solve_dependent_and_zero_columns():
    a, _, _ = operator()
    rhs = torch.randn(120, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rhs[:, 3] = 2 * rhs[:, 0] - rhs[:, 1]  # dependent: the block loses rank, plain block CG would break down
    rhs[:, 4] = 0
    damped = a + 1e-2 * torch.eye(120, dtype=torch.float64)
    x, products, residual = conjugate_gradients(lambda v: damped @ v, rhs, tolerance=1e-10)
    assert relative_error(x, torch.linalg.solve(damped, rhs)) < 1e-8
    assert residual.max() < 1e-9 and residual[4] == 0 and torch.all(x[:, 4] == 0)


def test_one_block_needs_fewer_products_than_its_slowest_column():
    a, _, _ = operator()
    damped = a + 1e-3 * torch.eye(120, dtype=torch.float64)
    rhs = torch.randn(120, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, together, _ = conjugate_gradients(lambda v: damped @ v, rhs, tolerance=1e-8)
    alone = [conjugate_gradients(lambda v: damped @ v, rhs[:, [k]], tolerance=1e-8)[1] for k in range(6)]
    assert together < max(alone)


def test_nystrom_sketch_recovers_a_low_rank_operator_and_its_top_eigenvalues():
    _, basis, _ = operator()
    low = (basis[:, :10] * torch.arange(1.0, 11.0, dtype=torch.float64)) @ basis[:, :10].T  # rank 10
    u, eigenvalues = nystrom(lambda v: low @ v, 120, 15)
    assert relative_error((u * eigenvalues) @ u.T, low) < 1e-10
    assert torch.allclose(u.T @ u, torch.eye(15, dtype=torch.float64), atol=1e-12)
    u, eigenvalues = nystrom(lambda v: 0 * v, 120, 8)  # an operator with nothing to precondition
    assert eigenvalues.max() < 1e-100 and torch.allclose(
        nystrom_preconditioner(u, eigenvalues, 0.1)(low), low, rtol=1e-12, atol=0
    )
    a, _, spectrum = operator()
    top = nystrom(lambda v: a @ v, 120, 40)[1]
    assert (
        torch.all(top <= spectrum.max() * (1 + 1e-12)) and top[0] > 0.9 * spectrum.max()
    )  # a Nystrom sketch never overestimates


def test_nystrom_preconditioned_cg_takes_fewer_products_to_the_same_solution():
    a, _, _ = operator()
    damping = 1e-3
    damped = a + damping * torch.eye(120, dtype=torch.float64)
    rhs = torch.randn(120, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    exact = torch.linalg.solve(damped, rhs)
    x, plain, _ = conjugate_gradients(lambda v: damped @ v, rhs, tolerance=1e-8)
    sketch = nystrom(lambda v: a @ v, 120, 30)
    y, preconditioned, residual = conjugate_gradients(
        lambda v: damped @ v, rhs, nystrom_preconditioner(*sketch, damping), tolerance=1e-8
    )
    assert relative_error(y, exact) < 1e-6 and residual.max() < 1e-8
    assert preconditioned < 0.6 * plain, (preconditioned, plain)


@pytest.mark.parametrize("time", [0.5, 300.0])
def test_lanczos_gives_the_matrix_functions_of_segmented_unrolling(time):
    a, basis, eigenvalues = operator()
    vectors = torch.randn(120, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    functions = [phi(time), lambda c: torch.exp(-time * c)]
    results, products = lanczos_functions(lambda v: a @ v, vectors, functions, tolerance=1e-10)
    for result, fn in zip(results, functions):
        assert relative_error(result, (basis * fn(eigenvalues)) @ basis.T @ vectors) < 1e-8
    # exp(-300 C) over eigenvalues up to 100 is a sharp filter: more products than dimensions (no
    # reorthogonalisation), but still accurate
    assert products < (2 * 120 if time < 1 else 2 * 300)


def test_lanczos_stops_exactly_when_the_krylov_space_is_exhausted():
    """Three distinct eigenvalues: the Krylov space of any vector has dimension 3."""
    g = torch.Generator().manual_seed(4)
    basis, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64))
    eigenvalues = torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64).repeat_interleave(torch.tensor([10, 20, 20]))
    a = (basis * eigenvalues) @ basis.T
    vectors = torch.randn(50, 2, generator=g, dtype=torch.float64)
    [result], products = lanczos_functions(lambda v: a @ v, vectors, [phi(2.0)])
    assert relative_error(result, (basis * phi(2.0)(eigenvalues)) @ basis.T @ vectors) < 1e-10
    assert products <= 2 * 4 - 1
