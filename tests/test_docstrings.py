"""util.docstrings.fill: shared docstring blocks, rendered as if written out."""

import pytest

from keras_defense import attacks
from keras_defense.util import docstrings


def test_fill_puts_the_block_at_the_line_indented_like_it():
  @docstrings.fill(shared="a: first.\n  more of a.\n\nReturns:\n  b.")
  def f():
    """Summary.

    Args:
      {shared}
    """
  assert f.__doc__ == ("Summary.\n\n    Args:\n      a: first.\n        more of a.\n\n"
                       "      Returns:\n        b.\n    ")


def test_fill_names_a_missing_or_unused_block():
  def g():
    """{other}"""
  with pytest.raises(ValueError, match=r"names `\{other\}`, which is not among"):
    docstrings.fill(shared="x")(g)
  def h():
    """No block here."""
  with pytest.raises(ValueError, match=r"has no line for \['shared'\]"):
    docstrings.fill(shared="x")(h)


def test_the_attacks_docstrings_have_no_block_left_unfilled():
  for fn in (attacks.bim, attacks.pgd, attacks.carlini_wagner_l0,
             attacks.carlini_wagner_linf):
    lines = [line.strip() for line in fn.__doc__.split("\n")]
    assert not [line for line in lines if line.startswith("{") and line.endswith("}")]
    assert "clip_max: highest pixel value." in lines
