"""Noise schedules against the numbers of their papers and their defining formulas."""

import jax
import numpy as np
import pytest

from ddpm import schedules


def test_linear_matches_ddpm_paper():
    s = schedules.get_schedule("linear", 1000)
    assert s.num_timesteps == 1000
    np.testing.assert_allclose(s.betas[0], 1e-4, rtol=1e-6)
    np.testing.assert_allclose(s.betas[-1], 0.02, rtol=1e-6)
    # DDPM: alpha_bar_T = prod(1 - beta_t) ~= 4.04e-5 for T = 1000.
    np.testing.assert_allclose(s.alpha_bars[-1], 4.04e-5, rtol=2e-3)
    assert s.betas.dtype == np.float32


def test_linear_is_rescaled_for_other_lengths():
    s = schedules.get_schedule("linear", 4000)
    np.testing.assert_allclose([s.betas[0], s.betas[-1]], [2.5e-5, 0.005], rtol=1e-6)
    # The same continuous process: alpha_bar_T = exp(sum log(1 - b)) ~= exp(-10.05) for any T;
    # the O(b^2) terms of log(1 - b) differ by ~5 % between T = 1000 and T = 4000.
    np.testing.assert_allclose(s.alpha_bars[-1], 4.04e-5, rtol=0.1)


def test_cosine_alpha_bar_is_f_over_f0():
    T, s = 1000, 0.008
    sched = schedules.get_schedule("cosine", T)

    def f(t):
        return np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2

    expected = f(np.arange(1, T + 1)) / f(0)  # 0-based index t is the paper's t + 1
    unclipped = np.asarray(sched.betas) < 0.999  # only the last steps hit the 0.999 clip
    assert unclipped.sum() > 990
    np.testing.assert_allclose(
        sched.alpha_bars[unclipped], expected[unclipped], rtol=2e-5, atol=1e-7
    )
    assert np.isclose(sched.betas.max(), 0.999)


def test_scaled_linear_and_sigmoid():
    s = schedules.get_schedule("scaled_linear", 1000)
    np.testing.assert_allclose([s.betas[0], s.betas[-1]], [0.00085, 0.012], rtol=1e-6)
    np.testing.assert_allclose(
        np.sqrt(s.betas), np.linspace(0.00085**0.5, 0.012**0.5, 1000), rtol=1e-6
    )
    sig = schedules.get_schedule("sigmoid", 1000)
    ab = np.asarray(sig.alpha_bars)
    assert np.all(np.diff(ab) < 0) and 0.99 < ab[0] < 1 and ab[-1] < 1e-3


@pytest.mark.parametrize("name", schedules.SCHEDULE_NAMES)
def test_tables_are_consistent(name):
    s = schedules.get_schedule(name, 200)
    b = np.asarray(s.betas, np.float64)
    ab = np.cumprod(1 - b)
    np.testing.assert_allclose(s.alpha_bars, ab, rtol=1e-4)
    assert s.alpha_bars_prev[0] == 1.0
    np.testing.assert_allclose(s.alpha_bars_prev[1:], s.alpha_bars[:-1], rtol=1e-6)
    np.testing.assert_allclose(
        s.sqrt_alpha_bars**2 + s.sqrt_one_minus_alpha_bars**2, 1.0, rtol=1e-6
    )
    assert s.posterior_variance[0] == 0.0
    np.testing.assert_allclose(s.posterior_log_variance_clipped[0], np.log(s.posterior_variance[1]))
    np.testing.assert_allclose(
        s.posterior_log_variance_clipped[1:], np.log(s.posterior_variance[1:]), rtol=1e-5
    )
    for leaf in jax.tree.leaves(s):
        assert leaf.dtype == np.float32 and leaf.shape == (200,)


def test_zero_terminal_snr():
    base = schedules.get_schedule("linear", 1000)
    s = schedules.get_schedule("linear", 1000, zero_terminal_snr=True)
    assert s.alpha_bars[-1] == 0.0 and s.betas[-1] == 1.0
    np.testing.assert_allclose(s.alpha_bars[0], base.alpha_bars[0], rtol=1e-6)
    assert np.all(np.diff(np.asarray(s.alpha_bars)) < 0)


def test_schedule_is_a_jit_argument():
    s = schedules.get_schedule("cosine", 50)
    total = jax.jit(lambda sched: sched.betas.sum() + sched.num_timesteps)(s)
    np.testing.assert_allclose(total, np.asarray(s.betas).sum() + 50, rtol=1e-6)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("cosin", 1000), {}, "linear, scaled_linear, cosine, sigmoid"),
        (("linear", 0), {}, "num_timesteps=0"),
        (("linear", 10.5), {}, "num_timesteps=10.5"),
        (("linear", 1000), {"beta_end": 1.5}, "beta_end"),
        (("linear", 1000), {"beta_start": 0.0}, "beta_start"),
        (("linear", 1000), {"s": 0.1}, "invalid arguments ['s']"),
        (("cosine", 1000), {"s": -1.0}, "s=-1.0"),
    ],
)
def test_bad_arguments_raise(args, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        schedules.get_schedule(*args, **kwargs)


def test_schedule_from_betas_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        schedules.schedule_from_betas(np.array([0.1, 1.2]))
