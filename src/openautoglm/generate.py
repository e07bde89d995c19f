"""Deprecated location, kept for one release: use :mod:`openautoglm.generation`.

``from openautoglm.generate import Generator`` keeps working; new code imports
``from openautoglm.generation import Generator``.
"""

from .generation import GenerateResult, Generator, enable_fast_generate  # noqa: F401

__all__ = ["GenerateResult", "Generator", "enable_fast_generate"]
