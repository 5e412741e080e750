"""Exceptions a user can act on.

Every message names what is wrong and how to fix it; the CLI prints it without a
traceback and the UI shows it as a message. Anything else that escapes is a bug.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """Base for errors caused by input or environment, not by a bug."""


class SourceError(WorkbenchError):
    """A model reference could not be resolved, read or trusted."""


class HubUnreachable(SourceError):
    """The Hub could not be reached (offline, DNS, timeout): nothing is known about the model."""


class BuildError(WorkbenchError):
    """A build could not start or could not finish; nothing was left under the output name."""


class GateError(WorkbenchError):
    """Router gates could not be computed from the recipe's prompts."""


class Cancelled(WorkbenchError):
    """A long job was stopped on request."""


class ForgeError(WorkbenchError):
    """An expert could not be forged from the examples; nothing was left under the output name."""
