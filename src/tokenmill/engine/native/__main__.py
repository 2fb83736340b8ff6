"""Build tokenmill's CPU kernels now and say what each will run: ``python -m tokenmill.engine.native``."""

from __future__ import annotations

import sys

from tokenmill.engine.native.builder import build


def main() -> int:
    result = build()
    print(("built " if result.library else "not built: ") + result.reason)
    return 0  # a machine without the kernel still serves, with PyTorch's; not an error


if __name__ == "__main__":
    sys.exit(main())
