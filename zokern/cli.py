"""The `zokern` command.

- `zokern demo`: the main job, the preference pipeline on the CPU (data, policy, reward model; ZOPrO against the
  MeZO direction and first-order RLOO), with metrics and plots in an output directory;
- `zokern dpo --data FILE`: offline ZO-DPO on a preference dataset;
- `zokern viz RUN_DIR`: plots of the policy–reward interplay from the sketches a run recorded;
- `zokern quickstart`: a small ZO fine-tune with ZOSGD, and its step timed against MeZO's published loop;
- `zokern info`: the version, the stream version and the backends this install can run.

Errors: a bad option value (a count that is not positive, a device that is not usable here, an --out that cannot be
a directory, ...) is argparse's one-line error before any work; bad input found once a command runs (a dataset, a
model directory) is one line `zokern COMMAND: ...` (`ZOKERN_TRACEBACK=1` shows its traceback instead). Both exit
with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import threading


def _info(_: argparse.Namespace) -> int:
    import torch

    import zokern

    print(f"zokern {zokern.__version__}, stream version {zokern.STREAM_VERSION}, torch {torch.__version__}")
    for name, state in zokern.backend_status().items():
        print(f"  {name:6s} {state}")
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    import zokern
    from zokern import demo

    if args.backend is not None and args.backend not in zokern.available_backends():
        raise ValueError(f"--backend {args.backend} is not available here: {zokern.backend_status()[args.backend]}")
    result = demo.run(steps=args.steps, eps=args.eps, lr=args.lr, backend=args.backend, device=args.device)
    if not result["end_loss"] < result["start_loss"]:  # (a NaN end loss too)
        print("zokern quickstart: the loss did not go down", file=sys.stderr)
        return 1
    return 0


# What each command imports only once its work is under way (plots at the end of a run): missing, the run would
# train for minutes and then fail. pip names, as pyproject.toml's "preference" extra lists them.
_NEEDS = {
    "demo": ("transformers", "datasets", "vaderSentiment", "matplotlib"),
    "dpo": ("transformers", "datasets"),
    "viz": ("matplotlib",),
}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder that refuses it, a module left as None in sys.modules
        return False


def _check_ready(args: argparse.Namespace) -> None:
    """Before any work: the packages the command needs, and a backend forced by ZOKERN_BACKEND where the command
    trains (its RuntimeError came when the first optimizer was built, after the data and the reward model); an
    explicit --backend wins over the variable, as everywhere."""
    from zokern import _dispatch

    missing = [name for name in _NEEDS.get(args.command, ()) if not _importable(name)]
    if missing:
        raise ValueError(f"needs {', '.join(missing)}: pip install 'zokern[preference]'")
    if args.command in ("demo", "dpo", "quickstart") and getattr(args, "backend", None) is None:
        try:
            _dispatch.available_requested_backend(None)
        except RuntimeError as e:
            raise ValueError(f"{e} (forced by the environment variable {_dispatch.ENV_VAR})") from None


def _demo(args: argparse.Namespace) -> int:
    import torch

    from zokern.preference.pipeline import run_pipeline

    device = args.device or ("cuda" if args.model is not None and torch.cuda.is_available() else "cpu")
    run_pipeline(args.out, seed=args.seed, forwards=args.forwards, methods=args.methods, model=args.model,
                 device=device, trainable=args.trainable)  # fmt: skip
    return 0


def _dpo(args: argparse.Namespace) -> int:
    from zokern.preference.pipeline import run_dpo

    run_dpo(
        args.data, args.out, seed=args.seed, steps=args.steps, response_tokens=args.response_tokens, split=args.split
    )
    return 0


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


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
    args = parser.parse_args(argv)  # a bad option value ends here: argparse's error line, exit status 2
    # Killed (a scheduler's SIGTERM, `timeout`), the process would die without unwinding: the demo's staging
    # directory would stay in the temporary directory. Exit as a SIGTERM'd process does, unwinding first.
    terminating = threading.current_thread() is threading.main_thread()
    terminating = terminating and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if terminating:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _check_ready(args)
        return args.run(args)
    # Bad input found once a command runs (data, model, backend), and files it cannot write (permissions, a file
    # where a directory must go, a full disk): one line, whatever the message it wraps (transformers' span several).
    except (ValueError, OSError) as e:
        if os.environ.get("ZOKERN_TRACEBACK") == "1":  # when the one line hides a bug: the whole traceback
            raise
        message = " ".join(str(e).split())
        print(f"zokern {args.command}: {message} (ZOKERN_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: unwound (the demo's staging directory gone), said in one line
        if os.environ.get("ZOKERN_TRACEBACK") == "1":
            raise
        print(f"zokern {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if terminating:  # (main() called from Python: the caller's handling comes back)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
