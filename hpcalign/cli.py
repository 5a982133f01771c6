"""The `hpcalign` command: one subcommand per module in `hpcalign.commands`.

Each subcommand lives in its own module exposing `HELP: str` and `main(argv) -> int`, so a
command's argument parsing sits next to what it does and this file stays a table.
Errors the user can fix (`hpcalign.errors.UserError`) print one clear line and exit 2;
they never show a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

from hpcalign.durable import keep_private
from hpcalign.errors import UserError

# name -> module under hpcalign.commands (each has HELP and main(argv) -> int)
COMMANDS: dict[str, str] = {
    "run": "run",
    "submit": "submit",
    "status": "status",
    "cancel": "cancel",
    "inspect": "inspect",
    "init-model": "init_model",
    "plot": "plot",
    "rollout": "rollout",
    "rescore": "rescore",
    "export": "export",
    "convert": "convert",
    "train-rm": "train_rm",
    "plan": "plan",
    "sweep": "sweep",
    "report": "report",
}
# commands that create or write a RUN_DIR (or a rollout directory): their files are private
RUN_DIR_WRITERS = frozenset({"run", "submit", "rollout", "rescore", "export", "convert",
                             "train-rm", "sweep", "cancel"})


def _usage() -> str:
    lines = ["usage: hpcalign COMMAND [ARGS...]", "", "commands:"]
    for name, module in COMMANDS.items():
        try:
            help_text = importlib.import_module(f"hpcalign.commands.{module}").HELP
        except ImportError:
            continue
        lines.append(f"  {name:<12} {help_text}")
    lines.append("")
    lines.append("Every command that takes a CONFIG also takes key=value overrides after it.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from hpcalign import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"hpcalign: unknown command '{name}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"hpcalign.commands.{COMMANDS[name]}")
    previous_umask = keep_private() if name in RUN_DIR_WRITERS else None
    try:
        return int(module.main(argv[1:]) or 0)
    except UserError as err:
        print(f"hpcalign {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:  # an in-process caller (a test, a notebook) keeps its own umask
        if previous_umask is not None:
            os.umask(previous_umask)


if __name__ == "__main__":
    sys.exit(main())
