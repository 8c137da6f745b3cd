"""PPO maths for RLHF (Ziegler et al., 2019; Schulman et al., 2017), as small pure tensor functions.

One PPO step, in TRL's spirit; the loop around these functions only moves tensors:

1. Rollout: the policy samples a response per prompt; we keep its per-token log-probs ``old_logprobs``,
   the frozen reference's ``ref_logprobs``, the value head's ``values`` and the reward model's
   sequence ``scores`` (optionally ``eos_penalty_scores``, then normalised with ``RunningMoments``
   and ``clip_scores``).
2. Per-token rewards: ``kl_penalty`` per token, then ``per_token_rewards``
   r_t = -beta * KL_t, plus the score on the last real token. beta comes from a KL controller.
3. GAE (``gae_advantages``): delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1},
   returns R_t = A_t + V_t; the advantages are then whitened with ``masked_whiten``.
4. Optimisation epochs on the rollout: ``policy_loss`` (clipped surrogate), ``value_loss``
   (clipped value error), ``entropy_from_logits`` for monitoring; afterwards the adaptive
   controller moves beta towards ``target_kl``.

Conventions: tensors are batch-first ``[batch, response_len]``; ``mask`` is 1 (or True) on real
response tokens, up to and including EOS, and 0 on the padding after it. Everything runs on CPU;
the loss functions are differentiable, the rollout-side ones return constants.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor


def _as_float(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(dtype=like.dtype)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(values * mask) / sum(mask), over ``dim`` or over everything when ``dim`` is None."""
    mask = _as_float(mask, values)
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim=dim) / mask.sum(dim=dim)


def masked_var(values: Tensor, mask: Tensor, *, unbiased: bool = True) -> Tensor:
    """Variance over the masked entries: sum(m (x - mean)^2) / (n - 1) if unbiased, else / n."""
    mask = _as_float(mask, values)
    n = mask.sum()
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} real entries, got {int(n.item())}")
    centred = values - masked_mean(values, mask)
    var = masked_mean(centred**2, mask)
    return var * n / (n - 1) if unbiased else var


def masked_whiten(values: Tensor, mask: Tensor, *, shift_mean: bool = True,
                  sum_over_ranks: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) with mean and unbiased var over masked entries only.

    With ``shift_mean=False`` the mean is added back (only the scale changes). Padded entries
    come back as 0, so they can never leak into a later unmasked sum. With ``sum_over_ranks``
    (a sum over processes) mean and variance are those of every rank's entries together, so
    the whitened values, and the objective, do not depend on the number of processes.
    """
    mask = _as_float(mask, values)
    if sum_over_ranks is None:
        mean, var = masked_mean(values, mask), masked_var(values, mask)
    else:
        n = sum_over_ranks(mask.sum())
        mean = sum_over_ranks((values * mask).sum()) / n
        var = sum_over_ranks((((values - mean) ** 2) * mask).sum()) / (n - 1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def _k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


def _k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2


def _k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    log_ratio = ref_logprobs - logprobs
    # expm1 keeps (r - 1) exact when r is close to 1, where the estimator lives most of the time.
    return torch.expm1(log_ratio) - log_ratio


_KL_ESTIMATORS = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, *, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman, "Approximating KL").

    With log r = log pi_ref(y) - log pi(y):
      k1 = -log r = logp - ref_logp          (unbiased, can be negative per token)
      k2 = 0.5 (log r)^2                     (biased, low variance, >= 0)
      k3 = (r - 1) - log r                   (unbiased, >= 0 since e^x >= 1 + x)
    """
    if estimator not in _KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid names: {sorted(_KL_ESTIMATORS)}")
    return _KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last real token of each row, ``[batch]`` (long); raises on an empty row."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values
    if (last < 0).any():
        raise ValueError(f"rows {torch.nonzero(last < 0).flatten().tolist()} have no real token in mask")
    return last


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, *, kl_coef: float) -> Tensor:
    """r_t = -kl_coef * kl_t on every real token, plus scores[b] on the last real token of row b.

    The reward model judges the whole sequence, so its score is a terminal reward; the KL term
    is a dense per-token cost that keeps the policy near the reference. Padding gets 0.
    """
    mask = _as_float(mask, kl)
    last = last_token_index(mask)
    terminal = torch.nn.functional.one_hot(last, num_classes=kl.shape[1]).to(kl.dtype)
    return (-kl_coef * kl + terminal * scores.to(kl.dtype)[:, None]) * mask


@torch.no_grad()
def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016), backwards over the response.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t

    V and A past the last real token are 0: the episode ends at EOS, so nothing is bootstrapped
    beyond it. Both outputs are 0 on padding. Computed without grad: advantages and returns are
    targets, and a gradient flowing through them would silently change the PPO objective.
    """
    mask = _as_float(mask, values)
    rewards, values = rewards * mask, values * mask
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t]
        advantages.append(next_advantage)
    advantages = torch.stack(advantages[::-1], dim=1)
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate: masked mean of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)).

    ratio = exp(logp - old_logp). The max (of negated objectives) takes the pessimistic side, so
    a step cannot gain by pushing the ratio past 1 +- eps in the advantage's direction.
    Stats (detached scalars): ``clipfrac`` share of real tokens where the clipped term wins,
    ``approx_kl`` = masked mean of 0.5 (logp - old_logp)^2 (the k2 estimator, as TRL logs),
    ``ratio_mean`` and ``ratio_max`` over real tokens.
    """
    mask = _as_float(mask, logprobs)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
            # ratio > 0 everywhere, so filling padding with 0 cannot win the max.
            "ratio_max": (ratio * mask).max(),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_range_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: 0.5 * masked mean of max((V - R)^2, (V_clip - R)^2).

    V_clip = old_V + clip(V - old_V, -c, c) keeps the value head from jumping far from the values
    the advantages were computed with. ``vf_clipfrac``: share of real tokens where the clipped
    error is the larger one.
    """
    mask = _as_float(mask, values)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)}
    return loss, stats


def entropy_from_logits(logits: Tensor, mask: Tensor, *, rows_per_chunk: int = 4) -> Tensor:
    """Mean over real tokens of H_t = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v, with
    logits ``[batch, len, vocab]`` in any dtype. Computed in float32 ``rows_per_chunk`` rows at a
    time, so a bf16 batch never has a whole float32 [batch, len, vocab] copy beside it."""
    with torch.no_grad():
        parts = []
        for chunk in logits.split(rows_per_chunk):
            z = chunk.float()
            parts.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1))
        return masked_mean(torch.cat(parts), mask)


class FixedKLController:
    """A constant KL coefficient beta; ``update`` is a no-op so it swaps in for the adaptive one."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Proportional controller on beta (Ziegler et al., 2019, section 2.2).

        e    = clip(current_kl / target_kl - 1, -0.2, 0.2)
        beta = beta * (1 + e * n_steps / horizon)

    KL above target raises beta (a stronger pull to the reference), below target lowers it; the
    clip bounds the change per update so one noisy batch cannot swing beta.
    """

    def __init__(self, init_kl_coef: float, *, target_kl: float, horizon: int):
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(f"target_kl and horizon must be > 0, got target_kl={target_kl}, horizon={horizon}")
        self.value, self.target_kl, self.horizon = float(init_kl_coef), float(target_kl), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def eos_penalty_scores(scores: Tensor, ended: Tensor, *, penalty: float) -> Tensor:
    """scores - penalty on rows whose response never emitted EOS (``ended`` False), unchanged otherwise.

    TRL's convention (``missing_eos_penalty``, a positive number that is subtracted). A truncated
    answer would otherwise be scored as if it were complete; the penalty teaches the policy to
    finish within the token budget.
    """
    return torch.where(ended.bool(), scores, scores - penalty)


def clip_scores(scores: Tensor, *, clip: float) -> Tensor:
    """Clamp scores to [-clip, clip], so one outlier reward cannot dominate a batch's advantages."""
    return torch.clamp(scores, -clip, clip)


class RunningMoments:
    """Running mean and standard deviation of reward scores across batches (Chan et al. parallel update).

    Merging a batch of n values with mean m_b and population variance v_b into (count, mean, var):

        delta = m_b - mean,  total = count + n
        mean  = mean + delta * n / total
        var   = (var * count + v_b * n + delta^2 * count * n / total) / total

    ``std`` is the unbiased sqrt(var * total / (total - 1)), matching ``torch.std`` on all values
    seen so far. Typical use: ``clip_scores((s - rm.mean) / rm.std, clip=...)`` after ``update(s)``.
    State is kept as float64 Python numbers so long runs do not drift.
    """

    def __init__(self) -> None:
        self.count, self.mean, self.var = 0, 0.0, 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var * self.count / (self.count - 1)) if self.count > 1 else 0.0

    def update(self, xs: Tensor) -> tuple[float, float]:
        """Merge ``xs`` (any shape) into the moments; returns the batch's own mean and unbiased std."""
        xs = xs.detach().double().flatten()
        n = xs.numel()
        if n == 0:
            raise ValueError("RunningMoments.update got an empty tensor")
        batch_mean, batch_var = xs.mean().item(), xs.var(unbiased=False).item()
        delta, total = batch_mean - self.mean, self.count + n
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total
        return batch_mean, math.sqrt(batch_var * n / (n - 1)) if n > 1 else 0.0
