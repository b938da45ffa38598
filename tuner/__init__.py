"""tuner: fine-tuning and personalization for latent diffusion models."""

import logging

# bitsandbytes, which diffusers and peft import whenever it is installed, warns on CPUs with AVX-512 BF16 about an
# optional 4-bit kernel package the suite never uses: keep that line out of every command's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
