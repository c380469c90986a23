"""Docstring sections that several public functions share, written once.

A function's docstring names a shared block on a line of its own, ``{name}``;
``fill`` puts the block there, indented like that line. The rendered
docstring (``help``, ``__doc__``) reads as if written out in full, and a fix
to a shared argument's description reaches every function that takes it.

Example:
  >>> _CLIP = '''clip_min: lowest pixel value.
  ... clip_max: highest pixel value.'''
  >>> @fill(clip_args=_CLIP)
  ... def attack(x, *, clip_min=0.0, clip_max=1.0):
  ...   '''An attack.
  ...
  ...   Args:
  ...     x: images.
  ...     {clip_args}
  ...   '''
"""

from __future__ import annotations

import textwrap
from typing import Callable, TypeVar

_F = TypeVar("_F", bound=Callable)


def fill(**blocks: str) -> Callable[[_F], _F]:
  """Decorator: replaces each ``{name}`` line of the docstring by ``blocks[name]``.

  Args:
    **blocks: text of each shared block (its lines are dedented, then indented
      like the ``{name}`` line; blank lines stay blank).

  Returns:
    A decorator that rewrites the function's ``__doc__`` in place and returns
    the function.

  Raises:
    ValueError: a block that the docstring does not name, or a ``{name}`` line
      with no block.
  """
  def decorate(fn: _F) -> _F:
    if fn.__doc__ is None:   # python -OO drops docstrings
      return fn
    used, lines = set(), []
    for line in fn.__doc__.split("\n"):
      key = line.strip()
      if not (key.startswith("{") and key.endswith("}")):
        lines.append(line)
        continue
      name = key[1:-1]
      if name not in blocks:
        raise ValueError(f"{fn.__qualname__}'s docstring names `{{{name}}}`, "
                         f"which is not among the blocks given: {sorted(blocks)}.")
      used.add(name)
      indent = line[:len(line) - len(line.lstrip())]
      lines.extend(indent + text if text else text for text in
                   textwrap.dedent(blocks[name]).strip("\n").split("\n"))
    unused = set(blocks) - used
    if unused:
      raise ValueError(f"{fn.__qualname__}'s docstring has no line for "
                       f"{sorted(unused)}.")
    fn.__doc__ = "\n".join(lines)
    return fn
  return decorate
