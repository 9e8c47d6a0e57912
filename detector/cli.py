"""Sub-command dispatch shared by ``python -m detector`` and ``python -m search``.

``python -m <app> <command> key=value ...`` composes the app's primary Hydra config with the
overrides and calls the command's function with the composed config. ``-m`` / ``--multirun``
hands the overrides to Hydra's launcher instead, which runs one job per combination, each in its
own directory (``hydra.sweep.dir``/<job number>).

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback), 1 unexpected failure.
"""
from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class Command:
    """A sub-command: ``target`` is ``"module:function"`` taking the composed config."""

    target: str
    help: str

    def load(self) -> Callable:
        module, func = self.target.split(":")
        return getattr(importlib.import_module(module), func)


def fail(message: str) -> None:
    """Print one line for the user and exit with the bad-input code."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _usage(app: str, commands: dict[str, Command]) -> str:
    lines = [f"usage: python -m {app} <command> [key=value ...] [-m]", "", "commands:"]
    lines += [f"  {name:<10} {cmd.help}" for name, cmd in commands.items()]
    return "\n".join(lines)


def _user_errors() -> tuple[type[BaseException], ...]:
    from omegaconf.errors import OmegaConfBaseException

    from detector.errors import UserError

    return (UserError, OmegaConfBaseException)


def compose(config_name: str, overrides: Sequence[str]):
    """Compose ``conf/<config_name>.yaml`` with overrides; bad overrides raise UserError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from detector.errors import UserError

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{first} (see the README's override tables for valid keys and values)") from None


def _run_multirun(config_name: str, overrides: list[str], func: Callable) -> None:
    import hydra

    errors = _user_errors()

    def task(cfg) -> None:
        try:
            func(cfg)
        except errors as err:
            fail(str(err))

    sys.argv = [sys.argv[0], "--multirun", *overrides]
    hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(task)()


def dispatch(app: str, config_name: str, commands: dict[str, Command], argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m <app>``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(app, commands))
        sys.exit(0 if argv else EXIT_BAD_INPUT)
    name, overrides = argv[0], argv[1:]
    if name not in commands:
        fail(f"unknown command '{name}'; choose one of: {', '.join(commands)}")
    multirun = any(o in ("-m", "--multirun") for o in overrides)
    overrides = [o for o in overrides if o not in ("-m", "--multirun")]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    errors = _user_errors()
    try:
        func = commands[name].load()
        if multirun:
            _run_multirun(config_name, overrides, func)
            return
        cfg = compose(config_name, overrides)
        func(cfg)
    except errors as err:
        fail(str(err))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
