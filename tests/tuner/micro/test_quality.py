"""A small `bench/quality.py`: every trainer, at half its preset's steps (the decoder at a quarter), must move a
continuous judge figure.

The bench reports the issue's figures (fidelity, context, prior drift, style adherence, PSNR gain); this test
guards the direction: a subject method must bring the palette of instance-prompt samples closer to the photos' than
the base model's is, the style LoRA the judge's shaded-style score, the decoder the held-out PSNR; and the subject
must not take over the class prompt; the subject methods must also reach the issue's fidelity targets (and
DreamBooth-LoRA a context bound) on fixed seeds. A trainer that stops learning (lr 0, a frozen adapter, a loss that
no longer reaches the weights) leaves the tuned figures equal to the base's and fails. Thresholds sit well under the
gains measured with the shipped micro model (noted beside each).
"""

from __future__ import annotations

import pytest

from tuner.micro.quality import score_method, train_method
from tuner.models import has_builtin_model

STEPS_SCALE = {"decoder": 0.25}
"""Share of each preset's steps trained here: half, and a quarter for the decoder (its 1,600 are the longest run)."""
SEEDS = (0, 1)
# Minimum gain of the subject likeness (palette closeness to the photos, tuned minus base) per subject method. The
# bounds were set on the earlier example subject (the checkered heart, now datasets/micro-subject-hard), where these
# steps and seeds measured dreambooth +0.012, dreambooth-lora +0.029, textual-inversion +0.245, pivotal +0.247. On the
# reachable subject (a black heart) the full-step bench measured +0.22, +0.23, +0.14 and +0.43 (4 seeds,
# bench/results/quality.md); not yet re-measured at these steps and seeds.
# A trainer that stops learning gains exactly 0 (same images as the base), so even the smallest bound catches it.
SUBJECT_GAIN = {"dreambooth": 0.005, "dreambooth-lora": 0.01, "textual-inversion": 0.08, "pivotal": 0.10}
# Style: the shaded score must rise at all: a style LoRA that stops learning leaves it exactly at the base's. At
# full steps and 4 seeds the bench measures adherence 0.69 and score 0.65 against the base's 0.00
# (bench/results/quality.md).
# Decoder held-out PSNR gain measured +1.34 dB at 400 steps (+2.2 dB at 800) on the polka dots. Prior drift measured 0
# for every method but pivotal tuning (0.75 at full steps, no prior preservation in its preset): the bound catches
# prior preservation that stops working (the subject taking over the class samples).
STYLE_GAIN, DECODER_GAIN_DB, MAX_PRIOR_DRIFT = 0.0, 1.0, 0.5
# The figures at these steps and seeds (fixed, so a run is reproducible): subject fidelity at its target
# (measured 1.00 for all four), and DreamBooth-LoRA's context adherence and prior drift (measured 0.62 and 0.00; at
# full steps and 4 seeds the bench measures 0.88 against its 0.7 target).
MIN_FIDELITY = {"dreambooth": 0.7, "dreambooth-lora": 0.8, "textual-inversion": 0.6, "pivotal": 0.6}
LORA_MIN_CONTEXT, LORA_MAX_PRIOR_DRIFT = 0.5, 0.1


pytestmark = pytest.mark.skipif(not has_builtin_model("micro"), reason="this install has no built-in micro model")


@pytest.mark.slow  # 40-160 s each: a method trained on the micro world, judged
@pytest.mark.parametrize("name", [*SUBJECT_GAIN, "style-lora", "decoder"])
def test_trainer_learns_on_the_micro_world(name, tmp_path):
    run_dir, _, config = train_method(name, "builtin:micro", tmp_path, STEPS_SCALE.get(name, 0.5))
    metrics = score_method(name, "builtin:micro", run_dir, config, seeds=SEEDS)
    print(name, metrics)
    if name == "decoder":
        assert metrics["psnr_gain_db"] >= DECODER_GAIN_DB, metrics
    elif name == "style-lora":
        assert metrics["style_score"] - metrics["base_style_score"] > STYLE_GAIN, metrics
    else:
        gain = metrics["subject_likeness"] - metrics["base_subject_likeness"]
        assert gain >= SUBJECT_GAIN[name], metrics
        assert metrics["prior_drift"] <= MAX_PRIOR_DRIFT, metrics
        assert metrics["fidelity"] >= MIN_FIDELITY[name], metrics
        if name == "dreambooth-lora":
            assert metrics["context_adherence"] >= LORA_MIN_CONTEXT, metrics
            assert metrics["prior_drift"] <= LORA_MAX_PRIOR_DRIFT, metrics
