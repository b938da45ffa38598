"""The kohya FLUX.1 LoRA file: BFL names ComfyUI maps, exact fusing, diffusers' loader and our reader give back
the trained model's output / the trained deltas."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tuner.errors import TunerError
from tuner.export.lora_flux import (
    SWAPPED,
    bfl_module,
    diffusers_caveats,
    diffusers_parts,
    flux_kohya_name,
    flux_kohya_tensors,
    fused_widths,
    module_deltas,
    read_flux_kohya,
    write_flux_kohya,
)
from tuner.export.state import ComponentAdapter, LoraState, collect_state

FLUX = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(2, 2, 4),
)
# Every Linear layer of both block kinds, as module-path suffixes.
DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
          "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
          "ff_context.net.2", "norm1.linear", "norm1_context.linear")  # fmt: skip
SINGLE_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
SINGLE = (*SINGLE_LINEAR1, "proj_out", "norm.linear")
GLOBALS = ("x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
           "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
           "time_text_embed.text_embedder.linear_2", "time_text_embed.guidance_embedder.linear_1",
           "time_text_embed.guidance_embedder.linear_2", "norm_out.linear", "proj_out")  # fmt: skip
# The BFL (original FLUX.1) state dict of a 1-double, 1-single-block dev model, as ComfyUI names it after
# `diffusion_model.`; `test_bfl_names_and_rows_match_diffusers_single_file_converter` checks it is exactly what
# diffusers' single-file converter consumes.
BFL_LINEAR = (
    "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
    "guidance_in.in_layer", "guidance_in.out_layer", "double_blocks.0.img_mod.lin", "double_blocks.0.txt_mod.lin",
    "double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_attn.proj",
    "double_blocks.0.txt_attn.proj", "double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2",
    "double_blocks.0.txt_mlp.0", "double_blocks.0.txt_mlp.2", "single_blocks.0.modulation.lin",
    "single_blocks.0.linear1", "single_blocks.0.linear2", "final_layer.linear", "final_layer.adaLN_modulation.1",
)  # fmt: skip
BFL_NORMS = ("double_blocks.0.img_attn.norm.query_norm.scale", "double_blocks.0.img_attn.norm.key_norm.scale",
             "double_blocks.0.txt_attn.norm.query_norm.scale", "double_blocks.0.txt_attn.norm.key_norm.scale",
             "single_blocks.0.norm.query_norm.scale", "single_blocks.0.norm.key_norm.scale")  # fmt: skip


def flux_model():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(**FLUX).eval()


def paths(double=DOUBLE, single=SINGLE, globals_=()):
    return ([f"transformer_blocks.0.{s}" for s in double] + [f"single_transformer_blocks.0.{s}" for s in single]
            + list(globals_))  # fmt: skip


def adapted(targets, rank=4, alpha=8.0, **patterns):
    """A tiny FLUX transformer with a non-zero peft LoRA on exactly `targets` (full module paths)."""
    from peft import LoraConfig

    model = flux_model()
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **patterns)
    model.add_adapter(config, adapter_name="default")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    adapters = {n[: -len(".lora_A")] for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert adapters == set(targets)  # peft matches suffixes: a bare `proj_out` would take the single blocks' too
    return model


def forward(model):
    gen = torch.Generator().manual_seed(3)
    inputs = {
        "hidden_states": torch.randn(1, 16, 64, generator=gen),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=gen),
        "pooled_projections": torch.randn(1, 32, generator=gen),
        "timestep": torch.tensor([0.6]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.randn(16, 3, generator=gen),
        "txt_ids": torch.zeros(8, 3),
    }
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def through_diffusers(path):
    """The file as diffusers loads it (`lora_state_dict` runs `_convert_kohya_flux_lora_to_diffusers`)."""
    from diffusers import FluxPipeline

    state_dict = FluxPipeline.lora_state_dict(str(path))
    model = flux_model()
    model.load_lora_adapter(state_dict, prefix="transformer", adapter_name="loaded")
    return model


def close(got, want, rtol=1e-5):
    return (got - want).abs().max().item() <= rtol * want.abs().max().item()


def assert_same_deltas(a: LoraState, b: LoraState, exact=True):
    want, got = module_deltas(a), module_deltas(b)
    assert set(got) == set(want)
    for key, delta in want.items():
        assert torch.equal(got[key], delta) if exact else close(got[key], delta, 1e-6), key


@pytest.mark.parametrize(
    "patterns",
    [{}, {"rank_pattern": {"attn.to_k": 2, "add_v_proj": 3}, "alpha_pattern": {"attn.to_q": 1.0, "ff.net.2": 5.0}}],
    ids=["uniform", "per-module-rank-alpha"],
)
def test_diffusers_loads_the_file_to_the_trained_output(tmp_path, patterns):
    # diffusers splits `linear1` at FLUX.1's real widths only: here the single block keeps linear2 / modulation.
    model = adapted(paths(single=("proj_out", "norm.linear")), **patterns)
    want = forward(model)
    state = collect_state({"transformer": model}, "default")
    path = write_flux_kohya(state, tmp_path / "flux.safetensors", {"modelspec.architecture": "flux-1-dev/lora"})
    assert diffusers_caveats(state) == []
    got = forward(through_diffusers(path))
    assert not close(forward(flux_model()), want, 1e-2)  # the adapter does change the output
    assert close(got, want)


def test_missing_fused_parts_get_zero_rows_and_still_load_exactly(tmp_path):
    targets = paths(double=("attn.to_q", "attn.to_v", "attn.add_k_proj"), single=())
    model = adapted(targets)
    state = collect_state({"transformer": model}, "default")
    path = write_flux_kohya(state, tmp_path / "qv.safetensors", {})
    tensors = load_file(path)
    up = tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert up.shape == (48, 8) and not up[16:32].any()  # k rows zero; q, v each keep rank 4
    assert not up[:16, 4:].any() and not up[32:, :4].any()  # block-diagonal
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 8.0
    assert tensors["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight"].shape == (4, 16)
    assert close(forward(through_diffusers(path)), forward(model))
    back = read_flux_kohya(path)
    assert_same_deltas(state, back)
    assert sorted(back.components["transformer"].modules()) == sorted(targets)


def test_linear1_at_flux_width_loads_in_diffusers_exactly(tmp_path):
    """diffusers' converter hard-codes FLUX.1's widths for linear1: check the split there, tensors only."""
    gen = torch.Generator().manual_seed(0)
    width, ranks = 3072, {"attn.to_q": 4, "attn.to_k": 2, "proj_mlp": 3}  # to_v untrained, ranks differ
    tensors, config = {}, {"r": 4, "lora_alpha": 8.0, "rank_pattern": {"to_k": 2, "proj_mlp": 3}, "alpha_pattern": {}}
    for part, rank in ranks.items():
        out = 4 * width if part == "proj_mlp" else width
        prefix = f"single_transformer_blocks.0.{part}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, width, generator=gen)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=gen)
    config["target_modules"] = sorted(ranks)
    state = LoraState({"transformer": ComponentAdapter("transformer", tensors, config)})
    assert diffusers_caveats(state) == []
    path = write_flux_kohya(state, tmp_path / "wide.safetensors", {})
    assert load_file(path)["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * width, 9)

    from diffusers import FluxPipeline

    loaded = FluxPipeline.lora_state_dict(str(path))
    for (_, module), delta in module_deltas(state).items():
        a, b = loaded[f"transformer.{module}.lora_A.weight"], loaded[f"transformer.{module}.lora_B.weight"]
        assert close(b @ a, delta, 1e-6), module  # diffusers loads it at scale 1 (alpha = rank)
    assert not loaded["transformer.single_transformer_blocks.0.attn.to_v.lora_B.weight"].any()
    assert_same_deltas(state, read_flux_kohya(path), exact=False)


def test_reader_gives_back_every_delta_exactly(tmp_path):
    targets = paths(globals_=GLOBALS)
    model = adapted(targets, rank_pattern={"single_transformer_blocks.0.proj_mlp": 2})
    state = collect_state({"transformer": model}, "default")
    back = read_flux_kohya(write_flux_kohya(state, tmp_path / "all.safetensors", {}), {"transformer": targets})
    assert_same_deltas(state, back)  # alpha / rank = 2 is baked in exactly
    comp = back.components["transformer"]
    assert sorted(comp.modules()) == sorted(targets)
    assert comp.rank_for("single_transformer_blocks.0.proj_mlp") == 2
    assert comp.rank_for("single_transformer_blocks.0.attn.to_k") == 4 and comp.rank_for("proj_out") == 4
    with pytest.raises(TunerError, match="do not exist in the base model"):
        read_flux_kohya(tmp_path / "all.safetensors", {"transformer": targets[:-1]})


def test_every_module_is_named_as_comfyui_maps_it_and_comfyui_math_gives_the_trained_output(tmp_path):
    """ComfyUI maps `lora_unet_` + a BFL weight key (`.` -> `_`) and adds up @ down * alpha / rank to it."""
    targets = paths(globals_=GLOBALS)
    model = adapted(targets, alpha=6.0)  # alpha / rank = 1.5, not a power of two
    state = collect_state({"transformer": model}, "default")
    path = write_flux_kohya(state, tmp_path / "all.safetensors", {})
    tensors = load_file(path)
    names = {key.split(".")[0] for key in tensors}
    assert names == {"lora_unet_" + key.replace(".", "_") for key in BFL_LINEAR}
    assert {flux_kohya_name("transformer", p) for p in targets} == names
    notes = diffusers_caveats(state)
    assert len(notes) == 2 and "outside the blocks" in notes[0] and "linear1" in notes[1]

    comfy = flux_model()
    weights = dict(comfy.named_parameters())
    with torch.no_grad():
        for bfl in BFL_LINEAR:
            name = "lora_unet_" + bfl.replace(".", "_")
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            delta = up @ down * (tensors[f"{name}.alpha"] / down.shape[0])
            if bfl == SWAPPED:
                delta = torch.cat(delta.chunk(2)[::-1])
            parts, widths = diffusers_parts(bfl), fused_widths(bfl)
            pieces = delta.split([w * down.shape[1] for w in widths]) if widths else (delta,)
            for part, piece in zip(parts, pieces, strict=True):
                weights[f"{part}.weight"] += piece
    assert close(forward(comfy), forward(model))


def test_bfl_names_and_rows_match_diffusers_single_file_converter():
    """Feed diffusers' BFL -> diffusers checkpoint converter a FLUX.1-width checkpoint whose rows say where they
    came from; each diffusers weight must come from the BFL module and rows `bfl_module` names."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    width = 3072
    checkpoint = {}
    for index, bfl in enumerate(BFL_LINEAR):
        rows = sum(fused_widths(bfl) or (2,)) * (width if fused_widths(bfl) else 1)
        tag = torch.stack([torch.full((rows,), float(index)), torch.arange(rows, dtype=torch.float64)], dim=1)
        checkpoint[f"{bfl}.weight"], checkpoint[f"{bfl}.bias"] = tag, tag[:, 0].clone()
    checkpoint.update({key: torch.zeros(1) for key in BFL_NORMS})
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert checkpoint == {}  # every BFL key consumed: the list is the BFL layout
    assert set(converted) == set(flux_model().state_dict())
    for module in paths(globals_=GLOBALS):
        bfl, part = bfl_module(module)
        widths = fused_widths(bfl)
        tag = converted[f"{module}.weight"]
        assert torch.all(tag[:, 0] == BFL_LINEAR.index(bfl)), module
        if widths:
            start = sum(widths[:part]) * width
            assert torch.equal(tag[:, 1], torch.arange(start, start + widths[part] * width, dtype=torch.float64))
        else:
            assert tag[:, 1].tolist() == ([1.0, 0.0] if bfl == SWAPPED else [0.0, 1.0]), module


def test_clip_l_goes_to_lora_te1_and_loads_through_flux_pipeline(tmp_path):
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel

    def clip():
        torch.manual_seed(0)
        config = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=16)  # fmt: skip
        return CLIPTextModel(config).eval()

    encoder, transformer = clip(), adapted(paths(double=("attn.to_q",), single=("proj_out",)))
    lora = LoraConfig(
        r=4, lora_alpha=2, target_modules=["q_proj", "v_proj", "out_proj", "fc1"], init_lora_weights=False
    )
    encoder.add_adapter(lora, adapter_name="default")
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    ids = torch.tensor([[0, 5, 17, 42, 2]])
    with torch.no_grad():
        want = encoder(ids).last_hidden_state
    state = collect_state({"text_encoder": encoder, "transformer": transformer}, "default")
    path = write_flux_kohya(state, tmp_path / "te.safetensors", {})
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in load_file(path)
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=clip(), tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=flux_model())  # fmt: skip
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        assert close(pipe.text_encoder(ids).last_hidden_state, want)
    assert close(forward(pipe.transformer), forward(transformer))
    back = read_flux_kohya(path)
    assert "text_model.encoder.layers.1.mlp.fc1" in back.components["text_encoder"].modules()
    assert_same_deltas(state, back, exact=False)  # alpha / rank = 0.5


def test_header_alpha_and_layout(tmp_path):
    state = collect_state({"transformer": adapted(paths(double=("attn.to_q",), single=()))}, "default")
    meta = {"modelspec.architecture": "flux-1-dev/lora", "ss_network_module": "networks.lora_flux"}
    path = write_flux_kohya(state, tmp_path / "sub" / "h.safetensors", meta)
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        alpha = handle.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.alpha")
    assert header["modelspec.architecture"] == "flux-1-dev/lora" and "sshs_model_hash" in header
    assert alpha.dtype == torch.float32 and alpha.dim() == 0 and alpha.item() == 4.0
    assert read_flux_kohya(path).metadata["ss_network_module"] == "networks.lora_flux"
    assert all(t.is_contiguous() for t in flux_kohya_tensors(state).values())


def test_kohya_unsplit_qkv_and_the_2204_alpha_read_as_loaders_apply_them(tmp_path):
    """sd-scripts' default qkv shares one down (dense up); `split_qkv` re-fuses at rank 3r but keeps alpha."""
    gen = torch.Generator().manual_seed(0)
    dense = {"down": torch.randn(4, 16, generator=gen), "up": torch.randn(48, 4, generator=gen), "alpha": 2.0}
    blocks = [torch.randn(16, 2, generator=gen) for _ in range(3)]
    split = {"down": torch.randn(6, 16, generator=gen), "up": torch.block_diag(*blocks), "alpha": 2.0}
    tensors = {}
    for name, spec in (("img", dense), ("txt", split)):
        key = f"lora_unet_double_blocks_0_{name}_attn_qkv"
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = spec["down"], spec["up"]
        tensors[f"{key}.alpha"] = torch.tensor(spec["alpha"])
    save_file(tensors, str(tmp_path / "kohya.safetensors"))
    back = read_flux_kohya(tmp_path / "kohya.safetensors")
    comp, deltas = back.components["transformer"], module_deltas(back)
    for spec, parts in ((dense, ("to_q", "to_k", "to_v")), (split, ("add_q_proj", "add_k_proj", "add_v_proj"))):
        whole = spec["up"] @ spec["down"] * (spec["alpha"] / spec["down"].shape[0])
        for i, part in enumerate(parts):
            assert close(deltas[("transformer", f"transformer_blocks.0.attn.{part}")], whole[16 * i : 16 * (i + 1)])
    assert (
        comp.rank_for("transformer_blocks.0.attn.to_k") == 4
        and comp.rank_for("transformer_blocks.0.attn.add_k_proj") == 2
    )


def test_refuses_what_the_form_cannot_hold(tmp_path):
    tensor = torch.zeros(4, 16)
    dora = ComponentAdapter("transformer", {"transformer_blocks.0.attn.to_q.lora_A.weight": tensor,
                                            "transformer_blocks.0.attn.to_q.lora_B.weight": tensor.T},
                            {"peft_type": "LORA", "use_dora": True, "r": 4, "lora_alpha": 4})  # fmt: skip
    with pytest.raises(TunerError, match="supports plain LoRA only; the diffusers file carries"):
        flux_kohya_tensors(LoraState({"transformer": dora}))
    loha = ComponentAdapter("transformer", {"transformer_blocks.0.attn.to_q.hada_w1_a": tensor},
                            {"peft_type": "LOHA", "r": 4, "alpha": 4})  # fmt: skip
    with pytest.raises(TunerError, match="is loha"):
        write_flux_kohya(LoraState({"transformer": loha}), tmp_path / "x.safetensors", {})
    with pytest.raises(TunerError, match="no counterpart in the BFL"):
        bfl_module("transformer_blocks.0.attn.norm_q")
    with pytest.raises(TunerError, match="transformer and CLIP-L"):
        flux_kohya_name("text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q")
    t5 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    save_file(
        {f"{t5}.lora_down.weight": tensor, f"{t5}.lora_up.weight": tensor.T.contiguous()},
        str(tmp_path / "t5.safetensors"),
    )
    with pytest.raises(TunerError, match="T5"):
        read_flux_kohya(tmp_path / "t5.safetensors")
