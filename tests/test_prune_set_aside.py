"""The set-aside text that judges the guard is checked before calibration, not after it."""

import logging

import pytest

from rmexport.errors import CalibrationError
from rmexport.models import resolve
from rmexport.prune import PruneOptions, prune


def _one_token_documents(path):
    """A text source whose documents are one letter each: any few of them pack into no sequence."""
    path.write_text("\n\n".join("abcdefghij"[i % 10] for i in range(80)) + "\n")
    return path


def test_set_aside_text_too_short_for_the_guard_fails_before_calibration(tiny_checkpoints, tmp_path, caplog):
    short = _one_token_documents(tmp_path / "short.txt")
    options = PruneOptions(
        ratio=0.25,
        calib_data=f"builtin+{short}",
        calib_samples=48,  # 24 one-letter documents: one 32-token sequence, enough to calibrate on
        selection_samples=2,  # one set-aside document per source: nothing for the guard on `short`
        seq_len=32,
        eval_tokens=1024,
        ood_tokens=1024,
    )
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="rmexport"), pytest.raises(CalibrationError) as raised:
        prune(resolve(str(tiny_checkpoints["llama"])), options, out)
    assert str(short) in str(raised.value) and "gives 0 tokens" in str(raised.value)
    assert str(raised.value).startswith("set-aside") and "--selection-samples (now 2" in raised.value.hint
    stages = [r.getMessage() for r in caplog.records if r.getMessage().endswith(" ...")]
    assert stages == ["load ..."], stages  # no calibration ran
    assert not out.exists()


def test_the_same_set_aside_text_with_more_documents_is_accepted(tiny_checkpoints, tmp_path):
    short = _one_token_documents(tmp_path / "short.txt")
    options = PruneOptions(
        ratio=0.25,
        calib_data=f"builtin+{short}",
        calib_samples=48,
        selection_samples=48,  # 24 set-aside one-letter documents: one sequence
        seq_len=32,
        eval_tokens=1024,
        ood_tokens=1024,
        parity_windows=1,
    )
    record = prune(resolve(str(tiny_checkpoints["llama"])), options, tmp_path / "out")
    assert set(record.guard.by_source) == {"builtin", str(short)}
