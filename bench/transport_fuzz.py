"""The transport's fuzz test, long: many seeds of a misbehaving broker.

    .venv/bin/python -m bench.transport_fuzz [--cases 5000] [--first-seed 0]

The same cases as ``tests/transport/test_fuzz.py`` (which runs 60 in ``make test``): a
scripted broker socket that answers the CONNECT, then sends malformed, truncated or random
packets and closes. Every case must end in a typed ``TransportError`` (or a clean run)
within 20 s; a hang, a crash or another exception stops the run and prints the seed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "transport"))

from test_fuzz import test_malformed_bytes_end_the_session_with_a_typed_error as one_case


async def run(first: int, cases: int) -> int:
    start = time.monotonic()
    for seed in range(first, first + cases):
        try:
            await one_case(seed)
        except BaseException as exc:
            print(f"seed {seed}: {exc!r}", flush=True)
            return 1
        if (seed - first + 1) % 500 == 0:
            print(f"{seed - first + 1} cases, {time.monotonic() - start:.0f}s", flush=True)
    print(f"{cases} cases passed in {time.monotonic() - start:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--first-seed", type=int, default=0)
    args = parser.parse_args(argv)
    return asyncio.run(run(args.first_seed, args.cases))


if __name__ == "__main__":
    raise SystemExit(main())
