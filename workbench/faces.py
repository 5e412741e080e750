"""Package faces that import nothing until a name is used.

Each stage's `__init__.py` lists the few names other stages use and the module of the
package that defines each; `face` turns that table into the package's `__getattr__`
(PEP 562). So `from workbench.gates import GateDiagnostics` loads only the module that
defines it, and importing a stage never pulls in torch by the way (a plain build imports
no torch at all). Nothing is cached on the package, so a name always means what its
module holds now.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def face(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, whose name N lives in `package.exports[N]`."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
