"""Bad input, every subcommand: exit 2, at most two lines on stderr, no traceback, nothing written.

One table of cases run in-process through ``rmexport.cli.main``. Inputs (broken checkpoints,
GGUF and ONNX files, text files) are made once per module; each case gets its own output folder,
and the listing of both folders must be the same before and after. ``test_prune_and_run_checks``
calls ``rmexport.inputs.check_prune_args``/``check_run_args`` directly on every prune and run case.
Then interruptions: SIGKILL and SIGINT while a real
``rmexport`` process writes, after which the next run leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rmexport.atomic import STAGING_PREFIX, finalize_modes, remove_stale_staging, staged_dir, umask
from rmexport.cli import build_parser, main
from rmexport.errors import RMExportError
from rmexport.lock import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
# Small enough that a case which today runs to the end (the xfail ones) still takes seconds.
PRUNE_FAST = "--calib-samples 16 --seq-len 32 --eval-tokens 512 --ood-tokens 512"
RUN_FAST = PRUNE_FAST + " --skip-onnx --skip-bench"
RUN_LIGHT = RUN_FAST + " --skip-gguf"


# --- inputs ---------------------------------------------------------------------------------
def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _fake_onnx(folder: Path, reference: Path, n_layers: int, *, external: str | None = None) -> Path:
    """An export folder whose graph has the interface of a decoder with ``n_layers`` blocks."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir()
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])]
    for i in range(n_layers):
        for kv in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kv}", TensorProto.FLOAT, ["b", 2, "p", 16]
                )
            )
    initializers = []
    if external:
        weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external), ("offset", "0"), ("length", "16")):
            entry = weight.external_data.add()
            entry.key, entry.value = key, value
        initializers.append(weight)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["logits"])],
        "decoder",
        inputs,
        [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])],
        initializer=initializers,
    )
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(reference / name, folder / name)
    return folder


def _drop_blocks(src: Path, dst: Path, keep: int) -> Path:
    """A consistent checkpoint with only the first ``keep`` blocks of ``src``."""
    from safetensors.torch import load_file, save_file

    _copy_checkpoint(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    kept = {
        k: v
        for k, v in tensors.items()
        if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= keep)
    }
    save_file(kept, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["num_hidden_layers"] = keep
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def hold_in_child(folder: Path) -> subprocess.Popen:
    """A live process (not this one) holding ``folder`` with rmexport's run lock, until killed."""
    code = "import sys, time\nfrom rmexport.lock import hold_folder\nwith hold_folder(sys.argv[1]):\n"
    code += "    print('held', flush=True)\n    time.sleep(3600)\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)],
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_checkpoints, builtin_corpus) -> Iterator[dict[str, str]]:
    """Name -> path of every (mostly broken) input the table refers to, as ``{name}``."""
    from converters.gguf_export import export_gguf

    root = tmp_path_factory.mktemp("fuzz-inputs")
    llama = tiny_checkpoints["llama"]
    rng = __import__("random").Random(16)
    p: dict[str, Path] = {"llama": llama, "qwen2": tiny_checkpoints["qwen2"]}

    p["nocfg"] = root / "nocfg"
    p["nocfg"].mkdir()
    (p["nocfg"] / "README.md").write_text("not a model\n")
    p["badjson"] = _copy_checkpoint(llama, root / "badjson")
    (p["badjson"] / "config.json").write_text('{"model_type": "llama", ')
    p["gpt2"] = _copy_checkpoint(llama, root / "gpt2")
    (p["gpt2"] / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 8})
    )
    p["alien"] = _copy_checkpoint(llama, root / "alien")
    (p["alien"] / "config.json").write_text(
        json.dumps(
            {"model_type": "frobnicator", "architectures": ["FrobForCausalLM"], "num_hidden_layers": 8}
        )
    )
    p["trunc"] = _copy_checkpoint(llama, root / "trunc")
    weights = p["trunc"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    p["garbage"] = _copy_checkpoint(llama, root / "garbage")
    (p["garbage"] / "model.safetensors").write_bytes(rng.randbytes(4096))
    p["zerost"] = _copy_checkpoint(llama, root / "zerost")
    (p["zerost"] / "model.safetensors").write_bytes(b"")
    p["noweights"] = _copy_checkpoint(llama, root / "noweights")
    (p["noweights"] / "model.safetensors").unlink()
    p["notok"] = _copy_checkpoint(llama, root / "notok")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (p["notok"] / name).unlink(missing_ok=True)
    p["shards"] = _copy_checkpoint(llama, root / "shards")
    with safe_open(str(llama / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    (p["shards"] / "model.safetensors").rename(p["shards"] / "model-00001-of-00002.safetensors")
    weight_map = {n: ("model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors")
                  for i, n in enumerate(names)}  # fmt: skip
    (p["shards"] / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    p["edited"] = _copy_checkpoint(llama, root / "edited")
    config = json.loads((llama / "config.json").read_text())
    (p["edited"] / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 6}))
    p["l6"] = _drop_blocks(llama, root / "l6", 6)

    p["gguf"] = export_gguf(llama, root / "llama-f32.gguf", type="f32")
    data = p["gguf"].read_bytes()
    p["gguf_empty"] = root / "empty.gguf"
    p["gguf_empty"].write_bytes(b"")
    p["gguf_random"] = root / "random.gguf"
    p["gguf_random"].write_bytes(rng.randbytes(100_000))
    p["gguf_half"] = root / "half.gguf"
    p["gguf_half"].write_bytes(data[: len(data) // 2])
    p["gguf_header"] = root / "header-only.gguf"
    p["gguf_header"].write_bytes(data[:200])
    p["gguf_v99"] = root / "v99.gguf"
    p["gguf_v99"].write_bytes(data[:4] + (99).to_bytes(4, "little") + data[8:])
    p["gguf_dir"] = root / "folder.gguf"
    p["gguf_dir"].mkdir()

    p["onnx"] = _fake_onnx(root / "onnx8", llama, 8)
    p["onnx_nomodel"] = root / "onnx_nomodel"
    p["onnx_nomodel"].mkdir()
    shutil.copy(llama / "config.json", p["onnx_nomodel"] / "config.json")
    p["onnx_random"] = _fake_onnx(root / "onnx_random", llama, 8)
    (p["onnx_random"] / "model.onnx").write_bytes(rng.randbytes(5000))
    p["onnx_empty"] = _fake_onnx(root / "onnx_empty", llama, 8)
    (p["onnx_empty"] / "model.onnx").write_bytes(b"")
    p["onnx_noext"] = _fake_onnx(root / "onnx_noext", llama, 8, external="model.onnx_data")
    p["onnx_nokv"] = _fake_onnx(root / "onnx_nokv", llama, 0)

    documents = [d for d in builtin_corpus.pool if isinstance(d, str)]
    p["txt_random"] = root / "random.txt"
    p["txt_random"].write_bytes(rng.randbytes(50_000))
    p["txt_empty"] = root / "empty.txt"
    p["txt_empty"].write_text("\n\n   \n")
    p["txt_symbols"] = root / "symbols.txt"
    p["txt_symbols"].write_text(
        "\n\n".join(
            f"{i}.{i * 7 % 13} + {i * 3} = {i * 11}; (x={i}) #$% 2024-11-{i % 28:02d}" for i in range(60)
        )
    )
    p["txt_base64"] = root / "base64.txt"
    p["txt_base64"].write_text(
        "\n\n".join(__import__("base64").b64encode(rng.randbytes(600)).decode() for _ in range(60))
    )
    p["txt_few"] = root / "few.txt"
    p["txt_few"].write_text("\n\n".join(documents[:5]))
    p["txt_one"] = root / "one.txt"
    p["txt_one"].write_text(documents[0])
    p["jsonl_bad"] = root / "bad.jsonl"
    p["jsonl_bad"].write_text('{"text": "fine"}\n{"text": broken\n')
    p["jsonl_nofield"] = root / "nofield.jsonl"
    p["jsonl_nofield"].write_text("\n".join(json.dumps({"body": d}) for d in documents[:40]))
    p["txt_dir"] = root / "texts.txt"
    p["txt_dir"].mkdir()

    p["file"] = root / "regular-file"
    p["file"].write_text("just a file\n")
    p["readme"] = root / "README.md"
    p["readme"].write_text("# notes\n")
    p["held"] = root / "held"  # an out-root whose run folder for {llama} a live process holds
    holder = hold_in_child(p["held"] / "llama-r0.25")
    yield {k: str(v) for k, v in p.items()} | {"root": str(root)}
    holder.kill()
    holder.wait()


# --- the table ------------------------------------------------------------------------------
# case(id, command line with {input} and {out} placeholders, fragment of the error, marks...)
def case(case_id: str, command: str, fragment: str, *marks) -> pytest.param:
    return pytest.param(command, fragment, id=case_id, marks=marks)


CASES = [
    # prune
    case("prune-unknown-alias", "prune llama9-1t --out {out}/p", "unknown model"),
    case("prune-missing-path", "prune {out}/nowhere/model --out {out}/p", "not found"),
    case("prune-dir-without-config", "prune {nocfg} --out {out}/p", "no config.json"),
    case("prune-config-not-json", "prune {badjson} --out {out}/p", "config.json"),
    case("prune-unsupported-family", "prune {gpt2} --out {out}/p", "GPT2LMHeadModel"),
    case("prune-unknown-model-type", "prune {alien} --out {out}/p", "supported families"),
    case("prune-truncated-weights", "prune {trunc} --out {out}/p", "corrupt or truncated"),
    case("prune-config-blocks-vs-weights", "prune {edited} --out {out}/p", "weights hold 8"),
    case("prune-ratio-out-of-range", "prune {llama} --out {out}/p --ratio 1.5", "out of range"),
    case("prune-ratio-nan", "prune {llama} --out {out}/p --ratio nan", "--ratio"),
    case("prune-layers-too-many", "prune {llama} --out {out}/p --layers 40", "only 8 blocks"),
    case("prune-layers-zero", "prune {llama} --out {out}/p --layers 0", "--layers must be at least 1"),
    case("prune-blocks-too-many", "prune {llama} --out {out}/p --blocks 5", "cannot split"),
    case("prune-alpha-negative", "prune {llama} --out {out}/p --alpha -1", "--alpha"),
    case("prune-calib-samples-zero", "prune {llama} --out {out}/p --calib-samples 0", "--calib-samples"),
    case("prune-survey-samples-zero", "prune {llama} --out {out}/p --survey-samples 0", "--survey-samples"),
    case("prune-batch-size-zero", "prune {llama} --out {out}/p --batch-size 0", "--batch-size"),
    case("prune-seq-len-one", "prune {llama} --out {out}/p --seq-len 1", "--seq-len"),
    case("prune-eval-tokens-short", "prune {llama} --out {out}/p --eval-tokens 100", "--eval-tokens"),
    case("prune-calib-samples-not-int", "prune {llama} --out {out}/p --calib-samples many", "invalid int"),
    case("prune-calib-missing", "prune {llama} --out {out}/p --calib-data {out}/none.txt", "not found"),
    case("prune-calib-random-bytes", "prune {llama} --out {out}/p --calib-data {txt_random}", "not UTF-8"),
    case("prune-calib-empty", "prune {llama} --out {out}/p --calib-data {txt_empty}", "empty"),
    case("prune-calib-symbols", "prune {llama} --out {out}/p --calib-data {txt_symbols}", "letters"),
    case("prune-calib-base64", "prune {llama} --out {out}/p --calib-data {txt_base64}", "usable"),
    case("prune-calib-too-few", "prune {llama} --out {out}/p --calib-data {txt_few}", "asks for 16"),
    case("prune-calib-bad-jsonl", "prune {llama} --out {out}/p --calib-data {jsonl_bad}", "not valid JSON"),
    case("prune-calib-jsonl-no-text", "prune {llama} --out {out}/p --calib-data {jsonl_nofield}", "'text'"),
    case("prune-calib-folder", "prune {llama} --out {out}/p --calib-data {txt_dir}", "folder"),
    case("prune-eval-one-document", "prune {llama} --out {out}/p --eval-data {txt_one}", "document"),
    case("prune-out-parent-is-file", "prune {llama} --out {file}/p", "cannot write"),
    case("prune-out-is-file", "prune {llama} --out {file}", "cannot write"),
    case("prune-out-foreign-folder", "prune {llama} --out {foreign}", "did not write"),
    case(
        "prune-memory-budget-tiny", "prune {llama} --out {out}/p --memory-budget 1KB", "smallest that works"
    ),
    case("prune-memory-budget-unreadable", "prune {llama} --out {out}/p --memory-budget lots", "memory size"),
    case(
        "prune-gguf-memory-budget-below-one-block",
        "prune {gguf} --out {out}/p --memory-budget 200KB",
        "smallest that works",
    ),
    case("prune-hub-offline-not-cached", "prune llama3-8b --out {out}/p", "not in the local"),
    case("prune-retries-negative", "prune {llama} --out {out}/p --retries -1", "--retries"),
    case("prune-device-without-cuda", "prune {llama} --out {out}/p --device cuda", "CUDA", NO_CUDA),
    case("prune-device-nonsense", "prune {llama} --out {out}/p --device toaster", "torch device"),
    # export onnx
    case("onnx-export-missing-checkpoint", "export onnx {out}/none --out {out}/o", "not found"),
    case("onnx-export-no-config", "export onnx {nocfg} --out {out}/o", "no config.json"),
    case("onnx-export-truncated-weights", "export onnx {trunc} --out {out}/o", "corrupt or truncated"),
    case("onnx-export-unknown-model-type", "export onnx {alien} --out {out}/o", "supported families"),
    case("onnx-export-no-tokenizer", "export onnx {notok} --out {out}/o", "tokenizer"),
    case("onnx-export-out-parent-is-file", "export onnx {llama} --out {file}/o", "is a file"),
    case("onnx-export-out-is-file", "export onnx {llama} --out {file}", "not a folder"),
    case("onnx-export-out-foreign-folder", "export onnx {llama} --out {foreign}", "did not write"),
    case("onnx-export-out-is-input", "export onnx {llama} --out {llama}", "did not write"),
    case("onnx-export-int4-optimum", "export onnx {llama} --out {out}/o --precision int4", "genai"),
    # export gguf
    case("gguf-export-truncated-weights", "export gguf {trunc} --out {out}/m.gguf", "corrupt or truncated"),
    case("gguf-export-random-weights", "export gguf {garbage} --out {out}/m.gguf", "corrupt or truncated"),
    case("gguf-export-empty-weights", "export gguf {zerost} --out {out}/m.gguf", "corrupt or truncated"),
    case("gguf-export-no-weights", "export gguf {noweights} --out {out}/m.gguf", "safetensors"),
    case("gguf-export-missing-shard", "export gguf {shards} --out {out}/m.gguf", "missing"),
    case("gguf-export-config-not-json", "export gguf {badjson} --out {out}/m.gguf", "not valid JSON"),
    case("gguf-export-unknown-model-type", "export gguf {alien} --out {out}/m.gguf", "supported families"),
    case("gguf-export-blocks-vs-weights", "export gguf {edited} --out {out}/m.gguf", "weights hold 8"),
    case(
        "gguf-export-hub-id-offline", "export gguf someone/not-cached --out {out}/m.gguf", "local checkpoint"
    ),
    case("gguf-export-out-is-folder", "export gguf {llama} --out {foreign}", "is a folder"),
    case("gguf-export-out-parent-is-file", "export gguf {llama} --out {file}/m.gguf", "is a file"),
    case("gguf-export-out-not-gguf", "export gguf {llama} --out {readme}", "not a GGUF file"),
    case("gguf-export-out-is-source", "export gguf {gguf} --out {gguf}", "overwrite the input"),
    case("gguf-export-missing-out", "export gguf {llama}", "--out"),
    case("gguf-export-bad-type", "export gguf {llama} --out {out}/m.gguf --type q3_weird", "invalid choice"),
    # validate gguf
    case("gguf-validate-empty-file", "validate gguf {gguf_empty} --reference {llama}", "empty"),
    case("gguf-validate-random-bytes", "validate gguf {gguf_random} --reference {llama}", "wrong magic"),
    case("gguf-validate-half-file", "validate gguf {gguf_half} --reference {llama}", "truncated"),
    case("gguf-validate-header-only", "validate gguf {gguf_header} --reference {llama}", "truncated"),
    case("gguf-validate-version-99", "validate gguf {gguf_v99} --reference {llama}", "version 99"),
    case("gguf-validate-folder", "validate gguf {gguf_dir} --reference {llama}", "is a folder"),
    case("gguf-validate-missing", "validate gguf {out}/none.gguf --reference {llama}", "not found"),
    case("gguf-validate-prompts-zero", "validate gguf {gguf} --reference {llama} --prompts 0", "--prompts"),
    case(
        "gguf-validate-new-tokens-zero",
        "validate gguf {gguf} --reference {llama} --new-tokens 0",
        "--new-tokens",
    ),
    case("gguf-validate-threads-zero", "validate gguf {gguf} --reference {llama} --threads 0", "--threads"),
    case("gguf-validate-fewer-blocks", "validate gguf {gguf} --reference {l6}", "different models"),
    case("gguf-validate-other-family", "validate gguf {gguf} --reference {qwen2}", "different models"),
    case("gguf-validate-reference-missing", "validate gguf {gguf} --reference {out}/none", "not found"),
    case(
        "gguf-validate-reference-truncated",
        "validate gguf {gguf} --reference {trunc}",
        "corrupt or truncated",
    ),
    case("gguf-validate-reference-is-file", "validate gguf {gguf} --reference {gguf}", "is a file"),
    case(
        "gguf-validate-json-is-folder",
        "validate gguf {gguf} --reference {llama} --json {foreign}",
        "is a folder",
    ),
    # validate onnx
    case("onnx-validate-missing", "validate onnx {out}/none --reference {llama}", "not found"),
    case("onnx-validate-no-model", "validate onnx {onnx_nomodel} --reference {llama}", "no model.onnx"),
    case(
        "onnx-validate-random-model", "validate onnx {onnx_random} --reference {llama}", "not a readable ONNX"
    ),
    case("onnx-validate-empty-model", "validate onnx {onnx_empty} --reference {llama}", "empty"),
    case(
        "onnx-validate-missing-external-data",
        "validate onnx {onnx_noext} --reference {llama}",
        "external data",
    ),
    case("onnx-validate-not-a-decoder", "validate onnx {onnx_nokv} --reference {llama}", "KV cache"),
    case("onnx-validate-fewer-blocks", "validate onnx {onnx} --reference {l6}", "different models"),
    case("onnx-validate-prompts-zero", "validate onnx {onnx} --reference {llama} --prompts 0", "--prompts"),
    case(
        "onnx-validate-reference-truncated",
        "validate onnx {onnx} --reference {trunc}",
        "corrupt or truncated",
    ),
    # bench onnx
    case("onnx-bench-original-missing", "bench onnx --original {out}/none --pruned {onnx}", "not found"),
    case("onnx-bench-pruned-empty-model", "bench onnx --original {onnx} --pruned {onnx_empty}", "empty"),
    case("onnx-bench-pruned-is-file", "bench onnx --original {onnx} --pruned {file}", "is a file"),
    case(
        "onnx-bench-eval-tokens-zero",
        "bench onnx --original {onnx} --pruned {onnx} --eval-tokens 0",
        "--eval-tokens",
    ),
    case("onnx-bench-runs-zero", "bench onnx --original {onnx} --pruned {onnx} --runs 0", "--runs"),
    case("onnx-bench-window-zero", "bench onnx --original {onnx} --pruned {onnx} --window 0", "--window"),
    case(
        "onnx-bench-json-parent-is-file",
        "bench onnx --original {onnx} --pruned {onnx} --json {file}/r.json",
        "is a file",
    ),
    # bench gguf
    case("gguf-bench-original-random", "bench gguf --original {gguf_random} --pruned {gguf}", "wrong magic"),
    case("gguf-bench-pruned-half", "bench gguf --original {gguf} --pruned {gguf_half}", "truncated"),
    case(
        "gguf-bench-pruned-truncated-ckpt",
        "bench gguf --original {gguf} --pruned {trunc}",
        "corrupt or truncated",
    ),
    case(
        "gguf-bench-unknown-type", "bench gguf --original {gguf} --pruned {gguf} --types q3_weird", "q3_weird"
    ),
    case(
        "gguf-bench-eval-tokens-zero",
        "bench gguf --original {gguf} --pruned {gguf} --eval-tokens 0",
        "--eval-tokens",
    ),
    case("gguf-bench-repeats-zero", "bench gguf --original {gguf} --pruned {gguf} --repeats 0", "--repeats"),
    case(
        "gguf-bench-threads-negative",
        "bench gguf --original {gguf} --pruned {gguf} --threads -1",
        "threads >= 0",
    ),
    case(
        "gguf-bench-work-dir-is-file",
        "bench gguf --original {gguf} --pruned {llama} --work-dir {file}",
        "not a folder",
    ),
    # run
    case("run-unknown-model", "run no-such-model --out-root {out}/r", "unknown model"),
    case("run-gguf-type", "run {llama} --out-root {out}/r --gguf-type q3_weird " + RUN_FAST, "--gguf-type"),
    case(
        "run-ratio-leaves-one",
        "run {llama} --out-root {out}/r --ratio 0.9 " + RUN_LIGHT,
        "at least 2 must remain",
    ),
    case("run-out-root-is-file", "run {llama} --out-root {file} " + RUN_LIGHT, "cannot write"),
    case("run-layers-too-many", "run {llama} --out-root {out}/r --layers 40 " + RUN_LIGHT, "only 8 blocks"),
    case(
        "run-calib-samples-zero",
        "run {llama} --out-root {out}/r " + RUN_LIGHT + " --calib-samples 0",
        "--calib-samples",
    ),
    case(
        "run-calib-random-bytes",
        "run {llama} --out-root {out}/r --calib-data {txt_random} " + RUN_LIGHT,
        "not UTF-8",
    ),
    case(
        "run-eval-random-bytes",
        "run {llama} --out-root {out}/r --eval-data {txt_random} " + RUN_LIGHT,
        "not UTF-8",
    ),
    case(
        "run-memory-budget-below-one-block",
        "run {llama} --out-root {out}/r --memory-budget 100KB " + RUN_LIGHT,
        "smallest that works",
    ),
    case("run-hub-offline-not-cached", "run someone/not-cached --out-root {out}/r", "not in the local"),
    case("run-out-root-held-by-live-run", "run {llama} --out-root {held} " + RUN_LIGHT, "in use by another"),
    case("run-truncated-weights", "run {trunc} --out-root {out}/r " + RUN_LIGHT, "corrupt or truncated"),
    case(
        "run-eval-tokens-zero",
        "run {llama} --out-root {out}/r " + RUN_LIGHT + " --eval-tokens 0",
        "--eval-tokens",
    ),
]


def _argv(template: str, inputs: dict[str, str], out: Path) -> list[str]:
    """The case's command line; ``{foreign}`` is a folder of someone else's files in ``out``."""
    if "{foreign}" in template:
        (out / "foreign").mkdir()
        (out / "foreign" / "thesis.tex").write_text("\\documentclass{article}\n")
        inputs = inputs | {"foreign": str(out / "foreign")}
    command = template.split()
    # Small calibration for every prune, before the case's own options (argparse: last one wins).
    if command[0] == "prune":
        command[1:1] = PRUNE_FAST.split()
    return [part.format(out=out, **inputs) for part in command]


def _listing(*roots: Path) -> dict[str, tuple]:
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            st = path.lstat()
            found[str(path)] = (path.is_dir(), st.st_size, st.st_mtime_ns, st.st_mode)
    return found


def one_line_error(err: str) -> str:
    """The one error line (and its hint) that end what a command printed on stderr."""
    lines = err.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1 and errors[0] >= len(lines) - 2, err
    return lines[errors[0]]


@pytest.mark.parametrize(("template", "fragment"), CASES)
def test_bad_input(template, fragment, inputs, tmp_path, capsys):
    argv = _argv(template, inputs, tmp_path)
    before = _listing(tmp_path, Path(inputs["root"]))
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2, err
    assert fragment in err, err
    assert _listing(tmp_path, Path(inputs["root"])) == before


def _command(template: str) -> str:
    words = template.split()
    return " ".join(words[:2]) if words[0] in ("export", "validate", "bench") else words[0]


def test_table_covers_every_subcommand():
    every = {"prune", "run", "export onnx", "export gguf", "validate onnx", "validate gguf"}
    every |= {"bench onnx", "bench gguf"}
    assert {_command(c.values[0]) for c in CASES} == every
    assert len(CASES) >= 40


# The same prune and run cases, checked by the check functions alone (no xfail: they work now).
CHECKED_NOW = [
    pytest.param(*c.values, id=c.id, marks=list(c.marks))
    for c in CASES
    if _command(c.values[0]) in ("prune", "run")
]


def _check_prune_or_run(args):
    """The check of ``prune`` or ``run`` on the typed config the CLI builds from ``args``."""
    from rmexport.commands.prune import prune_config
    from rmexport.commands.run import run_config
    from rmexport.inputs import check_prune_args, check_run_args

    if args.command == "prune":
        return check_prune_args(prune_config(args))
    return check_run_args(run_config(args))


@pytest.mark.parametrize(("template", "fragment"), CHECKED_NOW)
def test_prune_and_run_checks(template, fragment, inputs, tmp_path, capsys):
    """``check_prune_args``/``check_run_args`` alone already refuse every prune and run case."""
    argv = _argv(template, inputs, tmp_path)
    before = _listing(tmp_path, Path(inputs["root"]))
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as e:  # a usage error: argparse's own, already one line
        assert e.code == 2
        return
    with pytest.raises(RMExportError) as caught:
        _check_prune_or_run(args)
    assert caught.value.exit_code == 2
    text = f"{caught.value}\n{caught.value.hint or ''}"
    assert "\n" not in str(caught.value)
    assert fragment in text, text
    assert _listing(tmp_path, Path(inputs["root"])) == before
    capsys.readouterr()


def test_good_prune_and_run_arguments_pass_the_checks(inputs, tmp_path):
    for argv in (
        _argv("prune {llama} --out {out}/p", inputs, tmp_path),
        _argv("run {llama} --out-root {out}/r " + RUN_FAST, inputs, tmp_path),
    ):
        args = build_parser(argv).parse_args(argv)
        source = _check_prune_or_run(args)
        assert source.n_layers == 8 and source.family == "llama"
    assert not any(tmp_path.iterdir())


# --- staging, modes, interruptions ----------------------------------------------------------
def test_staging_is_removed_on_error_and_modes_follow_umask(tmp_path):
    target = tmp_path / "new" / "deeper" / "export"
    with pytest.raises(RuntimeError), staged_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("conversion failed")
    assert not any(tmp_path.iterdir()), "staging and the folders made for it are gone"
    with staged_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"x")
        os.chmod(tmp / "sub" / "weights.bin", 0o600)
    mask = umask()
    assert (target.stat().st_mode & 0o777) == 0o777 & ~mask
    assert ((target / "sub" / "weights.bin").stat().st_mode & 0o777) == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["export"]


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(done.stdout)


def test_stale_staging_is_removed_live_staging_is_kept(tmp_path):
    stale = tmp_path / f"{STAGING_PREFIX}{_dead_pid()}-model.gguf.abc"
    live = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-model.gguf.def"
    stale.write_bytes(b"half")
    live.write_bytes(b"being written")
    assert remove_stale_staging(tmp_path) == [stale]
    assert live.exists() and not stale.exists()
    finalize_modes(live)  # a file works too


def test_remove_partial_outputs_reaches_subfolders(tmp_path):
    from rmexport.stages import remove_partial_outputs

    dead = _dead_pid()
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / f"{STAGING_PREFIX}{dead}-m.gguf.x").write_bytes(b"half")
    (tmp_path / ".hf.interrupted").mkdir()
    (tmp_path / "hf").mkdir()
    removed = remove_partial_outputs(tmp_path)
    assert len(removed) == 2
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["gguf", "hf"]


# Interruptions at named moments: the stage runner, the prune's stages and every atomic write
# signal their own process when RMEXPORT_SIGNAL_AT names them (rmexport.hooks), so each test
# interrupts exactly where it says, however fast the machine.
def _start(argv: list[str], signal_at: str, sig: str = "KILL") -> subprocess.Popen:
    env = os.environ | {
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "RMEXPORT_SIGNAL_AT": signal_at,
        "RMEXPORT_SIGNAL": sig,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "rmexport.cli", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _staging(folder: Path) -> list[Path]:
    return list(folder.glob(STAGING_PREFIX + "*")) if folder.is_dir() else []


def _main_interrupted(argv: list[str], moment: str, monkeypatch) -> int:
    """``main(argv)`` in this process, sent SIGINT by itself on reaching ``moment``. Python's own
    SIGINT handler is installed for it: a suite started in the background inherits SIGINT ignored."""
    monkeypatch.setenv("RMEXPORT_SIGNAL_AT", moment)
    monkeypatch.setenv("RMEXPORT_SIGNAL", "INT")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main(argv)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.delenv("RMEXPORT_SIGNAL_AT")
    return code


def test_export_gguf_killed_mid_write_next_run_leaves_nothing(tmp_path, tiny_checkpoints, capsys):
    """SIGKILL once the whole file is written but before its rename: the target never appears,
    and the next run removes the dead process's staging file."""
    out = tmp_path / "gguf" / "model.gguf"
    argv = ["export", "gguf", str(tiny_checkpoints["llama"]), "--out", str(out), "--type", "f16"]
    proc = _start(argv, "wrote:model.gguf")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    staged = _staging(out.parent)
    assert len(staged) == 1 and staged[0].stat().st_size > 0 and not out.exists()
    assert main(argv) == 0
    capsys.readouterr()
    assert [p.name for p in out.parent.iterdir()] == ["model.gguf"], "the stale staging file is gone"
    assert (out.stat().st_mode & 0o777) == 0o666 & ~umask()


# gguf-py's writer can lose its file object to a KeyboardInterrupt between open() and storing it;
# the garbage collector closes it (the file itself is removed by the staging cleanup).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("moment", ["write:model.gguf", "wrote:model.gguf"])
def test_export_gguf_interrupted_cleans_up_at_once(moment, tmp_path, tiny_checkpoints, capsys, monkeypatch):
    """Ctrl-C as the q4_k_m file's staging appears, and once it is complete (the float32
    intermediate and llama.cpp's quantizer done): exit 130, nothing left, not even the folder."""
    out = tmp_path / "gguf" / "model.gguf"
    argv = ["export", "gguf", str(tiny_checkpoints["llama"]), "--out", str(out), "--type", "q4_k_m"]
    assert _main_interrupted(argv, moment, monkeypatch) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"
    assert not any(tmp_path.iterdir()), "neither the file nor the folder made for it is left"


PRUNE_ARGS = PRUNE_FAST.split() + ["--ratio", "0.5", "--ood-data", "none", "--selection-samples", "8"]


def _check_pruned(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["hf", "maps.safetensors", "prune.json"]
    assert [p.name for p in out.parent.iterdir()] == [out.name], "no staging or temporary is left"
    mask = umask()
    assert ((out / "hf").stat().st_mode & 0o777) == 0o777 & ~mask
    assert ((out / "hf" / "model.safetensors").stat().st_mode & 0o777) == 0o666 & ~mask


def test_prune_killed_leaves_nothing_after_next_run(tmp_path, tiny_checkpoints, capsys):
    """SIGKILL during calibration and with the pruned checkpoint written but not renamed (two
    processes at once): no output appears (the folder holds only the dead prune's lock, which the
    next one takes over), and after the next run the folder holds exactly hf/, the maps and
    prune.json, no staging and no lock left."""
    moments = {"calibrate": "calibrate", "save": "wrote:hf"}
    argv = {name: ["prune", str(tiny_checkpoints["llama"]), "--out", str(tmp_path / name / "pruned"),
                   *PRUNE_ARGS] for name in moments}  # fmt: skip
    procs = {name: _start(argv[name], moment) for name, moment in moments.items()}
    for proc in procs.values():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == -signal.SIGKILL, err
    killed_early = tmp_path / "calibrate" / "pruned"
    assert [p.name for p in killed_early.iterdir()] == [LOCK_NAME], "killed before its save: no output"
    out = tmp_path / "save" / "pruned"
    assert len(_staging(out)) == 1, "the finished checkpoint was still in its staging folder"
    assert not (out / "hf").exists() and not (out / "prune.json").exists()
    for name in moments:
        assert main(argv[name]) == 0
        capsys.readouterr()
        _check_pruned(tmp_path / name / "pruned")


@pytest.mark.parametrize("moment", ["calibrate", "save", "wrote:hf", "wrote:prune.json"])
def test_prune_interrupted_leaves_nothing(moment, tmp_path, tiny_checkpoints, capsys, monkeypatch):
    """SIGINT (Ctrl-C) during calibration, as the save starts, with the checkpoint written but not
    renamed, and with prune.json written but not renamed: exit 130, nothing left behind at once."""
    out = tmp_path / "pruned"
    argv = ["prune", str(tiny_checkpoints["llama"]), "--out", str(out), *PRUNE_ARGS]
    assert _main_interrupted(argv, moment, monkeypatch) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"
    assert not any(tmp_path.iterdir()), "an interrupted prune leaves nothing behind"


def test_run_interrupted_at_a_stage_keeps_finished_stages(tmp_path, tiny_checkpoints, capsys, monkeypatch):
    """Ctrl-C as the stage runner starts the GGUF export: exit 130, the lock is released, the
    prune stays (whole) and the next run reuses it."""
    root = tmp_path / "runs"
    argv = ["run", str(tiny_checkpoints["llama"]), "--out-root", str(root), *RUN_FAST.split()]
    assert _main_interrupted(argv, "export_gguf_f16", monkeypatch) == 130
    run_dir = root / "llama-r0.25"
    assert not (run_dir / ".rmexport.lock").exists() and not (run_dir / "gguf").exists()
    assert (run_dir / ".stages" / "prune.json").is_file()
    capsys.readouterr()
    main(argv)
    report = json.loads((run_dir / "report.json").read_text())
    assert "prune" in report["reused_stages"] and "export_gguf_f16" not in report["reused_stages"]
