"""Tokenizer parity of GGUF sources with the real llama.cpp: tiny GGUFs of both tokenizer families
written by our own GGUF writer (byte-level BPE ``gpt2``; SentencePiece-style ``llama`` with scores,
with and without the space prefix, as Llama 2 and Gemma use), a Gemma-style vocabulary that
transformers misreads (rebuilt), pre-tokenizer rules (rebuilt), one nobody here can reproduce
(refused with exit 2 before any weights are read), stale caches, and the real default model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from converters.gguf_export import export_gguf
from converters.gguf_metadata import KV, read_metadata, write_metadata
from rmexport.cli import main
from rmexport.errors import ModelLoadError
from rmexport.models import DEFAULT_MODEL, _file_fingerprint, checkpoint_dir, resolve, tokenizer_parity_record
from rmexport.tokenizer_parity import (
    PARITY_FILE,
    PROBES,
    REBUILT,
    TRANSFORMERS,
    TokenizerParity,
    compare,
    ensure_parity,
    open_llama_cpp_vocab,
    parity_texts,
    read_record,
    record_is_current,
)

from .tiny import tiny_config, tiny_tokenizer

SPACE = "\u2581"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
)


def sentencepiece_tokenizer(texts: list[str], space_prefix: bool, vocab_size: int = 700):
    """A small SentencePiece-style BPE (``▁`` for spaces, <0xXX> byte fallback, no pre-splitting)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    steps = [normalizers.Replace(" ", SPACE)]
    if space_prefix:
        steps.insert(0, normalizers.Prepend(SPACE))
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Sequence(steps)
    trained.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    )
    data = json.loads(trained.to_str())
    order = sorted(data["model"]["vocab"], key=data["model"]["vocab"].get)
    tokens = order[:3] + [f"<0x{b:02X}>" for b in range(256)] + order[3:]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    tok = Tokenizer(
        models.BPE(
            {t: i for i, t in enumerate(tokens)}, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True
        )
    )
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if space_prefix else [])
    )
    tok.add_special_tokens(order[:3])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_gguf(family: str, tokenizer, root: Path, name: str) -> Path:
    """A tiny random ``family`` model with ``tokenizer``, written as an f32 GGUF by our writer."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)), dtype=torch.float32)
    checkpoint = root / name
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    return export_gguf(checkpoint, root / f"{name}.gguf", "f32")


def retagged(source: Path, target: Path, changes: dict[str, KV]) -> Path:
    """A copy of an f32 GGUF with some metadata changed (another split rule, other scores)."""
    meta = read_metadata(str(source))
    meta.update(changes)
    writer = GGUFWriter(str(target), meta["general.architecture"].value)
    write_metadata(writer, meta)
    for tensor in GGUFReader(str(source)).tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def pre(name: str) -> dict[str, KV]:
    return {"tokenizer.ggml.pre": KV(name, GGUFValueType.STRING)}


@pytest.fixture
def cache(tmp_path_factory, monkeypatch) -> Path:
    """Conversions of the tiny GGUFs go to a cache of this module's own."""
    root = tmp_path_factory.getbasetemp() / "parity-cache"
    monkeypatch.setenv("RMEXPORT_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def texts(builtin_corpus) -> list[str]:
    # The probes repeated, so that the vocabularies have merges over digits, spaces and newlines.
    return builtin_corpus.pool[:300] + list(PROBES) * 20


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, texts) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity-gguf")
    return {
        "gpt2": tiny_gguf("llama", tiny_tokenizer(texts, vocab_size=400), root, "llama-bpe"),
        "llama-spm": tiny_gguf("llama", sentencepiece_tokenizer(texts, space_prefix=True), root, "llama-spm"),
        "gemma-spm": tiny_gguf(
            "gemma3", sentencepiece_tokenizer(texts, space_prefix=False), root, "gemma3-spm"
        ),
    }


def transformers_tokenizer(gguf: Path):
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def assert_agrees_with_llama_cpp(tokenizer, gguf: Path) -> None:
    """Independently of the check: ids of the probes and of held-out text, as llama.cpp makes them."""
    with open_llama_cpp_vocab(gguf) as llama:
        for text in (*PROBES, *parity_texts()[:3]):
            assert tokenizer(text, add_special_tokens=False)["input_ids"] == llama.tokenize(text), text
        assert tokenizer("Hi", add_special_tokens=True)["input_ids"] == llama.tokenize("Hi", add_special=True)
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (llama.bos, llama.eos)
        assert tokenizer.chat_template == llama.chat_template and "messages" in llama.chat_template


def test_the_families_are_what_llama_cpp_reads(ggufs):
    with open_llama_cpp_vocab(ggufs["gpt2"]) as llama:
        assert (llama.model, llama.pre) == ("gpt2", "gpt-2")
    for name in ("llama-spm", "gemma-spm"):
        with open_llama_cpp_vocab(ggufs[name]) as llama:
            assert llama.model == "llama"
        assert "tokenizer.ggml.scores" in read_metadata(str(ggufs[name]))
    assert read_metadata(str(ggufs["llama-spm"]))["tokenizer.ggml.add_space_prefix"].value is True
    assert read_metadata(str(ggufs["gemma-spm"]))["tokenizer.ggml.add_space_prefix"].value is False


@pytest.mark.parametrize("family", ["gpt2", "llama-spm"])
def test_good_gguf_passes_with_the_transformers_tokenizer(family, ggufs, cache):
    source = resolve(str(ggufs[family]))
    converted = Path(checkpoint_dir(source))
    record = tokenizer_parity_record(source)
    assert record == read_record(converted)
    assert record["method"] == TRANSFORMERS and record["verdict"].startswith("identical")
    assert record["characters"] >= 20_000 and record["tokens"] > 4_000 and record["texts"] > len(PROBES)
    assert record["gguf_fingerprint"] == _file_fingerprint(ggufs[family])
    assert record["chat_probe_tokens"] > 10 and "transformers_differed" not in record
    assert_agrees_with_llama_cpp(AutoTokenizer.from_pretrained(converted), ggufs[family])


def test_gemma_style_sentencepiece_gguf_is_rebuilt_from_its_vocabulary(ggufs, cache):
    gguf = ggufs["gemma-spm"]
    with open_llama_cpp_vocab(gguf) as llama:  # what the issue saw: transformers misreads this family
        first = compare(transformers_tokenizer(gguf), llama, parity_texts(), "transformers")
    assert not first.identical and "token 1 of the sample" in first.problems[0]
    source = resolve(str(gguf))
    converted = Path(checkpoint_dir(source))
    record = tokenizer_parity_record(source)
    assert record["method"] == REBUILT and record["verdict"].startswith("identical")
    assert record["transformers_differed"][0] == first.problems[0]
    assert_agrees_with_llama_cpp(AutoTokenizer.from_pretrained(converted), gguf)
    # The converted model names the same special tokens as its tokenizer.
    config = json.loads((converted / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (record["bos_id"], record["eos_id"])


@pytest.mark.parametrize("family", ["gpt2", "llama-spm", "gemma-spm"])
def test_a_disagreeing_tokenizer_is_replaced_by_one_rebuilt_from_the_gguf(family, ggufs):
    wrong = transformers_tokenizer(ggufs["gpt2" if family != "gpt2" else "llama-spm"])
    tokenizer, record = ensure_parity(ggufs[family], wrong, "fingerprint")
    assert record.method == REBUILT and record.transformers_differed
    assert record.texts == len(parity_texts()) and record.tokens > 4_000
    assert_agrees_with_llama_cpp(tokenizer, ggufs[family])
    assert TokenizerParity.from_json(json.loads(json.dumps(record.to_json()))) == record


@pytest.mark.parametrize("pre_name", ["llama-bpe", "qwen2", "smollm", "tekken"])
def test_byte_level_vocabulary_is_rebuilt_with_llama_cpp_pre_tokenizer(pre_name, ggufs, tmp_path):
    gguf = retagged(ggufs["gpt2"], tmp_path / f"bpe-{pre_name}.gguf", pre(pre_name))
    tokenizer, record = ensure_parity(gguf, None, "fingerprint")
    assert record.method == REBUILT and record.pre_tokenizer == pre_name
    assert_agrees_with_llama_cpp(tokenizer, gguf)


def test_llama3_pre_tokenizer_misread_by_transformers_is_rebuilt(ggufs, tmp_path, cache):
    # transformers reads every byte-level GGUF of a llama-architecture model with GPT-2's split
    # rule; llama.cpp uses Llama 3's (digits in runs of up to 3, no space before them).
    gguf = retagged(ggufs["gpt2"], tmp_path / "llama3.gguf", pre("llama-bpe"))
    converted = Path(checkpoint_dir(resolve(str(gguf))))
    record = read_record(converted)
    assert record["method"] == REBUILT and record["transformers_differed"]
    assert_agrees_with_llama_cpp(AutoTokenizer.from_pretrained(converted), gguf)


def test_unreproducible_tokenizer_is_refused_with_exit_2_before_any_weights(ggufs, tmp_path, capsys, cache):
    # llama.cpp's deepseek-coder rules split every digit and punctuation run apart; transformers
    # reads the file as GPT-2 and nothing here rebuilds those rules: the run must not go on.
    gguf = retagged(ggufs["gpt2"], tmp_path / "deepseek.gguf", pre("deepseek-coder"))
    with pytest.raises(ModelLoadError) as raised:
        checkpoint_dir(resolve(str(gguf)))
    message = str(raised.value)
    assert "can not be reproduced" in message and "token " in message and "llama.cpp gives" in message
    assert "deepseek-coder" in message and raised.value.exit_code == 2
    code = main(["prune", str(gguf), "--out", str(tmp_path / "out"), "--layers", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "can not be reproduced as llama.cpp reads it" in err and "hint:" in err
    assert not (tmp_path / "out" / "prune.json").exists()
    assert not list(cache.glob("*/deepseek-*"))  # nothing was dequantized or cached


def test_sentencepiece_vocabulary_with_equal_scores_is_refused(ggufs, tmp_path, cache):
    # Equal scores leave llama.cpp merging the leftmost pair first, which no merge list can
    # express: neither transformers nor the rebuild reproduce it, and the model is refused.
    n = len(read_metadata(str(ggufs["gemma-spm"]))["tokenizer.ggml.tokens"].value)
    flat = {"tokenizer.ggml.scores": KV([0.0] * n, GGUFValueType.ARRAY, GGUFValueType.FLOAT32)}
    gguf = retagged(ggufs["gemma-spm"], tmp_path / "flat.gguf", flat)
    with pytest.raises(ModelLoadError) as raised:
        checkpoint_dir(resolve(str(gguf)))
    message = str(raised.value)
    assert "transformers' tokenizer differs at token" in message
    assert "the tokenizer rebuilt from the GGUF vocabulary differs at token" in message
    assert "llama.cpp gives" in message and raised.value.exit_code == 2
    assert not list(cache.glob("*/flat-*"))


def test_stale_cache_with_a_wrong_tokenizer_is_converted_again(ggufs, cache):
    gguf = ggufs["gemma-spm"]
    source = resolve(str(gguf))
    converted = Path(checkpoint_dir(source))
    # A conversion made before this check: transformers' tokenizer, no verdict.
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", PARITY_FILE):
        (converted / name).unlink(missing_ok=True)
    transformers_tokenizer(gguf).save_pretrained(converted)
    assert read_record(converted) is None
    assert Path(checkpoint_dir(source)) == converted
    assert tokenizer_parity_record(source)["method"] == REBUILT
    assert_agrees_with_llama_cpp(AutoTokenizer.from_pretrained(converted), gguf)


def test_a_saved_verdict_holds_only_for_its_file_and_toolchain(ggufs, cache):
    source = resolve(str(ggufs["llama-spm"]))
    record = tokenizer_parity_record(source)
    fingerprint = _file_fingerprint(ggufs["llama-spm"])
    assert record_is_current(record, fingerprint)
    assert not record_is_current(record, "0" * 16)
    assert not record_is_current(
        {**record, "versions": {**record["versions"], "llama_cpp_python": "0"}}, fingerprint
    )
    assert not record_is_current({**record, "check_version": 0}, fingerprint)
    # A lost verdict is checked again from the saved tokenizer and written back.
    converted = Path(checkpoint_dir(source))
    (converted / PARITY_FILE).unlink()
    assert Path(checkpoint_dir(source)) == converted
    assert read_record(converted)["method"] == TRANSFORMERS


def test_an_hf_source_is_its_own_reference(tiny_checkpoints):
    record = tokenizer_parity_record(resolve(str(tiny_checkpoints["llama"])))
    assert record["verdict"].startswith("not checked")


def test_real_default_model_passes_with_transformers_in_seconds(default_checkpoint):
    source = resolve(DEFAULT_MODEL)
    (Path(default_checkpoint) / PARITY_FILE).unlink(missing_ok=True)  # make the check itself run
    start = time.perf_counter()
    record = tokenizer_parity_record(source)
    checked = time.perf_counter() - start
    assert record["method"] == TRANSFORMERS and record["verdict"].startswith("identical")
    assert (record["tokenizer_model"], record["pre_tokenizer"], record["vocab_size"]) == (
        "gpt2",
        "smollm",
        49152,
    )
    assert record["characters"] >= 20_000 and record["tokens"] > 4_000 and record["chat_probe_tokens"] > 20
    assert checked < 20 and record["seconds"] < 5
    start = time.perf_counter()
    assert tokenizer_parity_record(source) == record  # later uses read the saved verdict
    assert time.perf_counter() - start < 1.0
