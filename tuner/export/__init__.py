"""Adapter export: LoRA files in diffusers/peft and kohya formats, their metadata, conversion, round-trip checks.

Public entry points: `export_lora` (write every format of a trained adapter, checked), `load_peft_adapter`
(load a LoHa/LoKr peft-layout file into a stock pipeline), `export` (the `tuner export` command).
"""

from tuner.export.lora_diffusers import load_peft_adapter

__all__ = ["load_peft_adapter"]
