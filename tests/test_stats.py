import numpy as np
import pytest

from fedmoe.eval import paired_bootstrap


def test_mean_and_counts_are_exact():
    r = paired_bootstrap([3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 4.0, 4.0])
    assert r["n"] == 4
    assert r["mean"] == pytest.approx((2 + 0 - 2 + 1) / 4)
    assert (r["better"], r["worse"], r["equal"]) == (2, 1, 1)
    assert r["low"] <= r["mean"] <= r["high"]


def test_a_constant_change_has_a_zero_width_interval():
    before = np.random.default_rng(1).normal(10, 5, size=50)
    r = paired_bootstrap(before + 0.75, before)
    assert r["low"] == pytest.approx(0.75) and r["high"] == pytest.approx(0.75)


def test_pairing_cancels_the_per_example_difficulty():
    # Scores vary a lot between examples (std 10) but every example moves up by ~0.5 (std 0.2).
    rng = np.random.default_rng(2)
    before = rng.normal(20, 10, size=200)
    after = before + 0.5 + rng.normal(0, 0.2, size=200)
    r = paired_bootstrap(after.tolist(), before.tolist())
    # paired: the interval is ~ ±1.96·0.2/√200 = ±0.028 around the mean; resampling the two lists
    # independently would give ±1.96·10·√2/√200 = ±1.96 and contain 0
    assert r["low"] > 0.4 and r["high"] < 0.6
    assert r["high"] - r["low"] < 0.1


def test_interval_matches_the_normal_approximation_for_many_examples():
    d = np.random.default_rng(3).normal(0.3, 2.0, size=2000)
    r = paired_bootstrap(d.tolist(), [0.0] * d.size, n_resamples=20_000)
    half = 1.959964 * d.std(ddof=0) / np.sqrt(d.size)
    assert r["mean"] == pytest.approx(d.mean())
    assert (r["high"] - r["low"]) / 2 == pytest.approx(half, rel=0.05)
    assert (r["high"] + r["low"]) / 2 == pytest.approx(d.mean(), abs=0.1 * half)


def test_deterministic_and_seed_dependent():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=40).tolist(), rng.normal(size=40).tolist()
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, seed=7)["low"] != paired_bootstrap(a, b, seed=8)["low"]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([1.0], [0.0], confidence=1.5)


def test_too_few_pairs_get_no_verdict():
    """Two examples that both rose give the interval [their two differences], which excludes 0: "a real
    improvement" said of n = 2. Under 10 pairs the verdict and the table cell say the interval tells nothing."""
    from fedmoe.eval.stats import MIN_PAIRS, change_verdict, format_change

    few = paired_bootstrap([10.0, 20.0], [0.0, 0.0])
    assert few["low"] > 0  # the interval alone would call it real
    assert change_verdict(few).startswith("too few examples (2, fewer than 10)")
    assert format_change(few).endswith("(n = 2: too few)")
    rng = np.random.default_rng(0)
    before = rng.uniform(0, 50, MIN_PAIRS)
    enough = paired_bootstrap((before + 5).tolist(), before.tolist())
    assert change_verdict(enough) == ("the interval excludes 0: an improvement beyond test-sample noise (this run's; "
                                      "seeds not varied)") and "too few" not in format_change(enough)
    assert change_verdict(paired_bootstrap((before - 5).tolist(), before.tolist())).startswith("the interval excludes 0: a drop beyond test-sample noise")
