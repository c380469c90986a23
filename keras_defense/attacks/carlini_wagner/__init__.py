"""Carlini & Wagner's L2, L-inf and L0 attacks: optimisation in tanh space, per image.

Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks",
IEEE S&P 2017, https://arxiv.org/abs/1608.04644 (reference code:
https://github.com/carlini/nn_robust_attacks). Each attack minimises a
distance plus ``c * f(x')`` (f: the logit margin past the goal) over images
re-parametrised in tanh space, with Adam, searching the constant c per image.
``machinery`` holds what the three share (tanh space, Adam, f and the goal
test, the compacting loop, the L-inf/L0 round loop, validation); ``l2``,
``linf`` and ``l0`` each hold one distance's objective, its per-image search
and its public function. Defaults are theirs and say so, except C&W-L2's
``warm_start`` (ours; ``warm_start=False`` is theirs).
"""

from keras_defense.attacks.carlini_wagner.l0 import carlini_wagner_l0
from keras_defense.attacks.carlini_wagner.l2 import carlini_wagner_l2
from keras_defense.attacks.carlini_wagner.linf import carlini_wagner_linf
