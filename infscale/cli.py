"""The ``infscale`` command: ``demo``, ``run``, ``top`` and ``info``.

- ``infscale demo`` trains a small MLP on scikit-learn's digits with 10% flipped labels and
  shows what influence functions find (see ``infscale.demo``).
- ``infscale run`` computes the influences of a user's model (``--model pkg.mod:factory``)
  on a user's data (``--data pkg.mod:factory``) into a zarr store, sequentially or on Dask.
- ``infscale top STORE --test I`` prints the most helpful and harmful training points of one
  test point, reading only that row of blocks.
- ``infscale info STORE [--verify]`` prints the shape, chunks, completeness and attributes of a
  store; ``--verify`` reads every finished block back and checks its checksum.

This module only parses arguments (flags over a TOML file) and calls the application layer,
``infscale.app`` (registry, factories, results, cluster, pipeline); see ``docs/cli.md``.

Errors a person can act on print one line on stderr and exit with code 2: exactly the
exceptions derived from ``infscale.errors.UserFixableError`` (a bad factory or parameter, an
existing store, an unreachable scheduler, a λ too small for the curvature, a diverging LiSSA,
...); ``--debug`` adds the traceback. Anything else is an internal error: exit code 1.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from .app.cluster import dask_client, parse_scheduler
from .app.factories import load_data, load_factory, load_model
from .app.pipeline import ComputeSettings, RunConfig, compute_into_group, fit, run_pipeline
from .app.reading import info_lines, printable, top_lines
from .app.registry import (
    METHODS,
    available_methods,
    format_params,
    make_influence_model,
    parse_param,
    parse_params,
    resolve_method,
)
from .app.results import (
    INFLUENCES,
    SELF_INFLUENCES,
    TOP_ARRAYS,
    completeness,
    open_results,
    prepare_group,
    write_top_k,
)
from .errors import UsageError, UserFixableError

__all__ = [
    "UsageError",
    "main",
    "METHODS",
    "available_methods",
    "resolve_method",
    "parse_param",
    "parse_params",
    "make_influence_model",
    "load_factory",
    "RunConfig",
    "run_pipeline",
    # also re-exported from infscale.app for code that imported them from here
    "ComputeSettings", "compute_into_group", "fit", "dask_client", "parse_scheduler",
    "load_data", "load_model", "format_params", "INFLUENCES", "SELF_INFLUENCES", "TOP_ARRAYS",
    "completeness", "open_results", "prepare_group", "write_top_k",
    "report_error", "build_parser", "build_config",
]  # fmt: skip

#: Exit code for errors the user can act on (``UserFixableError``); 1 is for internal errors.
USAGE_EXIT = 2


# ====================================================================== config files
def _load_toml(path: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise UsageError(
                f"--config {path}: reading TOML on Python 3.10 needs the tomli package (pip install tomli)."
            ) from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as error:
        raise UsageError(f"--config: cannot read {path!r}: {error.strerror or error}.") from error
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"--config: {path!r} is not valid TOML: {error}.") from error


_CONFIG_KEYS = {
    "model": str, "data": str, "method": str, "params": dict, "mode": str, "batch_size": int, "device": str,
    "out": str, "overwrite": bool, "resume": bool, "top_k": int, "self_influences": bool, "scheduler": str,
    "connect_timeout": (int, float), "progress": bool,
}  # fmt: skip


def build_config(args: argparse.Namespace) -> RunConfig:
    """Flags over the TOML file (``--config``) over the defaults."""
    values: dict[str, Any] = {}
    if args.config:
        data = _load_toml(args.config)
        data = data.get("infscale", data)  # allow a [infscale] table or top-level keys
        for key, value in data.items():
            norm = key.replace("-", "_")
            if norm not in _CONFIG_KEYS:
                raise UsageError(
                    f"--config {args.config}: unknown key {key!r}; known keys: {', '.join(_CONFIG_KEYS)}."
                )
            expected = _CONFIG_KEYS[norm]
            if not isinstance(value, expected) or (
                expected in (int, (int, float)) and isinstance(value, bool)
            ):
                kind = "number" if isinstance(expected, tuple) else expected.__name__
                raise UsageError(f"--config {args.config}: {key} must be a {kind}; got {value!r}.")
            values[norm] = value
    for key in _CONFIG_KEYS:
        flag = getattr(args, key, None)
        if key == "params":
            continue
        if flag is not None:
            values[key] = flag
    params = dict(values.get("params", {}))
    params.update(parse_params(args.param))
    values["params"] = params
    return RunConfig(**values)


# ====================================================================== commands
def cmd_run(args: argparse.Namespace) -> int:
    run_pipeline(build_config(args), log=_log)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers: expected an integer ≥ 1; got {args.workers}.")
    run_demo(
        out=args.out,
        method=args.method,
        params=parse_params(args.param),
        workers=args.workers,
        size=args.size,
        progress=not args.no_progress,
    )
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    for line in top_lines(args.store, args.test, args.k):
        print(line)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    lines, damaged = info_lines(args.store, verify=args.verify)
    for line in lines:
        print(line)
    if damaged:
        raise UsageError(
            f"--verify: {damaged} damaged block(s) in {args.store!r} (listed above); rerun the same "
            "infscale run with --resume to recompute them."
        )
    return 0


def _log(message: str) -> None:
    print(message, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infscale",
        description="Influence functions for PyTorch models at any scale.",
        epilog="Add --debug to any command to see the traceback of an error. Docs: docs/cli.md",
    )
    parser.add_argument("--version", action="version", version=f"infscale {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,run,top,info}")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="train a digits MLP with 10%% flipped labels and show what influence finds",
        description="Train a small MLP on scikit-learn's digits after flipping 10%% of the training "
        "labels, compute influences into DIR/influences.zarr, print the findings and draw DIR/report.png.",
    )
    demo.add_argument("--out", default="demo-output", help="output directory (default: demo-output)")
    demo.add_argument(
        "--method", default="direct", help=f"influence method: {', '.join(METHODS)} (default: direct)"
    )
    demo.add_argument("--param", action="append", metavar="KEY=VALUE", help="method parameter (repeatable)")
    demo.add_argument(
        "--workers", type=int, default=None, help="use a local Dask cluster of N worker processes"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--size", choices=("full", "small", "tiny"), default="full", help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser(
        "run",
        help="compute influences of your model on your data into a zarr store",
        description="Compute test × train influences of a user model into a zarr store. Flags override "
        "the values of --config FILE (TOML; keys as the flags with underscores, [params] table).",
    )
    run.add_argument("--config", metavar="FILE", help="TOML file with the settings below")
    run.add_argument("--model", metavar="PKG.MOD:FACTORY", help="factory returning (model, loss)")
    run.add_argument(
        "--data", metavar="PKG.MOD:FACTORY", help="factory returning (train_dataset, test_dataset)"
    )
    run.add_argument("--method", help=f"influence method: {', '.join(METHODS)} (default: cg)")
    run.add_argument("--param", action="append", metavar="KEY=VALUE", help="method parameter (repeatable)")
    run.add_argument("--mode", choices=("up", "perturbation"), help="influence mode (default: up)")
    run.add_argument(
        "--batch-size", type=int, metavar="N", help="rows per batch and per zarr chunk (default: 64)"
    )
    run.add_argument("--device", help="torch device (default: cpu)")
    run.add_argument("--out", metavar="PATH_OR_URL", help="zarr store to write (path, file://, s3://, ...)")
    run.add_argument("--overwrite", action="store_true", default=None, help="replace an existing store")
    run.add_argument("--resume", action="store_true", default=None, help="finish an interrupted run")
    run.add_argument(
        "--top-k", type=int, metavar="K", help="also store the K most helpful/harmful per test point"
    )
    run.add_argument(
        "--self-influences",
        action="store_true",
        default=None,
        help="also store every training point's self-influence",
    )
    run.add_argument(
        "--connect-timeout", type=float, metavar="SECONDS", help="wait this long for a tcp:// scheduler (10)"
    )
    run.add_argument("--scheduler", help="sync (default), local:N, or tcp://HOST:PORT of a Dask scheduler")
    run.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no progress bars"
    )
    run.set_defaults(func=cmd_run)

    top = sub.add_parser("top", help="most helpful and harmful training points of one test point")
    top.add_argument("store", metavar="STORE", help="zarr store written by infscale run/demo (path or URL)")
    top.add_argument("--test", type=int, required=True, metavar="I", help="test point index")
    top.add_argument("-k", type=int, default=10, help="how many of each (default: 10)")
    top.set_defaults(func=cmd_top)

    info = sub.add_parser("info", help="shape, chunks, completeness and attributes of a store")
    info.add_argument("store", metavar="STORE", help="zarr store (path or URL)")
    info.add_argument(
        "--verify",
        action="store_true",
        help="read every finished block back and check its checksum (exit code 2 if any is damaged)",
    )
    info.set_defaults(func=cmd_info)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def report_error(command: str, error: BaseException, debug: bool = False) -> int:
    """Print ``error`` on stderr as the command reports it and return the exit code: 2 (one
    line) for a ``UserFixableError``, 1 (an internal error) for anything else. ``debug`` adds
    the traceback."""
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__)
    if isinstance(error, UserFixableError):
        name = "" if isinstance(error, UsageError) else f"{type(error).__name__}: "
        print(f"infscale {command}: error: {name}{_one_line(error)}", file=sys.stderr)
        return USAGE_EXIT
    print(
        f"infscale {command}: internal error: {type(error).__name__}: {_one_line(error)} "
        "(rerun with --debug for the traceback)",
        file=sys.stderr,
    )
    return 1


def _one_line(error: BaseException) -> str:
    return printable(" ".join(str(error).split()))  # messages may quote a store's keys or attributes


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``infscale`` command. Returns the exit code: 0 success, 2 an error
    the user can act on (one line on stderr), 1 an internal error, 130 interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return int(exit_.code or 0)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"infscale {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        return report_error(args.command, error, debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
