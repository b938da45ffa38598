"""Samplers by A1111 name on the tiny SD1 pipeline, and guidance schedules applied through the stock callbacks."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from tuner.errors import TunerError
from tuner.guidance import NO_GUIDANCE, GuidanceSchedule
from tuner.samplers import SAMPLERS, label, resolve, scheduler_for
from tuner.validation import render

LISTED = ["Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE Karras", "UniPC", "DDIM", "LCM"]
SMALL = dict(num_inference_steps=2, width=32, height=32)


@pytest.fixture(scope="module")
def sd1(tiny_models):
    pipe = DiffusionPipeline.from_pretrained(tiny_models["sd1"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_every_listed_sampler_renders_and_karras_ones_use_karras_sigmas(sd1):
    own = sd1.scheduler
    seen = set()
    try:
        for name in LISTED:
            sd1.scheduler = scheduler_for(name, own)
            cls_name, options = SAMPLERS[name]
            assert type(sd1.scheduler).__name__ == cls_name
            assert bool(sd1.scheduler.config.get("use_karras_sigmas")) == name.endswith("Karras"), name
            if "algorithm_type" in options:
                assert sd1.scheduler.config.algorithm_type == options["algorithm_type"]
            assert label(sd1.scheduler) == name
            (image,) = render(sd1, ["a red circle"], [0], guidance_scale=1.0, **SMALL)[0]
            pixels = _pixels(image)
            assert image.size == (32, 32) and pixels.std() > 0, name
            seen.add(pixels.tobytes())
    finally:
        sd1.scheduler = own
    assert len(seen) >= 6  # different samplers really ran (a few may coincide at two steps)


def test_names_are_forgiving_and_class_names_still_work(sd1):
    assert resolve("dpm++ 2m  karras", sd1.scheduler)[1]["use_karras_sigmas"] is True
    assert resolve("euler_a", sd1.scheduler)[0].__name__ == "EulerAncestralDiscreteScheduler"
    assert type(scheduler_for("DDIMScheduler", sd1.scheduler)).__name__ == "DDIMScheduler"


def test_unknown_and_flow_incompatible_names_are_refused_with_the_allowed_ones(sd1):
    with pytest.raises(TunerError, match=r"sampler 'Eular a': unknown; allowed here: Euler a, Euler, .*DPM\+\+ 2M"):
        resolve("Eular a", sd1.scheduler)
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    with pytest.raises(
        TunerError, match=r"'DPM\+\+ 2M': not available for a rectified-flow model; allowed here: Euler"
    ):
        resolve("DPM++ 2M", flow)
    with pytest.raises(TunerError, match="rectified-flow model needs a FlowMatch"):
        resolve("DDIMScheduler", flow)
    with pytest.raises(TunerError, match="FlowMatch\\* schedulers are for SD3/FLUX.1"):
        resolve("FlowMatchEulerDiscreteScheduler", sd1.scheduler)
    euler = scheduler_for("Euler", flow)
    assert type(euler).__name__ == "FlowMatchEulerDiscreteScheduler" and euler.config.shift == 3.0


def _guided(pipe, schedule: GuidanceSchedule | None, steps: int = 3) -> np.ndarray:
    kwargs = dict(SMALL, num_inference_steps=steps)
    return _pixels(render(pipe, ["a red circle"], [0], guidance_scale=5.0, guidance=schedule, **kwargs)[0][0])


def test_guidance_schedules(sd1):
    sd1.scheduler = scheduler_for("Euler", sd1.scheduler)
    plain = _guided(sd1, None)
    # Through the step callback (an interval over every step) with a constant w: exactly plain CFG.
    assert np.array_equal(_guided(sd1, GuidanceSchedule("constant", interval=(0.0, 1.0))), plain)
    assert np.array_equal(_guided(sd1, GuidanceSchedule(rescale=0.0)), plain)
    for changed in (GuidanceSchedule("linear"), GuidanceSchedule("cosine"), GuidanceSchedule(rescale=0.7),
                    GuidanceSchedule(interval=(0.5, 1.0))):  # fmt: skip
        assert np.abs(_guided(sd1, changed) - plain).max() > 0, changed


def test_schedule_shapes_average_to_the_scale():
    steps = np.linspace(0, 1, 101)
    for kind in ("linear", "cosine"):
        values = [GuidanceSchedule(kind).scale_at(7.0, p) for p in steps]
        assert values[0] == NO_GUIDANCE and values[-1] == pytest.approx(13.0)
        assert np.mean(values) == pytest.approx(7.0, abs=0.05)
        assert all(b >= a for a, b in zip(values, values[1:]))
    interval = GuidanceSchedule(interval=(0.2, 0.8))
    assert [interval.scale_at(7.0, p) for p in (0.1, 0.5, 0.9)] == [NO_GUIDANCE, 7.0, NO_GUIDANCE]


def test_guidance_needs_cfg(sd1):
    with pytest.raises(TunerError, match="guidance_scale > 1"):
        GuidanceSchedule("linear").call_kwargs(sd1, 1.0)
    with pytest.raises(TunerError, match="guidance_schedule"):
        GuidanceSchedule("exponential")
    from diffusers import AutoPipelineForImage2Image

    with pytest.raises(TunerError, match="StableDiffusionImg2ImgPipeline does not take it"):
        GuidanceSchedule(rescale=0.5).call_kwargs(AutoPipelineForImage2Image.from_pipe(sd1), 5.0)


def test_flux_refuses_schedules_and_non_flow_samplers(tiny_models):
    flux = DiffusionPipeline.from_pretrained(tiny_models["flux"])
    with pytest.raises(TunerError, match="FluxPipeline has no classifier-free guidance to schedule"):
        GuidanceSchedule("cosine").call_kwargs(flux, 3.5)
    assert GuidanceSchedule().call_kwargs(flux, 3.5) == {"guidance_scale": 3.5}
    with pytest.raises(TunerError, match="'Euler a': not available for a rectified-flow model"):
        scheduler_for("Euler a", flux.scheduler)
