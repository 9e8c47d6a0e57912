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
    """A sub-command: ``target`` is ``"module:function"`` taking the composed config; ``config`` names
    the command's own primary config under ``conf/`` (None: the app's); ``machine_defaults``, a
    ``"module:function"`` that takes the command line's overrides and returns them with defaults
    that depend on the machine put in front (e.g. the search's proxy on a GPU), or None."""

    target: str
    help: str
    config: str | None = None
    machine_defaults: str | None = None

    def load(self) -> Callable:
        return _load(self.target)

    def with_machine_defaults(self, overrides: list[str]) -> list[str]:
        return _load(self.machine_defaults)(overrides) if self.machine_defaults else overrides


def _load(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def fail(message: str) -> None:
    """Print one line for the user and exit with the bad-input code."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def one_line(message: str) -> str:
    """``message`` as one printable line: OmegaConf's context lines (``full_key: k``,
    ``object_type=...``) become `` (at k)``, other line breaks a space, control characters escapes."""
    import re

    text = re.sub(r"\n\s*full_key: *([^\n]*)", lambda m: f" (at {m.group(1)})" if m.group(1) else "", str(message))
    text = re.sub(r"\n\s*(object_type|reference_type)=[^\n)]*", "", text)
    text = " ".join(part.strip() for part in text.strip().split("\n"))
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _usage(app: str, commands: dict[str, Command]) -> str:
    lines = [f"usage: python -m {app} <command> [key=value ...] [-m]", "", "commands:"]
    lines += [f"  {name:<10} {cmd.help}" for name, cmd in commands.items()]
    return "\n".join(lines)


def _user_errors() -> tuple[type[BaseException], ...]:
    from omegaconf.errors import OmegaConfBaseException

    from detector.errors import UserError

    return (UserError, OmegaConfBaseException)


def compose(config_name: str, overrides: Sequence[str]):
    """Compose ``conf/<config_name>.yaml`` with overrides; bad overrides raise UserError.

    Besides Hydra's own checks, each value an override sets must be of the kind of its default
    (:func:`check_override_kinds`), so that ``seed=abc`` is refused here in one line instead of
    failing deep inside a command.
    """
    from omegaconf.errors import OmegaConfBaseException

    from detector.errors import UserError

    cfg = _compose(config_name, overrides)
    try:
        check_override_kinds(cfg, _default_config(config_name), overrides)
    except OmegaConfBaseException as err:  # an interpolation that does not resolve
        raise UserError(f"{one_line(str(err))} (see the README's override tables for valid keys and values)") \
            from None
    return cfg


def _compose(config_name: str, overrides: Sequence[str]):
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
    # Hydra also lets ValueError (a number as a group option), TypeError (a list of lists as one)
    # and OSError (an option name too long for a file name) escape for bad overrides.
    except (HydraException, OmegaConfBaseException, ValueError, TypeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{first} (see the README's override tables for valid keys and values)") from None
    except AssertionError:  # Hydra asserts that a group option is a name: `backbone=${oc.select:x}` fails there
        groups = sorted({o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o and "${" in o.split("=", 1)[1]})
        raise UserError(f"{', '.join(groups) or 'an override'}: a config group option must be a name from "
                        "conf/<group>/, not an interpolation (see the README's override tables)") from None


_DEFAULTS: dict[str, dict] = {}
# Keys whose default is not null but that accept null (their config comment says what null means).
NULLABLE_KEYS = frozenset({"proxy_eval.train_images", "proxy_eval.width", "controller.minibatch"})
# Keys whose default is a word (all / none / auto / one name) but that also take a list of names.
WORD_OR_LIST_KEYS = frozenset({"bench.fast_paths", "bench.compile", "bench.torchvision", "train.fast_paths"})


def _default_config(config_name: str) -> dict:
    """The primary config without overrides, as plain containers (composed once per process)."""
    if config_name not in _DEFAULTS:
        from omegaconf import OmegaConf

        _DEFAULTS[config_name] = OmegaConf.to_container(_compose(config_name, []), resolve=True)
    return _DEFAULTS[config_name]


def check_override_kinds(cfg, default: dict, overrides: Sequence[str]) -> None:
    """Refuse (UserError) an override whose value is not of the kind of the key's default.

    Kinds: a flag or a text takes a single value (not a list or mapping); a number takes a finite
    number (an integer default takes a float too: some integer settings accept fractions); a list
    takes a list or one item; a section (a config group) takes a mapping. Null is accepted where
    the default is null or the key is in :data:`NULLABLE_KEYS`. Keys without a default (new keys,
    another group option's keys) are left to the command.
    """
    import math

    from omegaconf import OmegaConf

    from detector.errors import UserError

    for override in overrides:
        if override.startswith("~") or "=" not in override:
            continue
        key = override.split("=", 1)[0].lstrip("+").split("@")[0]
        expected: object = default
        for part in key.split("."):
            expected = expected.get(part, KeyError) if isinstance(expected, dict) else KeyError
        if expected is KeyError or expected is None:
            continue
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=True)
        if value is None:
            problem = None if key in NULLABLE_KEYS else "must not be null"
        elif isinstance(expected, bool):  # other scalars are the command's to interpret (resume=<dir>)
            problem = None if isinstance(value, (bool, str, int, float)) else "expected true or false"
        elif isinstance(expected, (int, float)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            finite = number and (abs(value) < 2**63 if isinstance(value, int) else math.isfinite(value))
            problem = None if finite else "expected a finite number (integers within 64 bits)"
        elif isinstance(expected, str):
            single = isinstance(value, (str, int, float, bool))
            listed = key in WORD_OR_LIST_KEYS and OmegaConf.is_list(value)
            problem = None if single or listed else "expected a single value"
        elif isinstance(expected, list):
            problem = None if OmegaConf.is_list(value) or isinstance(value, str) else "expected a list like [a,b]"
        else:  # a section
            problem = None if OmegaConf.is_dict(value) else "expected a config group option or a mapping"
        if problem:
            shown = override.split("=", 1)[1]
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise UserError(f"{key}={shown}: {problem} (default: {_shown_default(expected)}); see the README's "
                            "override tables")


def _shown_default(value: object) -> str:
    if isinstance(value, dict):
        return "a section"
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def sweep_values(overrides: Sequence[str]) -> list[list[str]]:
    """Each override of a ``-m`` command line as the list of single overrides it sweeps over
    (``a=1,2`` -> ``[a=1, a=2]``; ``a=1`` -> ``[a=1]``; ``hydra.*`` / ``hydra/*``, ``glob(...)``
    and interval sweeps left out); a bad override raises UserError."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    from detector.errors import UserError

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        # glob(...) sweeps over group options and interval sweeps (for sweepers that sample) are
        # expanded by Hydra alone: left out here
        return [[f"{o.get_key_element()}={value}" for value in o.sweep_string_iterator()] if o.is_sweep_override()
                else [o.input_line] for o in parsed
                if not o.is_hydra_override() and o.value_type in (None, ValueType.ELEMENT, ValueType.CHOICE_SWEEP,
                                                                 ValueType.SIMPLE_CHOICE_SWEEP, ValueType.RANGE_SWEEP)]
    except (HydraException, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{first} (see the README's override tables for valid keys and values)") from None


def check_sweep(config_name: str, overrides: Sequence[str]) -> int:
    """Compose every value of every swept override (with the first value of the others), with the
    checks of a single run, before any job starts; returns the number of combinations of the
    checked overrides. UserError names the first bad value: a ``-m`` command line is refused in
    one line, like a single run."""
    choices = [values for values in sweep_values(overrides) if values]
    firsts = [values[0] for values in choices]
    for index, values in enumerate(choices):
        for value in values[1:] if index else values:
            compose(config_name, [*firsts[:index], value, *firsts[index + 1:]])
    jobs = 1
    for values in choices:
        jobs *= len(values)
    return jobs


def _run_multirun(config_name: str, overrides: list[str], func: Callable) -> None:
    """Every job of the sweep runs; one that fails (bad input, a diverging loss) is logged as a
    warning and the next job starts. At the end, failed jobs make one error line and exit 2."""
    import hydra

    check_sweep(config_name, overrides)
    errors = _user_errors()
    failed: list[str] = []

    def task(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        try:
            func(cfg)
        except errors as err:
            job = HydraConfig.get().job.num
            failed.append(f"job {job}: {one_line(str(err))}")
            logging.getLogger("detector.cli").warning("job %s failed: %s (the sweep goes on)", job, one_line(str(err)))

    sys.argv = [sys.argv[0], "--multirun", *overrides]
    hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(task)()
    if failed:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        fail(f"{len(failed)} job(s) of the sweep failed, the others ran: {failed[0]}{more}")


def dispatch(app: str, config_name: str, commands: dict[str, Command], argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m <app>``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(app, commands))
        sys.exit(0 if argv else EXIT_BAD_INPUT)
    name, overrides = argv[0], argv[1:]
    if name not in commands:
        fail(f"unknown command '{name}'; choose one of: {', '.join(commands)}")
    config_name = commands[name].config or config_name
    multirun = any(o in ("-m", "--multirun") for o in overrides)
    overrides = [o for o in overrides if o not in ("-m", "--multirun")]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    errors = _user_errors()
    try:
        func = commands[name].load()
        overrides = commands[name].with_machine_defaults(overrides)
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
