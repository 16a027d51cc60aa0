"""What the speed benchmarks time, and for how long: the settings a run's configuration carries.

The timing itself (A B B A turns, warm-up, the stopping rule) is ``validation.speed``'s; these
settings sit below it so that configurations can hold them without importing validation.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import TypedDict

from .errors import ConfigError
from .options import option
from .sysinfo import usable_cores

__all__ = ["ProtocolSettings", "SpeedProtocol", "SpeedRounds"]


def token_counts(text: str) -> tuple[int, ...]:
    """``--prompt-tokens``: comma-separated token counts."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from e


@dataclass(frozen=True)
class SpeedRounds:
    """How long the speed benchmarks time each phase, in both runtimes (the phases themselves are
    each runtime's: ``SpeedProtocol``)."""

    warmup: int = option(
        1, "--warmup", "untimed turns of every phase per model first", kind="count", minimum=0
    )
    min_rounds: int = option(3, "--min-rounds", "rounds of a phase at least", kind="count")
    max_rounds: int = option(6, "--max-rounds", "rounds of a phase at most, precise or not", kind="count")
    rel_tol: float = option(
        0.02,
        "--rel-tol",
        "a phase stops once the estimated standard error of its median speed-up is at most this "
        "fraction of it",
        kind="number",
    )
    threads: int = option(
        0, "--threads", "threads for both models", parse=int, shown_default="all cores"
    )  # 0: every usable core

    def __post_init__(self) -> None:
        if self.warmup < 0 or not 1 <= self.min_rounds <= self.max_rounds:
            raise ConfigError(
                f"need warmup >= 0 and 1 <= min rounds <= max rounds, got warmup={self.warmup} "
                f"min={self.min_rounds} max={self.max_rounds}"
            )
        if not 0 < self.rel_tol < 1 or self.threads < 0:
            raise ConfigError(
                f"need 0 < rel tol < 1 and threads >= 0, got rel_tol={self.rel_tol} threads={self.threads}"
            )


class ProtocolSettings(TypedDict):
    """A protocol as JSON: a benchmark stage's key, and what a speed result records it ran with."""

    prompt_tokens: list[int]
    gen_tokens: int
    warmup: int
    min_rounds: int
    max_rounds: int
    rel_tol: float
    threads: int


@dataclass(frozen=True)
class SpeedProtocol:
    """The phases timed (llama-bench's pp and tg tests) and how long each is timed."""

    prompt_tokens: tuple[int, ...] = option(
        (512,),
        "--prompt-tokens",
        "prompt-processing lengths to time, from an empty cache",
        metavar="N[,N]",
        parse=token_counts,
    )
    gen_tokens: int = option(
        128, "--gen-tokens", "tokens generated one at a time from an empty cache", parse=int
    )
    rounds: SpeedRounds = SpeedRounds()

    def with_rounds(self, rounds: SpeedRounds) -> SpeedProtocol:
        """The same phases, timed as ``rounds`` says."""
        return replace(self, rounds=rounds)

    def __post_init__(self) -> None:
        if not self.prompt_tokens or any(n < 1 for n in self.prompt_tokens) or self.gen_tokens < 1:
            raise ConfigError(
                f"prompt tokens {list(self.prompt_tokens)} and generated tokens {self.gen_tokens} "
                "must all be >= 1"
            )

    @property
    def phases(self) -> dict[str, int]:
        """Phase name -> tokens, prompt phases first: ``{"pp512": 512, "tg128": 128}``."""
        return {f"pp{n}": n for n in sorted(set(self.prompt_tokens))} | {
            f"tg{self.gen_tokens}": self.gen_tokens
        }

    @property
    def context(self) -> int:
        """The context every model gets (llama-bench: longest prompt + generated tokens)."""
        return max(self.prompt_tokens) + self.gen_tokens

    def resolved_threads(self) -> int:
        return self.rounds.threads or usable_cores()

    def as_dict(self) -> ProtocolSettings:
        rounds = self.rounds
        return ProtocolSettings(
            prompt_tokens=sorted(set(self.prompt_tokens)),
            gen_tokens=self.gen_tokens,
            warmup=rounds.warmup,
            min_rounds=rounds.min_rounds,
            max_rounds=rounds.max_rounds,
            rel_tol=rounds.rel_tol,
            threads=rounds.threads,
        )
