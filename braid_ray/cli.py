"""What every launch script shares: ``--config`` + ``key=value`` overrides, and logging set up once."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

import yaml

from braid_ray.config import Config, ConfigError, load_config
from braid_ray.rundir import StageConflict

log = logging.getLogger("braid_ray")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    log.setLevel(level)  # explicit: a Ray job's logging config may lower the root logger to WARNING


def parse(description: str, argv: list[str] | None = None, default_config: str | None = None) -> Config:
    """Parse ``[--config FILE] [key=value ...]`` into a validated Config; exit with the message on a bad key."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="YAML preset (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. run.dir=runs/x data.quantile=0.5")
    args = parser.parse_intermixed_args(argv)  # overrides may stand before and after --config
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        parser.exit(2, f"config error: {e}\n")
    log.info("resolved config:\n%s", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    return cfg


def run_main(main: Callable[[], None]) -> None:
    """Run a launch script's main; user errors (bad config, bad table, changed stage, a diverged fine-tuning)
    print one clear line and exit 2 instead of a traceback. BRAID_DEBUG=1 shows the traceback."""
    try:
        main()
    except (ConfigError, StageConflict, FileNotFoundError, ValueError, FloatingPointError) as e:
        if os.environ.get("BRAID_DEBUG"):
            raise
        log.error("%s", e)
        sys.exit(2)
