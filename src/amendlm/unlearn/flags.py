"""How ``amendlm debias``'s flags and :class:`~amendlm.unlearn.config.UnlearnConfig`'s fields name each other.

* :func:`recipe_default`: the default ``--help`` shows for an option whose field the recipe of a
  plain ``amendlm debias`` (``pairwise``) sets: that value, and the field default that a run with
  another ``--method`` takes (:func:`amendlm.unlearn.recipes.cli_recipe`);
* :func:`option_flags`: the flag spellings of a command's options, by field;
* :func:`error_line`: a config error in the words the user typed.  UnlearnConfig's messages name
  fields bare (``max_steps``) or as ``field=value`` (:mod:`amendlm.unlearn.config_checks`); the line
  names the flag instead (``--max-steps``, ``--rest-within 4``, ``--no-kl-unrelated``) for every field
  that has one and was not set by the ``--config`` file, and an error that a flag takes part in is
  not blamed on the file.

No torch import here: ``amendlm --help`` reads :func:`recipe_default`.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path
from typing import Mapping, Optional

from amendlm.unlearn.recipes import CLI_DEFAULT_RECIPE, RECIPES

# what the command line types for a field's None (the inverse of amendlm.unlearn.commands.explicit_options)
NONE_SPELLINGS = {"max_grad_norm": "0", "val_clusters": "0", "kl_texts": "none"}

# a field named in a message: a whole lower-case word, optionally with "=value" (a Python literal)
_MENTION = re.compile(r"(?<![\w-])(?P<field>[a-z][a-z0-9_]*)(?![\w-])"
                      r"(?:=(?P<value>'[^']*'|\"[^\"]*\"|\[[^\]]*\]|[^\s,;:()]+))?")


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


def error_line(message: str, flags: Mapping[str, tuple[str, Optional[str]]], given: Mapping[str, object],
               config_file: Optional[Path] = None, recipe: Optional[str] = None, file_fields=()) -> str:
    """A config error (``ValueError`` text) as ``amendlm debias`` reports it.

    Args:
        message: the error, fields named as :mod:`amendlm.unlearn.config_checks` names them.
        flags: :func:`option_flags` of the command.
        given: the fields given as flags, with their config values.
        config_file, recipe, file_fields: the ``--config`` file (None: none), the recipe the run
            builds on and the fields the file sets.

    Returns:
        Without ``config_file``: ``message`` with flags for fields.  With it, an error no given flag
        takes part in stays the file's (``"FILE: message"``, fields as in the file); one that a given
        flag takes part in says so: ``"--rest-within 4 with --config FILE (recipe official): --rest-within
        needs --type-focus all (--type-focus worst, from recipe official)"``.
    """
    involved = list(dict.fromkeys(m["field"] for m in _MENTION.finditer(message) if m["field"] in given))
    if config_file is not None and not involved:
        return f"{config_file}: {message}"
    mapped = {field for field in flags if field in given or field not in file_fields}
    stated = set(involved) if config_file is not None else set()  # values the prefix already states

    def named(match: re.Match) -> str:
        field, text = match["field"], match["value"]
        if field not in mapped:
            return match[0]
        if text is None:
            return flags[field][0]
        said = spelling(flags[field], field, _literal(text))
        return flags[field][0] if field in stated and said == spelling(flags[field], field, given[field]) else said

    line = _MENTION.sub(named, message)
    if config_file is None:
        return line
    prefix = ", ".join(spelling(flags[field], field, given[field]) for field in involved)
    return f"{prefix} with --config {config_file} (recipe {recipe}): {line}"


def _value_text(field: str, value: object) -> str:
    if value is None:
        return NONE_SPELLINGS.get(field, "none")
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return shlex.quote(value) if isinstance(value, str) else str(value)


def _literal(text: str) -> object:
    """The value a message wrote after ``field=`` (a Python literal; ``nan``/``inf`` as floats; else the text)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        try:
            return float(text)
        except ValueError:
            return text
