"""Tiny SD1-, SD2-v- and SDXL-shaped pipelines, built offline with fixed seeds and saved as diffusers folders.

They have every structural feature of the real families (cross-attention UNet, 8x VAE, CLIP text
encoder(s), SDXL's pooled embeddings and time ids, SD2's v-prediction and linear projections) at widths
that train in seconds on a CPU, so tests and CI exercise the real loading, training and export code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tuner.errors import TunerError
from tuner.tokenizer import BASIC_WORDS, build_tokenizer

FAMILIES = ("sd1", "sd2", "sdxl")
_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def tiny_vae(scaling_factor: float = 0.18215, seed: int = 0) -> AutoencoderKL:
    """Four blocks, three downsamples: the usual 8x spatial factor and 4 latent channels."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


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


def build_pipeline(family: str, seed: int = 0, words: list[str] | tuple[str, ...] = BASIC_WORDS):
    """A randomly initialized (but seeded) stock diffusers pipeline of `family`."""
    if family not in FAMILIES:
        raise TunerError(f"--family {family!r}: allowed: {', '.join(FAMILIES)}")
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
