"""``python -m bench.scaling SUBCOMMAND``: each subcommand's module adds its flags and runs it."""

from __future__ import annotations

import bench.scaling
from bench import harness
from bench.scaling import step, threads, transport_error, weak


def main() -> None:
    """Parse the subcommand and its flags, run it, and print its JSON summary (a worker prints its own)."""
    parser = harness.parser(bench.scaling.__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    for module in (weak, step, transport_error, threads):
        module.add_parser(sub)
    args = parser.parse_args()
    summary = args.run(args)
    if summary is not None:  # step-worker and threads-worker report to their parent themselves
        harness.emit(summary, args.output)


if __name__ == "__main__":
    main()
