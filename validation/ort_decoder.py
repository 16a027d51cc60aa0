"""A decoder-with-past ONNX graph driven by hand in a plain ``onnxruntime.InferenceSession``.

Both export flavors (optimum and onnxruntime-genai) produce the same interface: ``input_ids``,
``attention_mask``, optionally ``position_ids``, ``past_key_values.{i}.key|value`` in, and
``logits`` plus ``present.{i}.key|value`` out. This module feeds that interface itself, so the
parity check and the benchmark exercise exactly what a deployment without optimum would run.
Decoding uses IO binding: the KV cache stays in onnxruntime's buffers between steps.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from rmexport.errors import ExportError, ModelLoadError
from rmexport.optional import optional_import
from rmexport.records import JsonObject

__all__ = ["OrtDecoder", "default_providers", "text_config"]

log = logging.getLogger(__name__)

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _onnxruntime() -> ModuleType:
    return optional_import("onnxruntime", package="onnxruntime", needed_for="running an ONNX model")


def default_providers() -> list[str]:
    """CUDA when onnxruntime-gpu provides it, else the CPU execution provider."""
    available = _onnxruntime().get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def text_config(config: JsonObject) -> JsonObject:
    """The language-model part of a config.json (multimodal configs nest it)."""
    return config.get("text_config") or config


class OrtDecoder:
    """``model.onnx`` of an export folder in an InferenceSession, with its KV-cache layout."""

    def __init__(
        self,
        onnx_dir: str | Path,
        *,
        providers: list[str] | None = None,
        threads: int = 0,
        spinning: bool = True,
    ):
        """``spinning=False`` stops idle onnxruntime threads from busy-waiting between runs; use it
        when PyTorch shares the CPU with the session (parity checks), keep it for benchmarks."""
        ort = _onnxruntime()
        self.dir = Path(onnx_dir)
        model_path = self.dir / "model.onnx"
        config_path = self.dir / "config.json"
        if not model_path.is_file():
            raise ModelLoadError(
                f"no model.onnx in {self.dir}", hint="create it with: rmexport export onnx CKPT --out DIR"
            )
        if not config_path.is_file():
            raise ModelLoadError(f"no config.json beside {model_path}", hint="re-export the model")
        self.config = text_config(json.loads(config_path.read_text()))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.providers = providers or default_providers()
        ort_errors = ort.capi.onnxruntime_pybind11_state
        load_errors = (
            ort_errors.Fail,
            ort_errors.InvalidGraph,
            ort_errors.InvalidProtobuf,
            ort_errors.NoSuchFile,
        )
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=self.providers)
        except load_errors as e:
            raise ExportError(f"onnxruntime cannot load {model_path}: {str(e)[:300]}") from e
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.num_layers = self._count_layers()
        self.kv_heads = int(self.config.get("num_key_value_heads") or self.config["num_attention_heads"])
        self.head_dim = int(
            self.config.get("head_dim") or self.config["hidden_size"] // self.config["num_attention_heads"]
        )
        self.kv_dtype = _NUMPY_TYPES[self._inputs["past_key_values.0.key"].type]
        self.has_position_ids = "position_ids" in self._inputs
        self._index_types = {
            name: _NUMPY_TYPES[self._inputs[name].type]
            for name in ("input_ids", "attention_mask", "position_ids")
            if name in self._inputs
        }

    def _count_layers(self) -> int:
        layers = {int(m.group(1)) for name in self._inputs if (m := _PAST.match(name))}
        expected = int(self.config["num_hidden_layers"])
        if layers != set(range(expected)):
            raise ExportError(
                f"{self.dir / 'model.onnx'} has past key/values for {len(layers)} layers "
                f"but config.json says num_hidden_layers={expected}",
                hint="the graph and the config come from different checkpoints; re-export",
            )
        for name in ("input_ids", "attention_mask"):
            if name not in self._inputs:
                raise ExportError(f"{self.dir / 'model.onnx'} has no {name!r} input; not a decoder graph")
        return expected

    # --- plain numpy path (prefill, perplexity) ------------------------------------------
    def _past_shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        return (batch, self.kv_heads, length, self.head_dim)

    def _feeds(self, ids: np.ndarray, past_len: int) -> dict[str, np.ndarray]:
        batch, length = ids.shape
        feeds = {
            "input_ids": ids.astype(self._index_types["input_ids"]),
            "attention_mask": np.ones((batch, past_len + length), self._index_types["attention_mask"]),
        }
        if self.has_position_ids:
            positions = np.arange(past_len, past_len + length)[None].repeat(batch, 0)
            feeds["position_ids"] = positions.astype(self._index_types["position_ids"])
        return feeds

    def forward(self, ids: Any) -> np.ndarray:
        """Logits ``[B, T, V]`` (float32) for full sequences ``ids`` with an empty cache."""
        ids = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids)
        feeds = self._feeds(ids, 0)
        empty = np.zeros(self._past_shape(ids.shape[0], 0), self.kv_dtype)
        for i in range(self.num_layers):
            feeds[f"past_key_values.{i}.key"] = empty
            feeds[f"past_key_values.{i}.value"] = empty
        (logits,) = self.session.run(["logits"], feeds)
        return logits.astype(np.float32, copy=False)

    # --- IO-bound greedy decoding --------------------------------------------------------
    def _ortvalue(self, array: np.ndarray):
        return _onnxruntime().OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def _run_bound(self, ids: np.ndarray, past: list | None, past_len: int) -> tuple[np.ndarray, list]:
        binding = self.session.io_binding()
        for name, array in self._feeds(ids, past_len).items():
            binding.bind_ortvalue_input(name, self._ortvalue(array))
        if past is None:
            empty = self._ortvalue(np.zeros(self._past_shape(ids.shape[0], 0), self.kv_dtype))
            past = [empty] * (2 * self.num_layers)
        for i in range(self.num_layers):
            binding.bind_ortvalue_input(f"past_key_values.{i}.key", past[2 * i])
            binding.bind_ortvalue_input(f"past_key_values.{i}.value", past[2 * i + 1])
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = dict(zip(self.output_names, binding.get_outputs(), strict=True))
        present = []
        for i in range(self.num_layers):
            present += [outputs[f"present.{i}.key"], outputs[f"present.{i}.value"]]
        last_logits = outputs["logits"].numpy()[:, -1].astype(np.float32)
        return last_logits, present

    def greedy(
        self, prompt: list[int] | np.ndarray, new_tokens: int, *, keep_logits: bool = False
    ) -> tuple[list[int], list[np.ndarray]]:
        """Greedy-decode exactly ``new_tokens`` tokens (EOS is not special) through the KV cache.

        Returns the new token ids and, with ``keep_logits``, the ``[V]`` logits that chose each.
        """
        ids = np.asarray(prompt, dtype=np.int64)[None]
        logits, past = self._run_bound(ids, None, 0)
        past_len = ids.shape[1]
        tokens: list[int] = []
        kept: list[np.ndarray] = []
        for step in range(new_tokens):
            token = int(logits[0].argmax())
            tokens.append(token)
            if keep_logits:
                kept.append(logits[0])
            if step == new_tokens - 1:
                break
            logits, past = self._run_bound(np.array([[token]], np.int64), past, past_len)
            past_len += 1
        return tokens, kept

    def decode_steps(self, first: int) -> Iterator[None]:
        """Greedy decoding from an empty cache, one single-token step per ``next()``: ``first``,
        then the token each step chose (so a caller can time the steps one by one)."""
        token = np.array([[first]], np.int64)
        past, past_len = None, 0
        while True:
            logits, past = self._run_bound(token, past, past_len)
            past_len += 1
            token = np.array([[int(logits[0].argmax())]], np.int64)
            yield

    def prefill(self, prompt: list[int] | np.ndarray) -> np.ndarray:
        """One IO-bound prefill of ``prompt`` (batch 1); returns the last position's logits."""
        logits, _ = self._run_bound(np.asarray(prompt, dtype=np.int64)[None], None, 0)
        return logits[0]
