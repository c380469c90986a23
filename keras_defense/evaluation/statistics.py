"""Confidence intervals for attack success rates."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, *, z: float = 1.959963984540054
                    ) -> tuple[float, float]:
  """Wilson score interval for a binomial proportion (default 95%).

  Args:
    successes: number of successes, 0 <= successes <= n.
    n: number of trials, >= 0. With n = 0 the interval is (0, 1).
    z: normal quantile (1.96 for 95%).

  Returns:
    (low, high), both in [0, 1].

  Raises:
    ValueError: successes or n out of range.
  """
  if n < 0 or not 0 <= successes <= n:
    raise ValueError(f"need 0 <= successes <= n and n >= 0; got successes={successes}, n={n}.")
  if n == 0:
    return 0.0, 1.0
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  low = 0.0 if successes == 0 else max(0.0, centre - half)
  high = 1.0 if successes == n else min(1.0, centre + half)
  return low, high
