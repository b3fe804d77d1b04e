"""Train the digits MLP from a LightningCLI configuration, with recording and attribution as callbacks.

    python examples/cli.py fit --config examples/digits_cli.yaml

Writes the recorded run and attribution.safetensors under output/cli/runs and the logged table, histogram and
scatter figure under output/cli/csv (paths relative to where it is run).
"""

from digits import DigitsData, DigitsMLP
from lightning.pytorch.cli import LightningCLI

if __name__ == "__main__":
    LightningCLI(DigitsMLP, DigitsData)
