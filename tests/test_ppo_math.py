"""PPO maths on hand-worked numbers: GAE, per-token rewards, KL estimators, clipped losses, controllers."""

from __future__ import annotations

import math

import pytest
import torch

from alignment.stages.ppo.maths import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clip_scores,
    entropy_from_logits,
    eos_penalty_scores,
    gae_advantages,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)

torch.set_num_threads(1)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_one_row_by_hand():
    """r = [1, 0, 2], V = [1, 2, 4], gamma = lam = 0.5 (so gamma * lam = 0.25); V_3 = 0 (EOS).

    delta_2 = 2 + 0.5*0 - 4 = -2     A_2 = -2
    delta_1 = 0 + 0.5*4 - 2 =  0     A_1 =  0 + 0.25*(-2)   = -0.5
    delta_0 = 1 + 0.5*2 - 1 =  1     A_0 =  1 + 0.25*(-0.5) = 0.875
    R = A + V = [1.875, 1.5, 2.0]
    """
    adv, ret = gae_advantages(t([1.0, 0.0, 2.0]), t([1.0, 2.0, 4.0]), t([1, 1, 1]), gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, t([0.875, -0.5, -2.0]))
    torch.testing.assert_close(ret, t([1.875, 1.5, 2.0]))


def test_gae_padding_does_not_leak():
    """The same row padded with huge rewards and values gives the same numbers and 0 on padding.

    Row 1 has a single real token: A_0 = r_0 - V_0 = 3 - 1 = 2, R_0 = 3.
    """
    rewards = t([1.0, 0.0, 2.0, 100.0, 100.0], [3.0, 50.0, 50.0, 50.0, 50.0])
    values = t([1.0, 2.0, 4.0, 100.0, 100.0], [1.0, 70.0, 70.0, 70.0, 70.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, t([0.875, -0.5, -2.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(ret, t([1.875, 1.5, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0]))


def test_per_token_rewards_score_on_last_real_token():
    """kl_coef = 0.5: row 0 (2 real tokens, score 2) -> [-0.05, -0.1 + 2, 0];
    row 1 (3 real tokens, score -1) -> [-0.2, -0.25, -0.3 - 1]."""
    kl = t([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    mask = t([1, 1, 0], [1, 1, 1])
    rewards = per_token_rewards(torch.tensor([2.0, -1.0], dtype=torch.float64), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, t([-0.05, 1.9, 0.0], [-0.2, -0.25, -1.3]))


def test_per_token_rewards_rejects_empty_row():
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        per_token_rewards(torch.zeros(2), torch.zeros(2, 3), t([1, 0, 0], [0, 0, 0]), kl_coef=0.1)


def test_kl_estimators_by_hand():
    """logp = ln 0.5, ref = ln 0.25: k1 = ln 2, k2 = 0.5 ln^2 2, r = 0.5 so k3 = -0.5 + ln 2.
    logp = ln 0.25, ref = ln 0.5: k1 = -ln 2, k2 = 0.5 ln^2 2, r = 2 so k3 = 1 - ln 2."""
    logp, ref = t(math.log(0.5), math.log(0.25)), t(math.log(0.25), math.log(0.5))
    ln2 = math.log(2)
    torch.testing.assert_close(kl_penalty(logp, ref, estimator="k1"), t(ln2, -ln2))
    torch.testing.assert_close(kl_penalty(logp, ref, estimator="k2"), t(0.5 * ln2**2, 0.5 * ln2**2))
    torch.testing.assert_close(kl_penalty(logp, ref, estimator="k3"), t(ln2 - 0.5, 1 - ln2))


def test_k3_is_non_negative_and_zero_at_equality():
    gen = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(4, 16, generator=gen), torch.randn(4, 16, generator=gen)
    assert (kl_penalty(logp, ref, estimator="k3") >= 0).all()
    assert kl_penalty(logp, logp, estimator="k3").abs().max() == 0


def test_unknown_estimator_raises_with_valid_names():
    with pytest.raises(ValueError, match=r"'k4'.*\['k1', 'k2', 'k3'\]"):
        kl_penalty(torch.zeros(1), torch.zeros(1), estimator="k4")


def test_policy_loss_clipping_by_hand():
    """eps = 0.2; per token (ratio, A) -> max(-A r, -A clip(r)):
    (1.5, +1) -> max(-1.5, -1.2) = -1.2  clipped (no gain past 1 + eps)
    (1.0, +2) -> max(-2, -2)     = -2    not clipped (equal)
    (0.5, +1) -> max(-0.5, -0.8) = -0.5  not clipped (pessimistic side is the unclipped one)
    (0.5, -1) -> max(0.5, 0.8)   =  0.8  clipped
    (3.0, 10) padding, ignored.
    loss = (-1.2 - 2 - 0.5 + 0.8) / 4 = -0.725; clipfrac = 2/4; ratio_mean = 3.5/4; ratio_max = 1.5.
    d loss / d logp = -A r / 4 on unclipped tokens, 0 on clipped: [0, -0.5, -0.125, 0, 0].
    """
    old = torch.zeros(1, 5, dtype=torch.float64)
    logp = t([math.log(1.5), 0.0, math.log(0.5), math.log(0.5), math.log(3.0)]).requires_grad_()
    adv, mask = t([1.0, 2.0, 1.0, -1.0, 10.0]), t([1, 1, 1, 1, 0])
    loss, stats = policy_loss(logp, old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-0.725)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio_mean"].item() == pytest.approx(0.875)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    expected_kl = 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4
    assert stats["approx_kl"].item() == pytest.approx(expected_kl)
    loss.backward()
    torch.testing.assert_close(logp.grad, t([0.0, -0.5, -0.125, 0.0, 0.0]))


def test_value_loss_clipping_by_hand():
    """old V = 0, c = 0.2; per token (V, R) -> max((V-R)^2, (V_clip-R)^2):
    (0.5, 1) -> V_clip = 0.2:   max(0.25, 0.64) = 0.64  clipped
    (0.1, 0) -> V_clip = 0.1:   max(0.01, 0.01) = 0.01  not clipped
    (-0.5, 0) -> V_clip = -0.2: max(0.25, 0.04) = 0.25  not clipped
    loss = 0.5 * (0.64 + 0.01 + 0.25) / 3 = 0.15; vf_clipfrac = 1/3.
    """
    values, returns = t([0.5, 0.1, -0.5, 9.0]), t([1.0, 0.0, 0.0, -9.0])
    loss, stats = value_loss(values, torch.zeros_like(values), returns, t([1, 1, 1, 0]), clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.15)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)


def test_entropy_from_logits_masked():
    """Uniform over 4 tokens: H = ln 4; a one-hot-like token: H = 0; the padded token is ignored."""
    logits = torch.zeros(1, 3, 4)
    logits[0, 1] = torch.tensor([0.0, -1e4, -1e4, -1e4])
    logits[0, 2] = torch.tensor([5.0, 0.0, 0.0, 0.0])
    assert entropy_from_logits(logits, t([1, 1, 0])).item() == pytest.approx(math.log(4) / 2)


def test_adaptive_kl_controller_update():
    """target 6, horizon 10000, n_steps 256:
    current 12  -> e = clip(1, +-0.2) = 0.2    -> beta *= 1 + 0.2 * 256 / 10000 = 1.00512
    current 3   -> e = clip(-0.5)     = -0.2   -> beta *= 0.99488
    current 6.6 -> e = 0.1 (unclipped)         -> beta *= 1.00256
    """
    ctl = AdaptiveKLController(0.1, target_kl=6.0, horizon=10000)
    ctl.update(12.0, 256)
    assert ctl.value == pytest.approx(0.1 * 1.00512)
    ctl.update(3.0, 256)
    assert ctl.value == pytest.approx(0.1 * 1.00512 * 0.99488)
    ctl.update(6.6, 256)
    assert ctl.value == pytest.approx(0.1 * 1.00512 * 0.99488 * 1.00256)


def test_fixed_kl_controller_never_changes():
    ctl = FixedKLController(0.05)
    for kl in (0.0, 12.0, 1e6):
        ctl.update(kl, 256)
    assert ctl.value == 0.05


def test_masked_mean_and_unbiased_var_by_hand():
    """Real entries [1, 2, 3] (100 is padding): mean 2, squared deviations sum to 2,
    unbiased var = 2 / 2 = 1, biased var = 2 / 3."""
    values, mask = t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_var(values, mask).item() == pytest.approx(1.0)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(2 / 3)
    torch.testing.assert_close(masked_mean(t([1.0, 3.0], [4.0, 8.0]), t([1, 1], [1, 0]), dim=1), t(2.0, 4.0))


def test_masked_whiten_mean_zero_std_one_over_masked_entries():
    gen = torch.Generator().manual_seed(0)
    values = 3.0 + 5.0 * torch.randn(3, 6, generator=gen, dtype=torch.float64)
    mask = t([1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0])
    white = masked_whiten(values, mask)
    assert masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_var(white, mask).item() == pytest.approx(1.0, rel=1e-6)
    assert (white[mask == 0] == 0).all()
    kept_mean = masked_whiten(values, mask, shift_mean=False)
    assert masked_mean(kept_mean, mask).item() == pytest.approx(masked_mean(values, mask).item())


def test_running_moments_match_torch_over_concatenated_batches():
    gen = torch.Generator().manual_seed(0)
    batches = [2.0 + 3.0 * torch.randn(n, generator=gen, dtype=torch.float64) for n in (5, 1, 8, 3)]
    moments = RunningMoments()
    for batch in batches:
        moments.update(batch)
    everything = torch.cat(batches)
    assert moments.count == everything.numel()
    assert moments.mean == pytest.approx(everything.mean().item(), rel=1e-12)
    assert moments.std == pytest.approx(everything.std().item(), rel=1e-12)


def test_clip_scores():
    torch.testing.assert_close(clip_scores(t(-7.0, 0.5, 9.0), clip=3.0), t(-3.0, 0.5, 3.0))


def test_eos_penalty_is_subtracted_from_rows_that_never_ended_as_in_trl():
    """TRL's convention: missing_eos_penalty is a positive number taken off the score of a reply
    that never emitted EOS, so a ported TRL config penalises truncation (never rewards it)."""
    scores, ended = t(1.0, 2.0, 3.0), torch.tensor([True, False, True])
    torch.testing.assert_close(eos_penalty_scores(scores, ended, penalty=1.0), t(1.0, 1.0, 3.0))
    torch.testing.assert_close(eos_penalty_scores(scores, ended, penalty=0.5), t(1.0, 1.5, 3.0))


def test_entropy_in_chunks_equals_the_whole_float32_computation():
    logits = torch.randn(9, 5, 50, generator=torch.Generator().manual_seed(0))
    mask = (torch.rand(9, 5, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    logp = torch.log_softmax(logits, dim=-1)
    whole = ((-(logp.exp() * logp).sum(-1)) * mask).sum() / mask.sum()
    for rows in (1, 4, 9):
        assert entropy_from_logits(logits, mask, rows_per_chunk=rows).item() == pytest.approx(whole.item(), rel=1e-5)
    assert entropy_from_logits(logits.bfloat16(), mask).item() == pytest.approx(whole.item(), rel=2e-2)  # bf16 logits in
