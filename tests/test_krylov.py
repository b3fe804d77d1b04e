import pytest
import torch

from lightning_dtda.krylov import conjugate_gradients, lanczos_functions
from oracles import relative_error


def operator(num=120, zeros=20, seed=0):
    """A PSD matrix with a wide spectrum (1e-4 .. 1e2) and a null space, like a converged net's GGN."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(num, num, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(-4, 2, num, dtype=torch.float64)
    eigenvalues[:zeros] = 0
    return (basis * eigenvalues) @ basis.T, basis, eigenvalues


def phi(time):
    return lambda c: torch.where(c * time > 1e-12, -torch.expm1(-time * c) / c.clamp(min=1e-300), torch.full_like(c, time))


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
