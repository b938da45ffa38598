"""Original (LDM / SGM) module paths of a diffusers UNet: the names kohya writes for SDXL and A1111 resolves.

The index of a block in the original `input_blocks` / `output_blocks` lists follows from the UNet's layout
(block count, resnets per block, which blocks have attention, which resample), read from the model's own
module paths, so the same rules serve the full SDXL UNet and the tiny test UNets:

- `conv_in` -> `input_blocks.0.0`, `time_embedding.linear_{1,2}` -> `time_embed.{0,2}`,
  `add_embedding.linear_{1,2}` -> `label_emb.0.{0,2}`, `conv_norm_out` / `conv_out` -> `out.0` / `out.2`;
- `down_blocks.i.resnets.j` -> `input_blocks.n.0`, `down_blocks.i.attentions.j` -> `input_blocks.n.1`, with
  n = 1 + (resnets + downsampler of every earlier down block) + j; `down_blocks.i.downsamplers.0.conv` ->
  `input_blocks.m.0.op`, m = the index after block i's last resnet;
- `mid_block.resnets.j` -> `middle_block.2j`, `mid_block.attentions.j` -> `middle_block.2j+1`;
- `up_blocks.i.resnets.j` / `.attentions.j` -> `output_blocks.n.0` / `.1`, n = (resnets of every earlier up
  block) + j; `up_blocks.i.upsamplers.0.conv` -> `output_blocks.m.2.conv` on block i's last index m, or
  `.1.conv` where the block has no attention;
- inside a resnet: `norm1` / `conv1` -> `in_layers.0` / `in_layers.2`, `time_emb_proj` -> `emb_layers.1`,
  `norm2` / `conv2` -> `out_layers.0` / `out_layers.3`, `conv_shortcut` -> `skip_connection`; inside an
  attention (the transformer) the names are the same in both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from tuner.errors import TunerError

FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_BLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.+))?$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?$")


@dataclass(frozen=True)
class Block:
    """One down or up block: its resnet count, whether it has attentions, whether it down-/upsamples."""

    layers: int
    attention: bool
    resample: bool


@dataclass(frozen=True)
class UNetLayout:
    down: tuple[Block, ...]
    up: tuple[Block, ...]
    mid_attention: bool

    @classmethod
    def from_paths(cls, paths: Iterable[str]) -> UNetLayout:
        """The layout of a diffusers UNet from its module paths (`named_modules()` names, any subset that
        includes one Linear/Conv2d of every resnet, attention and resampler, e.g. `module_paths(unet)`)."""
        seen: dict[tuple[str, int], dict[str, set[int]]] = {}
        mid_attention = False
        for path in paths:
            if match := _BLOCK.match(path):
                side, i, kind, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
                seen.setdefault((side, i), {}).setdefault(kind, set()).add(j)
            elif (match := _MID.match(path)) and match.group(1) == "attentions":
                mid_attention = True
        blocks: dict[str, tuple[Block, ...]] = {}
        for side, resampler in (("down", "downsamplers"), ("up", "upsamplers")):
            count = 1 + max((i for s, i in seen if s == side), default=-1)
            found = []
            for i in range(count):
                kinds = seen.get((side, i))
                if not kinds or "resnets" not in kinds or kinds["resnets"] != set(range(len(kinds["resnets"]))):
                    raise TunerError(f"UNet layout: {side}_blocks.{i} has no contiguous resnets; not an SD-style UNet")
                found.append(Block(len(kinds["resnets"]), "attentions" in kinds, resampler in kinds))
            blocks[side] = tuple(found)
        return cls(blocks["down"], blocks["up"], mid_attention)

    @classmethod
    def of(cls, unet: nn.Module) -> UNetLayout:
        """The layout of a live (or meta-device) diffusers UNet."""
        return cls.from_paths(name for name, _ in unet.named_modules())

    def input_start(self, i: int) -> int:
        """Index in `input_blocks` of down block i's first resnet (0 is `conv_in`)."""
        return 1 + sum(b.layers + b.resample for b in self.down[:i])

    def output_start(self, i: int) -> int:
        """Index in `output_blocks` of up block i's first resnet."""
        return sum(b.layers for b in self.up[:i])


def sgm_path(path: str, layout: UNetLayout) -> str | None:
    """The original (SGM/LDM) path of a diffusers UNet module path, or None where it has none."""
    for prefix, target in FIXED.items():
        if path == prefix or path.startswith(prefix + "."):
            return target + path[len(prefix) :]
    if match := _BLOCK.match(path):
        side, kind, rest = match.group(1), match.group(3), match.group(5)
        i, j = int(match.group(2)), int(match.group(4))
        blocks = layout.down if side == "down" else layout.up
        if i >= len(blocks):
            return None
        block = blocks[i]
        start = layout.input_start(i) if side == "down" else layout.output_start(i)
        where = "input_blocks" if side == "down" else "output_blocks"
        if kind in ("resnets", "attentions"):
            if j >= block.layers or (kind == "attentions" and not block.attention):
                return None
            inner = _resnet_inner(rest) if kind == "resnets" else rest
            if inner is None:
                return None
            return f"{where}.{start + j}.{0 if kind == 'resnets' else 1}" + (f".{inner}" if inner else "")
        if j != 0 or not block.resample or rest != "conv":
            return None
        if side == "down":
            return f"input_blocks.{start + block.layers}.0.op"
        return f"output_blocks.{start + block.layers - 1}.{2 if block.attention else 1}.conv"
    if match := _MID.match(path):
        kind, j, rest = match.group(1), int(match.group(2)), match.group(3)
        step = 2 if layout.mid_attention else 1
        index = step * j + (1 if kind == "attentions" else 0)
        inner = _resnet_inner(rest) if kind == "resnets" else rest
        if inner is None:
            return None
        return f"middle_block.{index}" + (f".{inner}" if inner else "")
    return None


def _resnet_inner(rest: str | None) -> str | None:
    """`conv1` -> `in_layers.2` and so on; "" for the resnet itself; None for a name a resnet has no twin of."""
    if not rest:
        return ""
    head, _, tail = rest.partition(".")
    if head not in RESNET:
        return None
    return RESNET[head] + (f".{tail}" if tail else "")


def sgm_table(paths: Iterable[str], layout: UNetLayout) -> dict[str, str]:
    """Original path -> diffusers path for every given path that has an original name."""
    table = {}
    for path in paths:
        original = sgm_path(path, layout)
        if original is not None:
            table[original] = path
    return table
