"""The shared parity framework (validation/parity.py): metrics, checks, prompts, table, and the two
PyTorch references agreeing. The runtimes themselves are exercised in test_onnx.py and test_gguf.py."""

from __future__ import annotations

import json
from dataclasses import replace

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
    assert stats.top1_agree == 1 and stats.positions == 3
    assert stats.decisive_disagreements == 1
    assert stats.max_abs_diff == pytest.approx(6.0)
    assert stats.kl.shape == (3,) and stats.kl[0] == 0.0 and stats.kl[2] > 1.0
    p = torch.softmax(torch.tensor(ref[2], dtype=torch.float64), -1)
    q = torch.softmax(torch.tensor(got[2], dtype=torch.float64), -1)
    assert stats.kl[2] == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-12)
    plain = parity.compare_logits(ref, got)
    assert plain.decisive_disagreements is None and plain.kl is None


def test_summarize_pools_positions_across_prompts():
    ref = np.zeros((4, 5), dtype=np.float32)
    ref[:, 0] = 1.0
    a = parity.compare_logits(ref, ref, tie_margin=0.0, kl=True)
    worse = ref.copy()
    worse[0] = [0, 2, 0, 0, 0]
    b = parity.compare_logits(ref[:2], worse[:2], tie_margin=0.0, kl=True)
    summary = parity.summarize([a, b])
    assert summary.positions == 6 and summary.top1_agreement == pytest.approx(5 / 6)
    assert summary.max_abs_diff == pytest.approx(2.0)
    assert summary.mean_abs_diff == pytest.approx((0.0 + 3.0 / 10) / 2)
    assert summary.top1_decisive_disagreements == 1
    assert summary.mean_kl == pytest.approx(float(np.concatenate([a.kl, b.kl]).mean()))
    # measured on some prompts only: not summarized
    partial = parity.summarize([a, parity.compare_logits(ref, ref)])
    assert partial.top1_decisive_disagreements is None and partial.mean_kl is None


def test_matching_prefix():
    assert parity.matching_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert parity.matching_prefix([1, 2, 3], [1, 5, 3]) == 1
    assert parity.matching_prefix([], [1]) == 0


def _measured(**over) -> parity.Measured:
    return replace(
        parity.Measured(
            max_abs_diff=0.0, top1_agreement=1.0, positions=10, decode_match=1.0, decode_tokens=4
        ),
        **over,
    )


def test_check_holds_a_result_only_to_what_it_measured():
    tol = Tolerance(min_top1_agreement=0.9, max_abs_diff=0.1, max_mean_kl=1e-3, min_decode_match=1.0)
    good = _measured(top1_agreement=1.0, max_abs_diff=0.01, mean_kl=1e-6, decode_match=1.0)
    assert parity.check(good, tol) == {}
    bad = _measured(top1_agreement=0.5, max_abs_diff=0.2, mean_kl=0.1, decode_match=0.5)
    failures = parity.check(bad, tol)
    assert list(failures) == ["top1_agreement", "mean_kl", "max_abs_diff", "decode_match"]
    assert failures["top1_agreement"] == "top-1 agreement 0.5000 < 0.9"
    # not measured: not checked (a result without KL, decisive disagreements or decode logits)
    assert parity.check(_measured(max_abs_diff=0.01), tol) == {}
    # reported only: limits of None check nothing
    assert parity.check(bad, Tolerance()) == {}


def test_exact_decode_excepts_near_ties_only():
    tol = Tolerance(min_top1_agreement=0.5, max_abs_diff=1e-3, exact_decode=True)
    assert tol.tie_margin == pytest.approx(2e-3)
    result = _measured(top1_decisive_disagreements=0, decode_match=0.0, decisive_divergences=0)
    assert parity.check(result, tol) == {}
    assert set(parity.check(replace(result, decisive_divergences=1), tol)) == {"decode_match"}
    assert set(parity.check(replace(result, top1_decisive_disagreements=2), tol)) == {
        "top1_decisive_disagreements"
    }


def test_an_onnx_prompt_diverging_away_from_a_near_tie_counts_against_the_decode():
    near_tie = _onnx_prompt(
        decode_identical=False, decode_first_divergence=3, decode_divergence_near_tie=True
    )
    decisive = replace(near_tie, decode_divergence_near_tie=False)
    assert _onnx_result(per_prompt=[near_tie, _onnx_prompt()]).measured().decisive_divergences == 0
    assert _onnx_result(per_prompt=[decisive, near_tie]).measured().decisive_divergences == 1


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


def _onnx_prompt(**over) -> onnx_parity.PromptParity:
    prompt = onnx_parity.PromptParity(
        prompt_tokens=12,
        max_abs_diff=1e-6,
        mean_abs_diff=1e-7,
        top1_agree=10,
        positions=10,
        decisive_disagreements=0,
        decode_identical=True,
        decode_first_divergence=None,
        decode_divergence_near_tie=False,
        decode_max_abs_diff=1e-6,
        reference_tokens=[5, 6, 7, 8],
        onnx_tokens=[5, 6, 7, 8],
    )
    return replace(prompt, **over)


def _onnx_result(**over) -> onnx_parity.OnnxParity:
    result = onnx_parity.OnnxParity(
        onnx_dir="/runs/x/onnx",
        reference="/runs/x/hf",
        flavor="optimum",
        precision="fp32",
        providers=["CPUExecutionProvider"],
        prompts=1,
        new_tokens=4,
        tolerance=onnx_parity.TOLERANCES["fp32"],
        max_abs_diff=1e-6,
        mean_abs_diff=1e-7,
        top1_agreement=1.0,
        positions=10,
        top1_decisive_disagreements=0,
        decode_match=1.0,
        decode_max_abs_diff=1e-6,
        per_prompt=[_onnx_prompt()],
        failures=[],
        passed=True,
    )
    return replace(result, **over)


def _gguf_result(**over) -> gguf_parity.GGUFParity:
    result = gguf_parity.GGUFParity(
        gguf_file="/runs/x/gguf/x-q8_0.gguf",
        reference="/runs/x/hf",
        type="q8_0",
        prompts=4,
        positions=10,
        top1_agreement=1.0,
        max_abs_diff=1e-3,
        mean_kl=1e-9,
        decode_new_tokens=8,
        decode_matching_tokens=8,
        decode_match=1.0,
        decode_torch=[1, 2, 3, 4, 5, 6, 7, 8],
        decode_llama_cpp=[1, 2, 3, 4, 5, 6, 7, 8],
        tokenization_probes=5,
        tokenization_mismatches=[],
        tolerance=gguf_parity.TOLERANCES["f32"],
        tolerance_basis="absolute",
        source_error=None,
        n_threads=2,
        kv_cache_type="f32",
        elapsed_s=1.25,
        passed=True,
        failures=[],
    )
    return replace(result, **over)


def test_table_shows_what_each_back_end_measured():
    onnx = onnx_parity.format_table(_onnx_result())
    assert "top-1 disagreements, not ties" in onnx and "decode max |Δlogit|" in onnx
    assert "1.00 of prompts" in onnx
    assert "mean KL" not in onnx and "tokenizer" not in onnx and "FAIL" not in onnx
    gguf = gguf_parity.format_table(_gguf_result())
    assert "prefill mean KL" in gguf and "8/8 before the first miss" in gguf and "5/5 texts" in gguf
    assert "not ties" not in gguf and "FAIL" not in gguf


def test_table_marks_the_failed_rows():
    mismatch = gguf_parity.TokenizationMismatch("It's", [1, 2], [3])
    lines = gguf_parity.format_table(
        _gguf_result(mean_kl=0.5, tokenization_mismatches=[mismatch])
    ).splitlines()
    failed = [line.split("  ")[0] for line in lines if line.endswith("FAIL")]
    assert failed == ["prefill mean KL", "tokenizer splits sample text alike"]
    lines = onnx_parity.format_table(_onnx_result(top1_decisive_disagreements=3)).splitlines()
    assert [line.split("  ")[0] for line in lines if line.endswith("FAIL")] == [
        "top-1 disagreements, not ties"
    ]


def test_a_table_of_a_record_read_back_from_its_json_is_the_same():
    """The pipeline reads checks/*_parity.json back into the records: the table of either is the same."""
    onnx, gguf = _onnx_result(), _gguf_result()
    onnx_back = onnx_parity.OnnxParity.from_json(json.loads(json.dumps(onnx.to_json())))
    gguf_back = gguf_parity.GGUFParity.from_json(json.loads(json.dumps(gguf.to_json())))
    assert onnx_parity.format_table(onnx_back) == onnx_parity.format_table(onnx)
    assert gguf_parity.format_table(gguf_back) == gguf_parity.format_table(gguf)


# The keys of checks/onnx_parity.json and of each type in checks/gguf_parity.json, in their order: the
# report and earlier runs' files read them.
ONNX_KEYS = [
    "onnx_dir", "reference", "flavor", "precision", "providers", "prompts", "new_tokens", "tolerance",
    "max_abs_diff", "mean_abs_diff", "top1_agreement", "positions", "top1_decisive_disagreements",
    "decode_match", "decode_max_abs_diff", "per_prompt", "failures", "passed",
]  # fmt: skip
ONNX_PROMPT_KEYS = [
    "prompt_tokens", "max_abs_diff", "mean_abs_diff", "top1_agree", "positions", "decisive_disagreements",
    "decode_identical", "decode_first_divergence", "decode_divergence_near_tie", "decode_max_abs_diff",
    "reference_tokens", "onnx_tokens",
]  # fmt: skip
GGUF_KEYS = [
    "gguf_file", "reference", "type", "prompts", "positions", "top1_agreement", "max_abs_diff", "mean_kl",
    "decode_new_tokens", "decode_matching_tokens", "decode_match", "decode_torch", "decode_llama_cpp",
    "tokenization_probes", "tokenization_mismatches", "tolerance", "tolerance_basis", "source_error",
    "n_threads", "kv_cache_type", "elapsed_s", "passed", "failures",
]  # fmt: skip
TOLERANCE_KEYS = ["min_top1_agreement", "max_abs_diff", "max_mean_kl", "min_decode_match", "exact_decode"]


def test_onnx_parity_round_trips_through_json_with_its_keys():
    record = _onnx_result(
        per_prompt=[_onnx_prompt(), _onnx_prompt(decode_identical=False, decode_first_divergence=2)]
    )
    text = json.dumps(record.to_json(), indent=2)
    data = json.loads(text)
    assert list(data) == ONNX_KEYS and list(data["per_prompt"][0]) == ONNX_PROMPT_KEYS
    assert list(data["tolerance"]) == TOLERANCE_KEYS
    back = onnx_parity.OnnxParity.from_json(data)
    assert back == record and isinstance(back.per_prompt[1], onnx_parity.PromptParity)
    assert isinstance(back.tolerance, Tolerance) and json.dumps(back.to_json(), indent=2) == text


def test_gguf_parity_round_trips_through_json_with_its_keys():
    source = gguf_parity.SourceError("/base/x-q8_0.gguf", 0.97, 2e-3, 0.5)
    mismatch = gguf_parity.TokenizationMismatch("It's", [1, 2], [3])
    record = _gguf_result(
        tolerance_basis="source's own error", source_error=source, tokenization_mismatches=[mismatch]
    )
    text = json.dumps(record.to_json(), indent=2)
    data = json.loads(text)
    assert list(data) == GGUF_KEYS and list(data["tolerance"]) == TOLERANCE_KEYS
    assert list(data["source_error"]) == ["gguf_file", "top1_agreement", "mean_kl", "max_abs_diff"]
    assert data["tokenization_mismatches"] == [{"text": "It's", "hf": [1, 2], "llama_cpp": [3]}]
    back = gguf_parity.GGUFParity.from_json(data)
    assert back == record and back.source_error == source and back.tokenization_mismatches == [mismatch]
    assert json.dumps(back.to_json(), indent=2) == text
    assert gguf_parity.GGUFParity.from_json(_gguf_result().to_json()).source_error is None


def test_the_source_error_reads_from_the_record_as_stored():
    original = _gguf_result(top1_agreement=0.9, mean_kl=0.01)
    source = gguf_parity.SourceError.of(original)
    stored = gguf_parity.GGUFParity.from_json(json.loads(json.dumps(original.to_json())))
    assert source == gguf_parity.SourceError.of(stored)
    assert (source.gguf_file, source.top1_agreement, source.mean_kl) == (original.gguf_file, 0.9, 0.01)
    tol = gguf_parity.source_relative_tolerance("q8_0", source)
    assert tol.max_mean_kl == pytest.approx(gguf_parity.SOURCE_KL_MULTIPLE * 0.01)
    assert tol.min_top1_agreement == pytest.approx(0.9 - gguf_parity.SOURCE_TOP1_MARGIN)


def test_the_reference_along_a_decode_is_transformers_own_greedy_decode(builtin_corpus, tmp_path):
    """The block engine run once along a greedy decode chooses, at every step, the token transformers'
    own greedy decode (through its KV cache) chose, from the same logits."""
    from rmexport.models import load_model, load_tokenizer, resolve

    ckpt = make_tiny_checkpoint("llama", tmp_path / "llama", builtin_corpus.pool[:300])
    source = resolve(str(ckpt))
    prompt = parity.heldout_prompts(load_tokenizer(source), 1, 24)[0]
    model = load_model(source, dtype=torch.float32)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    with parity.EngineReference.open(ckpt) as reference:
        (along,) = reference.logits([prompt + tokens[:-1]])
        choices = reference.choices_along(prompt, tokens)
    assert len(tokens) == 6 and choices == tokens
    steps = torch.stack(out.logits)[:, 0].float().numpy()
    np.testing.assert_allclose(along[len(prompt) - 1 :], steps, atol=1e-4)
