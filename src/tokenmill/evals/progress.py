"""How far an eval run is, per endpoint: what the command prints to stderr while it runs.

A run can take long (a slow endpoint, a long ``--timeout``), and silence reads
as a hang. The runner counts here, and the command prints ``line()`` now and
then. Answers reused from earlier runs are counted apart: nothing was asked
for them, and calling them "asked" would hide that a run made no call at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Progress:
    checking: bool = True  # the endpoints' 1-token check is running; no question asked yet
    to_ask: dict[str, int] = field(default_factory=dict)  # per endpoint: questions asked this run
    asked: dict[str, int] = field(default_factory=dict)  # of them, done (answered or failed)
    failed: dict[str, int] = field(default_factory=dict)  # of them, not answered
    reused: int = 0  # (endpoint, question) pairs answered and graded by earlier runs

    def start(self, to_ask: dict[str, int], reused: int) -> None:
        self.to_ask = dict(to_ask)
        self.asked = dict.fromkeys(to_ask, 0)
        self.failed = dict.fromkeys(to_ask, 0)
        self.reused = reused

    def done(self, endpoint: str, answered: bool) -> None:
        """One question of ``endpoint`` was asked this run (its model, or the judge of its answer)."""
        self.asked[endpoint] += 1
        self.failed[endpoint] += not answered

    def line(self) -> str:
        if self.checking:
            return "checking the endpoints: one 1-token request each"
        reused = f"{_count(self.reused, 'answer')} of earlier runs reused"
        if not any(self.to_ask.values()):
            return f"nothing to ask: {reused}"
        parts = []
        for name, total in self.to_ask.items():
            failed = self.failed[name]
            parts.append(
                f"{name} {self.asked[name]}/{total}" + (f" ({failed} not answered)" if failed else "")
            )
        return "asked " + ", ".join(parts) + (f"; {reused}" if self.reused else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
