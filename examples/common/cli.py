"""The command line both example trainers share: a TOML config, ``--set`` overrides, output dir, resume, quiet."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from examples.common.config import ConfigError, load_config

# Keys of the trainer's results printed on stdout at the end (the whole results are in results.json).
PRINTED_RESULTS = ("test", "best_epoch", "epochs", "wall_s")


def build_parser(prog: str, description: str, set_example: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="TOML config (sections data/model/train/output); default: built-in defaults")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. {set_example} (repeatable)",
    )
    p.add_argument("--output-dir", help="shorthand for --set output.dir=...")
    p.add_argument("--resume", action="store_true", help="continue from <output.dir>/last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument(
        "--tp",
        type=int,
        metavar="N",
        help="tensor-parallel ranks per HSTU block (shorthand for --set parallel.tp=N); launch with torchrun, "
        "the data-parallel size is the world size / N",
    )
    return p


def run_cli(
    argv: list[str] | None,
    *,
    prog: str,
    doc: str,
    set_example: str,
    config_cls: type,
    train: Callable[[Any, bool], dict[str, Any]],
) -> int:
    """Parses ``argv``, loads ``config_cls`` and calls ``train(config, resume)``; returns the exit status.

    ``doc``'s first line is the description. A bad config prints ``error: ...`` and returns 2 before ``train``
    runs, so ``train`` may import the heavy modules itself and a typo costs no import time.
    """
    args = build_parser(prog, doc.split("\n")[0], set_example).parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output.dir={json.dumps(args.output_dir)}")
    if args.quiet:
        overrides.append("output.progress=false")
    if args.tp is not None:
        overrides.append(f"parallel.tp={args.tp}")
    # force: importing fbgemm_gpu logs through the root logger, which configures it (at WARNING) before we get here.
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True
    )
    try:
        config = load_config(config_cls, args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        results = train(config, args.resume)
    except ConfigError as e:  # found once the run starts, e.g. a layout the launched processes cannot take
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the results; one prints them
        print(json.dumps({k: results[k] for k in PRINTED_RESULTS if k in results}, indent=2))
    return 0
