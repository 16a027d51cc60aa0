"""User mistakes end in one clear line on stderr and exit code 2, before any heavy work."""

import json
import shutil

import pytest

from rmexport.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def test_unknown_alias_lists_known_ones(capsys, tmp_path):
    code, err = _run(capsys, "prune", "llama9-1t", "--out", str(tmp_path))
    assert code == 2
    assert "unknown model 'llama9-1t'" in err and "smollm2-135m" in err
    assert "Traceback" not in err


def test_missing_path(capsys, tmp_path):
    code, err = _run(capsys, "prune", str(tmp_path / "nowhere" / "model"), "--out", str(tmp_path / "o"))
    assert code == 2 and "not found" in err


def test_hub_unreachable_suggests_a_local_path(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = _run(capsys, "prune", "someone/not-cached-model", "--out", str(tmp_path))
    assert code == 2 and "Hugging Face Hub" in err and "local directory" in err


def test_unsupported_architecture_names_the_supported(capsys, tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    code, err = _run(capsys, "prune", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o"))
    assert code == 2 and "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err


def test_truncated_weights(capsys, tmp_path, tiny_checkpoints):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoints["llama"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "o"
    code, err = _run(
        capsys, "prune", str(broken), "--out", str(out), "--calib-samples", "32", "--seq-len", "32"
    )
    assert code == 2 and "corrupt or truncated" in err
    assert not (out / "hf").exists() and not (out / "prune.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ratio", "1.5"], "out of range"),
        (["--ratio", "0.01"], "removes no block"),
        (["--layers", "7"], "at least 2 must remain"),
        (["--blocks", "5"], "cannot split"),
        (["--calib-data", "/no/such/file.txt"], "text source not found"),
        (["--calib-samples", "1", "--seq-len", "8"], "calibration text"),
    ],
)
def test_impossible_requests(capsys, tmp_path, tiny_checkpoints, args, message):
    out = tmp_path / "o"
    code, err = _run(capsys, "prune", str(tiny_checkpoints["llama"]), "--out", str(out), *args)
    assert code == 2, err
    assert message in err
    assert not (out / "hf").exists()


def test_unwritable_output(capsys, tmp_path, tiny_checkpoints):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = _run(capsys, "prune", str(tiny_checkpoints["llama"]), "--out", str(blocker / "out"))
    assert code == 2 and "cannot write" in err
