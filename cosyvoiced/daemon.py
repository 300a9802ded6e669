"""`cosyvoiced`: run the daemon in the foreground (systemd supervises; no self-daemonizing)."""

from __future__ import annotations

import argparse
import sys

from cosyvoiced import __version__, config, logs
from cosyvoiced.supervisor import EXIT_CONFIG, Supervisor

DEFAULT_CONFIG = "/etc/cosyvoiced/cosyvoiced.toml"


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cosyvoiced", description=__doc__)
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"TOML config file (default: {DEFAULT_CONFIG})")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config file, print the outcome and exit")
    parser.add_argument("--version", action="version", version=f"cosyvoiced {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    try:
        settings = config.load(args.config)
    except config.ConfigError as error:
        print(f"cosyvoiced: config error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(f"cosyvoiced: {args.config}: OK")
        return 0
    logs.configure_supervisor(settings.log)
    return Supervisor(settings, args.config).run()


if __name__ == "__main__":
    sys.exit(main())
