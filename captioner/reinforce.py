"""The score-function (REINFORCE) estimator, shared by the two places that train a discrete choice:
self-critical training's words (objectives.SelfCritical through decoding.sample) and hard attention's
regions (models/hard_attention.py).

For a choice s drawn from p(s; theta) with reward r(s), E[(r(s) - b) * grad log p(s)] = grad E[r]
for any baseline b that does not depend on s: the surrogate below has that gradient, one sample at a time.
"""
from __future__ import annotations

import torch
from torch import Tensor


def draw(probs: Tensor) -> Tensor:
    """One index per row of probs (N, K), drawn from the categorical distribution the row gives."""
    return torch.multinomial(probs, 1).squeeze(1)


def surrogate(logprob: Tensor, advantage: Tensor) -> Tensor:
    """-(advantage x log-probability) per sample: minimising it climbs the expected reward. The advantage
    (reward less a baseline) is a constant here, so no gradient leaks through the reward."""
    return -advantage.detach() * logprob
