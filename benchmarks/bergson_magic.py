"""Our ``Unrolled`` next to bergson's MAGIC, an independent exact metagradient, on the public benchmark's MLP.

    python -m venv .venv-bergson && .venv-bergson/bin/pip install -e ".[bergson]"   # its own environment
    .venv-bergson/bin/python benchmarks/bergson_magic.py                           # ~1 min on 2 CPU cores

bergson (a benchmark-only extra, never a runtime dependency: it pulls in transformers, datasets and
torchopt) ships MAGIC, which differentiates the training run itself, as ``Unrolled`` does. For each seed
the digits MLP of ``digits_dtda.py`` (500 examples, SGD with momentum 0.9, lr 0.03, weight decay 1e-4,
batch 32, 20 epochs = 320 steps) is trained once with Lightning and the recorder; MAGIC's trainer then
replays the same run (the recorded step-0 weights and batches, torchopt's SGD with the same settings),
checkpointing every sqrt(320) steps, and differentiates one query's loss with respect to every training
example's weight. Printed per seed: Spearman and relative difference of the two removal effects (MAGIC's
metagradient negated), MAGIC's replay distance from the recorded final weights, and the times of both for
that query, with their ratio; and our time for all 50 queries next to MAGIC's, which differentiates one
measurement per backward pass (so 50 queries cost it one forward and 50 backward passes: extrapolated from
the one it ran, as said in the table).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from docs_tables import write_table
from models import QUIET, DigitsMLP, benchmark_data
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_dtda import Attributor, Unrolled, load_runs, train_seeds

QUERIES = 50
os.environ.setdefault("TQDM_DISABLE", "1")  # bergson's progress bars, one per checkpoint interval


class WeightedLoss(nn.Module):
    """The MLP as MAGIC's trainer calls it: keyword inputs in, the weighted mean training loss out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, example_weight: torch.Tensor) -> torch.Tensor:
        # MAGIC normalises by input_ids.shape[1] - 1 across micro-batches; with one micro-batch it cancels.
        return (F.cross_entropy(self.net(input_ids), targets, reduction="none") * example_weight).mean()


class RecordedBatches:
    """The recorded run's batches in step order, in the interface MAGIC's trainer reads (its ``DataStream``
    assumes tokenised text): ``data[i]`` is step ``i``'s batch with the weights of its examples."""

    def __init__(self, train, run) -> None:
        self.x, self.y = train.tensors
        self.steps = [step.micro_batches[0] for step in run.steps]
        self.device = torch.device("cpu")
        self.weights = nn.Parameter(torch.ones(len(self.x)))

    @property
    def requires_grad(self) -> bool:
        return self.weights.requires_grad

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        self.weights.requires_grad = value

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        index = self.steps[i]
        return {"input_ids": self.x[index], "targets": self.y[index], "example_weight": self.weights[index]}

    def __len__(self) -> int:
        return len(self.steps)


def magic(run, train, query, folder: Path) -> tuple[torch.Tensor, float, float]:
    """MAGIC's removal effects ``[N]`` on ``query``'s loss, the seconds it took, and its replay's relative
    distance from the recorded final weights."""
    import torchopt
    from bergson.magic.trainer import BackwardState, Trainer

    settings = run.manifest.param_groups[0]
    net = DigitsMLP(**run.manifest.hparams).net
    net.load_state_dict({k.removeprefix("net."): v for k, v in run.state_dict(0).items()})
    model = WeightedLoss(net)
    optimizer = torchopt.sgd(settings["lr"], momentum=settings["momentum"], weight_decay=settings["weight_decay"])
    data = RecordedBatches(train, run)
    start = time.perf_counter()
    trainer, state = Trainer.initialize(model, optimizer)
    final = trainer.train(state, data, save_dir=str(folder), save_mode="sqrt")
    recorded = run.state_dict()  # measured now: the backward pass loads its checkpoints into ``final``
    gap = max(
        ((final.params[k].detach() - recorded[k]).abs().max() / recorded[k].abs().max()).item() for k in final.params
    )
    x, y = query
    params = {k: v.detach().requires_grad_() for k, v in final.params.items()}
    loss = torch.func.functional_call(model, params, (x[None], y[None], torch.ones(1)))  # the query's loss
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    opt_grads = [torch.zeros_like(t) for t in final.differentiable_tensors()[len(params) :]]
    backward = BackwardState(grads, opt_grads, torch.zeros(len(train)))
    result = trainer.backward(str(folder), data, backward, final)
    seconds = time.perf_counter() - start
    return -result.weight_grads.detach(), seconds, gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--write-docs", action="store_true", help="rewrite the table in docs/benchmarks/bergson_magic.md"
    )
    args = parser.parse_args()
    train, queries = benchmark_data()
    lines = [
        "| seed | Spearman | relative difference | MAGIC's replay gap | ours s, 1 query | MAGIC s, 1 query | ratio | "
        f"ours s, {QUERIES} queries | MAGIC s, {QUERIES} queries (extrapolated) | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        loader = DataLoader(train, batch_size=32, shuffle=True)
        train_seeds(DigitsMLP, loader, runs, range(args.seeds), max_epochs=20, **QUIET)
        for seed, run in enumerate(load_runs(runs)):
            one = Subset(queries, [0])
            Attributor(DigitsMLP, run.path, train, Unrolled(), progress=False).attribute(one)  # warm-up
            start = time.perf_counter()
            ours = Attributor(DigitsMLP, run.path, train, Unrolled(), progress=False).attribute(one).effects[0, 0]
            ours_one = time.perf_counter() - start
            start = time.perf_counter()
            Attributor(DigitsMLP, run.path, train, Unrolled(), progress=False).attribute(
                Subset(queries, range(QUERIES))
            )
            ours_all = time.perf_counter() - start
            theirs, theirs_one, gap = magic(run, train, queries[0], Path(tmp) / f"magic{seed}")
            _, forward_only, _ = magic_forward_seconds(run, train, Path(tmp) / f"forward{seed}")
            theirs_all = forward_only + QUERIES * (theirs_one - forward_only)
            rho = spearmanr(ours.numpy(), theirs.numpy()).statistic
            difference = ((ours - theirs).norm() / theirs.norm()).item()
            lines.append(
                f"| {seed} | {rho:.5f} | {difference:.1e} | {gap:.1e} | {ours_one:.2f} | {theirs_one:.2f} | "
                f"{ours_one / theirs_one:.2f} | {ours_all:.2f} | {theirs_all:.1f} | {ours_all / theirs_all:.3f} |"
            )
            print(lines[-1], flush=True)
    if args.write_docs:
        write_table("bergson_magic", "main", "\n".join(lines))


def magic_forward_seconds(run, train, folder: Path) -> tuple[None, float, None]:
    """Seconds of MAGIC's checkpointed forward pass alone (what 50 queries would share)."""
    import torchopt
    from bergson.magic.trainer import Trainer

    settings = run.manifest.param_groups[0]
    net = DigitsMLP(**run.manifest.hparams).net
    net.load_state_dict({k.removeprefix("net."): v for k, v in run.state_dict(0).items()})
    optimizer = torchopt.sgd(settings["lr"], momentum=settings["momentum"], weight_decay=settings["weight_decay"])
    start = time.perf_counter()
    trainer, state = Trainer.initialize(WeightedLoss(net), optimizer)
    trainer.train(state, RecordedBatches(train, run), save_dir=str(folder), save_mode="sqrt")
    return None, time.perf_counter() - start, None


if __name__ == "__main__":
    main()
