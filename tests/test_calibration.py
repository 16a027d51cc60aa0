"""Calibration text: the fixed split, packing, padding masks, streaming statistics."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from rmexport.calib.collect import collect
from rmexport.calib.corpus import load_corpus, parse_mixture
from rmexport.calib.engine import Engine, original_plan
from rmexport.calib.store import ActivationStore
from rmexport.calib.tokens import calibration_batches, heldout_windows, mixture_batches, shares
from rmexport.calib.weights import ModelSkeleton
from rmexport.errors import CalibrationError, ConfigError


def test_builtin_split_is_fixed_and_disjoint(builtin_corpus):
    again = load_corpus("builtin")
    assert again.pool[:5] == builtin_corpus.pool[:5]
    assert len(builtin_corpus.pool) + len(builtin_corpus.heldout) == 10033
    assert len(builtin_corpus.heldout) == 10033 - int(10033 * 0.9)
    assert not set(builtin_corpus.pool) & set(builtin_corpus.heldout)


@pytest.mark.parametrize("spec", ["docs", "dialogue"])
def test_out_of_domain_sources_are_offline_and_disjoint(spec, builtin_corpus):
    corpus = load_corpus(spec)
    assert len(corpus.pool) > 400 and len(corpus.heldout) > 40
    key = json.dumps if spec == "dialogue" else str
    assert not {key(d) for d in corpus.pool} & {key(d) for d in corpus.heldout}
    assert not {key(d) for d in corpus.heldout} & set(builtin_corpus.heldout)
    assert load_corpus(spec).heldout[:3] == corpus.heldout[:3]
    if spec == "dialogue":  # chats, alternating speakers
        assert all(m["role"] == ("user", "assistant")[i % 2] for i, m in enumerate(corpus.heldout[0]))
    else:  # prose docstrings, no doctest sessions
        assert all(len(d) >= 300 and ">>>" not in d for d in corpus.heldout)


def test_text_and_jsonl_sources_split_without_overlap(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"paragraph number {i} about things" for i in range(50)))
    corpus = load_corpus(str(text))
    assert len(corpus.pool) == 45 and len(corpus.heldout) == 5
    assert not set(corpus.pool) & set(corpus.heldout)

    jsonl = tmp_path / "chat.jsonl"
    lines = [
        json.dumps(
            {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        )
        for i in range(20)
    ]
    jsonl.write_text("\n".join(lines))
    chat = load_corpus(str(jsonl))
    assert chat.is_chat and len(chat.pool) == 18


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_corpus(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        load_corpus(str(bad))


def test_packed_sequences_are_full_and_start_with_bos(tiny_checkpoints, builtin_corpus):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])
    calib = calibration_batches(builtin_corpus, tokenizer, n_samples=20, seq_len=32, batch_size=4)
    for ids, mask in calib.batches:
        assert ids.shape[1] == 32 and bool(mask.all())
        assert bool((ids[:, 0] == tokenizer.bos_token_id).all())
    again = calibration_batches(builtin_corpus, tokenizer, n_samples=20, seq_len=32, batch_size=4)
    assert again.token_hash == calib.token_hash


def test_chat_samples_are_padded_and_masked(tiny_checkpoints, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])
    jsonl = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hello " * (i + 1)}]} for i in range(30)]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    calib = calibration_batches(
        load_corpus(str(jsonl)), tokenizer, n_samples=30, seq_len=64, batch_size=8, min_tokens=10
    )
    ids, mask = calib.batches[0]
    assert not bool(mask.all()), "samples of different lengths must be padded"
    assert bool((ids[mask == 0] == tokenizer.pad_token_id).all())
    assert calib.n_tokens == sum(int(m.sum()) for _, m in calib.batches)


def test_a_mixture_draws_each_source_in_proportion(tiny_checkpoints, builtin_corpus):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])  # has a chat template
    assert parse_mixture("builtin*3+dialogue") == [("builtin", 3), ("dialogue", 1)]
    assert shares(10, [3, 1]) == [8, 2] and shares(64, [2, 1, 1]) == [32, 16, 16]
    mix = mixture_batches(
        "builtin*3+dialogue", tokenizer, n_samples=8, seq_len=32, batch_size=4, min_tokens=1
    )
    parts = {p["source"]: p for p in mix.describe()["parts"]}
    assert parts["builtin"]["documents"] == 6 and parts["dialogue"]["documents"] == 2
    assert parts["builtin"]["packed"] and not parts["dialogue"]["packed"]
    alone = calibration_batches(
        builtin_corpus, tokenizer, n_samples=6, seq_len=32, batch_size=4, min_tokens=1
    )
    assert all(torch.equal(a[0], b[0]) for a, b in zip(alone.batches, mix.batches, strict=False))
    aside = mixture_batches(
        "builtin*3+dialogue", tokenizer, n_samples=4, seq_len=32, batch_size=4, offset=8, min_tokens=1
    )
    assert aside.token_hash != mix.token_hash
    again = mixture_batches(
        "builtin*3+dialogue", tokenizer, n_samples=8, seq_len=32, batch_size=4, min_tokens=1
    )
    assert again.token_hash == mix.token_hash
    for bad in ("builtin*x+dialogue", "builtin*0+docs", "builtin+builtin", "+docs"):
        with pytest.raises(ConfigError):
            parse_mixture(bad)


def test_too_little_calibration_text_is_an_error(tiny_checkpoints, builtin_corpus):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])
    with pytest.raises(CalibrationError):
        calibration_batches(
            builtin_corpus, tokenizer, n_samples=1, seq_len=32, batch_size=1, min_tokens=10_000
        )


def test_heldout_windows_follow_the_protocol(tiny_checkpoints, builtin_corpus):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])
    windows = heldout_windows(builtin_corpus, tokenizer, n_tokens=2048, window=512)
    assert windows.shape == (4, 513)
    assert bool((windows[:, 0] == tokenizer.bos_token_id).all())
    first = tokenizer(builtin_corpus.heldout[0], add_special_tokens=False)["input_ids"]
    assert windows[0, 1 : 1 + len(first[:100])].tolist() == first[:100]


def test_statistics_do_not_depend_on_batch_size(tiny_checkpoints, builtin_corpus):
    path = tiny_checkpoints["qwen2"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    results = []
    for batch_size in (1, 5):
        calib = calibration_batches(
            builtin_corpus, tokenizer, n_samples=30, seq_len=32, batch_size=batch_size
        )
        engine = Engine(ModelSkeleton(path, resident=True), ActivationStore(torch.device("cpu"), 2**30))
        profile, stats = collect(engine, original_plan(8), calib, n=2, starts=[1, 3], stats_for=[1, 3])
        engine.close()
        results.append((profile.mean("all"), stats))
    (dist_a, stats_a), (dist_b, stats_b) = results
    for s in (1, 3):
        assert dist_a[s] == pytest.approx(dist_b[s], rel=1e-6)
        assert torch.allclose(stats_a[s].gram, stats_b[s].gram, rtol=1e-6)
        assert torch.allclose(stats_a[s].cross, stats_b[s].cross, rtol=1e-6, atol=1e-9)
