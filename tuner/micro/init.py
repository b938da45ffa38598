"""Build the random-init micro pipeline: SD1 architecture at micro widths with the micro world's vocabulary.

This is the starting point of the micro base recipe (`tuner.micro.build`); the suite's own trainers then train
its VAE (decoder preset, whole autoencoder) and its UNet (DreamBooth preset, captioned data; the random text
encoder stays frozen).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from tuner.micro.world import WORDS
from tuner.tiny import tiny_text_encoder
from tuner.tokenizer import build_tokenizer

EXTRA_WORDS = ["sks", "the", "an", "with", "picture", "image", "drawing", "painting"]
"""Rare identifier and a few everyday words, so personalization prompts tokenize one word per token."""
TEXT_WIDTH = 64
MAX_TOKENS = 20
"""Prompt length in tokens, BOS and EOS included. The micro world's longest prompts (a personalization prompt with a
four-vector textual-inversion token) take 15. Untrained cross-attention averages over every position, so at SD's 77
the ~9 content tokens of a caption would be drowned by ~68 identical padding tokens and the UNet learns to read the
text far more slowly."""
SCALING_FACTOR = 1.0  # placeholder; the build measures the trained VAE's latent std and writes 1/std here


def micro_vae(seed: int = 0) -> AutoencoderKL:
    """Three blocks, two downsamples: 64px -> 16x16x4 latents (8x would leave an 8x8 grid too coarse for shapes).

    Narrow at full resolution, where a CPU step spends its time.
    """
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=SCALING_FACTOR,
    )


def micro_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD1 block layout at 16x16 latents: attention at 16 and 8, a plain block at 4, with three SD1-compatible
    config options that made the prompt's shape word start to draw outlines (bench/results/micro.md):

    - `only_cross_attention` at 16x16: both attention layers there read the prompt; self-attention over 256
      positions took a third of a CPU step, and 8x8 keeps it;
    - `resnet_time_scale_shift="scale_shift"` with `addition_embed_type="text"`: the pooled prompt joins the time
      embedding and scales every ResNet's features (ADM's class conditioning), a multiplicative path a shape needs.

    Narrow at 16x16, where the compute is: on 2 shared cores more steps beat more width (3.3M params).
    """
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=32,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,  # diffusers' SD1 naming: the number of heads
        only_cross_attention=(True, False, False),
        resnet_time_scale_shift="scale_shift",
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def micro_text_encoder(vocab_size: int, seed: int = 0) -> CLIPTextModel:
    return tiny_text_encoder(vocab_size, hidden=TEXT_WIDTH, seed=seed, mlp_ratio=4, max_tokens=MAX_TOKENS)


def build_micro_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The untrained micro pipeline (seeded): what the recipe starts from.

    The scheduler is v-prediction on SD's scaled-linear betas rescaled to zero terminal SNR, sampled with trailing
    DDIM steps: at SD's own terminal SNR the flat background of a micro scene leaked through the noise and the UNet
    took it from the seed instead of the prompt (tuner/micro/README.md has the measurements).
    """
    tokenizer = build_tokenizer(list(dict.fromkeys([*WORDS, *EXTRA_WORDS])), max_length=MAX_TOKENS)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )  # fmt: skip
    return StableDiffusionPipeline(
        vae=micro_vae(seed),
        text_encoder=micro_text_encoder(len(tokenizer), seed + 1),
        tokenizer=tokenizer,
        unet=micro_unet(seed + 2),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def param_counts(pipe: StableDiffusionPipeline) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("vae", "unet", "text_encoder")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuner.micro.init", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="diffusers folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pipe = build_micro_pipeline(args.seed)
    pipe.save_pretrained(args.out_dir, safe_serialization=True)
    counts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in param_counts(pipe).items())
    print(f"wrote the untrained micro pipeline to {args.out_dir} ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
