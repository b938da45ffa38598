"""Tiny SD1-, SD2-v-, SDXL-, SD3.5-, FLUX.1-dev- and Z-Image-shaped pipelines, built offline with fixed seeds and
saved as diffusers folders.

They have every structural feature of the real families (cross-attention UNet, 8x VAE, CLIP text
encoder(s), SDXL's pooled embeddings and time ids, SD2's v-prediction and linear projections; SD3's MMDiT
with qk-norm and three text encoders; Flux's double- and single-stream blocks, rotary position ids, embedded
guidance and packed latents; Z-Image's single-stream blocks with refiners and a Qwen3 encoder behind a chat
template; 16-channel VAEs with a shift factor; T5 and Qwen tokenizers built in code)
at widths that train in seconds on a CPU, so tests and CI exercise the real loading, training and export code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Qwen3Config,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
)

from tuner.errors import TunerError
from tuner.qwen_tokenizer import build_qwen_tokenizer
from tuner.tokenizer import BASIC_WORDS, build_t5_tokenizer, build_tokenizer

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux", "zimage")
_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def tiny_vae(
    scaling_factor: float = 0.18215,
    seed: int = 0,
    latent_channels: int = 4,
    shift_factor: float | None = None,
    quant_conv: bool = True,
) -> AutoencoderKL:
    """Four blocks, three downsamples: the usual 8x spatial factor; 4 latent channels, or (SD3 and FLUX.1) 16
    with a shift factor and no 1x1 quant / post-quant convs."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )


def tiny_t5(vocab_size: int, width: int, seed: int = 0) -> T5EncoderModel:
    """A one-layer T5 encoder (relative position buckets, gated-GELU MLP like T5 v1.1)."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=width * 2, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")  # fmt: skip
    return T5EncoderModel(config)


def tiny_text_encoder(
    vocab_size: int,
    hidden: int = 32,
    projection: bool = False,
    seed: int = 0,
    act="quick_gelu",
    mlp_ratio: int = 2,
    max_tokens: int = 77,
):
    """A 2-layer CLIP text encoder (with a projection head for SDXL's second encoder)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * mlp_ratio,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_tokens,
        projection_dim=hidden,
        hidden_act=act,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_unet(family: str, cross_attention_dim: int = 32, seed: int = 0, sample_size: int = 8) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    common = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
    )
    if family == "sd1":
        return UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4,
        )
    if family == "sd2":
        return UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
        )
    # SDXL: text_time conditioning, pooled text embeds + 6 size/crop ids, attention in the deeper block.
    return UNet2DConditionModel(
        **common,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
        transformer_layers_per_block=(1, 2),
    )


def build_sd3(seed: int, words) -> StableDiffusion3Pipeline:
    """SD3.5-shaped: MMDiT with qk RMS-norm; CLIP-L and CLIP-G (with projections), whose 64-wide concatenated
    states the pipeline pads to T5's width (64); pooled = both projections (2 x 32); static flow shift 3.0."""
    tokenizer, t5_tokenizer = build_tokenizer(words), build_t5_tokenizer(words)
    torch.manual_seed(seed + 3)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16,
                                        qk_norm="rms_norm")  # fmt: skip
    return StableDiffusion3Pipeline(
        transformer=transformer,
        vae=tiny_vae(scaling_factor=1.5305, shift_factor=0.0609, latent_channels=16, seed=seed, quant_conv=False),
        text_encoder=tiny_text_encoder(len(tokenizer), projection=True, seed=seed + 1),
        text_encoder_2=tiny_text_encoder(len(tokenizer), projection=True, seed=seed + 2, act="gelu"),
        text_encoder_3=tiny_t5(len(t5_tokenizer), 64, seed=seed + 4),
        tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(words),
        tokenizer_3=t5_tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def build_flux(seed: int, words) -> FluxPipeline:
    """FLUX.1-dev-shaped: one double- and one single-stream block, rotary axes (2, 2, 4), embedded guidance;
    CLIP-L pooled (32) and a 32-wide T5; latents packed 2x2 (16 channels -> 64); resolution-dependent shift."""
    tokenizer, t5_tokenizer = build_tokenizer(words), build_t5_tokenizer(words)
    torch.manual_seed(seed + 3)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True,
                                         axes_dims_rope=(2, 2, 4))  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip
    return FluxPipeline(
        transformer=transformer,
        vae=tiny_vae(scaling_factor=0.3611, shift_factor=0.1159, latent_channels=16, seed=seed, quant_conv=False),
        text_encoder=tiny_text_encoder(len(tokenizer), seed=seed + 1),
        text_encoder_2=tiny_t5(len(t5_tokenizer), 32, seed=seed + 4),
        tokenizer=tokenizer,
        tokenizer_2=t5_tokenizer,
        scheduler=scheduler,
    )


def build_zimage(seed: int, words) -> ZImagePipeline:
    """Z-Image-shaped: one main block and one noise / one context refiner (32 wide, rotary axes (4, 6, 6)),
    a two-layer Qwen3 encoder (32 wide, grouped-query attention) whose penultimate states are the captions;
    FLUX.1's 16-channel VAE; Z-Image-Turbo's static flow shift 3.0."""
    tokenizer = build_qwen_tokenizer(words)
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
                                          pad_token_id=tokenizer.pad_token_id))  # fmt: skip
    torch.manual_seed(seed + 3)
    transformer = ZImageTransformer2DModel(in_channels=16, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2,
                                           n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6],
                                           axes_lens=[256, 64, 64])  # fmt: skip
    return ZImagePipeline(
        transformer=transformer,
        vae=tiny_vae(scaling_factor=0.3611, shift_factor=0.1159, latent_channels=16, seed=seed, quant_conv=False),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def build_pipeline(family: str, seed: int = 0, words: list[str] | tuple[str, ...] = BASIC_WORDS):
    """A randomly initialized (but seeded) stock diffusers pipeline of `family`."""
    if family not in FAMILIES:
        raise TunerError(f"--family {family!r}: allowed: {', '.join(FAMILIES)}")
    if family == "sd3":
        return build_sd3(seed, words)
    if family == "flux":
        return build_flux(seed, words)
    if family == "zimage":
        return build_zimage(seed, words)
    tokenizer = build_tokenizer(words)
    vocab = len(tokenizer)
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=tiny_vae(scaling_factor=0.13025, seed=seed),
            text_encoder=tiny_text_encoder(vocab, seed=seed + 1),
            text_encoder_2=tiny_text_encoder(vocab, projection=True, seed=seed + 2, act="gelu"),
            tokenizer=tokenizer,
            tokenizer_2=build_tokenizer(words),
            unet=tiny_unet("sdxl", cross_attention_dim=64, seed=seed + 3),
            scheduler=EulerDiscreteScheduler(**_SCHEDULER, timestep_spacing="leading", steps_offset=1),
        )
    if family == "sd2":
        scheduler = DDIMScheduler(
            **_SCHEDULER, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1
        )
        text_encoder = tiny_text_encoder(vocab, seed=seed + 1, act="gelu")
    else:
        scheduler = PNDMScheduler(**_SCHEDULER, skip_prk_steps=True, steps_offset=1)
        text_encoder = tiny_text_encoder(vocab, seed=seed + 1)
    return StableDiffusionPipeline(
        vae=tiny_vae(seed=seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(family, seed=seed + 3),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_tiny(directory: str | Path, family: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny `family` pipeline to `directory` as an ordinary diffusers folder (safetensors)."""
    directory = Path(directory)
    build_pipeline(family, seed=seed).save_pretrained(directory, safe_serialization=True)
    return directory
