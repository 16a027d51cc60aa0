"""``rmexport run`` end to end on a Llama-3-8B-shaped checkpoint with random bf16 weights.

The checkpoint (16 GB) is written one shard (≈ 4 blocks) at a time, never whole in memory, then
``rmexport run`` prunes it under a memory budget far below its size, writes a q4_k_m GGUF and checks
it in llama.cpp against the streamed PyTorch logits (``--skip-onnx --skip-bench``: the ONNX export
needs the whole model in memory). The run's peak RSS, summed over its process tree, is sampled.

Options it does not know go to ``rmexport run``: ``--compute-dtype float32`` for the float32 baseline
(``make bench-8b DTYPE=float32``), ``--device cuda`` for the GPU check (``make gpu-check``), which prints
the time of every stage and the prune's peak GPU memory.

    python -m bench.run_8b --dir out/bench-8b
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from rmexport.atomic import write_json

__all__ = ["LLAMA3_8B_SHAPE", "main", "write_random_checkpoint"]

LLAMA3_8B_SHAPE = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)
# Small budgets: a CPU does ~16 GFLOP per token of an 8B model. 12 set-aside documents give each source of
# the 4:1:1 mixture at least one full 128-token sequence for the guard (8 left `docs` one short document).
# Each other source's held-out text gets the Wikipedia text's 1,024 tokens: at run's default 4,096 the
# checks streamed the blocks for more than 45 minutes on 2 cores, against 217 s of calibration.
RUN_OPTIONS = [
    "--calib-samples", "16", "--seq-len", "128", "--batch-size", "4", "--alpha", "1e-2",
    "--selection-samples", "12", "--eval-tokens", "1024", "--ood-tokens", "1024", "--memory-budget", "5GiB",
    "--gguf-type", "q4_k_m", "--skip-onnx", "--skip-bench",
]  # fmt: skip


def write_random_checkpoint(
    target: Path,
    shape: dict[str, Any],
    tokenizer_dir: Path,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """A Llama checkpoint of ``shape`` with random weights, written one shard (≈ 4 blocks) at a
    time; tokenizer files are copied from ``tokenizer_dir`` (their ids must be < vocab_size)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (target / "config.json").is_file():
        return target
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = dtype
    d, f, n_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = d // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    generator = torch.Generator().manual_seed(seed)

    def random(*size: int, fan_in: int) -> torch.Tensor:
        return (torch.randn(*size, generator=generator) / math.sqrt(fan_in)).to(dtype)

    def block(j: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{j}."
        return {
            p + "self_attn.q_proj.weight": random(d, d, fan_in=d),
            p + "self_attn.k_proj.weight": random(kv, d, fan_in=d),
            p + "self_attn.v_proj.weight": random(kv, d, fan_in=d),
            p + "self_attn.o_proj.weight": random(d, d, fan_in=d),
            p + "mlp.gate_proj.weight": random(f, d, fan_in=d),
            p + "mlp.up_proj.weight": random(f, d, fan_in=d),
            p + "mlp.down_proj.weight": random(d, f, fan_in=f),
            p + "input_layernorm.weight": torch.ones(d, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(d, dtype=dtype),
        }

    groups: list[list[Any]] = (
        [["embed"]] + [list(range(j, min(j + 4, n_layers))) for j in range(0, n_layers, 4)] + [["head"]]
    )
    weight_map: dict[str, str] = {}
    total = 0
    for number, group in enumerate(groups, 1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for item in group:
            if item == "embed":
                tensors["model.embed_tokens.weight"] = random(config.vocab_size, d, fan_in=1)
            elif item == "head":
                tensors["model.norm.weight"] = torch.ones(d, dtype=dtype)
                tensors["lm_head.weight"] = random(config.vocab_size, d, fan_in=d)
            else:
                tensors |= block(item)
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        for key, value in tensors.items():
            weight_map[key] = name
            total += value.numel() * value.element_size()
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(tmp)
    for item in tokenizer_dir.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")) or item.name == "chat_template.jinja":
            shutil.copy2(item, tmp / item.name)
    os.replace(tmp, target)
    return target


class _TreeRss:
    """Peak resident memory of a process and its children, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self._process = psutil.Process(pid)
        self._interval = interval
        self.peak = 0
        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> tuple[int, int]:
        """(RSS, anonymous RSS) of the tree; RSS also counts mapped file pages (llama.cpp's
        quantizer memory-maps its input), which the kernel can drop, anonymous memory it cannot."""
        import psutil

        total = anon = 0
        try:
            for proc in [self._process, *self._process.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                    status = Path(f"/proc/{proc.pid}/status").read_text()
                    anon += (
                        int(next(x for x in status.splitlines() if x.startswith("RssAnon")).split()[1]) * 1024
                    )
                except (psutil.NoSuchProcess, FileNotFoundError, StopIteration):
                    pass
        except psutil.NoSuchProcess:
            pass
        return total, anon

    def _run(self) -> None:
        while not self._stop.is_set():
            total, anon = self._sample()
            self.peak = max(self.peak, total)
            self.peak_anon = max(self.peak_anon, anon)
            time.sleep(self._interval)

    def __enter__(self) -> _TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _prune_record(run_dirs: list[Path]) -> dict[str, Any]:
    path = run_dirs[-1] / "prune.json" if run_dirs else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_8b", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("out/bench-8b"), help="model and run outputs")
    parser.add_argument("--keep", action="store_true", help="keep the 16 GB checkpoint afterwards")
    parser.add_argument("--out", type=Path, default=None, help="JSON result (default DIR/run-8b.json)")
    args, extra = parser.parse_known_args(argv)
    from rmexport.models import DEFAULT_MODEL, checkpoint_dir, resolve

    checkpoint = args.dir / "hf"
    started = time.perf_counter()
    write_random_checkpoint(checkpoint, LLAMA3_8B_SHAPE, Path(checkpoint_dir(resolve(DEFAULT_MODEL))))
    write_s = time.perf_counter() - started
    command = [
        sys.executable,
        "-m",
        "rmexport.cli",
        "run",
        str(checkpoint),
        "--out-root",
        str(args.dir / "runs"),
    ]
    command += RUN_OPTIONS + extra
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, env=os.environ | {"RMEXPORT_NO_PROGRESS": "1"})
    with _TreeRss(process.pid) as rss:
        code = process.wait()
    wall = time.perf_counter() - started
    run_dirs = sorted((args.dir / "runs").glob("*-r*"))
    report = json.loads((run_dirs[-1] / "report.json").read_text()) if run_dirs else {}
    result = {
        "shape": LLAMA3_8B_SHAPE,
        "checkpoint_bytes": sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")),
        "write_s": round(write_s, 1),
        "command": command,
        "exit_code": code,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(rss.peak / 2**20, 1),
        "peak_anonymous_rss_mib": round(rss.peak_anon / 2**20, 1),
        "report": report,
    }
    write_json(args.out or args.dir / "run-8b.json", result)
    written = args.out or args.dir / "run-8b.json"
    for stage, seconds in report.get("timings_s", {}).items():
        print(f"{stage:>24}: {seconds:8.1f} s")
    prune_stages = _prune_record(run_dirs).get("timings_s", {})
    for stage, seconds in prune_stages.items():
        print(f"{'prune: ' + stage:>24}: {seconds:8.1f} s")
    result["prune_timings_s"] = prune_stages
    result["prune_compute"] = _prune_record(run_dirs).get("compute", {})
    gpu_peak = _prune_record(run_dirs).get("memory", {}).get("gpu_peak_allocated_bytes")
    if gpu_peak is not None:
        result["prune_gpu_peak_allocated_bytes"] = gpu_peak
        print(f"prune's peak GPU memory: {gpu_peak / 2**30:.2f} GiB")
    write_json(written, result)
    print(
        f"exit {code}, {wall:.0f} s, peak RSS {rss.peak / 2**30:.2f} GiB "
        f"(anonymous {rss.peak_anon / 2**30:.2f} GiB); wrote {written}"
    )
    if not args.keep:
        shutil.rmtree(checkpoint, ignore_errors=True)
    if code == 1 and report.get("failed_checks") == ["quality"]:
        print("the quality check failed; with random weights whether pruning beats plain removal is chance")
        return 0
    return code


if __name__ == "__main__":
    raise SystemExit(main())
