"""Attributes a recorded run on every rank of a torchrun job; run by test_sharded.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from models import TinyClassifier, TokenBag, classification_data, token_regression_data  # noqa: E402

from lightning_dtda import Attributor, Influence, Segmented  # noqa: E402

CASES = {
    "identity": Influence(curvature="identity"),
    "ggn": Influence(curvature="ggn"),
    "kfac": Influence(curvature="kfac"),
    "ekfac": Influence(curvature="ekfac"),
    "ggn-cg": Influence(curvature="ggn", solver="krylov"),
    "segmented": Segmented(segments=2, curvature="ekfac"),
}


SELF_CASES = ("identity", "ggn", "ekfac")
TOKEN_CASES = ("kfac", "ekfac")  # TokenBag: embedding blocks, summed over ranks


def self_influence(runs, case):
    return Attributor(
        TinyClassifier, runs, classification_data(n=41, dtype=torch.float64), CASES[case], batch_size=8, progress=False
    ).self_influence()


def attribute(runs, case):
    return Attributor(
        TinyClassifier, runs, classification_data(n=41, dtype=torch.float64), CASES[case], batch_size=8, progress=False
    ).attribute(classification_data(n=3, seed=1, dtype=torch.float64))


def attribute_tokens(runs, case):
    return Attributor(
        TokenBag, runs, token_regression_data(n=41, dtype=torch.float64), CASES[case], batch_size=8, progress=False
    ).attribute(token_regression_data(n=3, seed=1, dtype=torch.float64))


if __name__ == "__main__":
    runs, out, token_runs = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("gloo")
    for case in CASES:
        result = attribute(runs, case)
        if dist.get_rank() == 0:
            result.save(out / f"{case}.safetensors")
    for case in TOKEN_CASES:
        result = attribute_tokens(token_runs, case)
        if dist.get_rank() == 0:
            result.save(out / f"token-{case}.safetensors")
    for case in SELF_CASES:
        effects = self_influence(runs, case).effects
        if dist.get_rank() == 0:
            torch.save(effects, out / f"self-{case}.pt")
    dist.destroy_process_group()
