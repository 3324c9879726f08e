"""Import users' encoder modules by name or path, so the CLIs can build encoders that the
library does not ship (their ``register_encoder`` calls run on import)."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)


def is_file_spec(spec: str) -> bool:
    """Whether ``spec`` names a file (``.py`` or a path) rather than a dotted module."""
    return spec.endswith(".py") or "/" in spec


def import_encoder_modules(specs: Iterable[str]) -> None:
    """Import each spec: a dotted module name (``my_pkg.encoders``) or a ``.py`` file path.

    Raises ValueError naming the spec and the fix when one cannot be imported.
    """
    for spec in specs:
        spec = str(spec)
        if is_file_spec(spec):
            _import_file(Path(spec).expanduser())
        else:
            try:
                importlib.import_module(spec)
            except ImportError as e:
                raise ValueError(
                    f"cannot import encoder module {spec!r} ({e}); install it or add its folder to "
                    "PYTHONPATH, or give the path of a .py file instead"
                ) from e
        log.debug("imported encoder module %s", spec)


def _import_file(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"encoder module file {str(path)!r} does not exist: fix the path")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"spark_me_user_{path.stem}_{digest}"
    if name in sys.modules:  # the same file twice: its registrations already ran
        return
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"{str(path)!r} is not an importable Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
