"""What every ``fedkd`` subcommand shares on its command line.

- :class:`Parser`: never abbreviates an option (``--num-round`` is not ``--num-rounds``), and
  refuses an unknown option with the subcommand's own usage and a "did you mean".
- :class:`HelpFormatter` / :class:`RawHelpFormatter`: state each default once.
- :func:`add_config_options`: the experiment settings as ``--KEY VALUE`` options, grouped by section.
- :func:`read_overrides` / :func:`validated` / :func:`load_overrides`: TOML override files,
  with every error naming the file and the line.
"""

from __future__ import annotations

import argparse
import difflib
import re
import tomllib
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

from fedkd.config import SECTIONS, ExperimentConfig, Scalar

Where = dict[str, tuple[Path, int]]  # config key -> (file, line) that set it


# --------------------------------------------------------------------------- parsing
class Parser(argparse.ArgumentParser):
    """``allow_abbrev=False``; unknown arguments are an error of the parser that met them.

    ``add_subparsers`` makes its subparsers of this class too, so a subcommand refuses an
    unknown option with its own usage rather than the top-level one."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(self.unknown_message(extras))
        return ns, extras

    def unknown_message(self, extras: list[str]) -> str:
        options = [a for a in extras if a.startswith("-") and a != "-" and not _is_number(a)]
        if not options:
            return f"unexpected argument(s): {' '.join(extras)}"
        known = sorted(s for s in self._option_string_actions if s.startswith("--"))
        parts = []
        for arg in options:
            name = arg.split("=", 1)[0]
            longer = [k for k in known if k.startswith(name)]
            guess = longer if len(longer) == 1 else difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            text = f"unrecognized option {name}"
            if longer:
                text += " (options are never abbreviated)"
            parts.append(text + (f"; did you mean {guess[0]}?" if guess else ""))
        return "; ".join(parts)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _DefaultOnce:
    """Append "(default: X)" only where the help does not already say it and X means something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or not action.option_strings or action.nargs == 0
                or any(action.default is v for v in (None, False, True, argparse.SUPPRESS))
                or action.default == []):
            return text
        return text + " (default: %(default)s)"


class HelpFormatter(_DefaultOnce, argparse.HelpFormatter):
    pass


class RawHelpFormatter(_DefaultOnce, argparse.RawDescriptionHelpFormatter):
    pass


def parse_bool(text: str) -> bool:
    if text.lower() in {"true", "1", "yes"}:
        return True
    if text.lower() in {"false", "0", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def shown(value: Scalar) -> str:
    """A default as one types it: true/false, numbers as they are, text quoted (so '' shows)."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def add_config_options(parser: argparse.ArgumentParser, keys: Iterable[str] | None = None, *,
                       title: str = "{section} settings") -> None:
    """``--KEY VALUE`` for each experiment setting (every one, or ``keys``), in one argument group
    per config section (``title`` names it; ``{section}`` is the section's name) so that ``--help``
    lists them by section; dest ``cfg:KEY``, default None so that only what the user typed
    overrides the files."""
    wanted = None if keys is None else set(keys)
    for section, section_keys in ExperimentConfig.sections().items():
        mine = [k for k in section_keys if wanted is None or k in wanted]
        if not mine:
            continue
        group = parser.add_argument_group(title.format(section=section), SECTIONS[section])
        for key, default, text in ExperimentConfig.help_table(section):
            if key not in mine:
                continue
            kind = type(default)
            if kind is bool:  # `--resume` alone means true; `--progress false` still works
                group.add_argument(f"--{key}", dest=f"cfg:{key}", default=None, metavar="BOOL", nargs="?",
                                   const=True, type=parse_bool,
                                   help=f"{text} (default: {shown(default)}; bare --{key} = true)")
            else:
                group.add_argument(f"--{key}", dest=f"cfg:{key}", default=None, metavar=kind.__name__.upper(),
                                   type=kind, help=f"{text} (default: {shown(default)})")


def config_values(args: argparse.Namespace) -> dict[str, Scalar]:
    """The settings typed on the command line (the ``cfg:KEY`` options that were given)."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}


# --------------------------------------------------------------------------- override files
_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def read_overrides(files: Iterable[Path]) -> tuple[dict[str, Scalar], Where]:
    """Merge TOML override files (later files win); also say which file and line set each key."""
    out: dict[str, Scalar] = {}
    where: Where = {}
    for f in files:
        f = Path(f)
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{f}: cannot read overrides: {exc}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            msg = str(exc)
            at = _AT.search(msg)
            if at:
                raise ValueError(f"{f}: line {at.group(1)}, column {at.group(2)}: not valid TOML: "
                                 f"{msg[:at.start()]}") from None
            raise ValueError(f"{f}: not valid TOML: {msg}") from None
        for key, value in data.items():
            out[key] = value
            where[key] = (f, _line_of(text, key))
    return out, where


def _line_of(text: str, key: str) -> int:
    pattern = re.compile(rf"""^\s*(["']?){re.escape(key)}\1\s*[=.\]]|^\s*\[\s*(["']?){re.escape(key)}\2\s*\]""")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return 0


@contextmanager
def blame(where: Where):
    """Re-raise a ValueError that names a config key set in a file with that file and line."""
    try:
        yield
    except ValueError as exc:
        raise blamed(exc, where) from None


def blamed(exc: ValueError, where: Where) -> ValueError:
    match = re.search(r"[Cc]onfig key '([^']+)'", str(exc))
    if not match or match.group(1) not in where:
        return exc
    f, line = where[match.group(1)]
    return ValueError(f"{f}: line {line}: {exc}" if line else f"{f}: {exc}")


def validated(flat: Mapping[str, Scalar], where: Where | None = None) -> ExperimentConfig:
    """Parse the settings, naming the file and line of a bad key set in a file."""
    with blame(where or {}):
        return ExperimentConfig.from_flat(flat)


def load_overrides(files: list[Path]) -> dict[str, Scalar]:
    """Read and check override files; a bad key or value is named with its file and line."""
    out, where = read_overrides(files)
    validated(out, where)  # name the bad key before anything starts
    return out
