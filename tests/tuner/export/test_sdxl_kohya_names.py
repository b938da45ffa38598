"""SDXL kohya files name UNet modules by their original SGM paths (what kohya writes and A1111 resolves).

The key-name test builds the full-size SDXL UNet and both CLIP text encoders on the meta device (no weights)
and maps every key of a LoRA, a LoCon and a text-encoder LoRA file, named by the writer, to a module by the
original-name rules: `lora_unet_` + SGM path with `.` -> `_`, where the SGM path of each module is found
independently of the writer (the SGM UNet's module list enumerated as its constructor builds it, matched to
diffusers modules by diffusers' own single-file converter), and `lora_te1_`/`lora_te2_` + `text_model_...`.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tuner.export.convert import module_names
from tuner.export.lora_kohya import kohya_name, kohya_tensors, read_kohya, write_kohya
from tuner.export.roundtrip import Check, verify_export
from tuner.export.sgm_names import UNetLayout, sgm_path
from tuner.export.state import ComponentAdapter, LoraState, collect_state, module_paths

# diffusers' SDXL base UNet config (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json).
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
# The same UNet as the SGM config describes it (sgm/configs/inference/sd_xl_base.yaml).
SGM_UNET = {"model_channels": 320, "channel_mult": (1, 2, 4), "num_res_blocks": 2, "transformer_depth": (0, 2, 10)}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "hidden_act": "quick_gelu"}  # fmt: skip
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280, "hidden_act": "gelu"}  # fmt: skip
# kohya's text-encoder targets (CLIPAttention, CLIPMLP), as ComfyUI lists them: kohya name part -> module path.
CLIP_TARGETS = {"self_attn_q_proj": "self_attn.q_proj", "self_attn_k_proj": "self_attn.k_proj",
                "self_attn_v_proj": "self_attn.v_proj", "self_attn_out_proj": "self_attn.out_proj",
                "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}  # fmt: skip
ATTN = ("to_q", "to_k", "to_v", "to_out.0")
LOCON = ATTN + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut",
                "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")  # fmt: skip


@pytest.fixture(scope="module")
def sdxl_meta():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    return {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}


def sgm_modules() -> list[str]:
    """Linear/Conv module paths of the SGM UNet, in the order its constructor (sgm openaimodel.UNetModel) adds them."""
    mc, mults, per_level, depths = (SGM_UNET[k] for k in ("model_channels", "channel_mult", "num_res_blocks",
                                                          "transformer_depth"))  # fmt: skip
    names = ["time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2", "input_blocks.0.0"]

    def res(prefix: str, cin: int, cout: int) -> None:
        names.extend(f"{prefix}.{n}" for n in ("in_layers.2", "emb_layers.1", "out_layers.3"))
        if cin != cout:
            names.append(f"{prefix}.skip_connection")

    def transformer(prefix: str, depth: int) -> None:
        names.extend((f"{prefix}.proj_in", f"{prefix}.proj_out"))
        for d in range(depth):
            for attn in ("attn1", "attn2"):
                names.extend(f"{prefix}.transformer_blocks.{d}.{attn}.{p}" for p in ATTN)
            names.extend(f"{prefix}.transformer_blocks.{d}.ff.net.{p}" for p in ("0.proj", "2"))

    ch, skips, n = mc, [mc], 1
    for level, mult in enumerate(mults):
        for _ in range(per_level):
            res(f"input_blocks.{n}.0", ch, mult * mc)
            ch = mult * mc
            if depths[level]:
                transformer(f"input_blocks.{n}.1", depths[level])
            skips.append(ch)
            n += 1
        if level != len(mults) - 1:
            names.append(f"input_blocks.{n}.0.op")
            skips.append(ch)
            n += 1
    res("middle_block.0", ch, ch)
    transformer("middle_block.1", depths[-1])
    res("middle_block.2", ch, ch)
    n = 0
    for level, mult in reversed(list(enumerate(mults))):
        for i in range(per_level + 1):
            res(f"output_blocks.{n}.0", ch + skips.pop(), mult * mc)
            ch = mult * mc
            inner = 1
            if depths[level]:
                transformer(f"output_blocks.{n}.1", depths[level])
                inner = 2
            if level and i == per_level:
                names.append(f"output_blocks.{n}.{inner}.conv")
            n += 1
    names.append("out.2")
    return names


def original_unet_table(unet) -> dict[str, str]:
    """`lora_unet_<SGM path _-joined>` -> diffusers module path, matched by diffusers' single-file converter."""
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    sgm = sgm_modules()
    checkpoint = {}
    for index, name in enumerate(sgm):
        for param in ("weight", "bias"):
            checkpoint[f"{LDM_UNET_KEY}{name}.{param}"] = torch.tensor(float(index))
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(SDXL_UNET))
    table = {}
    for key, value in converted.items():
        if key.endswith(".weight"):
            table["lora_unet_" + sgm[int(value.item())].replace(".", "_")] = key.removesuffix(".weight")
    # The enumeration is the whole SGM UNet: one original name for every Linear/Conv2d of the diffusers UNet.
    assert len(table) == len(sgm) and sorted(table.values()) == sorted(module_paths(unet, "unet"))
    return table


def original_te_table(model, prefix: str) -> dict[str, str]:
    """`lora_te1_text_model_encoder_layers_{b}_{target}` -> module path, for each layer of one CLIP encoder."""
    names = dict(model.named_modules())
    table = {}
    for b in range(model.config.num_hidden_layers):
        for part, module in CLIP_TARGETS.items():
            path = f"text_model.encoder.layers.{b}.{module}"
            assert path in names or path.removeprefix("text_model.") in names
            table[f"{prefix}_text_model_encoder_layers_{b}_{part}"] = path
    return table


def fake_state(models: dict, targets: dict[str, tuple[str, ...]]) -> LoraState:
    """A rank-4 adapter on every module whose path ends with one of the component's targets (meta tensors)."""
    components = {}
    for component, suffixes in targets.items():
        paths = [p for p in module_paths(models[component], component) if p.endswith(tuple(f".{s}" for s in suffixes))]
        tensors = {}
        for path in paths:
            tensors[f"{path}.lora_A.weight"] = torch.empty(4, 8, device="meta")
            tensors[f"{path}.lora_B.weight"] = torch.empty(8, 4, device="meta")
        config = {"peft_type": "LORA", "r": 4, "lora_alpha": 4.0, "target_modules": list(suffixes)}
        components[component] = ComponentAdapter(component, tensors, config)
    return LoraState(components)


def test_sgm_rules_on_the_full_sdxl_unet(sdxl_meta):
    layout = UNetLayout.of(sdxl_meta["unet"])
    table = original_unet_table(sdxl_meta["unet"])
    mine = {"lora_unet_" + sgm_path(p, layout).replace(".", "_"): p for p in module_paths(sdxl_meta["unet"], "unet")}
    assert mine == table
    assert table["lora_unet_output_blocks_2_2_conv"] == "up_blocks.0.upsamplers.0.conv"
    assert table["lora_unet_output_blocks_5_2_conv"] == "up_blocks.1.upsamplers.0.conv"
    assert table["lora_unet_input_blocks_3_0_op"] == "down_blocks.0.downsamplers.0.conv"
    assert table["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    )
    assert table["lora_unet_middle_block_2_emb_layers_1"] == "mid_block.resnets.1.time_emb_proj"
    assert table["lora_unet_time_embed_0"] == "time_embedding.linear_1"
    assert table["lora_unet_label_emb_0_2"] == "add_embedding.linear_2"


@pytest.mark.parametrize(
    ("kind", "targets"),
    [
        ("lora", {"unet": ATTN}),
        ("locon", {"unet": LOCON}),
        ("te", {"text_encoder": tuple(CLIP_TARGETS.values()), "text_encoder_2": tuple(CLIP_TARGETS.values())}),
    ],
)
def test_every_sdxl_kohya_key_maps_to_a_module_by_the_original_names(sdxl_meta, kind, targets):
    state = fake_state(sdxl_meta, targets)
    keys = kohya_tensors(state, 2, UNetLayout.of(sdxl_meta["unet"]))
    table = {
        **original_unet_table(sdxl_meta["unet"]),
        **original_te_table(sdxl_meta["text_encoder"], "lora_te1"),
        **original_te_table(sdxl_meta["text_encoder_2"], "lora_te2"),
    }
    by_module: dict[str, set[str]] = {}
    for key in keys:
        name, _, suffix = key.partition(".")
        by_module.setdefault(name, set()).add(suffix)
    left_over = sorted(set(by_module) - set(table))
    assert not left_over, left_over[:5]
    assert all(suffixes == {"lora_down.weight", "lora_up.weight", "alpha"} for suffixes in by_module.values())
    # Each name resolves to the very module the adapter was on.
    layout = UNetLayout.of(sdxl_meta["unet"])
    for component, comp in state.components.items():
        for path in comp.modules():
            original = table[kohya_name(component, path, 2, layout)]
            assert original.removeprefix("text_model.") == path.removeprefix("text_model.")
    assert len(by_module) == sum(len(c.modules()) for c in state.components.values())
    if kind == "locon":
        assert "lora_unet_output_blocks_2_2_conv" in by_module  # up_blocks.0's upsampler, lost by A1111 before
        assert "lora_unet_input_blocks_6_0_op" in by_module and "lora_unet_middle_block_0_in_layers_2" in by_module
        assert not any(
            n.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks")) for n in by_module
        )
    elif kind == "lora":
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in by_module
        assert len(by_module) == 8 * (2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2)  # 70 transformer blocks, 8 each
    else:
        assert "lora_te1_text_model_encoder_layers_11_mlp_fc2" in by_module
        assert "lora_te2_text_model_encoder_layers_31_self_attn_out_proj" in by_module


def test_sd1_and_sd2_unet_names_stay_diffusers_paths(sdxl_meta):
    """One text encoder (SD1/SD2): a layout changes nothing, as kohya writes SD1 on the diffusers UNet."""
    layout = UNetLayout.of(sdxl_meta["unet"])
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert kohya_name("unet", path, 1) == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    state = fake_state(sdxl_meta, {"unet": ("upsamplers.0.conv",)})
    assert (
        set(kohya_tensors(state, 1, layout))
        == set(kohya_tensors(state, 1))
        == {
            f"lora_unet_up_blocks_{i}_upsamplers_0_conv.{s}"
            for i in (0, 1)
            for s in ("lora_down.weight", "lora_up.weight", "alpha")
        }
    )
    assert kohya_name("text_encoder", "encoder.layers.0.self_attn.q_proj", 1) == (
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    )


def test_tiny_sdxl_layout_follows_the_model(tiny_models):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_models["sdxl"], subfolder="unet")
    layout = UNetLayout.of(unet)
    # tiny: (DownBlock2D, CrossAttnDownBlock2D), one resnet each; up: (CrossAttnUpBlock2D, UpBlock2D).
    assert sgm_path("down_blocks.1.attentions.0.proj_in", layout) == "input_blocks.3.1.proj_in"
    assert sgm_path("down_blocks.0.downsamplers.0.conv", layout) == "input_blocks.2.0.op"
    assert sgm_path("up_blocks.0.upsamplers.0.conv", layout) == "output_blocks.1.2.conv"
    assert sgm_path("up_blocks.1.resnets.1.conv_shortcut", layout) == "output_blocks.3.0.skip_connection"
    assert all(sgm_path(p, layout) for p in module_paths(unet, "unet"))


def adapted_sdxl(model_dir, targets="locon"):
    """Tiny SDXL parts with a perturbed LoCon (UNet) + LoRA (both text encoders) and its collected state."""
    from trainers.lora import adapted_models, inject_lora
    from tuner.config import RunConfig
    from tuner.models import load_parts

    table = {"rank": 2, "alpha": 4.0, "train_text_encoder": True, "unet_target_modules": targets}
    config = RunConfig.for_method("lora").model_validate({"method": "lora", "lora": table})
    parts = load_parts(str(model_dir))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for group in inject_lora(parts, config.lora, config):
            for p in group["params"]:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return parts, collect_state(adapted_models(parts), "tuner")


def test_sgm_named_sdxl_file_loads_exactly_in_diffusers_and_by_merge_and_reads_back(tiny_models, tmp_path):
    parts, state = adapted_sdxl(tiny_models["sdxl"])
    layout = UNetLayout.of(parts.denoiser)
    path = write_kohya(state, tmp_path / "toy.safetensors", 2, {}, layout)
    keys = {k.partition(".")[0] for k in load_file(path)}
    assert "lora_unet_output_blocks_1_2_conv" in keys and "lora_unet_input_blocks_2_0_op" in keys
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in keys
    assert not any(k.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks")) for k in keys)
    # diffusers converts the SGM names with the pipeline's UNet config; the merge resolves them as A1111 does.
    report = verify_export(parts, state, [Check(path, "diffusers"), Check(path, "merge", rtol=1e-4)])
    assert set(report[f"{path.name} via diffusers"]) == {"unet", "text_encoder", "text_encoder_2"}
    # Both forms read back to the same adapter: the SGM file and an old tuner file with diffusers UNet names.
    old = write_kohya(state, tmp_path / "old.safetensors", 2, {})
    assert any(k.startswith("lora_unet_up_blocks_0_upsamplers_0_conv.") for k in load_file(old))
    names = module_names(str(tiny_models["sdxl"]), 2)  # the base model's, built on the meta device
    for written in (path, old):
        back = read_kohya(written, names, 2)
        assert set(back.components) == set(state.components)
        for component, comp in state.components.items():
            assert back.components[component].tensors.keys() == comp.tensors.keys()
            assert all(torch.equal(back.components[component].tensors[k], t) for k, t in comp.tensors.items())
            assert all(back.components[component].alpha_of(p) == comp.alpha_of(p) for p in comp.modules())


def test_export_to_kohya_with_the_base_writes_sgm_names_and_converts_back_exactly(tiny_models, tmp_path, caplog):
    from tuner.export.convert import export
    from tuner.export.lora_diffusers import write_peft_file

    model = str(tiny_models["sdxl"])
    _, state = adapted_sdxl(model)
    spec = {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    src = write_peft_file(state, tmp_path / "src" / "pytorch_lora_weights.safetensors", spec)
    kohya = export(src, "kohya", tmp_path / "k", model=model, name="xl")  # checked by loading both into the base
    keys = load_file(kohya)
    assert "lora_unet_output_blocks_1_2_conv.alpha" in keys and "lora_unet_middle_block_1_proj_in.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    back = export(kohya, "diffusers", tmp_path / "d", model=model)
    original, again = load_file(src), load_file(back)
    assert set(original) == set(again) and all(torch.equal(original[k], again[k]) for k in original)
    # Without the base model the layout is unknown: diffusers names, and a warning that says how to get SGM ones.
    plain = export(src, "kohya", tmp_path / "plain.safetensors")
    assert "lora_unet_up_blocks_0_upsamplers_0_conv.alpha" in load_file(plain)
    assert "pass --model BASE" in caplog.text
