"""``cmf``: continual momentum filtering on parameter space (Lee & Chang, ICLR 2024).

ROID's loss and prior correction, with its weight ensembling replaced by a Kalman
filter over the adapted weights: a hidden model, the filter's estimate of good
weights, drifts back toward the source at every step (the prediction), then moves
toward the adapted weights by the Kalman gain (the update); the adapted weights are
then pulled toward the hidden model. The gain depends on the step count only, so
the filter is one scalar variance for all weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_method
from .roid import ROID
from .teacher import ema_update_, pull_toward_

#: The official code scales its process noise by the number of adapted weights over
#: this constant (the affine parameters of the network it was tuned on).
NOISE_SCALE_PARAMS = 38400


@register_method("cmf")
class CMF(ROID):
    """CMF. Defaults are the official code's (mariodoebler/test-time-adaptation,
    conf.py: alpha 0.99, gamma 0.99, Q 0.005; ROID's loss settings; Adam, lr 1e-3
    on CIFAR-10-C).

    Args:
        alpha: the transition toward the source, ``h <- alpha h + (1 - alpha)
            theta_src`` (the filter's prediction step).
        gamma: the ensembling of the adapted weights with the hidden model,
            ``theta <- gamma theta + (1 - gamma) h``.
        process_noise: ``Q``; the filter's process noise is ``Q * n / 38400`` for
            ``n`` adapted weights, its measurement noise one minus that.

    ROID's ``source_momentum`` is not an option: the filter replaces its weight
    ensembling. Unlike the official code, ``reset()`` also resets the filter's variance (it
    returns every part of the method to the source).

    Presets: as ROID's.
    """

    updated_copies = ("hidden",)

    @classmethod
    def unused_options(cls) -> dict[str, str]:
        return {**super().unused_options(), "source_momentum": "filters its weights instead of ROID's ensembling"}

    def __init__(
        self,
        model: nn.Module,
        *,
        alpha: float = 0.99,
        gamma: float = 0.99,
        process_noise: float = 0.005,
        **kwargs,
    ) -> None:
        super().__init__(model, **kwargs)
        self.alpha, self.gamma = alpha, gamma
        num_adapted = sum(p.numel() for _, p in self.adapted)
        self.q = process_noise * num_adapted / NOISE_SCALE_PARAMS
        # The filter's state: the hidden weights (the adapted parameters' only; the
        # others never differ from the source) and the variance P of its estimate.
        self.hidden = nn.ParameterList([nn.Parameter(p.detach().clone(), requires_grad=False)
                                        for _, p in self.adapted])
        self.register_buffer("variance", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def after_step(self) -> None:
        hidden, adapted = list(self.hidden), [p for _, p in self.adapted]
        # Predict: the hidden model drifts toward the source, and its variance grows.
        pull_toward_(hidden, self.source_params(), self.alpha)
        variance = self.alpha ** 2 * self.variance + self.q
        # Update by the Kalman gain 1 - beta (beta clamped as the official code does).
        r = 1.0 - self.q
        beta = (r / (variance + r)).clamp_min(0.89)
        beta = torch.where(beta >= 0.9999, torch.ones_like(beta), beta)
        self.variance = beta * variance
        ema_update_(hidden, adapted, beta.float())
        # Ensemble the adapted weights with the filtered estimate.
        pull_toward_(adapted, hidden, self.gamma)
