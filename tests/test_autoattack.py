"""Tests for keras_defense.attacks.autoattack (the AutoAttack ensemble)."""

import importlib
import json
import types

import numpy as np
import pytest

import keras_defense as kd
from keras_defense import attacks
from test_apgd import tiny_model  # pylint: disable=g-bad-import-order

autoattack = importlib.import_module("keras_defense.attacks.autoattack")


def _data(n=64):
  return kd.load_arrays("mnist", "test", limit=n)


def test_custom_ensemble_per_image_worst_case():
  x, y = _data()
  model = tiny_model()
  eps = 0.08
  result = autoattack.auto_attack(model, x, y, eps, version="custom",
                                  attacks=["apgd-ce", "apgd-t"],
                                  compute_dtype="float32")
  clean_pred = attacks.predict_classes(model, x)
  np.testing.assert_array_equal(result.clean_correct, clean_pred == y)
  assert not np.any(result.robust & ~result.clean_correct)   # robust => clean-correct
  assert 0 < result.robust.sum() < result.clean_correct.sum()
  assert [r["attack"] for r in result.per_attack] == ["apgd-ce", "apgd-t"]
  accs = [result.clean_accuracy] + [r["robust_accuracy"] for r in result.per_attack]
  assert all(a >= b for a, b in zip(accs, accs[1:]))
  assert accs[-1] == result.robust_accuracy == np.mean(result.robust)
  assert sum(r["broken"] for r in result.per_attack) == (
      result.clean_correct.sum() - result.robust.sum())
  # x_adv: adversarial where broken, the clean image elsewhere, always legal.
  broken = result.clean_correct & ~result.robust
  pred = attacks.predict_classes(model, result.x_adv)
  assert np.all(pred[broken] != y[broken])
  np.testing.assert_array_equal(result.x_adv[~broken], x[~broken])
  assert np.abs(result.x_adv - x).max() <= eps + 1e-6
  assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
  summary = json.loads(json.dumps(result.to_dict()))
  assert summary["robust_acc"] == result.robust_accuracy
  assert summary["threat_model"] == "Linf" and summary["n_examples"] == len(x)


def test_adding_an_attack_never_increases_robust_accuracy():
  x, y = _data()
  model = tiny_model()
  kwargs = dict(version="custom", compute_dtype="float32", seed=1)
  one = autoattack.auto_attack(model, x, y, 0.08, attacks=["apgd-ce"], **kwargs)
  two = autoattack.auto_attack(model, x, y, 0.08, attacks=["apgd-ce", "apgd-dlr"],
                               **kwargs)
  assert one.per_attack[0]["robust_accuracy"] == two.per_attack[0]["robust_accuracy"]
  assert not np.any(two.robust & ~one.robust)
  assert two.robust_accuracy <= one.robust_accuracy


def _stub_modules(calls):
  """Stand-ins for the attack modules that record their keyword arguments."""
  def make(name):
    def attack(model, x, y, epsilon, **kwargs):  # pylint: disable=unused-argument
      calls.append((name, kwargs))
      return np.asarray(x)
    return attack
  mods = {n: types.SimpleNamespace(**{n: make(n)}) for n in ("apgd", "fab", "square")}
  return lambda name: mods[name]


@pytest.mark.parametrize("version,expected", [
    ("standard", [("apgd", {"loss": "ce", "restarts": 1, "eot_samples": 1}),
                  ("apgd", {"loss": "dlr", "targeted": True, "n_target_classes": 9,
                            "restarts": 1}),
                  ("fab", {"targeted": True, "n_target_classes": 9, "restarts": 1}),
                  ("square", {"queries": 5000, "p_init": 0.8})]),
    ("plus", [("apgd", {"loss": "ce", "restarts": 5}),
              ("apgd", {"loss": "dlr", "restarts": 5}),
              ("fab", {"targeted": False, "restarts": 5}),
              ("square", {"queries": 5000}),
              ("apgd", {"targeted": True, "n_target_classes": 9}),
              ("fab", {"targeted": True, "restarts": 1})]),
    ("rand", [("apgd", {"loss": "ce", "restarts": 1, "eot_samples": 20}),
              ("apgd", {"loss": "dlr", "restarts": 1, "eot_samples": 20})]),
])
def test_plan_follows_the_reference_settings(monkeypatch, version, expected):
  calls = []
  monkeypatch.setattr(autoattack, "_module", _stub_modules(calls))
  x, y = _data(4)
  steps = autoattack.plan(version, "l2")
  assert [n for n, _ in steps] == list(autoattack._ORDER[version])  # pylint: disable=protected-access
  for _, fn in steps:
    fn(tiny_model(), x, y, 0.5, seed=3, batch_size=7, compute_dtype="float32")
  assert [c[0] for c in calls] == [e[0] for e in expected]
  for (_, got), (_, want) in zip(calls, expected):
    assert got["norm"] == "l2" and got["seed"] == 3 and got["batch_size"] == 7
    assert {k: got[k] for k in want} == want
    assert got.get("steps", 100) == 100


def test_an_attack_returning_illegal_images_breaks_nothing(monkeypatch):
  def square(model, x, y, epsilon, **kwargs):  # pylint: disable=unused-argument
    return np.clip(np.asarray(x) + 2 * epsilon, 0, 1)   # outside the ball
  monkeypatch.setattr(autoattack, "_module",
                      lambda name: types.SimpleNamespace(square=square))
  x, y = _data(16)
  fooled = attacks.predict_classes(tiny_model(), square(None, x, y, 0.3)) != y
  assert fooled.sum() >= 4   # they would count if they were legal
  result = autoattack.auto_attack(tiny_model(), x, y, 0.3, version="custom",
                                  attacks=["square"])
  assert result.per_attack[0]["broken"] == 0
  np.testing.assert_array_equal(result.robust, result.clean_correct)
  np.testing.assert_array_equal(result.x_adv, x)


def test_exported():
  assert attacks.auto_attack is autoattack.auto_attack
  assert attacks.AutoAttackResult is autoattack.AutoAttackResult
  assert attacks.apgd is importlib.import_module("keras_defense.attacks.apgd").apgd


@pytest.mark.parametrize("kwargs,error,match", [
    ({"version": "fast"}, ValueError, r"`version` must be one of 'standard'"),
    ({"attacks": ["apgd-ce"]}, ValueError, r"`attacks` is only for version='custom'"),
    ({"version": "custom"}, TypeError, r"`attacks` must be a list of attack names"),
    ({"version": "custom", "attacks": []}, ValueError, r"at least one attack"),
    ({"version": "custom", "attacks": ["pgd"]}, ValueError,
     r"`attacks` must be one of 'apgd-ce'"),
    ({"version": "custom", "attacks": ["apgd-ce", "apgd-ce"]}, ValueError,
     r"must not name an attack twice"),
    ({"norm": "l1"}, ValueError, r"`norm` must be one of 'linf', 'l2'"),
    ({"epsilon": -1.0}, ValueError, r"`epsilon` must be >= 0"),
    ({"compute_dtype": "half"}, ValueError, r"`compute_dtype` must be one of"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
  x, y = _data(4)
  args = {"epsilon": 0.3}
  args.update(kwargs)
  with pytest.raises(error, match=match):
    autoattack.auto_attack(tiny_model(), x, y, args.pop("epsilon"), **args)
