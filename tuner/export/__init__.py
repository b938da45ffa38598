"""Artifact export: adapter and embedding files in every ecosystem format, their metadata and round-trip checks.

LoRA entry points: `tuner.export.lora.export_lora` (write every format of a trained adapter, checked),
`tuner.export.convert.export` (the `tuner export` command), and `load_peft_adapter` (load a LoHa/LoKr
peft-layout file into a stock pipeline; it is what those files' `load` lines call).
"""

from tuner.export.lora_diffusers import load_peft_adapter

__all__ = ["load_peft_adapter"]
