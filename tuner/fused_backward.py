"""The optimizer step inside the backward pass: each parameter is stepped, and its gradient freed, the moment
backward has finished accumulating it (`register_post_accumulate_grad_hook`), as kohya's fused backward pass does.

A full fine-tune then never holds every gradient at once (SD1.5's UNet: 3.4 GB of fp32 gradients, SDXL's:
10 GB), only the ones backward is producing. The price is what needs all gradients together, which
`tuner.optim.check_fused_backward` refuses: accumulation, clipping by the global norm, DDP averaging, fp16
grad scaling, Prodigy's shared step size. One inner optimizer per parameter (the same class and settings
the run asked for) gives the same update as one optimizer over all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class FusedBackwardOptimizer(torch.optim.Optimizer):
    """Looks like one optimizer to the loop, the schedule, accelerate and checkpoints; steps in backward.

    `param_groups` are the inner optimizers' own group dicts, so a learning-rate schedule reaches them; `step()`
    and `zero_grad()` have nothing left to do when backward has run."""

    def __init__(self, groups: list[dict[str, Any]], make: Callable[[dict[str, Any]], torch.optim.Optimizer]):
        params = [p for group in groups for p in group["params"]]
        super().__init__([{"params": params}], {})
        self.inner: list[torch.optim.Optimizer] = []
        self._hooks = []
        for group in groups:
            for p in group["params"]:
                optimizer = make({**group, "params": [p]})
                optimizer._fused_inner = True  # its steps happen inside backward (step timers skip them)
                self.inner.append(optimizer)
                self._hooks.append(p.register_post_accumulate_grad_hook(self._stepper(optimizer)))
        self.param_groups = [g for optimizer in self.inner for g in optimizer.param_groups]
        self._alias_state()

    @staticmethod
    def _stepper(optimizer: torch.optim.Optimizer):
        def step_and_free(param: torch.Tensor) -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step_and_free

    def _alias_state(self) -> None:
        """`state[p]` is the inner optimizer's own state dict of `p` (what `optimizer_state_bytes` reads)."""
        self.state = {p: optimizer.state[p] for optimizer in self.inner for p in optimizer.param_groups[0]["params"]}

    @torch.no_grad()
    def step(self, closure=None):
        """Every parameter was stepped in backward; a closure (a second forward/backward) steps them again."""
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.inner:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"fused_backward": [optimizer.state_dict() for optimizer in self.inner]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("fused_backward")
        if not isinstance(states, list) or len(states) != len(self.inner):
            raise ValueError(
                "optimizer state: not from a fused-backward run over these parameters "
                f"(expected {len(self.inner)} per-parameter states); resume with the optimizer settings it was "
                "saved with"
            )
        for optimizer, state in zip(self.inner, states):
            optimizer.load_state_dict(state)
        self.param_groups = [g for optimizer in self.inner for g in optimizer.param_groups]
        self._alias_state()

    def remove_hooks(self) -> None:
        """Detach from the parameters (a test comparing against an ordinary step, a second optimizer)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
