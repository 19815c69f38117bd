"""The `zokern` command: `zokern demo` runs the main job, `zokern info` says what this install can run."""

from __future__ import annotations

import argparse
import sys


def _info(_: argparse.Namespace) -> int:
    import torch

    import zokern

    print(f"zokern {zokern.__version__}, stream version {zokern.STREAM_VERSION}, torch {torch.__version__}")
    for name, state in zokern.backend_status().items():
        print(f"  {name:6s} {state}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from zokern import demo

    result = demo.run(steps=args.steps, eps=args.eps, lr=args.lr, backend=args.backend, device=args.device)
    return 0 if result["end_loss"] < result["start_loss"] else 1


def main(argv: list[str] | None = None) -> int:
    from zokern import demo

    parser = argparse.ArgumentParser(prog="zokern", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="a small zeroth-order fine-tune with the fused kernels")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=_demo)
    commands.add_parser("info", help="version, stream version and the available backends").set_defaults(run=_info)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
