"""Importance-matrix quantization: every type llama.cpp's quantizer makes, ``--imatrix auto|FILE|none``.

Real llama.cpp throughout: ``llama-imatrix`` and ``llama-quantize`` built from the vendored sources
(``make llama-tools``), libllama's quantizer through llama-cpp-python, and the files loaded back.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from converters.gguf_export import GGUF_TYPES, describe_gguf
from converters.imatrix import check_matches, imatrix_path_for, read_imatrix
from rmexport.api import export_gguf
from rmexport.cli import main
from rmexport.config import ExportGGUFConfig
from rmexport.errors import ConfigError
from rmexport.llama_tools import find_tool
from rmexport.llamacpp import eval_logits, open_model

# A short calibration so that llama-imatrix reads a few chunks of a tiny model.
_CALIBRATION = {"source": "builtin", "documents": 24, "seq_len": 64, "seed": 0}


@pytest.fixture(scope="module")
def run_dir(tiny_checkpoints, tmp_path_factory) -> Path:
    """A tiny llama laid out as a prune leaves it: ``hf/`` with ``prune.json`` beside it."""
    root = tmp_path_factory.mktemp("imatrix-run")
    shutil.copytree(tiny_checkpoints["llama"], root / "hf")
    (root / "prune.json").write_text(json.dumps({"calibration": _CALIBRATION}))
    return root


@pytest.fixture(scope="module")
def auto_export(run_dir) -> Path:
    """q4_k_m with the default ``--imatrix`` (auto at 4 bits)."""
    return export_gguf(
        run_dir / "hf", run_dir / "gguf" / "m-q4_k_m.gguf", ExportGGUFConfig(type="q4_k_m")
    ).path


def _metadata(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith("quantize.")}


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    return {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def _loads_in_llama_cpp(path: Path) -> None:
    with open_model(path, n_ctx=64, logits_all=True) as model:  # every position's logits, not only the last
        logits = eval_logits(model, [1, 5, 9, 13, 17, 21])
    assert logits.shape[0] == 6 and np.isfinite(logits).all()


def test_every_quantizer_type_is_offered():
    for name in (
        "q2_k",
        "q3_k_s",
        "q3_k_m",
        "q3_k_l",
        "q4_0",
        "q4_k_s",
        "q5_k_m",
        "q6_k",
        "iq4_xs",
        "iq2_xxs",
    ):
        assert GGUF_TYPES[name].by_llama_cpp
    assert not any(GGUF_TYPES[name].by_llama_cpp for name in ("f32", "f16", "bf16", "q8_0"))
    assert [t for t in GGUF_TYPES if GGUF_TYPES[t].imatrix_by_default][:3] == ["q4_k_m", "q4_k_s", "q4_0"]
    assert not GGUF_TYPES["q5_k_m"].imatrix_by_default and not GGUF_TYPES["q8_0"].uses_imatrix


def test_imatrix_from_calibration_text_is_written_beside_and_used(auto_export, run_dir):
    matrix = imatrix_path_for(auto_export)
    assert matrix == run_dir / "gguf" / "m-q4_k_m.imatrix.gguf" and matrix.is_file()
    importance = read_imatrix(matrix)
    check_matches(importance, auto_export)
    # llama-imatrix saw every matmul weight of all 8 blocks, over the calibration text's chunks
    assert len(importance.entries) == 8 * 7 and importance.chunk_count >= 2
    assert importance.datasets == ("calibration.txt",)
    assert all((v > 0).all() for v in importance.entries.values())
    meta = _metadata(auto_export)
    assert meta["quantize.imatrix.file"] == matrix.name
    assert meta["quantize.imatrix.entries_count"] == 8 * 7
    _loads_in_llama_cpp(auto_export)
    plain = export_gguf(
        run_dir / "hf", run_dir / "plain-q4_k_m.gguf", ExportGGUFConfig(type="q4_k_m", imatrix="none")
    ).path
    assert "quantize.imatrix.file" not in _metadata(plain)
    with_matrix, without = _tensor_bytes(auto_export), _tensor_bytes(plain)
    assert with_matrix["token_embd.weight"] == without["token_embd.weight"]  # not a matmul: no entry
    # Q5_0 and Q4_0 weigh rounding errors by the matrix (the tiny model's rows are too narrow for
    # K-quants); Q8_0 ignores it.
    changed = [name for name in with_matrix if with_matrix[name] != without[name]]
    assert len(changed) >= 8 * 4 and all(name.startswith("blk.") for name in changed)


def test_the_same_export_twice_gives_the_same_bytes(auto_export, run_dir, tmp_path):
    again = export_gguf(run_dir / "hf", tmp_path / "m-q4_k_m.gguf", ExportGGUFConfig(type="q4_k_m")).path
    assert again.read_bytes() == auto_export.read_bytes()
    assert imatrix_path_for(again).read_bytes() == imatrix_path_for(auto_export).read_bytes()


def test_in_process_quantizer_matches_llama_quantize_with_the_same_matrix(auto_export, run_dir, tmp_path):
    """libllama called with our reading of the file == the llama-quantize binary reading it."""
    matrix = imatrix_path_for(auto_export)
    f32 = export_gguf(run_dir / "hf", tmp_path / "m-f32.gguf", ExportGGUFConfig(type="f32")).path
    shutil.copy(matrix, tmp_path / matrix.name)
    ours = export_gguf(
        run_dir / "hf",
        tmp_path / "ours.gguf",
        ExportGGUFConfig(type="q3_k_m", imatrix=str(tmp_path / matrix.name)),
    ).path
    done = subprocess.run(
        [str(find_tool("llama-quantize")), "--imatrix", matrix.name, f32.name, "theirs.gguf", "Q3_K_M", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-500:]
    assert _tensor_bytes(ours) == _tensor_bytes(tmp_path / "theirs.gguf")
    assert _metadata(ours) == _metadata(tmp_path / "theirs.gguf")


@pytest.mark.parametrize("gguf_type", ["q3_k_m", "q5_k_m", "q2_k", "iq4_xs"])
def test_a_type_llama_cpp_makes_exports_and_loads(gguf_type, run_dir, tmp_path, capsys):
    out = tmp_path / f"m-{gguf_type}.gguf"
    code = main(["export", "gguf", str(run_dir / "hf"), "--out", str(out), "--type", gguf_type])
    assert code == 0, capsys.readouterr().err
    assert describe_gguf(out)["block_count"] == 8
    # The default: a matrix at 4 bits and fewer, none above.
    assert imatrix_path_for(out).is_file() == GGUF_TYPES[gguf_type].imatrix_by_default
    _loads_in_llama_cpp(out)


def test_a_type_that_needs_a_matrix_is_refused_without_one(run_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    code = main(
        ["export", "gguf", str(run_dir / "hf"), "--out", str(out), "--type", "iq2_xxs", "--imatrix", "none"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "only with an importance matrix" in err and not out.exists()


def _export_with(
    run_dir: Path, out: Path, matrix: Path, capsys, gguf_type: str = "q4_k_m"
) -> tuple[int, str]:
    code = main(
        [
            "export",
            "gguf",
            str(run_dir / "hf"),
            "--out",
            str(out),
            "--type",
            gguf_type,
            "--imatrix",
            str(matrix),
        ]
    )
    return code, capsys.readouterr().err


def _one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_corrupt_matrix_is_one_line_exit_2(auto_export, run_dir, tmp_path, capsys):
    garbage = tmp_path / "garbage.dat"
    garbage.write_bytes(b"\x07\x00\x00\x00not an imatrix at all")
    assert "is not a readable importance matrix" in _one_line_error(
        *_export_with(run_dir, tmp_path / "a.gguf", garbage, capsys)
    )
    truncated = tmp_path / "truncated.imatrix.gguf"
    data = imatrix_path_for(auto_export).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert "importance matrix" in _one_line_error(
        *_export_with(run_dir, tmp_path / "b.gguf", truncated, capsys)
    )
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()


def _write_imatrix(path: Path, entries: dict[str, np.ndarray]) -> Path:
    writer = gguf.GGUFWriter(path, arch="imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", ["elsewhere.txt"])
    writer.add_uint32("imatrix.chunk_count", 4)
    writer.add_uint32("imatrix.chunk_size", 64)
    for name, sums in entries.items():
        writer.add_tensor(f"{name}.in_sum2", sums.astype(np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[256.0]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_matrix_of_another_model_is_one_line_exit_2(auto_export, run_dir, tmp_path, capsys):
    entries = read_imatrix(imatrix_path_for(auto_export)).entries
    # as if made for a deeper model: one more block
    deeper = entries | {"blk.8.attn_q.weight": entries["blk.7.attn_q.weight"]}
    line = _one_line_error(
        *_export_with(run_dir, tmp_path / "a.gguf", _write_imatrix(tmp_path / "deeper.gguf", deeper), capsys)
    )
    assert "does not match the model" in line and "blk.8.attn_q.weight" in line
    # as if made for a pruned one: fewer blocks
    shallower = {k: v for k, v in entries.items() if not k.startswith("blk.7.")}
    line = _one_line_error(
        *_export_with(
            run_dir, tmp_path / "b.gguf", _write_imatrix(tmp_path / "shallow.gguf", shallower), capsys
        )
    )
    assert "covers 7 blocks, the model has 8" in line
    # as if made for a wider model: one more input column in one weight
    up = entries["blk.0.ffn_up.weight"]
    wider = entries | {"blk.0.ffn_up.weight": np.concatenate([up, up[:1]])}
    line = _one_line_error(
        *_export_with(run_dir, tmp_path / "c.gguf", _write_imatrix(tmp_path / "wider.gguf", wider), capsys)
    )
    assert f"blk.0.ffn_up.weight has {up.size + 1} values, the model's rows are {up.size} wide" in line
    # as if made for a wider one
    wider = entries | {"blk.0.ffn_down.weight": np.ones(96, np.float32)}
    line = _one_line_error(
        *_export_with(run_dir, tmp_path / "c.gguf", _write_imatrix(tmp_path / "wide.gguf", wider), capsys)
    )
    assert "96 values" in line


def test_a_matrix_on_a_type_that_ignores_it_warns(auto_export, run_dir, tmp_path, capsys):
    code, err = _export_with(
        run_dir, tmp_path / "m.gguf", imatrix_path_for(auto_export), capsys, gguf_type="q8_0"
    )
    assert code == 0 and "q8_0 does not use an importance matrix" in err


def test_a_missing_llama_imatrix_names_the_make_target(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RMEXPORT_CACHE", str(tmp_path / "empty-cache"))
    code = main(
        ["export", "gguf", str(run_dir / "hf"), "--out", str(tmp_path / "m.gguf"), "--type", "q4_k_m"]
    )
    err = capsys.readouterr().err
    assert "llama-imatrix is not built" in _one_line_error(code, err)
    assert "hint: run `make llama-tools`" in err
    assert not (tmp_path / "m.gguf").exists()


def test_check_matches_accepts_its_own_model(auto_export):
    check_matches(read_imatrix(imatrix_path_for(auto_export)), auto_export)
    with pytest.raises(ConfigError):
        read_imatrix(auto_export.parent / "nothing-here.gguf")


def test_the_default_recipe_keeps_its_keys_as_a_stage_key(tmp_path):
    """The recipe is hashed into GGUF export stages' keys: its keys and their order never change."""
    from rmexport.imatrix_text import IMATRIX_CHUNKS, default_imatrix_recipe

    record = tmp_path / "prune.json"
    recipe = default_imatrix_recipe("q4_k_m", record)  # no record: a default prune's text
    assert list(recipe) == ["source", "documents", "seq_len", "seed", "chunks"]
    assert recipe["chunks"] == IMATRIX_CHUNKS
    record.write_text(json.dumps({"calibration": {"documents": 7, "seed": 3, "tokens": 99}}))
    read = default_imatrix_recipe("q4_k_m", record)
    assert read == recipe | {"documents": 7, "seed": 3} and list(read) == list(recipe)
    assert default_imatrix_recipe("f16", record) is None
