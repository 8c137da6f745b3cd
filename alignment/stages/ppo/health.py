"""Signs that PPO is hacking its reward model or leaving the reference behind.

Fed one step's statistics at a time; returns the warnings that step raises:

- the verifier's gold accuracy of the rollouts falls while the reward model's score rises
  (compared over a window against the first window): the policy found what the reward model
  likes but the task does not;
- KL far above the adaptive controller's target (3x);
- the importance ratio far from 1 (mean outside [0.5, 2]): updates too large for PPO's clip;
- entropy collapse: below 10% of its value at the first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import fmean
from typing import Any, Optional


@dataclass
class HealthCheck:
    kl_target: Optional[float] = None
    window: int = 5
    gold_drop: float = 0.05
    reward_rise: float = 0.1
    history: list[dict[str, Any]] = field(default_factory=list)

    def observe(self, stats: dict[str, Any]) -> list[str]:
        self.history.append(stats)
        warnings = []
        first, last = self.history[: self.window], self.history[-self.window :]
        if len(self.history) >= 2 * self.window and "rollout/gold_accuracy" in stats:
            gold_change = _mean(last, "rollout/gold_accuracy") - _mean(first, "rollout/gold_accuracy")
            reward_change = _mean(last, "reward/raw") - _mean(first, "reward/raw")
            if gold_change < -self.gold_drop and reward_change > self.reward_rise:
                warnings.append(f"reward hacking: reward model score +{reward_change:.3f} while gold accuracy {gold_change:+.3f}")
        if self.kl_target is not None and stats["kl"] > 3 * self.kl_target:
            warnings.append(f"KL {stats['kl']:.3f} is over 3x the target {self.kl_target}")
        ratio = stats.get("ratio_mean")
        if ratio is not None and not 0.5 <= ratio <= 2.0:
            warnings.append(f"importance ratio mean {ratio:.3f} is far from 1: lower ppo.learning_rate or ppo.ppo_epochs")
        if stats["entropy"] < 0.1 * self.history[0]["entropy"]:
            warnings.append(f"entropy collapsed to {stats['entropy']:.4f} (from {self.history[0]['entropy']:.4f})")
        return warnings


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return fmean(r[key] for r in rows if key in r)
