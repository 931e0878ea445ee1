"""mean_ci95, the ± in every results table: mean and 1.96·s/√n with the unbiased s."""

import math

import pytest
import torch

from metagrad.training.evaluation import mean_ci95


def test_against_a_hand_computation():
    # mean 2.5; s² = (1.5² + 0.5² + 0.5² + 1.5²) / (4 − 1) = 5/3; half-width 1.96·√(5/3)/√4
    mean, half = mean_ci95(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5
    assert half == pytest.approx(1.96 * math.sqrt(5 / 3) / 2, rel=1e-12)
    assert half == pytest.approx(1.2651746, abs=1e-7)


def test_float32_input_gives_python_floats():
    mean, half = mean_ci95(torch.tensor([1.0, 3.0], dtype=torch.float32))
    assert type(mean) is float and type(half) is float
    assert (mean, half) == pytest.approx((2.0, 1.96 * math.sqrt(2) / math.sqrt(2)), rel=1e-12)


def test_constant_values_have_zero_width():
    assert mean_ci95(torch.full((10,), 0.75)) == (0.75, 0.0)


def test_one_value_has_an_undefined_width():
    mean, half = mean_ci95(torch.tensor([0.3]))
    assert mean == pytest.approx(0.3) and math.isnan(half)


def test_width_shrinks_as_one_over_root_n():
    base = torch.tensor([0.0, 1.0])
    _, h2 = mean_ci95(base)
    _, h8 = mean_ci95(base.repeat(4))
    # s changes from √(1/2) (n−1 = 1) to √(2/7) (n−1 = 7) as well as √n from √2 to √8
    assert h2 == pytest.approx(1.96 * math.sqrt(0.5) / math.sqrt(2), rel=1e-12)
    assert h8 == pytest.approx(1.96 * math.sqrt(2 / 7) / math.sqrt(8), rel=1e-12)
