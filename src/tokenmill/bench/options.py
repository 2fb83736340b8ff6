"""Which options of ``tokenmill bench run`` go together.

An option the chosen load or data would ignore, or a combination that cannot
run, is an error that names the options (the CLI exits 2), never a silent
no-op: a benchmark that quietly ran something else than was asked is worse
than none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenmill.bench.load import LoadProfile
from tokenmill.bench.metrics import SLO
from tokenmill.bench.sweep import parse_values

SEARCHABLE = ("poisson", "constant", "gamma")  # profiles with a rate for --find-max-goodput to vary


@dataclass(frozen=True)
class LoadOptions:
    """The load options as typed on the command line (None: not given)."""

    profile: str | None
    concurrency: str | None
    rate: str | None
    burstiness: float | None
    max_concurrency: int | None
    search: bool  # --find-max-goodput
    trace: bool  # --trace FILE was given

    @property
    def kind(self) -> str:
        """The profile that runs: as given, else trace with --trace, poisson for a search,
        concurrency otherwise."""
        if self.profile is not None:
            return self.profile
        if self.trace:
            return "trace"
        return "poisson" if self.search else "concurrency"

    def check(self) -> None:
        kind = self.kind
        if self.search:
            if self.concurrency is not None:
                raise ValueError("--find-max-goodput searches request rates: drop --concurrency")
            if kind not in SEARCHABLE:
                raise ValueError(
                    f"--find-max-goodput varies the rate of --profile {', '.join(SEARCHABLE)}; "
                    f"--profile {kind} has none" + (" (the trace gives the times)" if kind == "trace" else "")
                )
        if kind == "concurrency" and self.rate is not None:
            raise ValueError("--rate goes with --profile constant, poisson or gamma, not concurrency")
        if kind == "concurrency" and self.max_concurrency is not None:
            raise ValueError(
                "--max-concurrency caps an open loop; with --profile concurrency use --concurrency"
            )
        if kind != "concurrency" and self.concurrency is not None:
            raise ValueError(
                f"--concurrency goes with --profile concurrency; to cap {kind} use --max-concurrency"
            )
        if kind == "trace" and self.rate is not None:
            raise ValueError("--rate does not apply to --profile trace: the trace gives the times")
        if kind == "trace" and not self.trace:
            raise ValueError("--profile trace needs --trace FILE")
        if kind != "gamma" and self.burstiness is not None:
            raise ValueError("--burstiness goes with --profile gamma")
        if self.burstiness is not None and not 0 < self.burstiness < math.inf:
            raise ValueError(f"--burstiness must be a finite number > 0, got {self.burstiness:g}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if kind in SEARCHABLE and self.rate is None and not self.search:
            raise ValueError(f"--profile {kind} needs --rate (requests/s), e.g. --rate 4")
        if self.search and self.rate is not None and len(parse_values(self.rate, "--rate")) > 1:
            raise ValueError(f"--find-max-goodput starts from one --rate, got {self.rate!r}")

    def profiles(self) -> list[LoadProfile]:
        """One profile per point: one for a run, several for a sweep; a search's first probe."""
        self.check()
        kind, cap = self.kind, self.max_concurrency
        shape = 1.0 if self.burstiness is None else self.burstiness
        if self.search:  # the search varies this profile's rate, from --rate (default 1)
            start = parse_values(self.rate, "--rate")[0] if self.rate else 1.0
            return [LoadProfile(kind, rate=start, burstiness=shape, max_concurrency=cap)]
        if kind == "concurrency":
            values = parse_values(self.concurrency or "8", "--concurrency", int)
            return [LoadProfile(kind, concurrency=int(c)) for c in values]
        if kind == "trace":
            return [LoadProfile(kind, max_concurrency=cap)]
        rates: list[float | None] = list(parse_values(self.rate, "--rate")) if self.rate else [None]
        return [LoadProfile(kind, rate=r, burstiness=shape, max_concurrency=cap) for r in rates]


def check_run_options(
    *,
    search: bool,
    goodput_target: float | None,
    slo: str | None,
    gpus: int | None,
    gpu_cost_per_hour: float | None,
    duration: float | None,
    stream: bool,
    continuous_usage: bool,
    data: str,
    turns: int | None,
    think_time: float | None,
    check_tokens: int,
    max_lag_p99: float = 0.010,
    read_timeout: float = 300.0,
    temperature: float | None = None,
) -> None:
    """The options beyond the load's: each that needs another names it."""
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        # (every request would be refused by the server: a run of nothing but errors)
        raise ValueError(f"--temperature must be a number >= 0 (0: greedy), got {temperature:g}")
    if goodput_target is not None and not search:
        raise ValueError("--goodput-target goes with --find-max-goodput")
    if goodput_target is not None and not 0 < goodput_target <= 1:
        raise ValueError(f"--goodput-target must be a fraction in (0, 1], got {goodput_target:g}")
    if search and not slo:
        raise ValueError("--find-max-goodput needs --slo, e.g. --slo ttft=0.3,tpot=0.05")
    check_cost(gpu_cost_per_hour, gpus)
    if duration is not None and not duration > 0:
        raise ValueError(f"--duration must be a number of seconds > 0, got {duration:g}")
    if continuous_usage and not stream:
        raise ValueError("--continuous-usage asks for usage on every chunk: it needs --stream")
    if data != "multi-turn" and (turns is not None or think_time is not None):
        raise ValueError("--turns and --think-time go with --data multi-turn")
    if turns is not None and turns < 1:
        raise ValueError(f"--turns must be >= 1, got {turns}")
    if think_time is not None and not 0 <= think_time < math.inf:
        raise ValueError(f"--think-time must be a finite number of seconds >= 0, got {think_time:g}")
    check_max_lag(max_lag_p99)
    if not 0 < read_timeout < math.inf:
        raise ValueError(f"--read-timeout must be a finite number of seconds > 0, got {read_timeout:g}")
    if slo and not stream:
        unmeasured = [name for name in ("tpot", "itl") if getattr(SLO.parse(slo), name) is not None]
        if unmeasured:
            raise ValueError(
                f"--slo {','.join(unmeasured)} needs the tokens' times, which --no-stream does not see: "
                "drop them or stream"
            )
    if check_tokens < 0:
        raise ValueError(f"--check-tokens must be >= 0, got {check_tokens}")


def check_max_lag(max_lag_p99: float) -> None:
    """--max-lag-p99 of run, report and calibrate: NaN would turn the check off, a negative
    bound would fail every open-loop run."""
    if not 0 < max_lag_p99 < math.inf:
        raise ValueError(f"--max-lag-p99 must be a finite number of seconds > 0, got {max_lag_p99:g}")


def check_cost(gpu_cost_per_hour: float | None, gpus: int | None) -> None:
    """--gpu-cost-per-hour and --gpus of run and report (inf would write Infinity, not JSON)."""
    if gpus is not None and gpu_cost_per_hour is None:
        raise ValueError("--gpus goes with --gpu-cost-per-hour (it only scales the cost)")
    if gpus is not None and gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if gpu_cost_per_hour is not None and not 0 < gpu_cost_per_hour < math.inf:
        raise ValueError(f"--gpu-cost-per-hour must be a finite number > 0, got {gpu_cost_per_hour:g}")
