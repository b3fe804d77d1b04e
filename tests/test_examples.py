import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_digits_example_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits.py"), "--seeds", "2", "--epochs", "2", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("most helpful") == 5 and out.stdout.count("most harmful") == 5
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["seed_0", "seed_1"]
    png = (tmp_path / "influential_digits.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert (tmp_path / "result.safetensors").is_file() and list(tmp_path.glob("csv/*/attribution_top_k.csv"))


def test_lightning_cli_example_runs_from_its_config(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "cli.py"),
            "fit",
            "--config",
            str(ROOT / "examples" / "digits_cli.yaml"),
            "--trainer.max_epochs",
            "2",
            "--trainer.enable_progress_bar",
            "false",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    from lightning_dtda import AttributionResult, load_runs

    [run] = load_runs(tmp_path / "output" / "cli" / "runs")
    assert run.seed == 0 and run.module_class == "digits.DigitsMLP"
    result = AttributionResult.load(tmp_path / "output" / "cli" / "runs" / "attribution.safetensors")
    assert result.effects.shape == (1, 5, 1000) and result.settings["curvature"] == "ekfac"
    assert list((tmp_path / "output" / "cli" / "csv").glob("version_*/attribution_top_k.csv"))


def test_clean_digits_example_runs(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "clean_digits.py"),
            "--seeds",
            "3",  # a bootstrap interval needs three
            "--epochs",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "100 of 1000 labels flipped" in out.stdout and out.stdout.count("flipped") == 4
    assert (tmp_path / "suspicious_digits.png").read_bytes().startswith(b"\x89PNG")
    [ranking] = list(tmp_path.glob("csv/version_*/self_influence.csv"))
    import csv

    rows = list(csv.DictReader(ranking.open()))
    assert len(rows) == 1000 and [int(r["rank"]) for r in rows] == list(range(1, 1001))
    scores = [float(r["self_influence_mean"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0
    assert sum(r["flipped"] == "True" for r in rows) == 100
    # even after 2 epochs, flipped labels crowd the top of the ranking (10% would be chance)
    assert sum(r["flipped"] == "True" for r in rows[:50]) > 25
    metrics = (ranking.parent / "metrics.csv").read_text()
    assert "self_influence/flipped_in_top_50" in metrics


def test_transformer_example_tracks_embeddings_attention_and_linear_layers_with_ekfac(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "transformer.py"), "--epochs", "2", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        "ekfac: tracked encoder.linear1, encoder.linear2, encoder.self_attn, encoder.self_attn.out_proj, head, positions, tokens\n"
        "ggn: tracked every parameter"
    ) in out.stdout
    assert out.stdout.count("most helpful by ekfac") == 4 and out.stdout.count("most helpful by ggn") == 4
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["seed_0", "seed_1"]
    from lightning_dtda import AttributionResult

    result = AttributionResult.load(tmp_path / "result-ekfac.safetensors")
    assert result.effects.shape == (2, 4, 256)
    assert result.settings["per_run"][0]["parameters"] == [
        "tokens.weight",
        "positions.weight",
        "encoder.self_attn.in_proj_weight",
        "encoder.self_attn.in_proj_bias",
        *[
            f"{layer}.{p}"
            for layer in ("encoder.self_attn.out_proj", "encoder.linear1", "encoder.linear2", "head")
            for p in ("weight", "bias")
        ],
    ]
