"""The shared parity framework (validation/parity.py): metrics, checks, prompts, table, and the two
PyTorch references agreeing. The runtimes themselves are exercised in test_onnx.py and test_gguf.py."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from rmexport.errors import ConfigError
from validation import gguf_parity, onnx_parity, parity
from validation.parity import Tolerance

from .tiny import make_tiny_checkpoint, tiny_tokenizer


def test_both_back_ends_use_the_one_framework():
    assert onnx_parity.Tolerance is gguf_parity.Tolerance is Tolerance
    assert onnx_parity.heldout_prompts is parity.heldout_prompts
    assert all(
        isinstance(t, Tolerance) for t in [*onnx_parity.TOLERANCES.values(), *gguf_parity.TOLERANCES.values()]
    )


def test_compare_logits_counts_agreement_ties_and_kl():
    ref = np.array([[3.0, 1.0, 0.0], [1.0, 1.05, 0.0], [0.0, 0.0, 5.0]], dtype=np.float32)
    got = ref.copy()
    got[1] = [1.06, 1.0, 0.0]  # top-1 flips where the reference's margin is 0.05: a near tie
    got[2] = [6.0, 0.0, 5.0]  # top-1 flips where the margin is 5: decisive
    stats = parity.compare_logits(ref, got, tie_margin=0.1, kl=True)
    assert stats["top1_agree"] == 1 and stats["positions"] == 3
    assert stats["decisive_disagreements"] == 1
    assert stats["max_abs_diff"] == pytest.approx(6.0)
    assert stats["kl"].shape == (3,) and stats["kl"][0] == 0.0 and stats["kl"][2] > 1.0
    p = torch.softmax(torch.tensor(ref[2], dtype=torch.float64), -1)
    q = torch.softmax(torch.tensor(got[2], dtype=torch.float64), -1)
    assert stats["kl"][2] == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-12)
    assert "decisive_disagreements" not in parity.compare_logits(ref, got)


def test_summarize_pools_positions_across_prompts():
    ref = np.zeros((4, 5), dtype=np.float32)
    ref[:, 0] = 1.0
    a = parity.compare_logits(ref, ref, tie_margin=0.0, kl=True)
    worse = ref.copy()
    worse[0] = [0, 2, 0, 0, 0]
    b = parity.compare_logits(ref[:2], worse[:2], tie_margin=0.0, kl=True)
    summary = parity.summarize([a, b])
    assert summary["positions"] == 6 and summary["top1_agreement"] == pytest.approx(5 / 6)
    assert summary["max_abs_diff"] == pytest.approx(2.0)
    assert summary["mean_abs_diff"] == pytest.approx((0.0 + 3.0 / 10) / 2)
    assert summary["top1_decisive_disagreements"] == 1
    assert summary["mean_kl"] == pytest.approx(float(np.concatenate([a["kl"], b["kl"]]).mean()))


def test_matching_prefix():
    assert parity.matching_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert parity.matching_prefix([1, 2, 3], [1, 5, 3]) == 1
    assert parity.matching_prefix([], [1]) == 0


def test_check_holds_a_result_only_to_what_it_measured():
    tol = Tolerance(min_top1_agreement=0.9, max_abs_diff=0.1, max_mean_kl=1e-3, min_decode_match=1.0)
    good = {"top1_agreement": 1.0, "max_abs_diff": 0.01, "mean_kl": 1e-6, "decode_match": 1.0}
    assert parity.check(good, tol) == {}
    bad = {"top1_agreement": 0.5, "max_abs_diff": 0.2, "mean_kl": 0.1, "decode_match": 0.5}
    failures = parity.check(bad, tol)
    assert list(failures) == ["top1_agreement", "mean_kl", "max_abs_diff", "decode_match"]
    assert failures["top1_agreement"] == "top-1 agreement 0.5000 < 0.9"
    # not measured: not checked (a result without decisive disagreements or decode logits)
    assert parity.check({"top1_agreement": 1.0}, tol) == {}
    # reported only: limits of None check nothing
    assert parity.check(bad, Tolerance()) == {}


def test_exact_decode_excepts_near_ties_only():
    tol = Tolerance(min_top1_agreement=0.5, max_abs_diff=1e-3, exact_decode=True)
    assert tol.tie_margin == pytest.approx(2e-3)
    prompt = {"decode_identical": False, "decode_divergence_near_tie": True}
    result = {"top1_agreement": 1.0, "max_abs_diff": 0.0, "top1_decisive_disagreements": 0}
    assert parity.check({**result, "per_prompt": [prompt]}, tol) == {}
    prompt["decode_divergence_near_tie"] = False
    assert set(parity.check({**result, "per_prompt": [prompt]}, tol)) == {"decode_match"}
    assert set(parity.check({**result, "top1_decisive_disagreements": 2}, tol)) == {
        "top1_decisive_disagreements"
    }


@pytest.fixture(scope="module")
def tokenizer(builtin_corpus):
    return tiny_tokenizer(builtin_corpus.pool[:300])


def test_heldout_prompts(tokenizer):
    prompts = parity.heldout_prompts(tokenizer, 3, 24)
    assert len(prompts) == 3 and all(p[0] == tokenizer.bos_token_id and 8 <= len(p) <= 24 for p in prompts)
    assert len(set(map(tuple, prompts))) == 3
    with pytest.raises(ConfigError):
        parity.heldout_prompts(tokenizer, 0, 24)
    with pytest.raises(ConfigError, match="only"):
        parity.heldout_prompts(tokenizer, 10**6, 24)
    # gguf's way: documents of at least half the budget, as many as there are
    few = parity.heldout_prompts(tokenizer, 10**6, 48, min_tokens=24, need_all=False)
    assert few and all(24 < len(p) <= 48 for p in few)


def _onnx_like(**over):
    result = {
        "tolerance": asdict(onnx_parity.TOLERANCES["fp32"]),
        "max_abs_diff": 1e-6,
        "mean_abs_diff": 1e-7,
        "top1_agreement": 1.0,
        "positions": 10,
        "top1_decisive_disagreements": 0,
        "new_tokens": 4,
        "decode_match": 1.0,
        "decode_max_abs_diff": 1e-6,
        "per_prompt": [{"decode_identical": True, "decode_divergence_near_tie": False}],
    }
    return {**result, **over}


def _gguf_like(**over):
    result = {
        "tolerance": asdict(gguf_parity.TOLERANCES["f32"]),
        "max_abs_diff": 1e-3,
        "mean_kl": 1e-9,
        "top1_agreement": 1.0,
        "positions": 10,
        "decode_new_tokens": 8,
        "decode_matching_tokens": 8,
        "decode_match": 1.0,
        "tokenization_probes": 5,
        "tokenization_mismatches": [],
    }
    return {**result, **over}


def test_table_shows_what_each_back_end_measured():
    onnx = parity.format_table(_onnx_like(), "onnx")
    assert "top-1 disagreements, not ties" in onnx and "decode max |Δlogit|" in onnx
    assert "mean KL" not in onnx and "tokenizer" not in onnx and "FAIL" not in onnx
    gguf = parity.format_table(_gguf_like(), "gguf")
    assert "prefill mean KL" in gguf and "8/8 before the first miss" in gguf and "5/5 texts" in gguf
    assert "not ties" not in gguf and "FAIL" not in gguf


def test_table_marks_the_failed_rows():
    lines = parity.format_table(_gguf_like(mean_kl=0.5, tokenization_mismatches=[{}]), "gguf").splitlines()
    failed = [line.split("  ")[0] for line in lines if line.endswith("FAIL")]
    assert failed == ["prefill mean KL", "tokenizer splits sample text alike"]
    lines = parity.format_table(_onnx_like(top1_decisive_disagreements=3), "onnx").splitlines()
    assert [line.split("  ")[0] for line in lines if line.endswith("FAIL")] == [
        "top-1 disagreements, not ties"
    ]


def test_the_two_pytorch_references_agree(builtin_corpus, tmp_path):
    """transformers with its KV cache (ONNX's reference) and the block engine (llama.cpp's) give the
    same logits and the same greedy tokens."""
    from rmexport.models import load_model, load_tokenizer, resolve

    ckpt = make_tiny_checkpoint("llama", tmp_path / "llama", builtin_corpus.pool[:300])
    source = resolve(str(ckpt))
    prompt = parity.heldout_prompts(load_tokenizer(source), 1, 24)[0]
    prefill, tokens, steps = parity.torch_greedy(load_model(source, dtype=torch.float32), prompt, 6)
    assert prefill.shape[0] == len(prompt) and len(tokens) == len(steps) == 6
    assert tokens[0] == int(prefill[-1].argmax())
    with parity.EngineReference.open(ckpt) as reference:
        (engine_prefill,) = reference.logits([prompt])
        choices = reference.choices_along(prompt, tokens)
    np.testing.assert_allclose(engine_prefill, prefill, atol=1e-4)
    assert choices == tokens
