"""`screener serve` for subprocess tests: settings from a JSON file (a config.toml as JSON).

python -m tests.node.node_runner settings.json
"""

import json
import sys

from screener import cli, config, logs


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        settings = config.parse(json.load(f))
    logs.configure(settings.logging.renderer, settings.logging.level)
    return cli.cmd_serve(settings)


if __name__ == "__main__":
    sys.exit(main())
