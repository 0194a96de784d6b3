"""A config section: the base class of every stage's ``Config`` and of the run's sections.

Unknown keys are errors, values are checked on assignment, every integer fits in 32 bits. The stage
modules build their ``Config`` on it; ``coaflow.config`` assembles them into one profile model
(loading every stage to do so), so this base stands below both.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from coaflow.errors import UserError

MAX_INT = 2**31 - 1  # the largest integer a config value may have (seeds, counts, steps, sizes)


class ConfigError(UserError, ValueError):
    """A user error in a profile or an override; the message is meant to be shown as is."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    # inf/nan are never a sensible knob value (`--set sft.lr=.inf` is a typo, not a choice)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _bounded_ints(cls, v: Any) -> Any:
        """Every integer knob (also inside a dict or list: ``synthesize.suites``) fits in 32
        bits: ``run.seed=10**26`` or ``sft.max_steps=10**29`` is a typo that would otherwise pass
        here and overflow in torch or numpy an hour later."""
        values = v.values() if isinstance(v, dict) else v if isinstance(v, list) else [v]
        for x in values:
            if isinstance(x, int) and not isinstance(x, bool) and not -MAX_INT <= x <= MAX_INT:
                raise ValueError(f"{x} is out of range (at most {MAX_INT:,} in size)")
        return v
