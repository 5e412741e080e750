"""The CLI: `python -m workbench validate|gates|build|preview|trace|chat ...`.

A thin layer over the functions the UI calls: arguments in, the same recipe, build and
routing calls, progress on stderr, exit 1 with a message (never a traceback) on a user
error.

    commands  the parser and validate / gates / build
    inspect   preview / trace / chat
    steer     the router interventions trace and chat take
"""

from workbench.faces import face

EXPORTS = {"main": "commands", "ProgressBar": "commands"}
__getattr__, __dir__ = face(__name__, EXPORTS)
