"""Adversarial attacks: FGSM, BIM, PGD (one shared core) and Carlini-Wagner L2/L-inf/L0.

Every attack is a plain function of a model (a Keras model or any callable
mapping float32 NHWC images to logits), compiled once per model and options,
batched, and run inside ``tf.function`` loops.
"""

from keras_defense.attacks.apgd import apgd
from keras_defense.attacks.autoattack import auto_attack
from keras_defense.attacks.autoattack import AutoAttackResult
from keras_defense.attacks.carlini_wagner import carlini_wagner_l0
from keras_defense.attacks.carlini_wagner import carlini_wagner_l2
from keras_defense.attacks.carlini_wagner import carlini_wagner_linf
from keras_defense.attacks.fab import fab
from keras_defense.attacks.gradient_attacks import bim
from keras_defense.attacks.gradient_attacks import fgsm
from keras_defense.attacks.gradient_attacks import pgd
from keras_defense.attacks.metrics import attack_success
from keras_defense.attacks.metrics import AttackSuccess
from keras_defense.attacks.metrics import perturbation_norms
from keras_defense.attacks.metrics import PerturbationNorms
from keras_defense.attacks.metrics import predict_classes
from keras_defense.attacks.metrics import zero_gradient_fraction
from keras_defense.attacks.square import square
from keras_defense.attacks.targets import least_likely_targets
from keras_defense.attacks.targets import next_class_targets
from keras_defense.attacks.targets import random_targets
