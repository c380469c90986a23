"""The defenses comparison on real MNIST: shipped M0 and Defensive Dropout on it, tiny budgets.

One run (module fixture): rows, the report files, the per-image worst case
never above AutoAttack alone, the EOT run of the randomized row, a rerun that
computes nothing; the same comparison in a child process SIGKILLed inside the
randomized row and rerun, which must give the fixture's rows;
then the config and flag errors, which fail before any work.
"""

import csv
import dataclasses
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from keras_defense.pipelines import defense_comparison as dc
from keras_defense.evaluation import grid as evaluation
from keras_defense import flags as kd_flags
from keras_defense.util import io_utils
from keras_defense.defenses import dropout
from keras_defense.models import classifier
from keras_defense.util.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parent.parent
M0 = str(ROOT / "saved_models" / "mnist_m0" / "1")


def _config(tmp, **overrides) -> dc.ComparisonConfig:
  rows = (dc.Row("M0", (dc.Step("saved", path=M0, source="shipped M0"),)),
          dc.Row("Dropout p=0.1", (dc.Step("dropout", path=M0, source="dropout on M0",
                                           config=dropout.DefensiveDropoutConfig(rate=0.1)),)))
  config = dc.ComparisonConfig(
      run_dir=str(tmp / "run"), report_dir=str(tmp / "report"), rows=rows,
      eval=evaluation.EvalConfig(attacks=("fgsm",), epsilons=(0.3,), eval_size=30,
                                 targeted_modes=(False,), threat_models=("grey_box", "transfer"),
                                 cw_attacks=(), batch_size=100, autoattack_version="standard",
                                 autoattack_epsilons=(0.3,), autoattack_size=12,
                                 sanity_size=0),
      command="test")
  return dataclasses.replace(config, **overrides)


@pytest.fixture(scope="module")
def result(tmp_path_factory, tfds_dir):  # pylint: disable=unused-argument
  tmp = tmp_path_factory.mktemp("comparison")
  return tmp, dc.run(_config(tmp))


def test_rows_and_report(result):
  tmp, res = result
  assert [r["name"] for r in res.rows] == ["M0", "Dropout p=0.1"] and not res.missing
  assert res.computed == ["M0", "Dropout p=0.1"]
  m0, drop = res.rows
  assert m0["facts"]["compression"] == pytest.approx(1.0)
  assert 0.98 < m0["clean_acc"] <= 1.0  # the shipped M0 on all 10,000 test images
  assert drop["randomized"] and not m0["randomized"]
  assert drop["autoattack_eot"]["version"] == "rand" and m0["autoattack_eot"] is None
  assert (tmp / "run" / "models" / "dropout_p_0_1" / "1" / "saved_model.pb").is_file()
  for row in res.rows:
    e = row["per_eps"]["0.3"]
    # The worst case counts an image robust only if AutoAttack and the grid left it.
    assert e["worst_case_n_robust"] <= e["autoattack_n_robust"]
    assert e["n_examples"] == 12 and e["worst_case_n"] == 12 and e["grid_cells"] >= 1
    assert 0 <= e["worst_case_ci95"][0] <= e["worst_case_robust_acc"] <= e["worst_case_ci95"][1]
  text = (tmp / "report" / "defenses.md").read_text()
  assert "| M0 |" in text and "| Dropout p=0.1 |" in text and "(EOT: " in text
  assert "first 12" in text
  lines = list(csv.DictReader(io.StringIO(
      (tmp / "report" / "defenses" / "defenses.csv").read_text())))
  assert [l["key"] for l in lines] == ["m0", "dropout_p_0_1"]
  bench = io_utils.read_json(tmp / "report" / "defenses" / "defenses.json")
  assert set(bench["rows"][0]["results"][0]) >= {"clean_acc", "robust_acc", "eps",
                                                  "threat_model", "n_examples"}
  assert (tmp / "report" / "defenses" / "plots" / "robust_vs_eps.png").is_file()
  assert any((tmp / "report" / "defenses" / "tensorboard").iterdir())
  # The certified column, from the saved models at report time: M0 is bounded (and
  # held image by image against its AutoAttack state), the randomized row is n/a.
  cert = m0["certified"]
  assert cert["methods"] == ["ibp", "crown_ibp"] and cert["reason"] is None
  (c,) = cert["per_eps"]
  assert c["n_certified"] <= m0["per_eps"]["0.3"]["autoattack_n_robust"] <= 12
  assert (tmp / "run" / "certified" / "m0.json").is_file()
  assert "randomized at inference" in drop["certified"]["reason"]
  assert "certified (IBP ∪ CROWN-IBP), ε 0.3" in text and "| n/a |" in text
  assert "Certified n/a — Dropout p=0.1: randomized at inference" in text
  assert "gap (worst case − certified), ε 0.3" in text
  assert lines[0]["certified_acc"] != "" and lines[1]["certified_acc"] == ""


def test_rerun_computes_nothing(result):
  tmp, res = result
  again = dc.run(_config(tmp))
  assert again.computed == [] and [r["key"] for r in again.rows] == ["m0", "dropout_p_0_1"]
  assert again.rows == res.rows


def test_a_row_whose_model_changed_is_set_aside_and_evaluated_again(result, tmp_path,
                                                                   monkeypatch):
  tmp, res = result
  assert [r["model_sha256"] for r in res.rows] == [
      classifier.fingerprint(r["saved_model"]) for r in res.rows]
  shutil.copytree(tmp / "run", tmp_path / "run")
  run = tmp_path / "run"
  config = _config(tmp_path)
  # The Dropout row was evaluated on another model than the one on disk now.
  row_file = run / "rows" / "dropout_p_0_1.json"
  kept = json.loads(row_file.read_text())
  row_file.write_text(json.dumps(dict(kept, model_sha256="ab" * 32)))
  cells = sorted(p.name for p in (run / "attack" / "cells").glob("*__dropout_p_0_1__*"))
  m0_cells = sorted(p.name for p in (run / "attack" / "cells").glob("*__m0__*"))
  assert cells and m0_cells
  evaluated = []
  def evaluate(self, row, path, reference):  # the real one is the fixture's; record the call
    evaluated.append((row.key, path, reference))
    return {k: v for k, v in kept.items() if k not in ("saved_model", "model_sha256")}
  monkeypatch.setattr(dc._Comparison, "evaluate", evaluate)  # pylint: disable=protected-access
  again = dc.run(config)
  assert again.computed == ["Dropout p=0.1"]
  assert evaluated == [("dropout_p_0_1", str(run / "models" / "dropout_p_0_1" / "1"),
                        res.rows[0]["saved_model"])]
  stale = run / "stale" / f"dropout_p_0_1-{'ab' * 6}"
  assert json.loads((stale / "rows" / "dropout_p_0_1.json").read_text())["model_sha256"] == \
      "ab" * 32
  assert sorted(p.name for p in (stale / "attack" / "cells").iterdir()) == cells
  assert (stale / "autoattack" / "dropout_p_0_1").is_dir()
  assert (stale / "autoattack" / "dropout_p_0_1_rand").is_dir()
  assert not (run / "autoattack" / "dropout_p_0_1").exists()
  # The reference's cells stay; the new row names the model it describes.
  assert sorted(p.name for p in (run / "attack" / "cells").glob("*__m0__*")) == m0_cells
  assert again.rows[1]["model_sha256"] == kept["model_sha256"]
  assert dc.run(config).computed == []
  # The reference changed: every row's transfer cells are stale, so the run refuses.
  m0_file = run / "rows" / "m0.json"
  m0_file.write_text(json.dumps(dict(json.loads(m0_file.read_text()), model_sha256="cd" * 32)))
  with pytest.raises(UserError, match=r"row 'M0' is the reference, and its model .* changed "
                                      r"since the row was evaluated .*a new `run_dir`"):
    dc.run(config)


def test_other_settings_refused(result):
  tmp, _ = result
  config = _config(tmp)
  with pytest.raises(UserError, match="other settings .*eval"):
    dc.run(dataclasses.replace(config, eval=dataclasses.replace(config.eval, eval_size=31)))


def test_bad_configs(tmp_path):
  config = _config(tmp_path)
  with pytest.raises(UserError, match="first row .* must not be randomized"):
    dc.run(dataclasses.replace(config, rows=config.rows[::-1]))
  twin = dc.Row("m0!", config.rows[0].steps)
  with pytest.raises(UserError, match="same key 'm0'"):
    dc.run(dataclasses.replace(config, rows=(config.rows[0], twin)))
  with pytest.raises(UserError, match="no SavedModel at"):
    dc.run(dataclasses.replace(config, rows=(dc.Row("X", (dc.Step("saved",
                                                                  path=str(tmp_path)),)),)))
  with pytest.raises(UserError, match="autoattack_version"):
    dc.run(dataclasses.replace(config, eval=dataclasses.replace(config.eval,
                                                                autoattack_version="none")))


@pytest.mark.parametrize("step, message", [
    ("nonsense", "KIND:ARGUMENT"),
    ("train:flags/missing.flags", "does not exist"),
    ("dropout:0.3", "dropout:RATE@SAVEDMODEL"),
    ("dropout:x@saved_models/mnist_m0/1", "dropout:RATE@SAVEDMODEL"),
    ("teleport:x", "step kind must be one of"),
])
def test_bad_step_specs(step, message):
  with pytest.raises(UserError, match=message):
    kd_flags.comparison._defense_step(step, "row")  # pylint: disable=protected-access


def test_flagfile_steps_become_configs():
  step = kd_flags.comparison._defense_step(  # pylint: disable=protected-access
      f"prune:{ROOT / 'flags' / 'mnist_m1_at_fgsm_rs.flags'}", "M1-AT")
  assert step.kind == "prune" and step.config.adversarial.method == "fgsm_rs"
  assert step.config.export_dir == "saved_models/mnist_m1_at_fgsm_rs"
  drop = kd_flags.comparison._defense_step("dropout:0.1@saved_models/mnist_m0/1", "D")  # pylint: disable=protected-access
  assert drop.config.rate == 0.1 and drop.path == "saved_models/mnist_m0/1"


def test_report_only_renders_finished_rows_and_names_the_missing(result, tmp_path):
  tmp, res = result
  extra = dc.Row("Dropout p=0.2", (dc.Step("dropout", path=M0, source="dropout on M0",
                                           config=dropout.DefensiveDropoutConfig(rate=0.2)),))
  config = _config(tmp, report_dir=str(tmp_path), report_only=True,
                   rows=(*_config(tmp).rows, extra))
  out = dc.run(config)
  assert out.computed == [] and out.missing == ["Dropout p=0.2"]
  assert out.rows == res.rows
  text = (tmp_path / "defenses.md").read_text()
  assert "Not finished yet: Dropout p=0.2" in text and "Made by `test`" in text


def test_report_stage_certifies_old_rows_and_a_lying_bound_fails_loudly(result, tmp_path,
                                                                         monkeypatch):
  tmp, res = result
  shutil.copytree(tmp / "run", tmp_path / "run")
  shutil.rmtree(tmp_path / "run" / "certified")  # rows finished before the column existed
  config = _config(tmp_path, report_only=True)
  again = dc.run(config)
  def untimed(cert):
    return dict(cert, per_eps=[{k: v for k, v in p.items() if k != "seconds"}
                               for p in cert["per_eps"]])
  assert [untimed(r["certified"]) for r in again.rows] == \
      [untimed(r["certified"]) for r in res.rows]
  # A kept row whose model is gone, or is another model than the one attacked: n/a and why.
  row_file = tmp_path / "run" / "rows" / "m0.json"
  kept = json.loads(row_file.read_text())
  row_file.write_text(json.dumps(dict(kept, saved_model=str(tmp_path / "gone" / "1"))))
  gone = dc.run(config).rows[0]["certified"]
  assert gone["per_eps"] == [] and "is not in this checkout" in gone["reason"]
  # The attacked model's SHA-256: the row's own field, else (older rows) its AutoAttack run's.
  old_row = {k: v for k, v in kept.items() if k != "model_sha256"}
  for other in (dict(kept, model_sha256="0" * 64),
                dict(old_row, autoattack=dict(kept["autoattack"], model_sha256="0" * 64))):
    row_file.write_text(json.dumps(other))
    assert "is not the one this row's attacks ran on" in \
        dc.run(config).rows[0]["certified"]["reason"]
  row_file.write_text(json.dumps(kept))
  shutil.rmtree(tmp_path / "run" / "certified")
  from keras_defense.certify import bounds  # pylint: disable=g-import-not-at-top
  from keras_defense.evaluation import certified  # pylint: disable=g-import-not-at-top
  # M0 classifies its first 12 images correctly and AutoAttack breaks them at 0.3.
  monkeypatch.setattr(bounds, "certify", lambda model, x, y, eps, **kw: y == y)
  with pytest.raises(certified.CertificationBug,
                     match=r"image \d+ is certified at ε 0.3 by ibp, crown_ibp but attack "
                           r"'apgd-ce' broke it at ε 0.3"):
    dc.run(config)


def test_every_row_of_the_plot_has_its_own_look(tmp_path):
  from keras_defense.reports import defense_comparison_report as rep  # pylint: disable=g-import-not-at-top
  rows = [{"name": f"row {i}", "per_eps": {"0.3": {
      "eps": 0.3, "worst_case_robust_acc": 0.5, "worst_case_ci95": [0.4, 0.6]}}}
          for i in range(14)]
  fig = rep.plot_robust_vs_eps(rows, tmp_path / "p.png")
  looks = [(l.get_color(), l.get_marker(), l.get_linestyle()) for l in fig.axes[0].lines]
  assert len(looks) == 14 and len(set(looks)) == 14
  # The committed report's pairs that shared a colour (rows 0 and 10, 1 and 11) do not.
  assert looks[0][0] != looks[10][0] and looks[1][0] != looks[11][0]


# A child process running the fixture's comparison (what kd-experiment --defense
# calls after parsing its flags), so it can be SIGKILLed.
_CHILD = ("import pathlib, sys; sys.path.insert(0, sys.argv[2]); "
          "import test_defense_comparison as t; "
          "from keras_defense.pipelines import defense_comparison as dc; "
          "dc.run(t._config(pathlib.Path(sys.argv[1])))")


def _comparable(row: dict, run_dir: pathlib.Path) -> dict:
  """A row without what two runs of the same settings may differ in: times, paths."""
  text = json.dumps(row).replace(str(run_dir), "<run_dir>")
  def strip(v):
    if isinstance(v, dict):
      return {k: strip(w) for k, w in v.items() if "seconds" not in k
              and k not in ("built", "model_sha256", "dir")}
    return [strip(w) for w in v] if isinstance(v, list) else v
  return strip(json.loads(text))


def test_sigkill_inside_the_randomized_row_then_rerun_gives_the_uninterrupted_rows(
    result, tmp_path):
  tmp, res = result
  # The M0 row finished (the fixture's), the Dropout row not started: its model,
  # cells and AutoAttack state removed.
  run_dir = tmp_path / "run"
  shutil.copytree(tmp / "run", run_dir)
  (run_dir / "rows" / "dropout_p_0_1.json").unlink()
  shutil.rmtree(run_dir / "models" / "dropout_p_0_1")
  for path in [*(run_dir / "autoattack").glob("dropout_p_0_1*"),
               *(run_dir / "attack" / "cells").glob("*dropout_p_0_1*")]:
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  # Killed once the randomized row's grid cells are on disk, before its
  # AutoAttack starts: the rerun must draw the masks of the clean-accuracy pass
  # and of AutoAttack that the uninterrupted run drew after the grid's.
  cells_dir = run_dir / "attack" / "cells"
  cells = [cells_dir / f"{evaluation.cell_key(p, g.attack, g.targeted, g.epsilon)}.json"
           for g in evaluation.build_groups(["m0", "dropout_p_0_1"], "m0", _config(tmp).eval)
           for p in g.plans if p.target == "dropout_p_0_1"]
  proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), str(ROOT / "tests")],
                          cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  try:
    while not all(c.is_file() for c in cells):
      assert proc.poll() is None, "the run finished before the Dropout row's grid"
      assert time.time() < deadline, "no grid cells of the Dropout row within 300 s"
      time.sleep(0.02)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert len(cells) == 2 and not (run_dir / "rows" / "dropout_p_0_1.json").exists()
  assert not list((run_dir / "autoattack").glob("dropout_p_0_1*/*/main/state/clean.npz")), \
      "killed too late"
  kept = [run_dir / "rows" / "m0.json", *cells]
  before = {f: f.stat().st_mtime_ns for f in kept}
  again = dc.run(_config(tmp_path))
  assert again.computed == ["Dropout p=0.1"]
  # What was finished is kept, not recomputed ...
  assert {f: f.stat().st_mtime_ns for f in kept} == before
  # ... and the rows, the randomized one included, are the uninterrupted run's.
  for row, resumed in zip(res.rows, again.rows, strict=True):
    got, want = _comparable(resumed, run_dir), _comparable(row, tmp / "run")
    assert got == want, f"{row['name']}: {_differences(got, want)}"


def _differences(a, b, path="") -> list[str]:
  """Where two JSON values differ, as 'path: a != b' lines (for the failure message)."""
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k),
                                                                      f"{path}/{k}")]
  if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
    return [d for i, (u, v) in enumerate(zip(a, b)) for d in _differences(u, v, f"{path}[{i}]")]
  return [] if a == b else [f"{path}: {str(a)[:80]} != {str(b)[:80]}"]
