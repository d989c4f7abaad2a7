"""End to end with the real U-Net on the synthetic benchmark at a small size (minutes on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from selftrain.build import build_engine
from selftrain.config import load_recipe
from selftrain.data.synth import RARE_CLASSES

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "data.source.options.num_images=150", "data.target.options.num_images=100",
    "data.target_val.options.num_images=50", "source_training.steps=120", "rounds.count=1", "rounds.steps=10",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("source")
    records = build_engine(load_recipe(REPO / "recipes" / "synth_source.yaml", SMALL), out).run()
    assert records[0]["eval"]["miou"] > 10  # the U-Net learns something that transfers
    return out / "checkpoints" / "round_000.pt"


def run_policy(name: str, checkpoint: Path, out: Path, extra=()) -> dict:
    overrides = [*SMALL, f"model.checkpoint={checkpoint}", "source_training.enabled=false", *extra]
    return build_engine(load_recipe(REPO / "recipes" / f"synth_{name}.yaml", overrides), out).run()[1]


def test_class_balancing_covers_the_rare_classes_that_st_starves(source_checkpoint, tmp_path):
    """The paper's mechanism (CBST §4.2): one global threshold keeps almost only large-class pixels,
    per-class thresholds keep a share of every class the model predicts."""
    st = run_policy("st", source_checkpoint, tmp_path / "st")["pseudo"]
    cbst = run_policy("cbst", source_checkpoint, tmp_path / "cbst")["pseudo"]

    def rare_share(p):
        return sum(p["selected_pixels"][c] for c in RARE_CLASSES) / max(sum(p["selected_pixels"]), 1)

    assert rare_share(cbst) > 3 * rare_share(st)
    predicted = [c for c, n in enumerate(cbst["predicted_pixels"]) if n >= 10]
    assert all(cbst["selected_pixels"][c] > 0 for c in predicted)


def test_cbst_sp_runs_with_a_prior_built_from_the_source(source_checkpoint, tmp_path):
    from selftrain.priorbuild import build_prior_command

    prior = tmp_path / "prior.npz"
    build_prior_command(dataset=str(REPO / "recipes" / "synth_source.yaml"), root=None, split="", options=(),
                        num_classes=None, out=str(prior), size=None, ksize=None, plot=False, command="test",
                        overrides=SMALL)
    rec = run_policy("cbst_sp", source_checkpoint, tmp_path / "sp", [f"policy.prior={prior}"])
    assert rec["pseudo"]["selected_share"] > 0 and rec["eval"]["miou"] > 0
