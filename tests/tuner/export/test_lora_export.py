"""LoRA export formats on tiny models: key names, true alpha, metadata and hashes, and the round-trip check.

Adapters are injected with the trainer's own plumbing and then perturbed with seeded noise, so every
tensor (up-projections, DoRA magnitudes) differs from its initial value as after real training.
"""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tuner.config import RunConfig
from tuner.errors import TunerError
from tuner.export.lora import export_lora
from tuner.export.roundtrip import Check, Probe, fresh_pipeline, pipeline_outputs, stock_parts, verify_export
from tuner.export.state import collect_state
from tuner.models import load_parts


def adapted(model_dir, variant="lora", rank=4, alpha=8.0, te=True, targets="attn", seed=0, **extra):
    """Tiny parts with an injected, perturbed adapter, its run config and its collected state."""
    from trainers.lora import adapted_models, inject_lora

    table = {"rank": rank, "alpha": alpha, "variant": variant, "train_text_encoder": te,
             "unet_target_modules": targets, **extra}  # fmt: skip
    config = RunConfig.for_method("lora").model_validate(
        {"method": "lora", "lora": table, "data": {"resolution": 64, "token": "sks"}}
    )
    parts = load_parts(str(model_dir))
    groups = inject_lora(parts, config.lora, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in groups:
            for p in group["params"]:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return parts, config, collect_state(adapted_models(parts), "tuner")


def write(parts, state, out, name="toy", verify=True):
    files, extra = export_lora(parts, state, out, output_name=name, resolution=64, trigger="sks", verify=verify)
    return {f.path: f for f in files}, extra


def header(path):
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata())


@pytest.fixture(scope="module")
def sd1_export(tiny_models, tmp_path_factory):
    parts, config, state = adapted(tiny_models["sd1"], rank=4, alpha=8.0)
    out = tmp_path_factory.mktemp("sd1-lora")
    files, extra = write(parts, state, out)
    return parts, state, out, files, extra


def test_sd1_diffusers_file_has_peft_keys_text_model_prefix_and_full_config(sd1_export):
    parts, state, out, files, _ = sd1_export
    tensors = load_file(out / "pytorch_lora_weights.safetensors")
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in tensors
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in tensors
    assert all(k.startswith(("unet.", "text_encoder.text_model.")) for k in tensors)
    assert not any(".lora.down." in k or "lora_linear_layer" in k for k in tensors)
    meta = header(out / "pytorch_lora_weights.safetensors")
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 8.0 and config["text_encoder.lora_alpha"] == 8.0
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert files["pytorch_lora_weights.safetensors"].tools == ["diffusers", "peft"]
    assert 'load_lora_weights("' in files["pytorch_lora_weights.safetensors"].load


def test_sd1_kohya_file_names_true_alpha_and_metadata(sd1_export):
    parts, state, out, files, _ = sd1_export
    path = out / "toy.safetensors"
    tensors = load_file(path)
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{base}.lora_down.weight"].shape == (4, 32)
    assert tensors[f"{base}.lora_up.weight"].shape == (32, 4)
    assert tensors[f"{base}.alpha"].dtype == torch.float32 and tensors[f"{base}.alpha"].item() == 8.0
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in tensors
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_down.weight" in tensors
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in tensors)
    meta = header(path)
    for key in ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args", "sshs_model_hash", "sshs_legacy_hash", "modelspec.sai_model_spec",
                "modelspec.architecture", "modelspec.implementation", "modelspec.title", "modelspec.resolution",
                "modelspec.date", "modelspec.trigger_phrase", "modelspec.prediction_type"):  # fmt: skip
        assert key in meta, key
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v1", "False")
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora", "4", "8")
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.trigger_phrase"] == "sks" and meta["modelspec.prediction_type"] == "epsilon"
    assert files["toy.safetensors"].tools == ["A1111", "ComfyUI", "diffusers", "kohya"]


def test_kohya_hashes_are_computed_as_kohya_does(sd1_export):
    _, _, out, _, _ = sd1_export
    blob = (out / "toy.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    meta = header(out / "toy.safetensors")
    assert meta["sshs_model_hash"] == hashlib.sha256(blob[8 + n :]).hexdigest()
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    ss_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    from safetensors.torch import save

    rewritten = save(load_file(out / "toy.safetensors"), metadata=ss_only)
    assert meta["sshs_legacy_hash"] == hashlib.sha256(rewritten[0x100000:0x110000]).hexdigest()[:8]


def test_round_trip_is_exact_with_alpha_not_rank(sd1_export):
    _, _, _, _, extra = sd1_export
    report = extra["roundtrip"]
    assert set(report) == {"pytorch_lora_weights.safetensors via diffusers", "toy.safetensors via diffusers",
                           "toy.safetensors via merge"}  # fmt: skip
    for label, diffs in report.items():
        assert set(diffs) == {"unet", "text_encoder"}
        limit = 1e-5 if "merge" in label else 1e-6
        assert max(diffs.values()) <= limit, (label, diffs)
    assert (extra["rank"], extra["alpha"], extra["variant"]) == (4, 8.0, "lora")


def test_per_module_alphas_round_trip_exactly_and_kohya_file_says_where_it_loads(tiny_models, tmp_path):
    pattern = {"attn2.to_k": 2.0, "q_proj": 1.0}
    ranks = {"attn1.to_v": 2}
    parts, _, state = adapted(tiny_models["sd1"], rank=4, alpha=8.0, rank_pattern=ranks, alpha_pattern=pattern)
    files, extra = write(parts, state, tmp_path)
    kohya = load_file(tmp_path / "toy.safetensors")
    assert kohya["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha"].item() == 2.0
    assert kohya["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"].item() == 8.0
    assert kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 1.0
    assert kohya["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.lora_down.weight"].shape[0] == 2
    config = json.loads(header(tmp_path / "pytorch_lora_weights.safetensors")["lora_adapter_metadata"])
    assert config["unet.alpha_pattern"] == {"attn2.to_k": 2.0}
    assert config["text_encoder.alpha_pattern"] == {"q_proj": 1.0}
    assert config["unet.rank_pattern"] == {"attn1.to_v": 2} and config["text_encoder.rank_pattern"] == {}
    # diffusers 0.42 misreads per-module kohya alphas on attention layers: that file is for A1111/ComfyUI.
    assert set(extra["roundtrip"]) == {"pytorch_lora_weights.safetensors via diffusers", "toy.safetensors via merge"}
    assert extra["roundtrip"]["pytorch_lora_weights.safetensors via diffusers"] == {"unet": 0.0, "text_encoder": 0.0}
    assert files["toy.safetensors"].tools == ["A1111", "ComfyUI", "kohya"] and files["toy.safetensors"].load == ""


def test_alpha_matters_a_file_without_metadata_loads_differently(sd1_export, tmp_path):
    """Why the header carries the config: without it diffusers assumes alpha = rank and the outputs move."""
    parts, state, out, _, _ = sd1_export
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(out / "pytorch_lora_weights.safetensors"), str(bare))
    with pytest.raises(TunerError, match="max \\|difference\\|"):
        verify_export(parts, state, [Check(bare, "diffusers")])


def test_round_trip_check_catches_a_wrong_alpha_and_dropped_modules(sd1_export, tmp_path):
    parts, state, out, _, _ = sd1_export
    tensors = load_file(out / "toy.safetensors")
    wrong = {k: (v * 2 if k.endswith(".alpha") else v) for k, v in tensors.items()}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(TunerError, match="wrong.safetensors via diffusers: unet: max"):
        verify_export(parts, state, [Check(tmp_path / "wrong.safetensors", "diffusers")])
    dropped = {k: v for k, v in tensors.items() if "attn2" not in k}
    save_file(dropped, str(tmp_path / "dropped.safetensors"))
    with pytest.raises(TunerError, match="dropped.safetensors via merge"):
        verify_export(parts, state, [Check(tmp_path / "dropped.safetensors", "merge")])


def test_checks_share_the_trained_base_tensors_and_leave_them_untouched(sd1_export):
    """The round trip's stock denoiser holds the trained model's own frozen tensors (no second copy in memory), and
    a merge check, which adds deltas to weights, replaces its weights instead of writing into the shared ones."""
    parts, state, out, _, _ = sd1_export
    unet = parts.denoiser
    trained = unet.state_dict()
    given = stock_parts(parts)()
    assert set(given) == {"unet", "text_encoder"}  # the text encoder trains a LoRA too: its base is shared
    stock = given["unet"]
    te = parts.text_encoders[0]
    shared = given["text_encoder"].embeddings.token_embedding.weight
    assert shared.data_ptr() == te.embeddings.token_embedding.weight.data_ptr()
    assert not any(name.startswith("lora") for name in dict(stock.named_modules()))
    assert stock.conv_in.weight.data_ptr() == unet.conv_in.weight.data_ptr()
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert stock.get_submodule(q).weight.data_ptr() == unet.get_submodule(q).base_layer.weight.data_ptr()
    before = {k: v.clone() for k, v in [*trained.items(), *te.state_dict().items()]}
    verify_export(parts, state, [Check(out / "toy.safetensors", "merge")])
    assert all(torch.equal(before[k], v) for k, v in [*unet.state_dict().items(), *te.state_dict().items()])


def test_loaded_file_changes_output_and_scale_zero_is_base(sd1_export):
    parts, _, out, _, _ = sd1_export
    pipe = fresh_pipeline(parts.source)
    probe = Probe.for_pipeline(pipe)
    base = pipeline_outputs(pipe, probe)
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors", adapter_name="x")
    loaded = pipeline_outputs(pipe, probe)
    pipe.set_adapters(["x"], [0.0])
    zero = pipeline_outputs(pipe, probe)
    for name in base:
        assert (loaded[name] - base[name]).abs().max() > 1e-3
        assert torch.equal(zero[name], base[name])


def assert_load_lines_work(model_dir, files):
    """Every non-empty `load` line of the artifact runs on a fresh stock pipeline and changes its outputs."""
    for entry in files.values():
        if not entry.load:
            continue
        pipe = fresh_pipeline(model_dir)
        probe = Probe.for_pipeline(pipe)
        base = pipeline_outputs(pipe, probe)
        exec(entry.load, {"pipe": pipe})  # noqa: S102 - the line users copy
        loaded = pipeline_outputs(pipe, probe)
        assert (loaded["unet"] - base["unet"]).abs().max() > 1e-4, entry.load


def test_artifact_load_lines_run(sd1_export):
    parts, _, _, files, _ = sd1_export
    assert all(f.load for f in files.values())
    assert_load_lines_work(parts.source, files)


def test_sdxl_uses_te1_te2_prefixes_and_text_model_everywhere(tiny_models, tmp_path):
    parts, _, state = adapted(tiny_models["sdxl"], rank=2, alpha=1.0, targets="transformer")
    files, extra = write(parts, state, tmp_path)
    kohya = load_file(tmp_path / "toy.safetensors")
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in kohya)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_") for k in kohya)
    assert not any(k.startswith("lora_te_") for k in kohya)
    assert "lora_unet_input_blocks_3_1_proj_in.alpha" in kohya  # SDXL: kohya's original SGM names
    peft = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.text_model.") for k in peft)
    assert any(k.startswith("text_encoder_2.text_model.") for k in peft)
    meta = header(tmp_path / "toy.safetensors")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert set(extra["roundtrip"]["toy.safetensors via diffusers"]) == {"unet", "text_encoder", "text_encoder_2"}


@pytest.mark.parametrize(
    ("family", "variant", "targets", "rank"),
    [
        ("sd2", "dora", "locon", 4),
        ("sd1", "loha", "locon", 4),
        ("sdxl", "lokr", "attn", 4),
        ("sd1", "lokr", "locon", 2),
    ],
)
def test_variants_export_in_lycoris_key_forms_and_round_trip(tiny_models, tmp_path, family, variant, targets, rank):
    parts, _, state = adapted(tiny_models[family], variant=variant, targets=targets, rank=rank, alpha=8.0)
    files, extra = write(parts, state, tmp_path)
    kohya = load_file(tmp_path / "toy.safetensors")
    suffixes = {k.split(".", 1)[1] for k in kohya}
    if variant == "dora":
        assert {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"} <= suffixes
        scale = kohya["lora_unet_down_blocks_0_resnets_0_conv1.dora_scale"]
        assert scale.shape == (32, 1, 1, 1)  # output axis, one entry per output channel
        assert files["pytorch_lora_weights.safetensors"].tools == ["diffusers", "peft"]
        assert files["toy.safetensors"].tools == ["ComfyUI", "LyCORIS"] and files["toy.safetensors"].load == ""
        assert header(tmp_path / "toy.safetensors")["ss_network_module"] == "lycoris.kohya"
    elif variant == "loha":
        assert {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"} == suffixes
        assert json.loads(header(tmp_path / "toy.safetensors")["ss_network_args"])["algo"] == "loha"
    else:
        assert "lokr_w1" in suffixes and "alpha" in suffixes
        # Tiny layers at rank 4 keep w2 full (the scale is then baked in); rank 2 factors it everywhere.
        assert ("lokr_w2" in suffixes) == (rank == 4) and ("lokr_w2_a" in suffixes) == (rank == 2)
    if variant in ("loha", "lokr"):
        assert f"pytorch_{variant}_weights.safetensors" in files
        assert files["toy.safetensors"].tools == ["A1111", "ComfyUI", "LyCORIS"]
        assert "load_peft_adapter" in files[f"pytorch_{variant}_weights.safetensors"].load
    assert len(extra["roundtrip"]) == 2
    for diffs in extra["roundtrip"].values():
        assert max(diffs.values()) < 1e-4
    assert_load_lines_work(parts.source, files)


def test_output_name_must_not_collide_and_is_sanitized(sd1_export, tmp_path):
    parts, state, _, _, _ = sd1_export
    with pytest.raises(TunerError, match="collides"):
        write(parts, state, tmp_path, name="pytorch_lora_weights", verify=False)
    files, _ = write(parts, state, tmp_path / "b", name="my toy/v1", verify=False)
    assert "my_toy_v1.safetensors" in files


def test_half_precision_parts_are_checked_against_an_fp32_rebuild(tiny_models, tmp_path):
    """Mixed-precision runs keep the base in bf16: the reference is then the fp32 base plus the trained adapter."""
    from trainers.lora import adapted_models, inject_lora

    config = RunConfig.for_method("lora").model_validate({"method": "lora", "lora": {"rank": 4, "alpha": 8.0}})
    parts = load_parts(str(tiny_models["sd1"]), weight_dtype=torch.bfloat16)
    params = inject_lora(parts, config.lora, config)[0]["params"]
    assert all(p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    _, extra = write(parts, collect_state(adapted_models(parts), "tuner"), tmp_path)
    assert all(max(d.values()) < 1e-4 for d in extra["roundtrip"].values())
