"""``tokenmill generate``: run prompts through an engine and stream the text to the terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tokenmill.engine import Engine, OutputKind, SamplingParams


def stream_generate(
    engine: Engine,
    prompts: list[str | list[int]],
    params: SamplingParams,
    write: Callable[[str], None],
    header: Callable[[int, str], None],
) -> list[str]:
    """Run every prompt at once (continuous batching) and stream them in order.

    The prompt being shown streams live; later ones are buffered until it
    finishes, so the terminal reads top to bottom. Returns the full texts.
    """
    params = SamplingParams(**{**params.__dict__, "output_kind": OutputKind.DELTA})
    ids = [engine.add_request(None, p, params) for p in prompts]
    buffers = {rid: [] for rid in ids}
    done: set[str] = set()
    shown = 0
    texts = {rid: "" for rid in ids}
    header(0, _label(prompts[0]))
    try:
        while shown < len(ids):
            for out in engine.step():
                piece = out.outputs[0].text
                texts[out.request_id] += piece
                buffers[out.request_id].append(piece)
                if out.finished:
                    done.add(out.request_id)
            while shown < len(ids):
                rid = ids[shown]
                for piece in buffers[rid]:
                    write(piece)
                buffers[rid].clear()
                if rid not in done:
                    break
                shown += 1
                if shown < len(ids):
                    header(shown, _label(prompts[shown]))
    finally:
        for rid in ids:
            if rid not in done:
                engine.abort(rid)
    return [texts[rid] for rid in ids]


def _label(prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else f"<{len(prompt)} token ids>"


def stdout_write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
