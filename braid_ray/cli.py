"""What every launch script shares: ``--config`` + ``key=value`` overrides, and logging set up once."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

import yaml

from braid_ray.config import Config, ConfigError, load_config, parse_override, read_yaml
from braid_ray.rundir import RunDirError

log = logging.getLogger("braid_ray")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    log.setLevel(level)  # explicit: a Ray job's logging config may lower the root logger to WARNING


def debug_requested(argv: Sequence[str]) -> bool:
    """``run.debug`` as a command line sets it: in its ``--config`` preset, then a ``run.debug=...`` override.

    Read apart from loading the config, because the error handler needs it when the config is what failed. A
    sweep file's ``base`` is not read: pass run.debug=true on the command line there."""
    debug = False
    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            path = arg.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                run = read_yaml(path).get("run")
            except (ConfigError, OSError):
                continue
            if isinstance(run, dict) and "debug" in run:
                debug = run["debug"] is True
        elif arg.startswith("run.debug="):
            try:
                debug = parse_override(arg)[1] is True
            except ConfigError:
                debug = False
    return debug


def parse(description: str, argv: list[str] | None = None, default_config: str | None = None) -> Config:
    """Parse ``[--config FILE] [key=value ...]`` into a validated Config; exit with the message on a bad key
    (raise it with run.debug=true)."""
    return parse_args(description, argv, default_config)[0]


def parse_args(description: str, argv: list[str] | None = None, default_config: str | None = None,
               check_flag: bool = False) -> tuple[Config, argparse.Namespace]:
    """``parse``, also returning the parsed arguments; ``check_flag`` adds ``--check`` (a dry run)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="YAML preset (see configs/)")
    if check_flag:
        parser.add_argument("--check", action="store_true",
                            help="validate the config, the table and the split, say what the run would do; "
                                 "train and write nothing")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. run.dir=runs/x data.quantile=0.5")
    args = parser.parse_intermixed_args(argv)  # overrides may stand before and after --config
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        given = ([f"--config={args.config}"] if args.config else []) + args.overrides
        if debug_requested(given):
            raise
        parser.exit(2, f"config error: {e}\n")
    log.info("resolved config:\n%s", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    return cfg, args


def run_main(main: Callable[[], None], argv: Sequence[str] | None = None) -> None:
    """Run a launch script's main; user errors (bad config, bad table, changed stage, a diverged fine-tuning)
    print one clear line and exit 2 instead of a traceback. ``run.debug=true`` (on the command line ``argv``,
    default ``sys.argv[1:]``, or in its --config preset) shows the traceback."""
    try:
        main()
    except (ConfigError, RunDirError, FileNotFoundError, ValueError, FloatingPointError) as e:
        if debug_requested(sys.argv[1:] if argv is None else argv):
            raise
        log.error("%s", e)
        sys.exit(2)
