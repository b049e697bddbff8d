"""Run under torchrun (2 ranks): every refusal case of ``cases.json`` through ``flatlora.cli.main`` in one launch.

Each rank writes a marker line to stderr before each case, so the test can cut the rank's stderr log
into one part per case and check that each part is exactly the one-line refusal. ``exit_together``
(which ends the process after an agreed refusal) is held back between cases and called for real at
the end; the real exit of every rank with status 2 is tested by a launch of its own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flatlora import cli, distributed

MARKER = "=== case "


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    real_exit = distributed.exit_together
    distributed.exit_together = lambda code: code  # stay alive for the next case
    codes = []
    for i, argv in enumerate(cases):
        print(f"{MARKER}{i}", file=sys.stderr, flush=True)
        codes.append(cli.main(argv))
        sys.stderr.flush()
    (out / f"codes-{distributed.rank()}.json").write_text(json.dumps(codes))
    real_exit(0)


if __name__ == "__main__":
    main()
