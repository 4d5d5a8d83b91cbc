"""The ``--config`` flag of the entry points: a config file plus ``--config.a.b=value`` overrides.

ml_collections reads the overrides while absl parses the command line, where a mistake (a missing
file, a mistyped field, a value of the wrong kind) would surface as a long traceback or, for a
tuple field, not at all (``--config.data.video_size=abc`` parses as ``('abc',)``). :class:`ConfigFlag`
parses the command line up front and turns each mistake into one :class:`UserError` naming the
flag; ``--help`` lists every field of the given config file with its value.

    _CONFIG = config_cli.ConfigFlag("configs/tiny.py", "Config file (configs/*.py).")
    app.run(main, flags_parser=_CONFIG.flags_parser)
"""

from __future__ import annotations

import difflib
import importlib.util
import numbers
import pathlib
import re
import sys
from typing import Any, Sequence

from absl import flags
from ml_collections import ConfigDict, config_flags

from v2w_jax.user_errors import UserError, report

HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort")


class ConfigFlag:
  """A ``--config`` flag (ml_collections config file) whose mistakes are :class:`UserError`s."""

  def __init__(self, default: str | None, help_string: str, *, name: str = "config",
               flag_values: flags.FlagValues = flags.FLAGS, doc: str = ""):
    self.default = default
    self.name = name
    self.doc = doc
    self._flag_values = flag_values
    self._config_arg = re.compile(rf"^--?{re.escape(name)}(=|$)")
    self._override_arg = re.compile(rf"^--?(no)?{re.escape(name)}\.([^=]+)")
    # ml_collections looks for the overrides in this list (filled by `parse`), not in sys.argv, and
    # loads nothing at definition time (default None): every error surfaces inside `parse`.
    self._argv: list[str] = []
    self._holder = config_flags.DEFINE_config_file(
        name, None, f"{help_string} (default: {default})" if default else help_string,
        flag_values=flag_values, lock_config=True, sys_argv=self._argv)

  @property
  def value(self) -> ConfigDict:
    return self._holder.value

  # ---- Parsing --------------------------------------------------------------------------------

  def parse(self, argv: Sequence[str]) -> tuple[list[str], ConfigDict, bool]:
    """Parses ``argv`` (program name first); returns (positional args, config, whether --help was asked).

    Raises:
      UserError: a missing or broken config file, an unknown flag or config field, a bad value.
    """
    argv = list(argv)
    want_help = any(a in HELP_ARGS for a in argv[1:])
    argv = [argv[0]] + [a for a in argv[1:] if a not in HELP_ARGS]
    path = self._config_path(argv)
    if path is None:
      if not self.default:
        raise UserError(f"--{self.name} is required: a config file such as configs/nemo.py")
      argv.insert(1, f"--{self.name}={self.default}")
      path = self.default
    defaults = load_config_file(path, flag=f"--{self.name}")
    self._argv[:] = argv
    try:
      rest = self._flag_values(argv)
    except Exception as err:  # noqa: BLE001 - every parse failure becomes one message naming the flag
      raise UserError(self._describe_parse_error(err, argv, defaults)) from err
    try:
      config = self._holder.value
    except Exception as err:  # noqa: BLE001 - ml_collections defers load errors to first access
      raise UserError(f"--{self.name}={path}: the config file does not load: {_root_cause(err)}") from err
    self._check_override_kinds(config, defaults, argv)
    return rest, config, want_help

  def flags_parser(self, argv: Sequence[str]) -> list[str]:
    """For ``app.run(main, flags_parser=...)``: parses, prints ``--help``, or ends with one ``error:`` line."""
    try:
      rest, config, want_help = self.parse(argv)
    except UserError as err:
      sys.exit(report(err))
    if want_help:
      print(self.help_text(config, argv))
      sys.exit(0)
    return rest

  def _config_path(self, argv: list[str]) -> str | None:
    for i, arg in enumerate(argv[1:], 1):
      if self._config_arg.match(arg):
        return arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
    return None

  def _describe_parse_error(self, err: Exception, argv: list[str], defaults: ConfigDict) -> str:
    for arg in argv[1:]:
      m = self._override_arg.match(arg)
      if m is None:
        continue
      field = m.group(2)
      if not has_field(defaults, field):
        close = difflib.get_close_matches(field, list(flat_fields(defaults)), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return (f"--{self.name}.{field}: the config has no field {field}{hint}; "
                f"--help lists the fields")
    if isinstance(err, flags.Error):
      return f"{str(err).removeprefix('flag ')}; --help lists the flags and config fields"
    return f"bad command line: {_root_cause(err)}"

  def _check_override_kinds(self, config: ConfigDict, defaults: ConfigDict, argv: list[str]) -> None:
    """A tuple of numbers overridden by text (``('abc',)``) is a mistake ml_collections accepts."""
    for field, value in config_flags.get_override_values(self._flag_values[self.name]).items():
      if not has_field(defaults, field):
        continue
      default = get_field(defaults, field)
      if _is_number_tuple(default) and not _is_number_tuple(value):
        given = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{self.name}.{field}=")), value)
        example = ",".join(str(v) for v in default)
        raise UserError(f"--{self.name}.{field}={given}: expected numbers like {tuple(default)}; write it as "
                        f"--{self.name}.{field}='({example})'")

  # ---- Help -------------------------------------------------------------------------------------

  def help_text(self, config: ConfigDict, argv: Sequence[str]) -> str:
    path = self._config_path(list(argv)) or self.default
    flag = self._flag_values[self.name]
    other_flags = self._flag_values.main_module_help().strip()
    lines = [self.doc.strip(), "", "flags:", f"  --{self.name}=FILE: {flag.help}",
             *([other_flags] if other_flags else []), "",
             f"config fields of {path} (set any as --{self.name}.<field>=<value>):"]
    lines += [f"  {k} = {_short_repr(v)}" for k, v in flat_fields(config).items()]
    return "\n".join(lines).strip("\n")


# ---- Config trees ---------------------------------------------------------------------------------


def load_config_file(spec: str, *, flag: str = "--config") -> ConfigDict:
  """``get_config()`` of a config file (``path`` or ``path:arg``), without overrides."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    folder = file.parent if file.parent.is_dir() else pathlib.Path("configs")
    known = sorted(str(p) for p in folder.glob("*.py") if p.name != "__init__.py") if folder.is_dir() else []
    hint = f" (config files there: {', '.join(known)})" if known else ""
    raise UserError(f"{flag}={spec}: no such config file{hint}")
  try:
    module_spec = importlib.util.spec_from_file_location(f"_v2w_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(*([arg] if arg else []))
  except Exception as err:  # noqa: BLE001 - any failure of the user's config file
    raise UserError(f"{flag}={spec}: the config file does not load: {type(err).__name__}: {err}") from err


def flat_fields(config: ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
  """``{"data.num_frames": 93, ...}``: every leaf field with its dotted path, in definition order."""
  out: dict[str, Any] = {}
  items = config.items() if isinstance(config, (ConfigDict, dict)) else ()
  for key, value in items:
    if isinstance(value, (ConfigDict, dict)):
      out.update(flat_fields(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def has_field(config: ConfigDict, field: str) -> bool:
  node: Any = config
  for key in field.split("."):
    if not isinstance(node, (ConfigDict, dict)) or key not in node:
      return False
    node = node[key]
  return True


def get_field(config: ConfigDict, field: str) -> Any:
  node: Any = config
  for key in field.split("."):
    node = node[key]
  return node


def _is_number_tuple(value: Any) -> bool:
  return (isinstance(value, (tuple, list)) and len(value) > 0
          and all(isinstance(v, numbers.Number) and not isinstance(v, bool) for v in value))


def _short_repr(value: Any, width: int = 100) -> str:
  text = repr(value)
  return text if len(text) <= width else text[: width - 3] + "..."


def _root_cause(err: BaseException) -> str:
  while err.__cause__ is not None:
    err = err.__cause__
  return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
