"""The exact GGN without a matrix: block CG and Lanczos against the dense path, and what
preconditioning (K-FAC, EK-FAC, a randomized Nystrom sketch) does to CG.

    python benchmarks/krylov.py          # digits MLP, ~2 min on 2 cores
    python benchmarks/krylov.py --cnn    # adds the 1M-parameter CNN of benchmarks/speed.py (~15 min)

Prints, on the digits MLP 64-64-10 (4.8k parameters, 1,000 examples, float32, trained 20 epochs):
(a) products that block CG takes for 50 queries at once against the slowest of the same queries
solved one at a time, per damping; (b) Influence(curvature="ggn") with solver="dense" and
solver="krylov": time and the relative difference of the effects; (c) CG products without and with a
K-FAC or EK-FAC preconditioner fitted at the same weights, or a rank-r Nystrom sketch of the GGN (one
product of r columns); (d) the cost of 256 GGN columns on a small CNN and a small MLP of about the same
parameter count (why a dense GGN is slow on convolutions). With --cnn: seconds per GGN product against
its number of columns, and CG's products and seconds for 1 and 50 queries without and with the sketch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from docs_tables import invocation, write_table
from models import GGN_SUBSET, SPEED_SETTINGS, final_model, record_speed_run, speed_data
from torch import nn

from lightning_dtda import Attributor, Hooks, Influence, load_runs

# This benchmark measures the exact GGN's internals on purpose (its products, the CG solver, the Nystrom
# sketch, the preconditioners and the default's cut-off), which the public API does not expose.
from lightning_dtda.curvature.fit import fit_curvature
from lightning_dtda.curvature.ggn import NYSTROM_MAX_COLUMNS, KrylovGGN
from lightning_dtda.curvature.krylov import conjugate_gradients, nystrom, nystrom_preconditioner
from lightning_dtda.model.gradients import per_example_gradients


def setting(name: str, root: Path, num_train: int, num_queries: int):
    """The trained model, its curvature data and loss, and query gradients ``[Q, P]``."""
    runs = record_speed_run(name, root)
    [run] = load_runs(runs)
    model = final_model(SPEED_SETTINGS[name][0], run)
    train_set, queries = speed_data(name)
    x, y = train_set.tensors[0][:num_train], train_set.tensors[1][:num_train]
    batches = [(x[i : i + 100], y[i : i + 100]) for i in range(0, num_train, 100)]
    params = list(model.parameters())
    qx, qy = queries.tensors[0][:num_queries], queries.tensors[1][:num_queries]
    grads = per_example_gradients(model, Hooks(model).measurement, (qx, qy))
    return run, runs, model, params, batches, num_train, grads


def products(
    curvature: KrylovGGN, vectors: torch.Tensor, damping: float, precondition=None
) -> tuple[int, float, float]:
    start = time.perf_counter()
    _, count, residual = conjugate_gradients(
        lambda v: curvature.matmat(v) + damping * v, vectors.T.double(), precondition, max_iterations=400
    )
    return count, residual.max().item(), time.perf_counter() - start


def solving(approximation, damping: float):
    """CG's preconditioner: ``approximation``'s damped solve, on CG's float64 ``[P, K]`` residuals."""
    return lambda r: approximation.solve(r.T.float(), damping).T.double()


def mlp_table(part_a: dict[float, tuple[int, int]], part_c: dict[tuple[int, float], dict[str, int]]) -> str:
    """The digits MLP's table of GGN products, from parts (a) and (c); a damping a part did not run is left empty."""
    dampings = (1e-1, 1e-2, 1e-3)

    def row(label: str, value) -> str:
        return f"| {label} | " + " | ".join(str(value(d)) for d in dampings) + " |"

    def c(queries: int, key: str):
        return lambda d: part_c[queries, d][key] if (queries, d) in part_c else ""

    return "\n".join(
        [
            "| | damping 0.1 | 0.01 | 0.001 |",
            "| --- | --- | --- | --- |",
            row("block CG, 50 queries at once: products", lambda d: part_a[d][0]),
            row("one query at a time: products (slowest of 10)", lambda d: part_a[d][1]),
            row("block CG preconditioned by K-FAC: products", c(50, "kfac")),
            row("block CG preconditioned by a rank-64 Nyström sketch: products (+ the sketch)", c(50, "nystrom 64")),
            row("one query, plain CG: products", c(1, "none")),
            row("one query, preconditioned by a rank-16 Nyström sketch: products (+ the sketch)", c(1, "nystrom 16")),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cnn", action="store_true", help="also the 1M-parameter CNN (about 25 minutes)")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="rewrite the tables in docs/benchmarks/krylov.md (the CNN's with --cnn)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp())
    loss = nn.CrossEntropyLoss()

    run, runs, model, params, batches, n, grads = setting("mlp", root, 1000, 50)
    auto = Influence(curvature="ggn").damping_for(run)
    ggn = fit_curvature("ggn", model, loss, params, batches, n, solver="krylov")
    assert isinstance(ggn, KrylovGGN)
    print(f"digits MLP: {grads.shape[1]} parameters, {n} examples, float32; auto damping {auto:.2e}")
    print("(a) block CG on 50 queries against one query at a time (GGN products to relative residual 1e-5)")
    part_a: dict[float, tuple[int, int]] = {}  # damping: (block CG's products, the slowest single query's)
    for damping in (1e-1, 1e-2, 1e-3):
        block, residual, seconds = products(ggn, grads, damping)
        alone = [products(ggn, grads[[k]], damping)[0] for k in range(0, 50, 5)]
        part_a[damping] = (block, max(alone))
        print(
            f"    damping {damping:g}: block {block} products ({seconds:.1f} s, residual {residual:.0e}); "
            f"one at a time: max {max(alone)}, mean {sum(alone) / len(alone):.0f} (10 of the 50 queries)"
        )

    print("(b) Influence(curvature='ggn'), auto damping, 50 queries, whole pipeline")
    effects = {}
    for solver in ("dense", "krylov"):
        start = time.perf_counter()
        result = Attributor(
            type(model), runs, speed_data("mlp")[0], Influence(curvature="ggn", solver=solver), progress=False
        ).attribute(speed_data("mlp")[1])
        effects[solver] = result.effects
        print(f"    {solver:6s}: {time.perf_counter() - start:6.1f} s  {result.settings['per_run'][0]}")
    difference = (effects["krylov"] - effects["dense"]).norm() / effects["dense"].norm()
    print(f"    relative difference of the effects: {difference:.1e}")

    print(
        "(c) K-FAC and EK-FAC (type-2, exact damping) as CG's preconditioner, 50 queries and one; the preconditioner's"
    )
    print(
        "    damping is the system's times 1, 3, 10 or 30 (a more damped preconditioner trusts the approximation less)"
    )
    approximations = {kind: fit_curvature(kind, model, loss, params, batches, n) for kind in ("kfac", "ekfac")}
    part_c: dict[tuple[int, float], dict[str, int]] = {}  # (queries, damping): products per preconditioner
    for queries in (50, 1):  # one query: the preconditioner has the most to do when the block is one column
        for damping in (1e-2, 1e-3, auto):
            block = grads[:queries]
            plain = products(ggn, block, damping)
            row = [f"none {plain[0]}"]
            part_c[queries, damping] = {"none": plain[0]}
            for kind, approximation in approximations.items():
                counts = [products(ggn, block, damping, solving(approximation, damping * m))[0] for m in (1, 3, 10, 30)]
                row.append(f"{kind} {'/'.join(map(str, counts))}")
                part_c[queries, damping][kind] = counts[0]
            for rank in (16, 64):
                sketch = nystrom(ggn.matmat, grads.shape[1], rank)
                count = products(ggn, block, damping, nystrom_preconditioner(*sketch, damping))[0]
                row.append(f"Nystrom rank {rank} {count} + the sketch")
                part_c[queries, damping][f"nystrom {rank}"] = count
            print(f"    {queries} queries, damping {damping:.1e}: products: {', '.join(row)}")

    print("(d) 256 GGN columns (one block of a dense build), 300 8x8 images, one thread")
    torch.set_num_threads(1)
    x = torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (300,), generator=torch.Generator().manual_seed(0))
    for label, net in [
        (
            "CNN conv(8)-relu-pool-linear",
            nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 10)),
        ),
        ("MLP 64-16-10", nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))),
    ]:
        net.eval()
        op = fit_curvature("ggn", net, loss, list(net.parameters()), [(x, y)], 300, solver="krylov")
        columns = torch.randn(sum(p.numel() for p in net.parameters()), 256)
        start = time.perf_counter()
        op.matmat(columns)
        print(f"    {label}: {columns.shape[0]} parameters, {time.perf_counter() - start:.2f} s")
    torch.set_num_threads(2)
    if args.write_docs:
        write_table("krylov", "mlp", mlp_table(part_a, part_c), command=invocation())

    if args.cnn:
        run, _, model, params, batches, n, grads = setting("cnn", root, GGN_SUBSET, 50)
        auto = Influence(curvature="ggn").damping_for(run)
        ggn = fit_curvature("ggn", model, loss, params, batches, n, solver="krylov")
        print(f"CNN of benchmarks/speed.py: {grads.shape[1]} parameters, GGN on {n} images, auto damping {auto:.2e}")
        seconds = {}
        for columns in (1, 16, 50, 64):
            block = torch.randn(grads.shape[1], columns, dtype=torch.float64)
            start = time.perf_counter()
            ggn.matmat(block)
            seconds[columns] = time.perf_counter() - start
        print("    seconds per GGN product: " + ", ".join(f"{k} columns {v:.1f}" for k, v in seconds.items()))
        lines = ["| queries | plain CG | rank-16 sketch | sketch as wide as the block |", "| --- | --- | --- | --- |"]
        for queries in (1, 50):
            count, residual, elapsed = products(ggn, grads[:queries], auto)
            row = [f"none: {count} products, {elapsed:.0f} s (residual {residual:.0e})"]
            cells = [f"{count} products, {elapsed:.0f} s"]
            for rank in (16, 64):
                start = time.perf_counter()
                sketch = nystrom(ggn.matmat, grads.shape[1], rank)
                sketched = time.perf_counter() - start
                count, residual, elapsed = products(ggn, grads[:queries], auto, nystrom_preconditioner(*sketch, auto))
                row.append(
                    f"Nystrom rank {rank}: {count} products, {elapsed:.0f} s + sketch {sketched:.0f} s (residual {residual:.0e})"
                )
                cells.append(
                    f"{'(rank 64) ' if rank == 64 else ''}{count} products, {elapsed:.0f} s + sketch {sketched:.0f} s"
                )
            print(f"    {queries} queries: " + "; ".join(row))
            # Bold: what solve() does by default (a rank-16 sketch for a block of at most NYSTROM_MAX_COLUMNS, else plain).
            default = 1 if queries <= NYSTROM_MAX_COLUMNS else 0
            cells[default] = f"**{cells[default]}**"
            lines.append(f"| {queries} | " + " | ".join(cells) + " |")
        if args.write_docs:
            write_table("krylov", "cnn", "\n".join(lines), command=invocation())


if __name__ == "__main__":
    main()
