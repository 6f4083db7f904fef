"""Group-relative policy optimisation (GRPO) on a classifier's softmax, with
rewards from the agreement of the policy's own draws (TTRV's vote shares): the
rewards, GRPO's advantages and PPO's clipped surrogate, each a few tensor ops over
a batch of images and their draws.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["vote_entropy", "vote_rewards", "grpo_advantages", "clipped_policy_loss", "GRPO_EPS"]

#: GRPO's epsilon in ``(r - mean) / (std + eps)`` (verl's compute_grpo_outcome_advantage).
GRPO_EPS = 1e-6


def vote_entropy(counts: Tensor) -> Tensor:
    """Entropy of each row of vote ``counts`` (B, C), normalised by the log of the
    number of distinct votes as the reference code does (0 when they agree)."""
    share = counts / counts.sum(dim=1, keepdim=True)
    entropy = -torch.special.xlogy(share, share).sum(dim=1)
    distinct = (counts > 0).sum(dim=1)
    return torch.where(distinct > 1, entropy / distinct.clamp_min(2).float().log(), torch.zeros_like(entropy))


def vote_rewards(draws: Tensor, num_classes: int, entropy_weight: float = 0.75,
                 entropy_in_reward: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Rewards of class ``draws`` (B, N): each draw's share of its image's N votes,
    minus ``entropy_weight`` x the normalised vote entropy if ``entropy_in_reward``
    (the released code; a per-image constant). Returns rewards (B, N), the vote
    counts (B, C) and the normalised vote entropy (B,)."""
    ones = torch.ones(draws.shape, device=draws.device)
    counts = torch.zeros(draws.shape[0], num_classes, device=draws.device).scatter_add_(1, draws, ones)
    rewards = counts.gather(1, draws) / draws.shape[1]
    entropy = vote_entropy(counts)
    if entropy_in_reward:
        rewards = rewards - entropy_weight * entropy.unsqueeze(1)
    return rewards, counts, entropy


def grpo_advantages(rewards: Tensor, eps: float = GRPO_EPS) -> Tensor:
    """GRPO's group-relative advantages per row of ``rewards`` (B, M), M >= 2:
    ``(r - mean) / (std + eps)`` with the unbiased std, as verl computes them."""
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + eps)


def clipped_policy_loss(log_p: Tensor, old_log_p: Tensor, advantages: Tensor,
                        clip_ratio: float | None) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate ``mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))`` with
    ``r = p / p_old`` of each draw (plain ``-mean(A r)`` when ``clip_ratio`` is
    None); at ``log_p == old_log_p`` its gradient is REINFORCE's, ``-A grad log p``.
    Returns the loss and the fraction of draws whose ratio was clipped."""
    ratio = (log_p - old_log_p).exp()
    loss = -advantages * ratio
    if clip_ratio is None:
        return loss.mean(), torch.zeros((), device=loss.device)
    clipped = -advantages * ratio.clamp(1 - clip_ratio, 1 + clip_ratio)
    return torch.maximum(loss, clipped).mean(), (clipped > loss).float().mean()
