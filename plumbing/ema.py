"""
An exponential moving average of the trained weights (`--ema-decay`): the model eval.py evaluates.
Flow-GRPO keeps one for its evaluations (github yifan123/flow_grpo, flow_grpo/ema.py: decay 0.9 every 8
optimizer steps); the policy samples and trains with its own weights either way. Each optimizer step moves
every weight by about the learning rate, much of it along the batch's noise; the average keeps the steps'
common direction and cancels part of their noise. Of the project it imports nothing.
"""

from contextlib import contextmanager

import torch


class WeightAverage:
    """average <- decay * average + (1 - decay) * weights after each optimizer step, starting from the weights
    the run starts with. Unlike Flow-GRPO's there is no warm-up ramp of the decay: RL starts from a trained
    model, which the average should leave as slowly at the first step as at the last. Each rank averages its
    own part of a sharded (FSDP2) parameter, so the average is sharded as the weights are."""

    def __init__(self, params, decay: float):
        self.params, self.decay = list(params), decay
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        for average, p in zip(self.average, self.params, strict=True):
            average.lerp_(p.detach(), 1 - self.decay)

    @contextmanager
    def swapped_in(self):
        """Inside the block the policy holds the average (and the average the weights), so that it is saved
        and loaded by the policy's own code: diffusers files, a LoRA adapter, a sharded model alike."""
        self.swap()
        try:
            yield
        finally:
            self.swap()

    @torch.no_grad()
    def swap(self):
        for average, p in zip(self.average, self.params, strict=True):
            weights = p.detach().clone()
            p.detach().copy_(average)
            average.copy_(weights)
