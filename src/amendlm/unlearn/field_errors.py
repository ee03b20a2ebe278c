"""Config errors that carry the fields they are about, so that each caller names those fields its own way.

A check of :class:`~amendlm.unlearn.config.UnlearnConfig` (:mod:`amendlm.unlearn.config_checks`)
raises a :class:`ConfigFieldError`: the fields the failed condition involves, and a function that
writes the message through a :class:`FieldNaming`.  ``str(err)`` is the message under the plain
naming, the one Python callers and config files use (``max_steps``, ``rest_within=4.0``);
``amendlm debias`` writes it again under a naming of its flags
(:class:`amendlm.unlearn.flags.FlagNaming`: ``--max-steps``, ``--rest-within 4``) and blames the
error on the flags among :attr:`ConfigFieldError.fields` that the user typed.  No message text is
parsed or rewritten: a value is inserted where the message is written, as it is.

No torch import here.
"""

from __future__ import annotations

from typing import Callable, Iterable

# where a field's value came from, as a check computes it (amendlm.unlearn.config_checks.source)
GIVEN, RECIPE, DEFAULT = "given", "recipe", "default"


class FieldNaming:
    """How a message names fields: the plain naming, as Python code and config files name them."""

    def name(self, field: str) -> str:
        """``field`` alone, e.g. ``max_steps``."""
        return field

    def value(self, field: str, value: object) -> str:
        """``field`` holding ``value``, e.g. ``rest_within=4.0``, ``type_focus='all'``."""
        return f"{field}={value!r}"

    def origin(self, field: str, source: str, recipe: str) -> str:
        """Where ``field``'s value came from: ``given`` (:data:`GIVEN`), ``from recipe NAME`` (the recipe
        ``recipe`` sets it: :data:`RECIPE`) or ``the field default`` (:data:`DEFAULT`)."""
        if source == RECIPE:
            return f"from recipe {recipe}"
        return "the field default" if source == DEFAULT else "given"


PLAIN = FieldNaming()


class ConfigFieldError(ValueError):
    """An invalid configuration value, about the fields in :attr:`fields`.

    Args:
        fields: the fields the failed condition involves (those whose change can fix it).
        write: writes the message, naming every field through the :class:`FieldNaming` it is given.

    ``str(err)`` is the message under :data:`PLAIN`; :meth:`message` writes it under another naming.
    """

    def __init__(self, fields: Iterable[str], write: Callable[[FieldNaming], str]):
        self.fields = tuple(fields)
        self._write = write
        super().__init__(write(PLAIN))

    def message(self, naming: FieldNaming) -> str:
        """The message with the fields named by ``naming``."""
        return self._write(naming)
