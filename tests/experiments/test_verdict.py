"""experiments.verdict: the t quantiles, the paired interval, the verdict rule, divergence."""

from __future__ import annotations

import math

import pytest

from experiments.verdict import (
    TABLE_DF,
    UNIFORM_BYTE_LOSS,
    DivergenceRule,
    VerdictRule,
    paired_interval,
    t_quantile,
    verdict_of,
)


def _t_cdf(t: float, df: int, intervals: int = 4000) -> float:
    """P(T <= t) for t >= 0 by Simpson's rule on the density: an independent reference."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    h = t / intervals
    total = density(0.0) + density(t)
    total += sum((4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
    return 0.5 + total * h / 3


@pytest.mark.parametrize("probability", [0.95, 0.975])
def test_the_t_table_inverts_the_t_distribution(probability):
    for df in range(1, TABLE_DF + 1):
        assert _t_cdf(t_quantile(probability, df), df) == pytest.approx(probability, abs=2e-6)


@pytest.mark.parametrize(
    ("probability", "df", "expected"),
    [  # printed t tables
        (0.975, 1, 12.706),
        (0.975, 4, 2.776),
        (0.975, 9, 2.262),
        (0.975, 30, 2.042),
        (0.95, 4, 2.132),
        (0.95, 30, 1.697),
        # above the table: the expansion
        (0.975, 40, 2.021),
        (0.975, 60, 2.000),
        (0.975, 120, 1.980),
        (0.95, 120, 1.658),
    ],
)
def test_t_quantiles_match_printed_tables(probability, df, expected):
    assert t_quantile(probability, df) == pytest.approx(expected, abs=5e-4)


def test_the_expansion_joins_the_table():
    for probability in (0.95, 0.975):
        assert _t_cdf(t_quantile(probability, 31), 31) == pytest.approx(probability, abs=2e-6)
        assert t_quantile(probability, 31) < t_quantile(probability, 30)


@pytest.mark.parametrize(
    ("probability", "df", "match"),
    [(0.975, 0, "df=0"), (0.99, 5, "the table holds"), (0.4, 40, "probability=0.4")],
)
def test_t_quantile_errors(probability, df, match):
    with pytest.raises(ValueError, match=match):
        t_quantile(probability, df)


def test_paired_interval():
    interval = paired_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert interval.n == 5 and interval.mean == 3.0
    assert (interval.low, interval.high) == pytest.approx((3 - half, 3 + half))
    narrow = paired_interval([1.0, 2.0, 3.0, 4.0, 5.0], confidence=0.9)
    assert narrow.high - narrow.low == pytest.approx(2 * 2.131847 * math.sqrt(0.5))
    with pytest.raises(ValueError, match="at least 2"):
        paired_interval([0.1])
    with pytest.raises(ValueError, match="finite"):
        paired_interval([0.1, math.nan])


@pytest.mark.parametrize(
    ("mean", "low", "high", "expected"),
    [
        (-0.02, -0.03, -0.01, "better"),
        (-0.01, -0.015, -0.005, "better"),  # the mean exactly at -margin
        (-0.02, -0.04, 0.0, "inconclusive"),  # the upper end at 0 is not below 0
        (-0.0099, -0.015, -0.005, "inconclusive"),  # below 0 but too small, not inside
        (-0.005, -0.008, -0.002, "equivalent"),  # below 0, too small: inside the margin
        (0.0, -0.01, 0.01, "equivalent"),  # both ends exactly at the margin
        (0.0, -0.0100001, 0.005, "inconclusive"),
        (0.005, 0.002, 0.008, "equivalent"),  # above 0 but inside the margin
        (0.01, 0.005, 0.0100001, "worse"),  # above 0, just outside the margin
        (0.02, 0.0, 0.04, "inconclusive"),  # the lower end at 0 is not above 0
        (0.0, -0.02, 0.02, "inconclusive"),
    ],
)
def test_the_verdict_rule_at_its_edges(mean, low, high, expected):
    assert VerdictRule(margin=0.01).decide(mean, low, high) == expected


@pytest.mark.parametrize(
    ("deltas", "expected"),
    [
        ([-0.03, -0.025, -0.02, -0.035, -0.03], "better"),
        ([0.001, -0.002, 0.0015, -0.001, 0.0005], "equivalent"),
        ([0.02, 0.03, 0.025, 0.02, 0.03], "worse"),
        ([-0.05, 0.04, 0.0, 0.03, -0.02], "inconclusive"),
        ([-0.012, -0.01, -0.011, -0.009, -0.0105], "better"),  # mean -0.0105, tight
        ([-0.009, -0.008, -0.0085, -0.0095, -0.009], "equivalent"),  # below 0, mean > -0.01
    ],
)
def test_verdict_of_constructed_deltas(deltas, expected):
    verdict, interval = verdict_of(deltas, 5, VerdictRule())
    assert verdict == expected
    assert interval is not None and interval.n == 5


def test_a_point_is_pending_until_every_seed_is_in():
    verdict, interval = verdict_of([-0.1, -0.1, -0.1, -0.1], 5, VerdictRule())
    assert verdict == "pending (4/5 seeds)" and interval is None
    assert verdict_of([-0.1], 1, VerdictRule()) == ("inconclusive", None)


def test_rule_errors_name_the_field():
    with pytest.raises(ValueError, match="verdict.margin=0 is invalid"):
        VerdictRule(margin=0)
    with pytest.raises(ValueError, match="verdict.confidence=0.99 is invalid"):
        VerdictRule(confidence=0.99)
    with pytest.raises(ValueError, match="divergence.factor=1 is invalid"):
        DivergenceRule(factor=1)
    with pytest.raises(ValueError, match="divergence.after_step=-1 is invalid"):
        DivergenceRule(after_step=-1)


def _curve(*losses, start=50, every=50):
    return [{"step": start + i * every, "loss": loss} for i, loss in enumerate(losses)]


def test_the_divergence_rule():
    rule = DivergenceRule(factor=2.0, after_step=50)
    assert rule.reason(_curve(5.0, 2.0, 1.5, 1.4, 1.3), 1.3) is None
    # a spike at step 50 (the warmup, not checked) is no divergence
    assert rule.reason(_curve(9.0, 2.0, 1.5), 1.5) is None
    # exactly 2x the running minimum does not exceed it
    assert rule.reason(_curve(5.0, 1.5, 3.0, 1.4), 1.4) is None
    reason = rule.reason(_curve(5.0, 1.5, 3.01, 1.4), 1.4)
    assert reason is not None and "step 150" in reason and "running minimum 1.5000" in reason
    assert "non-finite training loss at step 150" in rule.reason(_curve(5.0, 2.0, math.nan), 1.0)
    assert "non-finite final validation loss" in rule.reason(_curve(5.0, 2.0), math.inf)
    assert "non-finite final validation loss" in rule.reason(_curve(5.0, 2.0), None)


def test_a_diverged_run_counts_with_the_penalty():
    rule = DivergenceRule()
    assert rule.penalty_loss == UNIFORM_BYTE_LOSS == pytest.approx(5.545177, abs=1e-6)
    assert rule.counted_loss(1.3, False) == 1.3
    assert rule.counted_loss(1.3, True) == UNIFORM_BYTE_LOSS
    assert rule.counted_loss(None, True) == UNIFORM_BYTE_LOSS
    assert rule.counted_loss(math.nan, True) == UNIFORM_BYTE_LOSS
    assert rule.counted_loss(7.0, True) == 7.0
