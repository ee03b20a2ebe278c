"""How ``amendlm debias``'s flags and :class:`~amendlm.unlearn.config.UnlearnConfig`'s fields name each other.

* :func:`recipe_default`: the default ``--help`` shows for an option whose field the recipe of a
  plain ``amendlm debias`` (``pairwise``) sets: that value, and the field default that a run with
  another ``--method`` takes (:func:`amendlm.unlearn.recipes.cli_recipe`);
* :func:`option_flags`: the flag spellings of a command's options, by field;
* :class:`FlagNaming` and :func:`error_line`: a config error in the words the user typed.  The
  checks raise a :class:`~amendlm.unlearn.field_errors.ConfigFieldError` that carries the fields
  involved and writes its message through a naming; the line names the flag (``--max-steps``,
  ``--rest-within 4``, ``--no-kl-unrelated``) for every field that has one and was not set by the
  ``--config`` file alone, and blames the error on the flags typed among its fields, or on the file
  when there are none.  No message text is parsed.

No torch import here: ``amendlm --help`` reads :func:`recipe_default`.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Mapping, Optional

from amendlm.unlearn.field_errors import ConfigFieldError, FieldNaming
from amendlm.unlearn.recipes import CLI_DEFAULT_RECIPE, RECIPES

# what the command line types for a field's None (the inverse of amendlm.unlearn.commands.explicit_options)
NONE_SPELLINGS = {"max_grad_norm": "0", "val_clusters": "0", "kl_texts": "none"}


def recipe_default(field: str, field_default: object) -> object:
    """What ``--help`` shows as the default of option ``field``: where the default recipe sets the
    field to another value than ``field_default``, ``"pairwise recipe: V; with another --method: D"``
    (``--method dpo-swap`` keeps the recipe); else True (typer shows ``field_default`` itself)."""
    if field not in RECIPES[CLI_DEFAULT_RECIPE] or RECIPES[CLI_DEFAULT_RECIPE][field] == field_default:
        return True
    value = _value_text(field, RECIPES[CLI_DEFAULT_RECIPE][field])
    if field == "method":
        return f"{CLI_DEFAULT_RECIPE} recipe: {value}"
    return f"{CLI_DEFAULT_RECIPE} recipe: {value}; with another --method: {_value_text(field, field_default)}"


def option_flags(command, exclude=()) -> dict[str, tuple[str, Optional[str]]]:
    """``{field: (flag, negative flag or None)}`` of the options of a click ``command`` but those named in
    ``exclude``, e.g. ``{"rest_within": ("--rest-within", None), "kl_unrelated": ("--kl-unrelated", "--no-kl-unrelated")}``."""
    flags = {}
    for param in command.params:
        if param.name not in exclude and getattr(param, "opts", None):
            long = [opt for opt in param.opts if opt.startswith("--")] or param.opts
            negative = [opt for opt in getattr(param, "secondary_opts", ()) if opt.startswith("--")]
            flags[param.name] = (long[0], negative[0] if negative else None)
    return flags


def spelling(flag: tuple[str, Optional[str]], field: str, value: object) -> str:
    """How the command line gives ``field`` the config value ``value``: ``--rest-within 4``,
    ``--no-kl-unrelated``, ``--kl-texts none``, ``--target-modules q_proj,v_proj``."""
    on, off = flag
    if isinstance(value, bool):
        return on if value else (off or f"{on} false")
    if value is None:
        return f"{on} {NONE_SPELLINGS[field]}" if field in NONE_SPELLINGS else on
    return f"{on} {_value_text(field, value)}"


class FlagNaming(FieldNaming):
    """How ``amendlm debias`` names fields in a config error (a
    :class:`~amendlm.unlearn.field_errors.ConfigFieldError`'s message).

    A field with a flag is named by its flag (``--max-steps``; with a value, as the command line gives
    it: ``--rest-within 4``, ``--no-kl-unrelated``, ``--kl-texts none``) unless the ``--config`` file
    sets it and no flag was typed for it; other fields keep their plain names (``tolerance``,
    ``type_focus='worst'`` of the file).

    Args:
        flags: :func:`option_flags` of the command (empty: every field by its plain name).
        given: the fields given as flags, with their config values.
        file_fields: the fields the ``--config`` file sets; config_file: that file (None: none).
    """

    def __init__(self, flags: Mapping[str, tuple[str, Optional[str]]], given: Mapping[str, object],
                 file_fields=(), config_file: Optional[Path] = None):
        self.flags, self.given, self.file_fields, self.config_file = flags, given, set(file_fields), config_file

    def _by_flag(self, field: str) -> bool:
        return field in self.flags and (field in self.given or field not in self.file_fields)

    def name(self, field: str) -> str:
        """The field's flag (``--max-steps``), else the field (``tolerance``)."""
        return self.flags[field][0] if self._by_flag(field) else field

    def value(self, field: str, value: object) -> str:
        """The flag with ``value`` as typed (:func:`spelling`), else ``field=value``."""
        return spelling(self.flags[field], field, value) if self._by_flag(field) else super().value(field, value)

    def origin(self, field: str, source: str, recipe: str) -> str:
        """``given`` (a flag typed), ``set in FILE`` (the ``--config`` file) or ``from recipe NAME`` (the
        recipe's value, or the field default that the recipe leaves alone)."""
        if field in self.given:
            return "given"
        if field in self.file_fields and self.config_file is not None:
            return f"set in {self.config_file}"
        return f"from recipe {recipe}"


def error_line(err: ValueError, flags: Mapping[str, tuple[str, Optional[str]]], given: Mapping[str, object],
               config_file: Optional[Path] = None, recipe: Optional[str] = None, file_fields=()) -> str:
    """A config error as ``amendlm debias`` reports it.

    Args:
        err: the error; a :class:`~amendlm.unlearn.field_errors.ConfigFieldError` is written again under
            a :class:`FlagNaming`, any other ``ValueError`` is taken as it is.
        flags: :func:`option_flags` of the command.
        given: the fields given as flags, with their config values.
        config_file, recipe, file_fields: the ``--config`` file (None: none), the recipe the run
            builds on and the fields the file sets.

    Returns:
        Without ``config_file``: the message naming flags.  With it, an error that involves no flag the
        user typed is the file's (``"FILE: message"``, fields named as in the file), and one that
        involves typed flags says so first: ``"--rest-within 4 with --config FILE (recipe official):
        --rest-within 4 needs --type-focus all (--type-focus worst, from recipe official)"``.
    """
    if not isinstance(err, ConfigFieldError):
        return str(err) if config_file is None else f"{config_file}: {err}"
    typed = [field for field in err.fields if field in given]
    if config_file is None:
        return err.message(FlagNaming(flags, given))
    if not typed:
        return f"{config_file}: {err.message(FlagNaming({}, {}, file_fields, config_file))}"
    prefix = ", ".join(spelling(flags[field], field, given[field]) for field in typed)
    return f"{prefix} with --config {config_file} (recipe {recipe}): {err.message(FlagNaming(flags, given, file_fields, config_file))}"


def _value_text(field: str, value: object) -> str:
    if value is None:
        return NONE_SPELLINGS.get(field, "none")
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return shlex.quote(value) if isinstance(value, str) else str(value)
