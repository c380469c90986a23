"""Certified robustness: interval/linear bounds (IBP, CROWN-IBP, CROWN), randomized smoothing.

``bounds`` proves that no perturbation in an ε-ball changes a Keras model's
prediction (``certify``, ``margin_bounds``, ``logit_bounds``) for models made
of the layers ``network.parse`` reads; ``smoothing`` certifies an L2 radius
for any callable model (Cohen et al. 2019); ``runner`` is ``kd-certify``'s
library side (``CertifyConfig`` -> ``run``).
"""

from keras_defense.certify.bounds import certify
from keras_defense.certify.bounds import logit_bounds
from keras_defense.certify.bounds import margin_bounds
from keras_defense.certify.bounds import METHODS
from keras_defense.certify.network import parse
from keras_defense.certify.losses import ibp_loss
