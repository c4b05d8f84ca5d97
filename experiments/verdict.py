"""The pre-registered decision of a frontier spec: paired t-intervals, the verdict, divergence.

A spec with a ``verdict`` section (``configs/frontier_decide.yaml``) states its rule before any
run; ``experiments.frontier`` applies it to every family against the baseline at each point:

- ``paired_interval``: the mean of the per-seed differences Δ_s (family minus baseline, paired
  by seed) and its two-sided Student-t interval, ``mean ± t_{(1+c)/2, n-1} · sd / sqrt(n)``;
- ``VerdictRule.decide``: better / equivalent / worse / inconclusive from that interval;
- ``DivergenceRule.reason``: whether a run diverged (it then counts against its family with a
  penalty loss, never dropped).

The t quantiles come from a table (df 1 to 30, the upper 0.95 and 0.975 points, as printed in
statistics tables) so no scipy is needed; above 30 degrees of freedom a Cornish-Fisher
expansion around the normal quantile is within 1e-5 of the exact value.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

# Upper quantiles t_{p, df} of Student's t for df = 1 .. 30 (index df - 1).
_T_TABLE = {
    0.975: (
        12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
        2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905,
        2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
        2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
    ),
    0.95: (
        6.313752, 2.919986, 2.353363, 2.131847, 2.015048, 1.943180, 1.894579, 1.859548,
        1.833113, 1.812461, 1.795885, 1.782288, 1.770933, 1.761310, 1.753050, 1.745884,
        1.739607, 1.734064, 1.729133, 1.724718, 1.720743, 1.717144, 1.713872, 1.710882,
        1.708141, 1.705618, 1.703288, 1.701131, 1.699127, 1.697261,
    ),
}  # fmt: skip
TABLE_DF = len(_T_TABLE[0.975])
#: Two-sided confidence levels a rule may use (the table's upper quantiles are (1 + c) / 2).
CONFIDENCES = (0.9, 0.95)
VERDICTS = ("better", "equivalent", "worse", "inconclusive")
#: The loss of predicting every byte uniformly, ln 256 nats: what a diverged run is charged.
UNIFORM_BYTE_LOSS = math.log(256)


def t_quantile(probability: float, df: int) -> float:
    """The upper quantile ``t_{probability, df}`` of Student's t distribution.

    Args:
        probability: 0.95 or 0.975 for ``df`` <= 30 (the table); any value in (0.5, 1) above.
        df: Degrees of freedom, an int >= 1.

    Returns:
        The ``t`` with ``P(T <= t) = probability``.

    Raises:
        ValueError: For ``df`` < 1, or a probability the table does not hold at ``df`` <= 30.
    """
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df={df!r} is invalid: an int >= 1")
    if not 0.5 < probability < 1:
        raise ValueError(f"probability={probability!r} is invalid: a float in (0.5, 1)")
    if df <= TABLE_DF:
        for tabled, values in _T_TABLE.items():
            if math.isclose(probability, tabled, abs_tol=1e-12):
                return values[df - 1]
        raise ValueError(
            f"probability={probability!r} is invalid at df={df}: the table holds "
            f"{sorted(_T_TABLE)} for df <= {TABLE_DF}"
        )
    # Cornish-Fisher expansion of t in powers of 1 / df (Abramowitz & Stegun 26.7.5).
    z = statistics.NormalDist().inv_cdf(probability)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


@dataclass(frozen=True)
class PairedInterval:
    """The mean of paired differences and its two-sided t-interval.

    Attributes:
        n: Number of pairs.
        mean: Mean difference.
        std: Sample standard deviation of the differences.
        low: Lower end of the interval.
        high: Upper end of the interval.
        confidence: Its two-sided confidence level.
    """

    n: int
    mean: float
    std: float
    low: float
    high: float
    confidence: float


def paired_interval(deltas: list[float], confidence: float = 0.95) -> PairedInterval:
    """The two-sided Student-t interval of the mean of ``deltas``.

    Args:
        deltas: One difference per pair (at least 2, all finite).
        confidence: Two-sided level, one of ``CONFIDENCES``.

    Raises:
        ValueError: For fewer than 2 differences, a non-finite one, or another level.
    """
    if confidence not in CONFIDENCES:
        raise ValueError(f"confidence={confidence!r} is invalid: one of {CONFIDENCES}")
    if len(deltas) < 2:
        raise ValueError(f"a t-interval needs at least 2 paired differences, got {len(deltas)}")
    if not all(math.isfinite(d) for d in deltas):
        raise ValueError(f"deltas={deltas!r} are invalid: finite floats")
    n = len(deltas)
    mean = statistics.fmean(deltas)
    std = statistics.stdev(deltas)
    half = t_quantile((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
    return PairedInterval(n, mean, std, mean - half, mean + half, confidence)


def _need(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {allowed}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class VerdictRule:
    """The pre-registered rule: a family against the baseline at one point.

    Checked in this order, on the two-sided ``confidence`` t-interval [low, high] of the mean
    paired difference Δ (family minus baseline validation loss, negative = the family is
    better):

    1. ``better``: high < 0 and mean <= -margin;
    2. ``equivalent``: -margin <= low and high <= +margin;
    3. ``worse``: low > 0;
    4. ``inconclusive``: anything else.

    With ``confidence=0.95`` the equivalence test is the 95 % interval inside the margin,
    stricter than TOST at the 5 % level (the 90 % interval).

    Attributes:
        margin: The equivalence margin and the least improvement that counts, in nats.
        confidence: Two-sided level of the interval, one of ``CONFIDENCES``.
    """

    margin: float = 0.01
    confidence: float = 0.95

    def __post_init__(self) -> None:
        _need(
            _is_number(self.margin) and math.isfinite(self.margin) and self.margin > 0,
            "verdict.margin",
            self.margin,
            "a float > 0 (nats)",
        )
        _need(
            self.confidence in CONFIDENCES,
            "verdict.confidence",
            self.confidence,
            f"one of {CONFIDENCES}",
        )

    def decide(self, mean: float, low: float, high: float) -> str:
        """The verdict of an interval (see the class docstring)."""
        if high < 0 and mean <= -self.margin:
            return "better"
        if -self.margin <= low and high <= self.margin:
            return "equivalent"
        if low > 0:
            return "worse"
        return "inconclusive"

    def text(self, baseline: str, seeds: int) -> list[str]:
        """The rule in words, for the spec's report (markdown lines)."""
        level = f"{self.confidence * 100:g} %"
        quantile = f"t_{{{(1 + self.confidence) / 2:g}, n-1}}"
        m = f"{self.margin:g}"
        equivalence = (
            "a 95 % interval: stricter than TOST at the 5 % level, which is the 90 % interval"
            if self.confidence == 0.95
            else "the 90 % interval: TOST at the 5 % level"
        )
        return [
            f"For each family and point: Δ_s = its validation loss minus {baseline}'s at the "
            f"same E and active count on seed s, over all {seeds} seeds of the spec (paired "
            f"by seed: same initialisation and data order); mean Δ and its two-sided {level} "
            f"Student-t interval, mean ± {quantile} · sd / √n. Checked in this order:",
            "",
            f"1. **better**: the interval's upper end < 0 and mean Δ ≤ −{m} nats;",
            f"2. **equivalent**: the interval inside [−{m}, +{m}] nats ({equivalence});",
            "3. **worse**: the interval's lower end > 0;",
            "4. **inconclusive**: anything else.",
            "",
            f"A point is **pending** until every seed of the family and of {baseline} has "
            "finished or diverged.",
        ]


@dataclass(frozen=True)
class DivergenceRule:
    """When a run counts as diverged, and what it is charged.

    A run is diverged if it stopped on a non-finite loss or gradient, ended with a non-finite
    validation loss, or if its logged training loss (the mean over each logging interval) at a
    logged step after ``after_step`` exceeds ``factor`` times the lowest logged training loss
    after ``after_step`` before it. A diverged run is never dropped: its validation loss counts
    as ``max(its own, penalty_loss)`` in the paired differences, whichever family it is in.

    Attributes:
        factor: Spike factor over the running minimum (> 1).
        after_step: Logged steps up to this one are not checked (the warmup).
        penalty_loss: The loss a diverged run counts with, at least (nats).
    """

    factor: float = 2.0
    after_step: int = 50
    penalty_loss: float = UNIFORM_BYTE_LOSS

    def __post_init__(self) -> None:
        _need(
            _is_number(self.factor) and math.isfinite(self.factor) and self.factor > 1,
            "divergence.factor",
            self.factor,
            "a float > 1",
        )
        _need(
            isinstance(self.after_step, int)
            and not isinstance(self.after_step, bool)
            and self.after_step >= 0,
            "divergence.after_step",
            self.after_step,
            "an int >= 0",
        )
        _need(
            _is_number(self.penalty_loss) and math.isfinite(self.penalty_loss),
            "divergence.penalty_loss",
            self.penalty_loss,
            "a finite float (nats)",
        )

    def reason(self, train_curve: list[dict[str, float]], final_loss: float | None) -> str | None:
        """Why a finished run counts as diverged, or None if it does not.

        Args:
            train_curve: The run's ``{"step", "loss"}`` points in step order.
            final_loss: Its final validation loss (None or non-finite: diverged).
        """
        for point in train_curve:
            if not math.isfinite(point["loss"]):
                return f"non-finite training loss at step {point['step']}"
        if final_loss is None or not math.isfinite(final_loss):
            return f"non-finite final validation loss ({final_loss})"
        lowest = math.inf
        for point in train_curve:
            if point["step"] <= self.after_step:
                continue
            if point["loss"] > self.factor * lowest:
                return (
                    f"training loss {point['loss']:.4f} at step {point['step']} > "
                    f"{self.factor:g} x its running minimum {lowest:.4f}"
                )
            lowest = min(lowest, point["loss"])
        return None

    def counted_loss(self, loss: float | None, diverged: bool) -> float:
        """The validation loss a run counts with in the paired differences."""
        if not diverged:
            assert loss is not None  # a run that did not diverge has a finite loss
            return loss
        if loss is None or not math.isfinite(loss):
            return self.penalty_loss
        return max(loss, self.penalty_loss)

    def text(self) -> list[str]:
        """The rule in words, for the spec's report (markdown lines)."""
        uniform = math.isclose(self.penalty_loss, UNIFORM_BYTE_LOSS, abs_tol=1e-6)
        return [
            "**Divergence** (fixed before any run): a run is diverged if it stops on a "
            "non-finite loss or gradient, ends with a non-finite validation loss, or its "
            "logged training loss (the mean over each logging interval) at any logged step "
            f"after step {self.after_step} exceeds {self.factor:g} x the lowest logged training "
            f"loss after step {self.after_step} before it. A diverged run is never dropped: it "
            "is counted in the *diverged* column and its validation loss counts in Δ as "
            f"max(its own, {self.penalty_loss:.3f} nats"
            + (" = ln 256, predicting bytes uniformly" if uniform else "")
            + "), in every family, the baseline included. A tuning trial that diverges "
            "cannot be chosen.",
        ]


def verdict_of(
    deltas: list[float], expected: int, rule: VerdictRule
) -> tuple[str, PairedInterval | None]:
    """The verdict of one point's paired differences.

    Args:
        deltas: Counted differences of the seeds done so far (family minus baseline).
        expected: The spec's number of seeds.
        rule: The rule.

    Returns:
        ``(verdict, interval)``: ``pending (n/N seeds)`` and None while seeds are missing;
        ``inconclusive`` and None for a single seed of a one-seed spec.
    """
    if len(deltas) < expected:
        return f"pending ({len(deltas)}/{expected} seeds)", None
    if len(deltas) < 2:
        return "inconclusive", None
    interval = paired_interval(deltas, rule.confidence)
    return rule.decide(interval.mean, interval.low, interval.high), interval
