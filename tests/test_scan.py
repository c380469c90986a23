"""SavedModels that touch the outside world are refused before they run.

The models are built here with plain TensorFlow (a ``tf.Module`` whose
``serving_default`` takes ``images`` float32 [None, 28, 28, 1] and returns
``logits`` [None, 10]) and, beside the logits, (a) write a file, (b) read a
file, (c) print, or (d) write a file only inside a nested ``tf.function`` or a
``tf.cond`` branch. kd-evaluate must refuse each before calling it (the file
is not written, the run directory not created), naming the op and the
function; ``allow_ops=("WriteFile",)`` lets (a) run.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import _helpers
from keras_defense import data
from keras_defense import flags as kd_flags
from keras_defense.evaluation import robustness
from keras_defense.models import classifier
from keras_defense.models import export
from keras_defense.models import scan
from keras_defense.util.compat import tf

from tensorflow.python.framework import meta_graph
from tensorflow.python.framework import op_def_registry

REPO = pathlib.Path(__file__).resolve().parents[1]
_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
_SPEC = tf.TensorSpec([None, 28, 28, 1], tf.float32)


def _save(out: pathlib.Path, side_effect) -> pathlib.Path:
  """A linear MNIST classifier whose serving function also calls ``side_effect()``."""
  module = tf.Module()
  module.w = tf.Variable(np.random.default_rng(0).normal(0, 0.05, (784, 10)), dtype=tf.float32)

  @tf.function(input_signature=[_SPEC])
  def serve(images):
    logits = tf.matmul(tf.reshape(images, [-1, 784]), module.w)
    return {"logits": side_effect(logits)}

  module.serve = serve
  tf.saved_model.save(module, str(out), signatures={"serving_default": serve})
  return out


def _writes(target):
  def effect(logits):
    tf.io.write_file(str(target), "written by the model")
    return logits
  return effect


def _reads(target):
  def effect(logits):
    return logits + 0.0 * tf.cast(tf.strings.length(tf.io.read_file(str(target))), tf.float32)
  return effect


def _prints(logits):
  tf.print("model says hello")
  return logits


def _nested(target):
  inner = tf.function(_writes(target))

  def effect(logits):
    return inner(logits)
  return effect


def _in_cond(target):
  def effect(logits):
    def write():
      tf.io.write_file(str(target), "written by the model")
      return tf.identity(logits)
    return tf.cond(tf.reduce_sum(logits) > -1e30, write, lambda: tf.identity(logits))
  return effect


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
  """{case: (model dir, file the model would write or None)}."""
  root = tmp_path_factory.mktemp("bad_models")
  readable = root / "secret.txt"
  readable.write_text("secret")
  cases = {}
  for name, make, target in [("write", _writes, root / "written_a"),
                             ("read", lambda t: _reads(readable), None),
                             ("print", lambda t: _prints, None),
                             ("nested", _nested, root / "written_nested"),
                             ("cond", _in_cond, root / "written_cond")]:
    cases[name] = (_save(root / name, make(target)), target)
  return cases


def _config(model, run_dir, **kw):
  return robustness.RobustnessConfig(model=str(model), run_dir=str(run_dir), epsilons=(0.1,),
                                     n_examples=20, batch_size=20, compute_dtype="float32",
                                     **kw)


def _no_attack(version, norm, names):
  del version, norm, names
  return [("none", lambda model, x, y, eps, **kw: x)]


@pytest.mark.parametrize("case, op, function", [
    ("write", "WriteFile", r"__inference_serve_\d+"),
    ("read", "ReadFile", r"__inference_serve_\d+"),
    ("print", "PrintV2", r"__inference_serve_\d+"),
    ("nested", "WriteFile", r"__inference_effect_\d+"),  # the inner tf.function
    ("cond", "WriteFile", r"cond_true_\d+"),  # the tf.cond branch
])
def test_kd_evaluate_refuses_before_calling(bad, tmp_path, case, op, function):
  model, target = bad[case]
  run_dir = tmp_path / "run"
  with pytest.raises(scan.UnsafeModelError,
                     match=rf"model '.*{case}' refused: it calls {op} \(.*\) in function "
                           rf"'{function}' \(called by signature 'serving_default'\).*"
                           rf"pass --allow_ops={op} "):
    robustness.run(_config(model, run_dir), attack_plan=_no_attack)
  assert not run_dir.exists()
  if target is not None:
    assert not target.exists()  # the model never ran
  # Every path that loads a SavedModel refuses it the same way.
  with pytest.raises(scan.UnsafeModelError,
                     match=rf"it calls {op} .* pass --allow_ops={op} to kd-evaluate, or "
                           rf"allow_ops=\['{op}'\] to keras_defense.load_model"):
    export.load_model(model)
  with pytest.raises(scan.UnsafeModelError, match=rf"it calls {op} "):
    classifier.load_classifier(model)
  if target is not None:
    assert not target.exists()


def test_tf_scan_misses_a_cond_branch_ours_does_not(bad):
  """Why the function library is walked here: saved_model_cli's walk skips If branches."""
  model, _ = bad["cond"]
  proto = scan._read(model)  # pylint: disable=protected-access
  assert "WriteFile" not in meta_graph.ops_used_by_graph_def(proto.meta_graphs[0].graph_def)
  assert [f.op for f in scan.scan_saved_model(model)] == ["WriteFile"]


def test_binary_refuses_in_one_line_exit_2(bad, tmp_path):
  model, target = bad["write"]
  run_dir = tmp_path / "run"
  done = subprocess.run(
      [sys.executable, "-m", "keras_defense.bin.evaluate", f"--model={model}",
       f"--run_dir={run_dir}", "--epsilons=0.1", "--n_examples=20"],
      cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Traceback" not in done.stderr
  lines = [l for l in done.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, done.stderr[-3000:]
  assert "it calls WriteFile (writes a file) in function '__inference_serve_" in lines[0]
  assert "pass --allow_ops=WriteFile " in lines[0]
  assert not run_dir.exists() and not target.exists()


def test_allow_ops_lets_the_model_run(bad, tmp_path):
  model, target = bad["write"]
  data.info("mnist")
  res = robustness.run(_config(model, tmp_path / "run", allow_ops=("WriteFile",)),
                       attack_plan=_no_attack)  # the runner alone writes no report
  assert res.n == 20
  assert target.read_text() == "written by the model"  # it ran, as allowed
  target.unlink()
  # The library loader takes the same override (the module is no Keras model).
  with pytest.raises(export.ModelLoadError, match=r"holds no Keras model"):
    export.load_model(model, allow_ops=["WriteFile"])
  # Allowing another op does not let it through, and the fix names them all.
  with pytest.raises(scan.UnsafeModelError, match=r"pass --allow_ops=PrintV2,WriteFile "):
    robustness.run(_config(model, tmp_path / "run2", allow_ops=("PrintV2",)),
                   attack_plan=_no_attack)
  assert not target.exists()


def test_allow_ops_flag_makes_the_config():
  fv = _helpers.fresh_flags(kd_flags.evaluate_flags)
  fv(["kd-evaluate", "--model=m", "--allow_ops=WriteFile,PrintV2"])
  assert kd_flags.evaluate_config(None, fv).validate().allow_ops == ("WriteFile", "PrintV2")
  fv.unparse_flags()
  fv(["kd-evaluate", "--model=m"])
  assert kd_flags.evaluate_config(None, fv).allow_ops == ()


def test_checkpoint_ops_outside_the_loaders_own_are_refused(tmp_path):
  prefix = tmp_path / "ckpt"

  def effect(logits):
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=["logits"], shape_and_slices=[""],
                      tensors=[logits])
    return logits

  model = _save(tmp_path / "saves", effect)
  found = scan.scan_saved_model(model)
  # The loader's own save/restore functions hold SaveV2 too: only the serving one counts.
  assert [(f.op, f.signatures) for f in found] == [("SaveV2", ("serving_default",))]
  assert found[0].function.startswith("__inference_serve_")


@pytest.mark.parametrize("path", sorted(str(p.parent.relative_to(REPO)) for p in
                                        (REPO / "saved_models").glob("*/*/saved_model.pb")))
def test_shipped_saved_models_pass(path):
  assert scan.scan_saved_model(REPO / path) == []
  scan.check_saved_model(REPO / path)


def test_shipped_models_hold_the_loaders_checkpoint_ops():
  """The exemption is needed: without it every model would be refused."""
  model = REPO / "saved_models" / "mnist_m0" / "1"
  ops = {n.op for m in scan._read(model).meta_graphs  # pylint: disable=protected-access
         for f in m.graph_def.library.function for n in f.node_def}
  assert {"SaveV2", "RestoreV2", "MergeV2Checkpoints"} <= ops


def test_denylist_holds_tensorflows_and_only_real_ops():
  assert scan.TF_DENYLIST >= {"WriteFile", "ReadFile", "PrintV2"}
  assert scan.TF_DENYLIST <= set(scan.DENYLIST)
  assert [op for op in scan.DENYLIST if op_def_registry.get(op) is None] == []


def test_importing_the_scanner_adds_no_command_line_flags():
  # saved_model_cli defines --dir, --all, --op_denylist ... on import.
  assert not {"dir", "all", "op_denylist", "outdir"} & set(kd_flags.FLAGS)
