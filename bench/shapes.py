"""The benchmarked models, built in code from their published shapes (no downloads), at any width.

`width=1.0` is the real thing: SD1.5's UNet (860M), SDXL's UNet (2.6B), FLUX.1-dev's transformer (11.9B).
A smaller width keeps the topology (blocks, layers, attention layout) and narrows the channels, so a CPU
can run the same code; `tiny()` is the smallest such shape the test suite runs. Weights are random: speed and
memory do not depend on them.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _channels(base: int, width: float, multiple: int = 32) -> int:
    return max(multiple, int(round(base * width / multiple)) * multiple)


def sd15_unet(width: float = 1.0, layers_per_block: int = 2):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        block_out_channels=tuple(_channels(c, width) for c in (320, 640, 1280, 1280)),
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=_channels(768, width),
        attention_head_dim=8,
    )


def sdxl_unet(width: float = 1.0, layers: tuple[int, int, int] = (1, 2, 10), layers_per_block: int = 2):
    from diffusers import UNet2DConditionModel

    channels = tuple(_channels(c, width, 64) for c in (320, 640, 1280))
    return UNet2DConditionModel(
        sample_size=128,
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=layers,
        attention_head_dim=tuple(c // 64 for c in channels),
        cross_attention_dim=_channels(2048, width),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_channels(256, width, 8),
        projection_class_embeddings_input_dim=_channels(256, width, 8) * 6 + _channels(1280, width),
    )


def flux_transformer(width: float = 1.0, double: int = 19, single: int = 38):
    from diffusers import FluxTransformer2DModel

    heads = max(2, int(round(24 * width)))
    head_dim = 128 if width >= 1 else 16
    rope = (16, 56, 56) if head_dim == 128 else (4, 6, 6)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=_channels(4096, width),
        pooled_projection_dim=_channels(768, width),
        guidance_embeds=True,
        axes_dims_rope=rope,
    )


def sd_vae(width: float = 1.0, latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=tuple(_channels(c, width) for c in (128, 256, 512, 512)),
        layers_per_block=2,
        latent_channels=latent_channels,
        sample_size=512,
        **extra,
    )


def clip_text(tokens: int, width: float = 1.0, vocab_size: int = 49408):
    """SD1.5's CLIP-L text encoder at `width`, with CLIP's 49,408-row embedding (a tokenizer of `tokens` ids uses
    its first rows)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    hidden = _channels(768, width, 64)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=hidden * 4,
            num_hidden_layers=12,
            num_attention_heads=hidden // 64,
            max_position_embeddings=77,
            projection_dim=hidden,
            hidden_act="quick_gelu",
            bos_token_id=tokens - 2,
            eos_token_id=tokens - 1,
            pad_token_id=tokens - 1,
        )
    )


def sd1_pipeline(folder: Path, width: float, dtype: torch.dtype = torch.float32) -> Path:
    """An SD1.5-shaped pipeline folder at `width`, which both our loop and diffusers' example scripts load."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from tuner.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=sd_vae(width),
        text_encoder=clip_text(len(tokenizer), width),
        tokenizer=tokenizer,
        unet=sd15_unet(width),
        scheduler=PNDMScheduler(beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012, skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype).save_pretrained(folder, safe_serialization=True)
    return folder


def make_images(folder: Path, count: int, resolution: int, captions: bool = True) -> Path:
    """Random RGB images, with distinct sidecar captions or (`captions=False`) none: the instance prompt."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
        if captions:
            (folder / f"img{i:03d}.txt").write_text(f"a photo of thing {i}", encoding="utf-8")
    return folder
