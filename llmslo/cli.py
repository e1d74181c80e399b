"""``llmslo`` command line: one entry point, one module per sub-command.

Sub-commands are imported lazily so that ``llmslo generate`` does not pay for
importing Ray, and a missing optional part breaks only its own command.
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line help). Each function takes argv (list[str])
# and returns a process exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("serve.cli:main", "start a local Ray and deploy serve/config.yaml"),
    "generate": ("llmslo.generate:main", "write alerts/, dashboards/ and deploy/k8s/prometheusrule.yaml from slo.yaml"),
    "grafana": ("llmslo.grafana_push:main", "push dashboards and alerts to a Grafana"),
    "up": ("llmslo.stack:main", "run the whole stack as local processes"),
    "demo": ("llmslo.demo:main", "bring the stack up, run a bounded load, print the verdict"),
    "compare": ("llmslo.compare:main", "compare runs with the seed's platform table"),
}


def _usage() -> str:
    lines = ["usage: llmslo COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"llmslo: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
