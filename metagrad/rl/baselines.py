"""Linear feature baseline of Duan et al. 2016 ("Benchmarking deep RL for continuous control",
§A), as used by the MAML paper's code.

V(s_t) = w·φ(s_t, t),  φ = [clip(o, ±10), clip(o, ±10)², t/100, (t/100)², (t/100)³, 1],
w = argmin Σ_t (w·φ_t − R_t)² + c‖w‖², fitted per task by regularised least squares; when the
normal equations are singular or give non-finite weights, c is raised tenfold (as in rllab).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.errors import ConfigError


@dataclass(frozen=True)
class LinearFeatureBaseline:
    """Batched over tasks: ``obs`` is ``[*batch, episodes, T, obs_dim]``, ``masks``/``returns``
    ``[*batch, episodes, T]``; one weight vector per ``batch`` index (e.g. per task)."""

    reg_coeff: float = 1e-5
    max_tries: int = 5
    """Regularisation increases tried; a task still unsolved gets the zero baseline."""

    def __post_init__(self) -> None:
        if not self.reg_coeff > 0 or self.max_tries < 1:
            raise ConfigError(
                f"need reg_coeff > 0 and max_tries >= 1, got {self.reg_coeff}, {self.max_tries}"
            )

    @staticmethod
    def features(obs: Tensor, masks: Tensor) -> Tensor:
        """φ(s_t, t) on valid steps, 0 on padding: ``[*batch, episodes, T, 2·obs_dim + 4]``."""
        if obs.dim() < 3 or obs.shape[:-1] != masks.shape:
            raise ConfigError(
                f"obs {tuple(obs.shape)} must be [..., episodes, T, obs_dim] with masks "
                f"{tuple(masks.shape)} equal to its leading dimensions"
            )
        o = obs.clamp(-10.0, 10.0)
        t = torch.arange(obs.shape[-2], dtype=obs.dtype, device=obs.device) / 100.0
        t = t[:, None].expand(*obs.shape[:-1], 1)
        phi = torch.cat([o, o * o, t, t * t, t * t * t, torch.ones_like(t)], dim=-1)
        return phi * masks[..., None]

    def fit(self, obs: Tensor, returns: Tensor, masks: Tensor) -> Tensor:
        """Weights ``[*batch, 2·obs_dim + 4]`` (float64 solve of the normal equations)."""
        batch = obs.shape[:-3]
        phi = self.features(obs, masks).reshape(batch.numel(), -1, 2 * obs.shape[-1] + 4).double()
        target = (returns * masks).reshape(batch.numel(), -1).double()
        gram = phi.mT @ phi
        rhs = (phi.mT @ target[..., None])[..., 0]
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        reg = torch.full((len(gram),), self.reg_coeff, dtype=gram.dtype, device=gram.device)
        weights = torch.full_like(rhs, float("nan"))
        for _ in range(self.max_tries):
            todo = ~torch.isfinite(weights).all(-1)
            if not todo.any():
                break
            solution, info = torch.linalg.solve_ex(gram[todo] + reg[todo][:, None, None] * eye,
                                                   rhs[todo])
            solution[(info != 0) | ~torch.isfinite(solution).all(-1)] = float("nan")
            weights[todo] = solution
            reg[todo] *= 10.0
        return torch.nan_to_num(weights, nan=0.0).to(obs.dtype).reshape(*batch, -1)

    def predict(self, obs: Tensor, masks: Tensor, weights: Tensor) -> Tensor:
        """V(s_t) for every step, 0 on padding: ``[*batch, episodes, T]``."""
        phi = self.features(obs, masks)
        return (phi @ weights[..., None, :, None])[..., 0]

    def values(self, obs: Tensor, returns: Tensor, masks: Tensor) -> Tensor:
        """Fit on these episodes and predict on them (how MAML-RL uses the baseline)."""
        return self.predict(obs, masks, self.fit(obs, returns, masks))
