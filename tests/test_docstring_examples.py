"""Every ``Example:`` block in the package's docstrings runs, on a tiny module standing in for ``MyModule``."""

import re
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from models import TinyClassifier, classification_data
from torch.utils.data import DataLoader, Subset

import lightning_dtda
from lightning_dtda import load_runs

PACKAGE = Path(lightning_dtda.__file__).parent
BLOCK = re.compile(r"\n([ \t]*)Example:\n\n\1    ```python\n(.*?)\n\1    ```\n", re.S)


class MyModule(TinyClassifier):
    pass


def examples() -> dict[str, str]:
    """``{"file:line": code}`` for every docstring example in the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text[: match.start()].count("\n") + 2
            found[f"{path.relative_to(PACKAGE)}:{line}"] = textwrap.dedent(match.group(2))
    return found


def test_the_package_has_its_docstring_examples():
    owners = {key.split(":")[0] for key in examples()}
    assert {"attributor.py", "callback.py", "record/recorder.py", "estimators/influence.py"} <= owners


def namespace(tmp_path: Path) -> dict:
    train_set = classification_data(n=32)
    return {
        "MyModule": MyModule,
        "train_set": train_set,
        "query_set": Subset(train_set, range(3)),
        "train_loader": DataLoader(train_set, batch_size=8),
        "model": MyModule(),
        "trainer": pl.Trainer(logger=CSVLogger(tmp_path / "logs"), enable_progress_bar=False),
        "TrajectoryRecorder": lightning_dtda.TrajectoryRecorder,
        "AttributionCallback": lightning_dtda.AttributionCallback,
        "Trainer": lambda **kw: pl.Trainer(
            **{"max_epochs": 2, "enable_progress_bar": False, "enable_model_summary": False, **kw}
        ),
        "TensorBoardLogger": TensorBoardLogger,
        **{name: getattr(lightning_dtda, name) for name in lightning_dtda.__all__},
    }


@pytest.mark.parametrize("where", sorted(examples()))
def test_docstring_example_runs(where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = examples()[where]
    if 'TrajectoryRecorder("runs/")' not in code:  # attribution examples read runs the recorder's example makes
        recorder = examples()[next(k for k in examples() if k.startswith("record/recorder.py"))]
        exec(
            compile(
                recorder.replace("range(4)", "range(2)").replace("max_epochs=10", "max_epochs=2"), "recorder", "exec"
            ),
            namespace(tmp_path),
        )
    scope = namespace(tmp_path)
    exec(compile(code.replace("max_epochs=10", "max_epochs=2"), where, "exec"), scope)
    runs = load_runs(tmp_path / "runs")
    assert runs and all(run.status == "finished" for run in runs)
    if "top_k" in code:
        assert len(scope["values"]) == len(scope["indices"]) == 5
    if "AttributionCallback(" in code:  # the result went to the logger given
        assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))
