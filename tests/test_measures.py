"""The shared measurements (rmexport/measures.py) on inputs whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rmexport import measures


def test_angular_distance():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [-1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    d = measures.angular_distance(a, b)
    assert d.dtype == torch.float64
    assert d.tolist() == pytest.approx([0.5, 1.0, 0.0, 0.25], abs=1e-7)


def test_token_nll_is_the_negative_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64) * 4
    targets = torch.randint(0, 11, (2, 5))
    nll = measures.token_nll(logits, targets)
    expected = -torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert nll.dtype == torch.float64 and nll.shape == (2, 5)
    torch.testing.assert_close(nll, expected, rtol=0, atol=1e-12)
    uniform = measures.token_nll(torch.zeros(3, 7), torch.tensor([0, 3, 6]))
    assert uniform.tolist() == pytest.approx([math.log(7)] * 3, rel=1e-15)


def test_token_nll_of_float32_logits_over_a_real_vocabulary_is_float64_accurate():
    """The exponentials are summed in float32: over 49,152 logits the loss stays within 1e-6 of
    the float64 log-softmax, for peaked and for flat distributions."""
    torch.manual_seed(0)
    logits = torch.randn(64, 49152) * torch.linspace(0.1, 30, 64)[:, None]
    targets = torch.randint(0, 49152, (64,))
    nll = measures.token_nll(logits, targets)
    expected = -torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert nll.dtype == torch.float64
    torch.testing.assert_close(nll, expected, rtol=1e-7, atol=1e-6)


def test_nll_sum_counts_only_the_counted_predictions():
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 2] = 10.0  # position 0 is sure of token 2
    targets = torch.tensor([[1, 0, 0, 0]])
    total, count = measures.nll_sum(logits, targets)
    assert count == 4 and total > 3 * math.log(5) + 9
    counted = torch.tensor([[False, True, True, False]])
    total, count = measures.nll_sum(logits, targets, counted)
    assert count == 2 and total == pytest.approx(2 * math.log(5), rel=1e-15)
    assert measures.perplexity(total, count) == pytest.approx(5.0, rel=1e-14)


def test_kl_rows():
    ref = np.array([[0.0, 0.0], [5.0, 0.0], [1.0, 2.0]], dtype=np.float32)
    got = np.array([[3.0, 3.0], [0.0, 5.0], [1.0, 2.0]], dtype=np.float32)
    kl = measures.kl_rows(ref, got)
    assert kl.dtype == np.float64 and kl[0] == pytest.approx(0.0, abs=1e-15) and kl[2] == 0.0
    p = torch.softmax(torch.tensor([5.0, 0.0], dtype=torch.float64), -1)
    assert kl[1] == pytest.approx(float((p * (p / p.flip(0)).log()).sum()), rel=1e-12)
    assert (measures.kl_rows(got, ref) >= 0).all()
