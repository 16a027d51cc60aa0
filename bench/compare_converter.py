"""Our GGUF writer vs llama.cpp's own ``convert_hf_to_gguf.py`` on the same checkpoint.

The converter ships in llama-cpp-python's source distribution (``vendor/llama.cpp``) together
with the ``gguf-py`` it needs; the sdist of the installed version is downloaded from PyPI once
and cached (``$RMEXPORT_CACHE/llama-cpp-python-src/<version>``). Both files are written as f32 and
compared on tensor names, shapes, types and values, metadata keys and values, and on how
llama.cpp tokenizes sample text with each.

Intended differences (``INTENDED_DIFFERENCES``) are listed with their reason; anything else is a
difference to explain. Run: ``python -m bench.compare_converter CKPT [--json FILE]`` (the first run
downloads the sdist).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from rmexport.errors import ToolchainError
from rmexport.log import get_logger

__all__ = ["INTENDED_DIFFERENCES", "compare_with_converter", "converter_source"]

log = get_logger(__name__)

# key -> why our file differs from the converter's there, on purpose.
INTENDED_DIFFERENCES: dict[str, str] = {
    "general.*": (
        "naming metadata: ours carries the source GGUF's general.* when the model came from one, "
        "else names the model after its folder; the converter derives names from the folder"
    ),
    "{arch}.rope.dimension_count": "written for every family (llama.cpp's default equals it)",
    "{arch}.attention.key_length": "written for every family (llama.cpp's default equals it)",
    "{arch}.attention.value_length": "written for every family (llama.cpp's default equals it)",
    "{arch}.vocab_size": "written for every family",
    "{arch}.attention.sliding_window_pattern": (
        "explicit per-layer sliding pattern for Gemma, so llama.cpp does not derive it from the layer index"
    ),
    "{arch}.rope.freq_base_swa": "Gemma 3 local rope base written explicitly (llama.cpp's default is 10000)",
    "tokenizer.ggml.add_eos_token": "we measure whether the HF tokenizer adds EOS and always state it",
    "tokenizer.ggml.add_bos_token": "we measure whether the HF tokenizer adds BOS and always state it",
    "tokenizer.ggml.add_sep_token": "converter-only",
    "general.quantization_version": "we always state it",
    "general.type": "we always state it",
}

_SAMPLES = (
    "Hello world! It's 2024; I'll pay $1,234.56 by 12/31.",
    "  spaces\tand\nnew lines  ",
    "Café ünïcödé 東京 🦙",
)


def _cache_root() -> Path:
    from rmexport.models import cache_dir

    return cache_dir() / "llama-cpp-python-src"


def converter_source(download: bool = True) -> Path:
    """``vendor/llama.cpp`` of the installed llama-cpp-python's sdist (downloaded once)."""
    import llama_cpp

    version = llama_cpp.__version__
    target = _cache_root() / version
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    env = os.environ.get("RMEXPORT_LLAMA_CPP_SRC")
    if env and (Path(env) / "convert_hf_to_gguf.py").is_file():
        return Path(env)
    if not download:
        raise ToolchainError(f"llama.cpp converter sources for llama-cpp-python {version} are not cached")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            scratch,
            f"llama-cpp-python=={version}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(scratch).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise ToolchainError(
                f"could not download the llama-cpp-python {version} sdist: {done.stderr.strip()[-300:]}",
                hint="set RMEXPORT_LLAMA_CPP_SRC to an unpacked vendor/llama.cpp",
            )
        staging = Path(scratch) / "src"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        with tarfile.open(archives[0]) as tar:
            members = []
            for m in tar.getmembers():
                parts = m.name.split("/", 3)
                if len(parts) == 4 and parts[1:3] == ["vendor", "llama.cpp"] and parts[3].startswith(wanted):
                    m.name = parts[3]
                    members.append(m)
            tar.extractall(staging, members=members, filter="data")
        os.replace(staging, target)
    return target


def _stage_checkpoint(checkpoint: Path, folder: Path) -> Path:
    """The checkpoint as links, minus a ``tokenizer.model`` that is not a SentencePiece model.

    (Checkpoints dequantized from GGUF by transformers carry a copy of the GGUF under that name,
    which the converter would try to parse as SentencePiece.)
    """
    staged = folder / checkpoint.name
    staged.mkdir()
    for item in checkpoint.iterdir():
        if item.name == "tokenizer.model" and item.read_bytes()[:4] == b"GGUF":
            continue
        (staged / item.name).symlink_to(item.resolve())
    return staged


def _run_converter(source: Path, checkpoint: Path, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(source / "gguf-py"), HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        str(source / "convert_hf_to_gguf.py"),
        str(checkpoint),
        "--outfile",
        str(out),
        "--outtype",
        "f32",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise ToolchainError(f"llama.cpp's converter failed: {done.stderr.strip()[-600:]}")


_TOKENIZE_SCRIPT = """
import json, sys
from rmexport import llamacpp as L
with L.open_model(sys.argv[1], n_ctx=64) as model:
    print(json.dumps([L.tokenize(model, t) for t in json.loads(sys.argv[2])]))
"""


def _tokenize_isolated(path: Path) -> list[list[int]] | str:
    """llama.cpp's tokens for the samples, in a child process: a bad vocab can abort libllama."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", _TOKENIZE_SCRIPT, str(path), json.dumps(list(_SAMPLES))],
        capture_output=True,
        text=True,
        cwd=root,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"llama.cpp failed to tokenize (exit {done.returncode}): {last[:200]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _values_equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return bool(np.isclose(float(a), float(b), rtol=1e-6))
    return a == b


def _tensors(path: Path) -> dict[str, Any]:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def compare_with_converter(checkpoint: str | Path, *, download: bool = True) -> dict[str, Any]:
    """Write ``checkpoint`` with both writers (f32) and list every difference."""
    from converters.gguf_export import export_gguf
    from converters.gguf_metadata import read_metadata

    source = converter_source(download=download)
    checkpoint = Path(checkpoint)
    with tempfile.TemporaryDirectory(prefix="rmexport-compare-") as scratch:
        folder = Path(scratch)
        ours_path = export_gguf(checkpoint, folder / "ours.gguf", "f32")
        theirs_path = folder / "theirs.gguf"
        _run_converter(source, _stage_checkpoint(checkpoint, folder), theirs_path)
        ours_meta, theirs_meta = read_metadata(str(ours_path)), read_metadata(str(theirs_path))
        arch = ours_meta["general.architecture"].value
        intended = {k.format(arch=arch): why for k, why in INTENDED_DIFFERENCES.items()}
        for key in set(ours_meta) | set(theirs_meta):
            if key.startswith("general.") and key not in intended:
                intended[key] = INTENDED_DIFFERENCES["general.*"]
        differing = sorted(
            k
            for k in set(ours_meta) & set(theirs_meta)
            if not _values_equal(ours_meta[k].value, theirs_meta[k].value)
        )
        ours_t, theirs_t = _tensors(ours_path), _tensors(theirs_path)
        tensor_shape_diffs = sorted(
            n for n in set(ours_t) & set(theirs_t) if list(ours_t[n].shape) != list(theirs_t[n].shape)
        )
        max_value_diff = max(
            (
                float(
                    np.abs(
                        np.asarray(ours_t[n].data, np.float32) - np.asarray(theirs_t[n].data, np.float32)
                    ).max()
                )
                for n in set(ours_t) & set(theirs_t)
                if n not in tensor_shape_diffs
            ),
            default=0.0,
        )
        tokenization = {
            label: _tokenize_isolated(path) for label, path in (("ours", ours_path), ("theirs", theirs_path))
        }
    only_ours = sorted(set(ours_meta) - set(theirs_meta))
    only_theirs = sorted(set(theirs_meta) - set(ours_meta))
    all_diffs = only_ours + only_theirs + differing
    unexplained = [k for k in all_diffs if k not in intended and not k.startswith("tokenizer.")]
    return {
        "checkpoint": str(checkpoint),
        "converter": str(source / "convert_hf_to_gguf.py"),
        "tensors_only_ours": sorted(set(ours_t) - set(theirs_t)),
        "tensors_only_theirs": sorted(set(theirs_t) - set(ours_t)),
        "tensor_shape_differences": tensor_shape_diffs,
        "tensor_max_abs_diff": max_value_diff,
        "metadata_only_ours": only_ours,
        "metadata_only_theirs": only_theirs,
        "metadata_differing": {
            k: {"ours": _short(ours_meta[k].value), "theirs": _short(theirs_meta[k].value)} for k in differing
        },
        "intended": {k: intended[k] for k in all_diffs if k in intended},
        "unexplained_metadata": unexplained,
        "tokenizer_differences": [k for k in all_diffs if k.startswith("tokenizer.")],
        "tokens_equal": ours_meta["tokenizer.ggml.tokens"].value
        == theirs_meta["tokenizer.ggml.tokens"].value,
        "tokenization_ours": tokenization["ours"],
        "tokenization_theirs": tokenization["theirs"],
        "tokenization_equal": tokenization["ours"] == tokenization["theirs"],
    }


def _short(value: Any) -> Any:
    if isinstance(value, list) and len(value) > 8:
        return f"list of {len(value)}"
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    result = compare_with_converter(args.checkpoint)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if not result["unexplained_metadata"] and not result["tensor_shape_differences"] else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
