"""Errors that are the user's to fix, as opposed to bugs: the entry points print their one-line
message (mmx_jax/cli.py) and exit with code 2 for `UsageError`, 1 for the others."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad command line, config key or value: the message names it and what is allowed."""


class ConfigError(UsageError):
    """A config value out of its range, of the wrong type, or inconsistent with another."""
