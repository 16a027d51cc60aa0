"""The maths of the method on small synthetic data: cut size, solvers, residuals, fold."""

import pytest
import torch

from rmexport.calib.collect import CutActivations, CutStatistics
from rmexport.errors import ConfigError
from rmexport.fold import fold_into_down_proj, fold_into_post_mlp_norm, is_hidden_map
from rmexport.replaceme.select import CutScores, candidate_starts, choose_start, cut_size, split_cut
from rmexport.replaceme.solve import (
    CosineSettings,
    cosine_fit,
    diagonal_lstsq_from_gram,
    lstsq_from_gram,
    residual_energy,
    ridge_toward,
)


@pytest.mark.parametrize(
    ("n_layers", "ratio", "expected"), [(32, 0.25, 8), (30, 0.25, 8), (28, 0.25, 7), (8, 0.1, 1)]
)
def test_cut_size_rounds_half_up(n_layers, ratio, expected):
    assert cut_size(n_layers, ratio) == expected


@pytest.mark.parametrize(("ratio", "layers"), [(0.01, None), (1.0, None), (0.0, None), (None, 7), (None, 0)])
def test_impossible_cuts_are_rejected(ratio, layers):
    with pytest.raises(ConfigError):
        cut_size(8, ratio, layers)


def test_split_and_candidates():
    assert split_cut(8, 2) == [4, 4]
    assert split_cut(7, 3) == [3, 2, 2]
    assert candidate_starts(30, 8) == list(range(1, 23))
    with pytest.raises(ConfigError):
        split_cut(2, 3)


def test_choose_start_breaks_ties_to_earliest():
    scores = CutScores(distance={1: 0.3, 2: 0.1, 3: 0.1}, fit={1: 0.05, 2: 0.2, 3: 0.3})
    assert choose_start(scores, "distance") == 2
    assert choose_start(scores, "fit") == 1


def _stats_from(m: torch.Tensor, target: torch.Tensor, stream: torch.Tensor) -> CutStatistics:
    m64, t64 = m.double(), target.double()
    return CutStatistics(
        start=1,
        n=1,
        gram=m64.T @ m64,
        cross=m64.T @ t64,
        target_energy=float((t64**2).sum()),
        stream_energy=float((stream.double() ** 2).sum()),
        tokens=m.shape[0],
    )


def test_lstsq_recovers_a_planted_map_and_residual_matches():
    torch.manual_seed(0)
    m = torch.randn(4000, 16, dtype=torch.float64)
    planted = torch.randn(16, 16, dtype=torch.float64)
    noise = 0.01 * torch.randn(4000, 16, dtype=torch.float64)
    target = m @ planted + noise
    stats = _stats_from(m, target, target)
    transform = lstsq_from_gram(stats.gram, stats.cross)
    assert torch.allclose(transform, planted, atol=1e-3)
    direct = float(((m @ transform - target) ** 2).sum())
    assert residual_energy(stats, transform) == pytest.approx(direct, rel=1e-6)
    identity = torch.eye(16, dtype=torch.float64)
    assert residual_energy(stats, identity) == pytest.approx(float(((m - target) ** 2).sum()), rel=1e-9)


def test_ridge_shrinks_the_map():
    torch.manual_seed(0)
    m = torch.randn(500, 8, dtype=torch.float64)
    target = m @ torch.randn(8, 8, dtype=torch.float64)
    stats = _stats_from(m, target, target)
    plain = lstsq_from_gram(stats.gram, stats.cross)
    ridge = lstsq_from_gram(stats.gram, stats.cross, alpha=1e3)
    assert ridge.norm() < plain.norm()


def test_diagonal_lstsq_is_per_channel_least_squares():
    torch.manual_seed(0)
    m = torch.randn(1000, 6, dtype=torch.float64)
    scale = torch.tensor([0.5, 1.0, 2.0, -1.0, 3.0, 0.1], dtype=torch.float64)
    stats = _stats_from(m, m * scale, m)
    assert torch.allclose(diagonal_lstsq_from_gram(stats.gram, stats.cross), scale, atol=1e-9)


def _activations(tokens=3000, d=12, noise=0.5):
    torch.manual_seed(0)
    m = torch.randn(tokens, d)
    bypass = 2.0 * torch.randn(tokens, d)
    after = bypass + m @ torch.randn(d, d) + noise * torch.randn(tokens, d)
    activations = CutActivations(m, bypass, after)
    stats = _stats_from(m.double(), activations.target.double(), after.double())
    return activations, lstsq_from_gram(stats.gram, stats.cross)


def _cosine_distance(activations, transform):
    stream = activations.bypass + activations.mlp @ transform.float()
    return 1 - float(torch.nn.functional.cosine_similarity(stream, activations.after, dim=-1).mean())


def test_cosine_fit_starts_from_its_init_and_returns_its_best_epoch():
    activations, start = _activations()
    result = cosine_fit(activations, start, CosineSettings(lr=1e-3, max_epochs=40, tolerance=1e-3))
    curve = result.details["loss_curve"]
    assert curve[0] == pytest.approx(_cosine_distance(activations, start), rel=1e-5)
    assert curve[result.details["best_epoch"]] == min(curve) < curve[0]
    assert _cosine_distance(activations, result.transform) == pytest.approx(min(curve), rel=1e-5)
    assert result.details["stopped"] == "tolerance" and result.details["epochs"] < 40


def test_cosine_fit_keeps_the_start_when_validation_only_gets_worse():
    activations, start = _activations()
    drift = []

    def validate(transform):
        drift.append(float((transform - start).norm()))
        return drift[-1]

    settings = CosineSettings(lr=1e-3, max_epochs=40, tolerance=0.0, patience=2)
    result = cosine_fit(activations, start, settings, validate=validate)
    assert result.details["best_epoch"] == 0 and result.details["stopped"] == "validation"
    assert result.details["epochs"] == 2 and result.details["validation_curve"] == drift
    assert torch.allclose(result.transform, start.float().double())


def test_cosine_fit_follows_validation_when_it_improves():
    activations, start = _activations()

    def validate(transform):
        return _cosine_distance(activations, transform)

    result = cosine_fit(activations, start, CosineSettings(lr=1e-3, max_epochs=6, tolerance=0.0), validate)
    assert result.details["best_epoch"] > 0
    validation = result.details["validation_curve"]
    assert validation[result.details["best_epoch"]] == min(validation) < validation[0]


def test_fold_into_down_proj_gives_m_times_t():
    torch.manual_seed(0)
    down = torch.nn.Linear(12, 6, bias=True)
    x = torch.randn(5, 12)
    transform = torch.randn(6, 6, dtype=torch.float64)
    expected = (down(x).double() @ transform).float()
    fold_into_down_proj(down, transform)
    assert torch.allclose(down(x), expected, atol=1e-5)


def test_fold_with_identity_is_a_no_op():
    down = torch.nn.Linear(12, 6, bias=False)
    before = down.weight.detach().clone()
    fold_into_down_proj(down, torch.eye(6))
    assert torch.equal(down.weight, before)


def test_fold_into_gemma_norm_scales_its_output():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    torch.manual_seed(0)
    norm = Gemma3RMSNorm(6)
    norm.weight.data.normal_()
    x = torch.randn(4, 6)
    scale = torch.tensor([0.5, 2.0, 1.0, -1.0, 0.0, 3.0])
    expected = norm(x) * scale
    fold_into_post_mlp_norm(norm, scale, weight_offset=1.0)
    assert torch.allclose(norm(x), expected, atol=1e-5)


def test_a_hidden_map_becomes_the_down_proj():
    torch.manual_seed(0)
    down = torch.nn.Linear(12, 6, bias=False)
    h = torch.randn(5, 12)
    hidden_map = torch.randn(12, 6, dtype=torch.float64)
    assert is_hidden_map(hidden_map, tuple(down.weight.shape))
    assert not is_hidden_map(torch.eye(6), tuple(down.weight.shape))
    fold_into_down_proj(down, hidden_map)
    assert torch.allclose(down(h), (h.double() @ hidden_map).float(), atol=1e-5)


def test_the_output_map_is_the_hidden_map_through_w_down():
    """T acting on M = H·W_downᵀ is the hidden map W_downᵀ·T: both folds give the same down_proj."""
    torch.manual_seed(0)
    by_output, by_hidden = torch.nn.Linear(12, 6, bias=False), torch.nn.Linear(12, 6, bias=False)
    by_hidden.weight.data.copy_(by_output.weight.data)
    transform = torch.randn(6, 6, dtype=torch.float64)
    fold_into_down_proj(by_output, transform)
    fold_into_down_proj(by_hidden, by_hidden.weight.detach().double().T @ transform)
    torch.testing.assert_close(by_output.weight, by_hidden.weight, rtol=0, atol=1e-6)


def _hidden_problem(tokens: int, features: int = 24, d: int = 8, seed: int = 0):
    """Features H, a planted map of them, and the prior a d×d map would give."""
    generator = torch.Generator().manual_seed(seed)
    planted = torch.randn(features, d, generator=generator, dtype=torch.float64)
    prior = planted + 0.3 * torch.randn(features, d, generator=generator, dtype=torch.float64)

    def sample(n: int) -> CutStatistics:
        h = torch.randn(n, features, generator=generator, dtype=torch.float64)
        target = h @ planted + 0.5 * torch.randn(n, d, generator=generator, dtype=torch.float64)
        return _stats_from(h, target, target)

    return sample(tokens), sample(2000), planted, prior


def test_ridge_toward_recovers_the_map_when_the_data_pin_it_down():
    stats, set_aside, planted, prior = _hidden_problem(tokens=20000)
    choice = ridge_toward(stats, set_aside, prior)
    assert choice.alpha < 1e-2
    assert (choice.transform - planted).norm() < 0.1 * (prior - planted).norm()
    errors = {a: e for a, e in choice.set_aside_rel_residual.items() if e is not None}
    assert errors[str(choice.alpha)] == min(errors.values()) < errors["inf"]


def test_ridge_toward_leans_on_the_prior_when_the_data_do_not():
    """Fewer calibration tokens than features: the exact solve is singular or overfits, and the
    set-aside text picks a strong pull toward the prior; α = ∞ is the prior itself."""
    stats, set_aside, _planted, prior = _hidden_problem(tokens=16)
    choice = ridge_toward(stats, set_aside, prior)
    assert choice.alpha >= 1e-2
    only_prior = ridge_toward(stats, set_aside, prior, grid=(float("inf"),))
    assert torch.equal(only_prior.transform, prior) and only_prior.alpha == float("inf")
