"""tuner: fine-tuning and personalization for latent diffusion models."""

import logging

# Library notices about optional packages the suite never uses, kept out of every command's output:
# - bitsandbytes, which diffusers and peft import whenever it is installed, warns on CPUs with AVX-512 BF16 about an
#   optional 4-bit kernel package;
# - transformers warns that CLIP's and SigLIP's image processors, which diffusers' pipelines import, fall back to
#   PIL without torchvision (the suite loads every pipeline without an image processor).
for _name in ("bitsandbytes.backends.cpu.ops", "transformers.utils.import_utils"):
    logging.getLogger(_name).setLevel(logging.ERROR)
