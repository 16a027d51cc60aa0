"""The real llama.cpp loads and evaluates quantized GGUFs on this machine's CPU, whatever its features."""

from __future__ import annotations

import subprocess
import sys

from rmexport import llamacpp
from rmexport.models import DEFAULT_MODEL, resolve

# Run in a child: a crash inside libllama (SIGSEGV) would otherwise end the whole test session.
_EVALUATE = """
import sys
import numpy as np
from rmexport import llamacpp
with llamacpp.open_model(sys.argv[1], n_ctx=64, logits_all=True) as model:
    ids = llamacpp.tokenize(model, "The capital of France is Paris. The capital of Italy is")
    logits = llamacpp.eval_logits(model, ids)
    following = model.detokenize([int(logits[-1].argmax())]).decode()
assert logits.shape[0] == len(ids) and np.isfinite(logits).all()
print(following)
"""


def test_extra_buffer_types_are_left_out_where_llama_cpp_reports_amx():
    amx = "CPU : AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |"
    plain = "CPU : AVX2 = 1 | AVX512 = 1 | REPACK = 1 |"
    assert not llamacpp.extra_buffer_types_usable(amx)
    assert llamacpp.extra_buffer_types_usable(plain)
    info = llamacpp.library_info()
    assert info["extra_buffer_types"] == llamacpp.extra_buffer_types_usable(info["system_info"])


def test_quantized_default_model_evaluates_in_llama_cpp():
    gguf = resolve(DEFAULT_MODEL).location
    done = subprocess.run(
        [sys.executable, "-c", _EVALUATE, gguf], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"llama.cpp evaluation ended with {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.strip().endswith("Rome")
