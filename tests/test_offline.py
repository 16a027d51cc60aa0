"""A hub that cannot be reached is one line, fast, without retries unless asked; HF_HUB_OFFLINE is
honoured; library warnings reach the user once, through one handler."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

from rmexport.cli import main
from rmexport.log import route_library_logs

from .test_cli_fuzz import REPO, one_line_error


def _cli(argv: list[str], **env: str) -> tuple[subprocess.CompletedProcess, float]:
    environ = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | env
    environ |= {"PYTHONPATH": str(REPO), "RMEXPORT_NO_PROGRESS": "1"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "rmexport.cli", *argv],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, time.monotonic() - started


def test_unreachable_hub_is_one_line_fast(tmp_path):
    """The command as a user runs it, in its own process: at most 3 lines, exit 2, with no retries (within
    30 s: 9 s beside a prune on 2 cores, 14 s beside a prune and the rest of the suite; retrying would take a
    minute)."""
    # Nothing listens there, wherever the test runs: the hub is unreachable, for real.
    argv = ["prune", "llama3-8b", "--out", str(tmp_path / "p")]
    done, seconds = _cli(argv, HF_ENDPOINT="http://127.0.0.1:9")
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(lines) <= 3, done.stderr
    assert "Meta-Llama-3-8B-Instruct" in lines[0] and "cannot be reached" in lines[0]
    assert seconds < 30, seconds
    assert not tmp_path.joinpath("p").exists()


def _prune_hub_model(tmp_path, capsys, *extra: str) -> tuple[str, float]:
    started = time.monotonic()
    assert main(["prune", "llama3-8b", "--out", str(tmp_path / "p"), *extra]) == 2
    return one_line_error(capsys.readouterr().err), time.monotonic() - started


def test_hf_hub_offline_is_honoured_without_a_probe(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://192.0.2.1:9")  # would time out if it were probed
    line, seconds = _prune_hub_model(tmp_path, capsys)
    assert "HF_HUB_OFFLINE" in line and "not in the local cache" in line and seconds < 2


def test_retries_are_made_only_when_asked(tmp_path, capsys, monkeypatch):
    """No retry by default; --retries 2 probes three times, 1 s and 2 s apart; one line either way."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:7")
    line, seconds = _prune_hub_model(tmp_path, capsys)
    assert "cannot be reached" in line and seconds < 1
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:13")  # a new host: probed afresh
    line, seconds = _prune_hub_model(tmp_path, capsys, "--retries", "2")
    assert "cannot be reached" in line and seconds >= 3


def test_library_warnings_are_printed_once_at_sensible_levels(tiny_checkpoints, tmp_path):
    """After the CLI set up logging: a transformers warning and a Python warning once each, in one
    line; a urllib3 retry and a warning about a library's internals not at all."""
    code = (
        "import logging, sys, warnings\n"
        "from rmexport.cli import main\n"
        "main(['export', 'gguf', sys.argv[1], '--out', sys.argv[2]])\n"
        "from transformers.utils import logging as tl\n"
        "tl.get_logger('transformers.modeling_utils').warning('LIBRARY-WARNING')\n"
        "warnings.warn('PYTHON-WARNING')\n"
        "warnings.warn('LIBRARY-INTERNALS', FutureWarning)\n"
        "logging.getLogger('urllib3.connectionpool').warning('Retrying (Retry(total=4))')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tiny_checkpoints["llama"]), str(tmp_path / "m.gguf")],
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("LIBRARY-WARNING") == 1, done.stderr
    assert done.stderr.count("PYTHON-WARNING") == 1, done.stderr
    assert "Retrying" not in done.stderr and "LIBRARY-INTERNALS" not in done.stderr


def test_the_mistral_regex_warning_is_kept_for_mistral_alone(tmp_path, caplog):
    """transformers 4.57.3+ warns of Mistral's tokenizer regex for any local checkpoint with a large
    vocabulary that it wrote (Qwen2.5's, for one); after the CLI set up logging the warning reaches
    the user for a Mistral checkpoint only. Its text as transformers 4.57.6 words it."""
    route_library_logs()
    logger = logging.getLogger("transformers.tokenization_utils_base")
    warned = {}
    for model_type in ("qwen2", "mistral"):
        checkpoint = tmp_path / model_type
        checkpoint.mkdir()
        (checkpoint / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            logger.warning(
                f"The tokenizer you are loading from '{checkpoint}' with an incorrect regex pattern: "
                "https://huggingface.co/... This will lead to incorrect tokenization."
            )
        warned[model_type] = bool(caplog.records)
    assert warned == {"qwen2": False, "mistral": True}
