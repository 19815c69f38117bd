"""The `zokern` command.

- `zokern demo`: the main job, the preference pipeline on the CPU (data, policy, reward model; ZOPrO against the
  MeZO direction and first-order RLOO), with metrics and plots in an output directory;
- `zokern dpo --data FILE`: offline ZO-DPO on a preference dataset;
- `zokern viz RUN_DIR`: plots of the policy–reward interplay from the sketches a run recorded;
- `zokern quickstart`: a small ZO fine-tune with ZOSGD, and its step timed against MeZO's published loop;
- `zokern info`: the version, the stream version and the backends this install can run.
"""

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


def _quickstart(args: argparse.Namespace) -> int:
    from zokern import demo

    result = demo.run(steps=args.steps, eps=args.eps, lr=args.lr, backend=args.backend, device=args.device)
    return 0 if result["end_loss"] < result["start_loss"] else 1


def _demo(args: argparse.Namespace) -> int:
    from zokern.preference.loop import METHODS
    from zokern.preference.pipeline import run_pipeline

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        print(f"zokern demo: --methods takes some of {', '.join(METHODS)}, got {args.methods!r}", file=sys.stderr)
        return 2
    import torch

    device = args.device or ("cuda" if args.model is not None and torch.cuda.is_available() else "cpu")
    try:
        run_pipeline(args.out, seed=args.seed, forwards=args.forwards, methods=methods, model=args.model,
                     device=device, trainable=args.trainable or None)  # fmt: skip
    except (FileNotFoundError, ValueError) as e:  # a bad --model or --trainable: say what, without a traceback
        print(f"zokern demo: {e}", file=sys.stderr)
        return 2
    return 0


def _dpo(args: argparse.Namespace) -> int:
    from zokern.preference.pipeline import run_dpo

    try:
        run_dpo(args.data, args.out, seed=args.seed, steps=args.steps)
    except (ValueError, FileNotFoundError) as e:  # bad data: say what, without a traceback
        print(f"zokern dpo: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    from zokern import demo
    from zokern.preference import pipeline
    from zokern.preference import viz

    parser = argparse.ArgumentParser(prog="zokern", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="the preference pipeline: ZOPrO vs MeZO direction vs RLOO")
    pipeline.add_arguments(demo_parser)
    demo_parser.set_defaults(run=_demo)
    dpo = commands.add_parser("dpo", help="offline ZO-DPO on a preference dataset (prompt, chosen, rejected)")
    pipeline.add_dpo_arguments(dpo)
    dpo.set_defaults(run=_dpo)
    viz_parser = commands.add_parser("viz", help="policy-reward interplay plots from a run's sketches")
    viz.add_arguments(viz_parser)
    viz_parser.set_defaults(run=viz.run_command)
    quick = commands.add_parser("quickstart", help="a small zeroth-order fine-tune with the fused kernels")
    demo.add_arguments(quick)
    quick.set_defaults(run=_quickstart)
    commands.add_parser("info", help="version, stream version and the available backends").set_defaults(run=_info)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
