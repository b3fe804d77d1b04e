"""Speed and peak memory of this project's EK-FAC attribution next to kronfluence's.

    pip install -e ".[bench]"      # kronfluence, a benchmark-only dependency
    python benchmarks/speed.py

Each attribution runs in its own process, on the same trained weights, data, queries and damping:
(a) the digits MLP 64-64-10 (1,000 examples, 50 queries); (b) a convolutional network of about one
million parameters on 3,000 digits upsampled to 32x32 (50 queries). Wall time covers fitting the
factors and scoring every (query, train) pair; memory is how far each raised the process's peak
RSS. On the CNN the exact GGN solved by block conjugate gradients (``Influence(curvature="ggn",
solver="krylov")``, its products on a random subset of ``GGN_SUBSET`` training images) runs the same
way, with and without its Nystrom preconditioner, with its time as ratios to both EK-FACs and its
breakdown (products, seconds per product). The recorder's overhead is measured by
``recorder_overhead.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from docs_tables import write_table
from models import GGN_SUBSET, SPEED_SETTINGS, final_model, record_speed_run, speed_data

from lightning_dtda import Attributor, Influence, load_runs

BATCH = 128


def run_ours(
    setting: str,
    runs: Path,
    damping: float,
    curvature: str = "ekfac",
    device: str = "cpu",
    subset: int | None = GGN_SUBSET,
) -> tuple[torch.Tensor, dict]:
    """Our EK-FAC (``curvature="ekfac"``) or exact GGN by block CG with its products on ``subset`` training
    examples (``None``: all): the effects and the run's settings."""
    cls, _ = SPEED_SETTINGS[setting]
    train_set, queries = speed_data(setting)
    estimator = (
        Influence(curvature="ekfac", damping=damping)
        if curvature == "ekfac"
        else Influence(curvature="ggn", damping=damping, solver="krylov", curvature_subset=subset)
    )
    result = Attributor(
        cls, runs, train_set, estimator=estimator, batch_size=BATCH, device=device, progress=False
    ).attribute(queries)
    return result.effects[0], result.settings["per_run"][0]


def run_kronfluence(setting: str, runs: Path, damping: float, out: Path, device: str = "cpu") -> torch.Tensor:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # labels drawn from the model: the true Fisher, as curvlinops' Monte Carlo type
                with torch.no_grad():
                    y = torch.multinomial(logits.softmax(-1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    cls, _ = SPEED_SETTINGS[setting]
    [run] = load_runs(runs)
    model = prepare_model(final_model(cls, run), Classification())
    train_set, queries = speed_data(setting)
    analyzer = Analyzer(
        f"speed_{setting}", model, Classification(), cpu=device == "cpu", disable_tqdm=True, output_dir=str(out)
    )
    analyzer.fit_all_factors(
        "ekfac",
        train_set,
        per_device_batch_size=BATCH,
        factor_args=FactorArguments(strategy="ekfac"),
        overwrite_output_dir=True,
    )
    analyzer.compute_pairwise_scores(
        "scores",
        "ekfac",
        queries,
        train_set,
        per_device_query_batch_size=len(queries),
        per_device_train_batch_size=BATCH,
        score_args=ScoreArguments(damping_factor=damping),
        overwrite_output_dir=True,
    )
    # kronfluence scores g_q^T (F + damping)^-1 g_n with summed losses; ours divide by N
    return analyzer.load_pairwise_scores("scores")["all_modules"] / len(train_set)


# Where our EK-FAC's time goes: internal steps timed by wrapping them (internal on purpose: the public API
# reports no breakdown). (module, class or None, function, label)
BREAKDOWN = (
    ("lightning_dtda.curvature.kfac", None, "collect_factors", "factors"),
    ("lightning_dtda.curvature.kfac", None, "eigendecompose_factors", "eigendecompositions"),
    ("lightning_dtda.curvature.kfac", None, "collect_corrected_eigenvalues", "correction"),
    ("lightning_dtda.curvature.kfac", "EKFAC", "solve", "query transforms"),
    ("lightning_dtda.estimators.base", "RunContext", "contract", "training gradients"),
)


@contextlib.contextmanager
def timed_steps(seconds: dict[str, float]) -> Iterator[None]:
    """Within, each step of ``BREAKDOWN`` adds its wall time to ``seconds[label]``."""
    originals = []
    for module, cls, name, label in BREAKDOWN:
        owner = importlib.import_module(module)
        owner = getattr(owner, cls) if cls else owner
        original = getattr(owner, name)

        def wrapper(*args, _original=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_label] = seconds.get(_label, 0.0) + time.perf_counter() - start

        setattr(owner, name, wrapper)
        originals.append((owner, name, original))
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def child(tool: str, setting: str, runs: Path, damping: float, out: Path) -> None:
    torch.manual_seed(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    report: dict = {}
    if tool.startswith("ggn"):  # with and without the Nystrom preconditioner (by default: without, for 50 queries)
        # Internal on purpose: forcing the preconditioner on or off, which the public API leaves to the default.
        from lightning_dtda.curvature.ggn import KrylovGGN

        init = KrylovGGN.__init__
        KrylovGGN.__init__ = lambda self, *args, **kwargs: init(
            self, *args, **{**kwargs, "preconditioned": tool == "ggn"}
        )
    if tool == "kronfluence":
        effects = run_kronfluence(setting, runs, damping, out)
    elif tool == "ours":
        steps: dict[str, float] = {}
        with timed_steps(steps):
            effects, report = run_ours(setting, runs, damping, "ekfac")
        report["steps"] = steps
    else:
        effects, report = run_ours(setting, runs, damping, "ggn")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    torch.save(effects, out / f"{tool}_{setting}.pt")
    print(json.dumps({"seconds": seconds, "peak_mib": peak, **report}))


def pearson(root: Path, first: str, second: str, setting: str) -> float:
    a, b = torch.load(root / f"{first}_{setting}.pt"), torch.load(root / f"{second}_{setting}.pt")
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten().to(a)]))[0, 1].item()


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3], Path(sys.argv[4]), float(sys.argv[5]), Path(sys.argv[6]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-docs", action="store_true", help="rewrite the table in docs/benchmarks/speed.md")
    args = parser.parse_args()
    root = Path("benchmarks/output/speed")
    root.mkdir(parents=True, exist_ok=True)
    lines = [
        "| setting | parameters | ours (s) | kronfluence (s) | time ratio | ours peak (MiB) | kronfluence peak (MiB) | memory ratio | Pearson of scores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines))
    measured: dict[tuple[str, str], dict] = {}
    for setting in ("mlp", "cnn"):
        runs = record_speed_run(setting, root)
        [run] = load_runs(runs)
        # 1 / the learning-rate time: the exact GGN's "auto" rule less its weight-decay term (the MLP's 1e-4),
        # the damping these measurements have always used.
        damping = Influence(curvature="ggn").damping_for(run) - run.weight_decay
        for tool in ("ours", "kronfluence", "ggn", "ggn-plain") if setting == "cnn" else ("ours", "kronfluence"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", tool, setting, str(runs), str(damping), str(root)],
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-3000:])
            measured[tool, setting] = json.loads(out.stdout.strip().splitlines()[-1])
        params = sum(p.numel() for p in SPEED_SETTINGS[setting][0]().parameters())
        o, k = measured["ours", setting], measured["kronfluence", setting]
        lines.append(
            f"| {setting} | {params:,} | {o['seconds']:.1f} | {k['seconds']:.1f} | {o['seconds'] / k['seconds']:.2f} | "
            f"{o['peak_mib']:.0f} | {k['peak_mib']:.0f} | {o['peak_mib'] / k['peak_mib']:.2f} | "
            f"{pearson(root, 'ours', 'kronfluence', setting):.3f} |"
        )
        print(lines[-1])
    steps = [
        "| setting | " + " | ".join(label for *_, label in BREAKDOWN) + " | the rest | total |",
        "|---|" + "---|" * (len(BREAKDOWN) + 2),
    ]
    for setting in ("mlp", "cnn"):
        o = measured["ours", setting]
        rest = o["seconds"] - sum(o["steps"].values())
        steps.append(
            f"| {setting} | "
            + " | ".join(f"{o['steps'].get(label, 0.0):.1f}" for *_, label in BREAKDOWN)
            + f" | {rest:.1f} | {o['seconds']:.1f} |"
        )
    print("\nOur EK-FAC's time by step (s; the rest: loading, query gradients, checks)\n" + "\n".join(steps))
    if args.write_docs:
        write_table("speed", "main", "\n".join(lines))
        write_table("speed", "steps", "\n".join(steps))
    o, k = measured["ours", "cnn"], measured["kronfluence", "cnn"]
    for tool, label in (
        ("ggn", "preconditioned by a Nystrom sketch"),
        ("ggn-plain", "without a preconditioner (the default for 50 queries)"),
    ):
        g = measured[tool, "cnn"]
        print(
            f"\nCNN, exact GGN by block CG {label} (50 queries, GGN products on {GGN_SUBSET} of 3,000 images): "
            f"{g['seconds']:.1f} s, {g['seconds'] / o['seconds']:.2f}x our EK-FAC, {g['seconds'] / k['seconds']:.2f}x kronfluence's; "
            f"peak {g['peak_mib']:.0f} MiB"
        )
        sketch = (
            f" after a rank-{g['nystrom_rank']} sketch ({g['nystrom_seconds']:.1f} s)" if "nystrom_rank" in g else ""
        )
        print(
            f"    {g['cg_products']} GGN products of [P, 50]{sketch} to relative residual {g['cg_residual']:.1e}, "
            f"{g['cg_seconds']:.1f} s in CG ({g['cg_seconds'] / g['cg_products']:.1f} s a product), "
            f"{g['seconds'] - g['cg_seconds']:.1f} s for the query and training gradients; "
            f"Pearson with our EK-FAC {pearson(root, tool, 'ours', 'cnn'):.3f}"
        )
        # A product's cost is linear in the images it runs on; CG's product count is taken as it was here.
        whole = g["cg_seconds"] * len(speed_data("cnn")[0]) / GGN_SUBSET + g["seconds"] - g["cg_seconds"]
        print(
            f"    all 3,000 images in the products (curvature_subset=None), extrapolated: {whole:.0f} s, "
            f"{whole / k['seconds']:.1f}x kronfluence's EK-FAC, {whole / o['seconds']:.1f}x ours"
        )


if __name__ == "__main__":
    main()
