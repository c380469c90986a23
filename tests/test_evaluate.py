"""kd-evaluate: any model a user brings, worst-case robust accuracy, resumable.

The models come from a separate program that imports only TensorFlow and
tf_keras (``_SAVE_MODELS``, run once in a subprocess): a plain tf_keras model
saved with ``tf.saved_model.save``, the same as a ``.keras`` file, and a
SavedModel of hand-written signatures: softmax output, uint8 images, 32x32x3
images. The
attack ensemble is a cheap stand-in (FGSM then PGD-5 from
``keras_defense.attacks``) handed to ``pipelines.evaluate.run`` (kd-evaluate's
runner + report) as ``attack_plan``,
so these tests check kd-evaluate's bookkeeping, not the strength of the
ensemble (tests/test_autoattack*.py do that).
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import _helpers
from keras_defense import attacks
from keras_defense.models import classifier
from keras_defense import data
from keras_defense import flags as kd_flags
from keras_defense.util import provenance
from keras_defense.evaluation import robustness
from keras_defense.pipelines import evaluate
from keras_defense.reports import robustness_report
from keras_defense.util.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
M0 = REPO / "saved_models" / "mnist_m0" / "1"
_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
N = 200

# Run with `python - OUT_DIR MNIST_DIR`: no keras_defense anywhere in it.
_SAVE_MODELS = textwrap.dedent("""
    import gzip, os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import numpy as np
    import tensorflow as tf
    import tf_keras as keras
    out, mnist = sys.argv[1], sys.argv[2]
    sys.path.insert(0, sys.argv[3])
    import _helpers
    with gzip.open(os.path.join(mnist, "train-images-idx3-ubyte.gz")) as f:
      x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)[:2000]
    with gzip.open(os.path.join(mnist, "train-labels-idx1-ubyte.gz")) as f:
      y = np.frombuffer(f.read(), np.uint8, offset=8)[:2000].astype(np.int64)
    x = (x / 255.0).astype(np.float32)
    logits = _helpers.small_cnn(keras, x, y, batch_size=64)
    tf.saved_model.save(logits, os.path.join(out, "plain_logits"))
    logits.save(os.path.join(out, "plain.keras"))
    # One more SavedModel, of signatures written by hand: softmax output, and
    # inputs kd-evaluate must refuse (uint8 images; 32x32x3 images).
    module = tf.Module()
    module.model = logits
    f32 = tf.TensorSpec([None, 28, 28, 1], tf.float32)
    module.probs = tf.function(lambda images: {"probabilities": tf.nn.softmax(logits(images))},
                               input_signature=[f32])
    module.uint8 = tf.function(lambda images: {"logits": logits(tf.cast(images, tf.float32) / 255)},
                               input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.uint8)])
    module.rgb = tf.function(lambda images: {"logits": logits(tf.image.rgb_to_grayscale(
        images[:, 2:30, 2:30, :]))}, input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
    tf.saved_model.save(module, os.path.join(out, "signatures"), signatures={
        "serving_default": module.uint8, "rgb": module.rgb, "probs": module.probs})
    assert not [m for m in sys.modules if m.startswith("keras_defense")]
    print("saved")
""")


def _stand_in_plan(version, norm, names):
  """FGSM, then PGD-5: the attack interface of autoattack.plan, cheaply."""
  del version, names
  assert norm == "linf"

  def fgsm(model, x, y, eps, *, seed, batch_size, compute_dtype):
    del seed  # FGSM has no randomness
    return attacks.fgsm(model, x, y, eps, batch_size=batch_size, compute_dtype=compute_dtype)

  def pgd(model, x, y, eps, *, seed, batch_size, compute_dtype):
    return attacks.pgd(model, x, y, eps, step_size=eps / 4, steps=5, seed=seed,
                       batch_size=batch_size, compute_dtype=compute_dtype)

  return [("fgsm", fgsm), ("pgd", pgd)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  data.info("mnist")  # build the hermetic tfds copy once, before any child runs
  out = tmp_path_factory.mktemp("models")
  done = subprocess.run([sys.executable, "-", str(out), str(data.SHIPPED_DIR / "mnist"),
                         str(pathlib.Path(__file__).parent)],
                        input=_SAVE_MODELS, env=_ENV, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0 and "saved" in done.stdout, done.stderr[-3000:]
  return out


def _config(model, run_dir, **kw):
  kw.setdefault("epsilons", (0.1, 0.05))
  kw.setdefault("n_examples", N)
  kw.setdefault("compute_dtype", "float32")  # "auto" would time bfloat16 first
  return robustness.RobustnessConfig(model=str(model), run_dir=str(run_dir), batch_size=64,
                                     **kw)


def _check_invariants(res: dict):
  assert res["threat_model"] == "Linf"
  assert res["eps"] == sorted(res["eps"])
  previous_final = res["clean_acc"]
  for p in res["per_eps"]:
    accs = [res["clean_acc"]] + [s["robust_acc"] for s in p["attacks"]]
    assert all(b <= a for a, b in zip(accs, accs[1:])), accs  # never rises
    assert p["robust_acc"] == accs[-1] <= res["clean_acc"]
    assert p["robust_acc"] <= previous_final  # a larger ball never helps
    previous_final = p["robust_acc"]
    lo, hi = p["robust_acc_ci95"]
    assert lo <= p["robust_acc"] <= hi
  assert res["robust_acc"] == [p["robust_acc"] for p in res["per_eps"]]


def test_plain_saved_model_evaluates(models, tmp_path):
  run_dir = tmp_path / "run"
  result = evaluate.run(_config(models / "plain_logits", run_dir),
                        attack_plan=_stand_in_plan)
  res = json.loads((run_dir / "results.json").read_text())
  _check_invariants(res)
  assert res["output"] == "logits" and res["model_kind"] == "saved_model"
  assert res["signature"] == "serving_default" and res["attacks"] == ["fgsm", "pgd"]
  assert res["eps"] == [0.05, 0.1]
  assert res["clean_acc"] > 0.7  # a real model, really trained
  assert res["robust_acc"][-1] < res["clean_acc"]  # the attacks really ran
  assert res["versions"]["tensorflow"] and res["seed"] == 0
  assert result.to_dict()["robust_acc"] == res["robust_acc"]
  report = (run_dir / "report.md").read_text()
  assert "## ε = 0.1" in report and "after pgd" in report and "broken at a smaller ε" in report
  assert (run_dir / robustness_report.GRID).stat().st_size > 1000
  assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
  # Every broken image's adversarial is on disk, inside the ball, and misclassified.
  st = np.load(run_dir / "state" / "eps_0.05" / "00_fgsm.npz")
  assert len(st["broken_idx"]) == res["per_eps"][0]["attacks"][0]["broken"] > 0


def test_keras_file_evaluates(models, tmp_path):
  res = evaluate.run(_config(models / "plain.keras", tmp_path / "run", epsilons=(0.1,),
                             certify=("ibp",)),
                     attack_plan=_stand_in_plan).to_dict()
  _check_invariants(res)
  assert res["model_kind"] == "keras" and res["signature"] is None
  assert res["output"] == "logits" and res["robust_acc"][0] < res["clean_acc"]
  # A tf_keras Conv2D/Flatten/Dense file is bounded: certified <= robust per ε.
  assert res["certify_methods"] == ["ibp"] and res["certified_reason"] is None
  assert 0 <= res["certified_acc"][0] <= res["robust_acc"][0]


def test_probability_output_is_attacked_as_log(models, tmp_path):
  clf = classifier.load_classifier(models / "signatures", signature="probs")
  x, _ = data.load_arrays("mnist", "test", limit=64)
  assert classifier.detect_output(clf, x, num_classes=10) == classifier.PROBABILITIES
  probs = clf.scores(x).numpy()
  logits = clf.use_output(classifier.PROBABILITIES)(x).numpy()
  np.testing.assert_allclose(logits, np.log(np.maximum(probs, 1e-38)), rtol=1e-5, atol=1e-5)
  run_dir = tmp_path / "run"
  res = evaluate.run(_config(models / "signatures", run_dir, epsilons=(0.1,),
                             signature="probs", certify=("ibp", "crown_ibp")),
                     attack_plan=_stand_in_plan).to_dict()
  _check_invariants(res)
  assert res["output"] == "probabilities (attacked as log)"
  # Hand-written signatures hold no tf_keras model: certified is n/a with the reason.
  assert res["certified_acc"] == [None] and res["certified_indices"] == [None]
  assert "not a tf_keras model" in res["certified_reason"]
  assert "| n/a |" in (run_dir / "report.md").read_text()
  assert res["robust_acc"][0] < res["clean_acc"] - 0.1  # log(p) gives real gradients
  assert "attacks differentiate log(p)" in (run_dir / "report.md").read_text()
  # The logits model's output is not mistaken for probabilities.
  assert classifier.detect_output(classifier.load_classifier(models / "plain_logits"), x,
                                  num_classes=10) == classifier.LOGITS


def test_output_of_the_wrong_shape_or_not_finite_is_a_user_error():
  x = np.zeros((4, 28, 28, 1), np.float32)

  def clf(fn):
    return classifier.Classifier(fn, path="m", kind="keras", signature=None, output_key=None,
                                 input_name="images", input_dtype="float32",
                                 input_shape=(None, 28, 28, 1))
  with pytest.raises(UserError, match=r"model 'm' \(Keras file\) returned shape \(4, 5\) for "
                     r"4 images; kd-evaluate needs one score per class, \(4, 10\)"):
    classifier.detect_output(clf(lambda t: t[:, 0, :5, 0]), x, num_classes=10)
  with pytest.raises(UserError, match=r"returned NaN or inf on clean test images"):
    classifier.detect_output(clf(lambda t: t[:, 0, :10, 0] / 0.0), x, num_classes=10)


def test_wrong_input_is_one_line_error_exit_2(models, tmp_path):
  run_dir = tmp_path / "run"
  done = subprocess.run(
      [sys.executable, "-m", "keras_defense.bin.evaluate",
       f"--model={models / 'signatures'}", "--output_key=logits", f"--run_dir={run_dir}",
       "--epsilons=0.3", "--n_examples=10"],
      cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Traceback" not in done.stderr
  lines = [l for l in done.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, done.stderr[-3000:]
  assert str(models / "signatures") in lines[0]
  assert "takes input 'images' as uint8 [?, 28, 28, 1]" in lines[0]
  assert "float32 [?, 28, 28, 1]" in lines[0]
  assert not run_dir.exists()  # refused before any work
  # A wrong shape (the other signature), in-process.
  with pytest.raises(UserError, match=r"float32 \[\?, 32, 32, 3\].*float32 \[\?, 28, 28, 1\]"):
    evaluate.run(_config(models / "signatures", run_dir, signature="rgb",
                         output_key="logits"), attack_plan=_stand_in_plan)
  assert not run_dir.exists()


@pytest.mark.parametrize("kw, match", [
    (dict(signature="nope"), r"has no signature 'nope'; its signatures: 'serving_default'"),
    (dict(output_key=None), r"has 3 outputs \('classes', 'logits', 'probabilities'\); pass"),
    (dict(output_key="classes"), r"output 'classes' .* is int64; kd-evaluate needs float"),
    (dict(output_key="logit"), r"has no output 'logit'; its outputs are 'classes', 'logits'"),
    (dict(epsilons=()), r"`epsilons` must list at least one epsilon"),
    (dict(epsilons=(2.0,)), r"L-inf `epsilons` must be <= 1"),
    (dict(version="custom"), r"version 'custom' needs `attacks`"),
    (dict(attacks=("fgsm",)), r"`attacks` only goes with version 'custom'"),
    (dict(n_examples=20000), r"`n_examples` must be at most the 10000 test images"),
    (dict(strategy="multi_worker"), r"`strategy` must be one of default, mirrored for "
     r"kd-evaluate; got 'multi_worker'. Across machines, run shards"),
    (dict(strategy="mirrored", compute_dtype="bfloat16"), r"`compute_dtype` 'bfloat16' "
     r"clones the Keras model itself; under strategy 'mirrored'"),
    (dict(num_cpu_devices=2), r"`num_cpu_devices` must be an integer >= 1 and only goes "
     r"with strategy 'mirrored'"),
])
def test_bad_input_is_a_user_error(tmp_path, kw, match):
  kw = dict(dict(output_key="logits", epsilons=(0.3,)), **kw)
  n = kw.pop("n_examples", N)
  config = robustness.RobustnessConfig(model=str(M0), run_dir=str(tmp_path / "run"),
                                       n_examples=n, **kw)
  with pytest.raises(UserError, match=match):
    evaluate.run(config, attack_plan=_stand_in_plan)
  assert not (tmp_path / "run").exists()


def test_adversarials_outside_the_ball_do_not_count(models, tmp_path):
  def cheat(version, norm, names):
    return [("cheat", lambda model, x, y, eps, **kw: np.clip(x + 2 * eps, 0, 1))]
  res = evaluate.run(_config(models / "plain_logits", tmp_path / "run", epsilons=(0.1,)),
                     attack_plan=cheat).to_dict()
  step, = res["per_eps"][0]["attacks"]
  assert step["outside_threat_model"] == step["attacked"] == res["n_clean_correct"]
  assert step["broken"] == 0 and res["robust_acc"] == [res["clean_acc"]]
  assert "outside the threat model: not counted" in (tmp_path / "run" / "report.md").read_text()


def test_same_numbers_as_auto_attack(models, tmp_path):
  autoattack = pytest.importorskip("keras_defense.attacks.autoattack")
  run_dir = tmp_path / "run"
  res = evaluate.run(_config(models / "plain_logits", run_dir, epsilons=(0.1,),
                             n_examples=100, version="custom",
                             attacks=("apgd-ce",))).to_dict()
  _check_invariants(res)
  assert res["attacks"] == ["apgd-ce"] and res["robust_acc"][0] < res["clean_acc"]
  x, y = data.load_arrays("mnist", "test", limit=100)
  ref = autoattack.auto_attack(classifier.load_classifier(models / "plain_logits"), x, y, 0.1,
                               version="custom", attacks=["apgd-ce"], batch_size=64,
                               compute_dtype="float32", seed=0)
  assert [s["robust_acc"] for s in res["per_eps"][0]["attacks"]] == [
      a["robust_accuracy"] for a in ref.per_attack]
  state = np.load(run_dir / "state" / "eps_0.1" / "00_apgd-ce.npz")
  np.testing.assert_array_equal(state["robust"], ref.robust)


def test_no_attack_keeps_clean_accuracy_and_run_dir_is_bound(models, tmp_path):
  def identity(version, norm, names):
    return [("none", lambda model, x, y, eps, **kw: np.array(x))]
  run_dir = tmp_path / "run"
  res = evaluate.run(_config(models / "plain_logits", run_dir), attack_plan=identity).to_dict()
  assert res["robust_acc"] == [res["clean_acc"]] * 2
  before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
  with pytest.raises(UserError, match=r"holds another evaluation \(epsilons=\[0.05, 0.1\] -> "
                     r"\[0.3\]\).*pass a new `run_dir`"):
    evaluate.run(_config(models / "plain_logits", run_dir, epsilons=(0.3,)),
                 attack_plan=identity)
  assert before == {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_runner_writes_only_its_state_and_the_pipeline_adds_the_report(models, tmp_path):
  def identity(version, norm, names):
    return [("none", lambda model, x, y, eps, **kw: np.array(x))]
  run_dir = tmp_path / "run"
  result = robustness.run(_config(models / "plain_logits", run_dir, epsilons=(0.1,)),
                          attack_plan=identity)
  assert sorted(p.name for p in run_dir.iterdir()) == ["run.json", "state"]
  # The pipeline resumes the finished run (nothing recomputed) and writes the artifacts.
  again = evaluate.run(_config(models / "plain_logits", run_dir, epsilons=(0.1,)),
                       attack_plan=identity)
  assert _helpers.without_timing(again.to_dict()) == _helpers.without_timing(result.to_dict())
  assert {"results.json", "report.md", "tensorboard"} <= {p.name for p in run_dir.iterdir()}


_KILLABLE = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[3])
    from keras_defense.pipelines import evaluate
    import test_evaluate as t
    config = t._config(sys.argv[1], sys.argv[2], epsilons=(0.05, 0.1, 0.2), n_examples=100)
    evaluate.run(config, attack_plan=t._stand_in_plan)
""")


def _differences(a: dict, b: dict) -> list:
  return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def test_kill_9_then_rerun_gives_the_same_results(models, tmp_path, monkeypatch):
  # Other work in a shared checkout can commit between the two runs and change
  # keras_defense_commit; what this test compares is the numbers.
  versions = robustness.provenance.versions()
  monkeypatch.setattr(robustness.provenance, "versions", lambda: versions)
  model = models / "plain_logits"
  config = _config(model, tmp_path / "whole", epsilons=(0.05, 0.1, 0.2), n_examples=100)
  whole = evaluate.run(config, attack_plan=_stand_in_plan).to_dict()
  run_dir = tmp_path / "killed"
  _helpers.kill_9_script_when(_KILLABLE, [model, run_dir, pathlib.Path(__file__).parent],
                              lambda: list(run_dir.glob("state/eps_*/*.npz")), timeout=240)
  assert not (run_dir / "results.json").exists()  # killed mid-run
  finished = {p: p.stat().st_mtime_ns for p in run_dir.glob("state/eps_*/*.npz")}
  assert 1 <= len(finished) < 6
  resumed = evaluate.run(_config(model, run_dir, epsilons=(0.05, 0.1, 0.2), n_examples=100),
                         attack_plan=_stand_in_plan).to_dict()
  on_disk = json.loads((run_dir / "results.json").read_text())
  assert _helpers.without_timing(on_disk) == _helpers.without_timing(resumed)
  _check_invariants(on_disk)
  assert _helpers.without_timing(resumed) == _helpers.without_timing(whole), _differences(
      _helpers.without_timing(resumed), _helpers.without_timing(whole))
  # The finished steps were loaded, not recomputed: their files are unchanged.
  assert {p: p.stat().st_mtime_ns for p in finished} == finished
  assert len(list(run_dir.glob("state/eps_*/*.npz"))) == 6


IBP = REPO / "saved_models" / "mnist_m0_ibp" / "1"


def test_certified_beside_robust_and_reused_on_rerun(tmp_path, monkeypatch):
  run_dir = tmp_path / "run"
  config = _config(IBP, run_dir, epsilons=(0.1, 0.3), n_examples=30, output_key="logits",
                   certify=("ibp", "crown_ibp"))
  result = evaluate.run(config, attack_plan=_stand_in_plan)
  res = result.to_dict()
  _check_invariants(res)
  assert res["certify_methods"] == ["ibp", "crown_ibp"] and res["certified_reason"] is None
  assert (f"ε=0.3: certified {100 * res['certified_acc'][1]:.2f}% <= robust "
          f"{100 * res['robust_acc'][1]:.2f}%") in result.summary()
  for p, idx in zip(res["per_eps"], res["certified_indices"]):
    # certified <= robust <= clean, image by image: no certified image was broken.
    assert p["n_certified"] == len(idx) <= p["n_robust"] <= res["n_clean_correct"]
    assert max(p["n_certified_by_method"].values()) <= p["n_certified"]
  assert res["certified_acc"][1] > 0.5  # the IBP-trained net is provably robust at 0.3
  report = (run_dir / "report.md").read_text()
  assert "certified (IBP ∪ CROWN-IBP)" in report and "gap (robust − certified)" in report
  # A rerun reuses the saved certificates (state/certified/) instead of bounding again.
  from keras_defense.certify import bounds  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(bounds, "certify", lambda *a, **k: pytest.fail("bounded again"))
  again = evaluate.run(config, attack_plan=_stand_in_plan).to_dict()
  assert again["certified_indices"] == res["certified_indices"]


@pytest.mark.parametrize("lie, message", [
    ("all", r"image \d+ is certified at ε 0.3 by ibp but misclassified clean"),
    ("clean", r"image \d+ is certified at ε 0.3 by ibp but attack 'fgsm' broke it at ε 0.3"),
])
def test_a_certified_image_an_attack_broke_fails_loudly(tmp_path, monkeypatch, lie, message):
  from keras_defense.certify import bounds  # pylint: disable=g-import-not-at-top
  from keras_defense.evaluation import certified  # pylint: disable=g-import-not-at-top

  def lying(model, x, y, eps, **kw):  # a bound that proves what the attacks then break
    del kw, eps
    if lie == "all":
      return np.ones(len(y), bool)
    return np.argmax(model(x).numpy(), axis=1) == y
  monkeypatch.setattr(bounds, "certify", lying)
  # M0-IBP misclassifies 3 of its first 50 images (18, 30, 42); plain M0 none of its first 20.
  config = _config(IBP if lie == "all" else M0, tmp_path / "run", epsilons=(0.3,),
                   n_examples=50 if lie == "all" else 20, output_key="logits",
                   certify=("ibp",))
  with pytest.raises(certified.CertificationBug, match=message):
    evaluate.run(config, attack_plan=_stand_in_plan)
  assert not (tmp_path / "run" / "results.json").exists()


def test_flags_make_the_config():
  fv = _helpers.fresh_flags(kd_flags.evaluate_flags)
  fv(["kd-evaluate", "--model=saved_models/mnist_m0/1", "--output_key=logits",
      "--epsilons=0.1,8/255", "--n_examples=1000", "--version=custom",
      "--attacks=apgd-ce,square", "--norm=l2", "--run_dir=/tmp/x", "--batch_size=250"])
  config = kd_flags.evaluate_config("kd-evaluate ...", fv).validate()
  assert config.model == "saved_models/mnist_m0/1" and config.output_key == "logits"
  assert config.epsilons == (0.1, 8 / 255) and config.norm == "l2"
  assert config.attacks == ("apgd-ce", "square") and config.version == "custom"
  assert (config.n_examples, config.batch_size, config.compute_dtype) == (1000, 250, "float32")
  assert config.certify == ("ibp", "crown_ibp")  # on by default: n/a where it cannot bound
  # L2 radii may exceed 1; L-inf ones keep the shared validator.
  l2 = _helpers.fresh_flags(kd_flags.evaluate_flags)
  l2(["kd-evaluate", "--model=m.keras", "--norm=l2", "--epsilons=1.5,2", "--certify="])
  assert kd_flags.evaluate_config(None, l2).validate().epsilons == (1.5, 2.0)
  assert kd_flags.evaluate_config(None, l2).certify == ()
  linf = _helpers.fresh_flags(kd_flags.evaluate_flags)
  with pytest.raises(Exception, match=r"--epsilons must all be in \(0, 1\]; got \['2'\]"):
    linf(["kd-evaluate", "--epsilons=2"])
  # The other binaries' --model (an architecture) is untouched.
  other = _helpers.fresh_flags()
  with pytest.raises(Exception, match="value should be one of"):
    other(["kd-train", "--model=saved_models/mnist_m0/1"])


def test_command_line_is_repo_relative(tmp_path):
  argv = [str(REPO / ".venv" / "bin" / "kd-evaluate"), f"--model={M0}",
          "--run_dir=runs/x", "--epsilons=0.1,0.3", f"--data_dir={tmp_path}"]
  text = provenance.command_line(argv, cwd=REPO)
  assert text == (f"kd-evaluate --model=saved_models/mnist_m0/1 --run_dir=runs/x "
                  f"--epsilons=0.1,0.3 --data_dir={tmp_path}")
