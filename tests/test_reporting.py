"""Tests for the experiment's report (reports.experiment_report, tables, plots).

Every artifact exists, parses and says the right thing.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import pathlib

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from keras_defense.reports import experiment_report
from keras_defense.reports import tables
from keras_defense.evaluation import statistics

MODELS = ("m0", "m1", "m2")
EPSILONS = (0.05, 0.1, 0.3)


def _row(model, attack, targeted, epsilon, threat_model, source, loss, n, successes, **extra):
  lo, hi = statistics.wilson_interval(successes, n)
  row = {"model": model, "attack": attack, "targeted": targeted, "epsilon": epsilon,
         "threat_model": threat_model, "source_model": source, "loss": loss, "n": n,
         "successes": successes, "success_rate": successes / n if n else 0.0,
         "ci_low": lo, "ci_high": hi, "mean_l0": None, "mean_l2": None, "mean_linf": None,
         "seconds": 1.5}
  row.update(extra)
  return row


def _successes(model, attack, targeted, eps, threat_model, n=200):
  """Deterministic, distinct counts per cell: masked grey-box on m2, strong adaptive."""
  base = {"fgsm": 40, "bim": 60}[attack] - (15 if targeted else 0) + int(100 * eps)
  if model == "m2" and threat_model == "grey_box":
    base = 3 + int(10 * eps)
  if threat_model == "adaptive":
    base += 20
  return min(base, n)


def synthetic_rows():
  rows = []
  for tm, models, loss in (("grey_box", MODELS, "cross_entropy"),
                           ("transfer", ("m1", "m2"), "cross_entropy"),
                           ("adaptive", ("m1", "m2"), "margin")):
    for model in models:
      source = "m0" if tm == "transfer" else model
      for attack in ("fgsm", "bim"):
        for targeted in (False, True):
          for eps in EPSILONS:
            s = _successes(model, attack, targeted, eps, tm)
            rows.append(_row(model, attack, targeted, eps, tm, source, loss, 200, s,
                             mean_linf=eps, mean_l2=10 * eps, mean_l0=300.0))
  for model in MODELS:
    rows.append(_row(model, "cw_l2", False, None, "grey_box", model, "cw", 50, 50,
                     mean_l2=1.76, mean_linf=0.41, mean_l0=170.0))
    rows.append(_row(model, "cw_l2", False, None, "adaptive", model, "cw", 50, 49,
                     mean_l2=1.80, mean_linf=0.45, mean_l0=172.0))
  # A C&W cell without a single success: its means are None.
  rows.append(_row("m2", "cw_l0", False, None, "grey_box", "m2", "cw", 50, 0))
  return rows


def synthetic_models():
  return {name: {"clean_accuracy": acc, "n_test": 10000, "total_weights": 312202,
                 "nonzero_weights": nz, "compression": 312202 / nz,
                 "zero_gradient_fraction": zg, "saved_model": f"saved_models/mnist_{name}/1",
                 "description": desc}
          for name, acc, nz, zg, desc in (
              ("m0", 0.994, 312202, 0.0, "M0: C&W MNIST net"),
              ("m1", 0.9945, 53000, 0.001, "M1: pruned (90% Dense / 95% Conv)"),
              ("m2", 0.9945, 53000, 0.948, "M2: M1 + logits augmentation x21"))}


def synthetic_examples(k=5):
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (k, 28, 28, 1)).astype(np.float32)
  x_adv = np.clip(x + rng.choice([-0.3, 0.3], x.shape), 0, 1).astype(np.float32)
  y = np.arange(k) % 10
  return [{"model": m, "attack": "fgsm", "threat_model": tm, "epsilon": np.float32(0.3),
           "targeted": False, "x": x, "x_adv": x_adv, "y": y, "pred_clean": y.copy(),
           "pred_adv": (y + (i + 1)) % 10}
          for i, (m, tm) in enumerate((("m1", "grey_box"), ("m2", "adaptive")))]


WARNINGS = ["m2: 94.8% of test images have an exactly-zero input gradient (gradient masking).",
            "m2: adaptive BIM success exceeds grey-box success."]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("run")
  rows = synthetic_rows()
  # numpy scalars, as the experiment produces them, must be converted.
  rows[0]["n"] = np.int64(rows[0]["n"])
  rows[0]["success_rate"] = np.float32(rows[0]["success_rate"])
  paths = experiment_report.write_report(
      str(run_dir), rows=rows, models=synthetic_models(), warnings=WARNINGS,
      config={"epsilons": EPSILONS, "seed": np.int32(0)}, versions={"tensorflow": "2.21.0"},
      examples=synthetic_examples(), wall_seconds=123.4,
      command="kd-experiment --flagfile=flags/mnist.flags", title="MNIST")
  return run_dir, paths


def _section(markdown, heading):
  """Text from a '#'-heading line up to the next heading of the same or higher level."""
  lines = markdown.splitlines()
  start = lines.index(heading)
  level = len(heading) - len(heading.lstrip("#"))
  out = []
  for line in lines[start + 1:]:
    if line.startswith("#") and len(line) - len(line.lstrip("#")) <= level:
      break
    out.append(line)
  return "\n".join(out)


def _table(section):
  """Parses the first Markdown table in ``section`` into {first cell: {column: cell}}."""
  lines = [l for l in section.splitlines() if l.startswith("|")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  table = {}
  for line in lines[2:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    table[cells[0]] = dict(zip(header[1:], cells[1:]))
  return table


def test_all_artifacts_written(report):
  run_dir, paths = report
  assert set(paths) == {"results.json", "results.csv", "report.md", "plots/success_vs_epsilon.png",
                        "plots/adversarial_examples.png", "tensorboard"}
  for name, path in paths.items():
    assert os.path.exists(path), name
  for png in ("success_vs_epsilon.png", "adversarial_examples.png"):
    with open(run_dir / "plots" / png, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_no_temporary_files_left(report):
  run_dir, _ = report
  leftovers = [p for p in pathlib.Path(run_dir).rglob("*") if p.name.endswith(".tmp")
               or p.name.startswith(".")]
  assert leftovers == []


def test_results_json_round_trips(report):
  run_dir, paths = report
  results = experiment_report.load_results(paths["results.json"])
  assert results == experiment_report.load_results(run_dir)
  expected = json.loads(json.dumps(synthetic_rows()))
  assert results["rows"] == expected
  assert isinstance(results["rows"][0]["n"], int)
  assert list(results["models"]) == list(MODELS)
  assert results["models"]["m2"]["zero_gradient_fraction"] == 0.948
  assert results["warnings"] == WARNINGS
  assert results["config"] == {"epsilons": list(EPSILONS), "seed": 0}
  assert results["versions"] == {"tensorflow": "2.21.0"}
  assert results["wall_seconds"] == 123.4
  assert results["command"] == "kd-experiment --flagfile=flags/mnist.flags"


def test_csv_has_one_line_per_row(report):
  _, paths = report
  with open(paths["results.csv"], newline="") as f:
    records = list(csv.DictReader(f))
  rows = synthetic_rows()
  assert len(records) == len(rows)
  assert list(records[0]) == list(experiment_report.ROW_KEYS)
  assert records[0]["model"] == "m0" and records[0]["epsilon"] == "0.05"
  assert float(records[5]["success_rate"]) == pytest.approx(rows[5]["success_rate"])
  assert records[-1]["epsilon"] == "" and records[-1]["mean_l2"] == ""


def test_report_has_one_table_per_threat_model(report):
  _, paths = report
  markdown = pathlib.Path(paths["report.md"]).read_text(encoding="utf-8")
  assert markdown.startswith("# MNIST")
  assert "kd-experiment --flagfile=flags/mnist.flags" in markdown
  assert "123 s" in markdown
  for tm in ("grey_box", "transfer", "adaptive"):
    table = _table(_section(markdown, f"### {tm}"))
    # attacks × targeted × ε down
    assert len(table) == 2 * 2 * len(EPSILONS), tm
    assert list(table)[0] == "FGSM untargeted ε=0.05"
    assert list(table)[-1] == "BIM targeted ε=0.3"
    assert list(table["FGSM untargeted ε=0.05"]) == list(MODELS)  # models across
  grey = _table(_section(markdown, "### grey_box"))
  s = _successes("m2", "bim", False, 0.3, "grey_box")
  lo, hi = statistics.wilson_interval(s, 200)
  assert grey["BIM untargeted ε=0.3"]["m2"] == (
      f"{100 * s / 200:.1f}% [{100 * lo:.1f}–{100 * hi:.1f}] (200)")
  transfer = _table(_section(markdown, "### transfer"))
  assert all(cells["m0"] == "—" for cells in transfer.values())
  assert all(cells["m1"] != "—" for cells in transfer.values())
  assert "crafted on: m0" in _section(markdown, "### transfer")
  adaptive = _table(_section(markdown, "### adaptive"))
  s = _successes("m2", "fgsm", True, 0.1, "adaptive")
  assert adaptive["FGSM targeted ε=0.1"]["m2"].startswith(f"{100 * s / 200:.1f}% [")
  assert "Loss: margin" in _section(markdown, "### adaptive")


def test_report_cw_models_warnings_definitions(report):
  _, paths = report
  markdown = pathlib.Path(paths["report.md"]).read_text(encoding="utf-8")
  cw = _section(markdown, "## Minimum-distortion attacks (Carlini & Wagner)")
  cw_lines = [l for l in cw.splitlines() if l.startswith("| C&W")]
  assert len(cw_lines) == 7
  assert "| C&W L2 untargeted | grey_box | m1 | cw | m1 | 100.0% [" in cw
  assert "| 1.76 | 0.410 | 170.0 |" in cw
  assert ("| C&W L0 untargeted | grey_box | m2 | cw | m2 | 0.0% [0.0–7.1] (50) | — | — | — |"
          in cw)
  models = _table(_section(markdown, "## Models"))
  assert models["m2"]["Compression"] == "5.89×"
  assert models["m2"]["Zero-gradient fraction"] == "94.8%"
  assert models["m0"]["Clean accuracy"].startswith("99.40% [")
  assert models["m0"]["Clean accuracy"].endswith("(10000)")
  warnings = _section(markdown, "## Warnings")
  for w in WARNINGS:
    assert f"- {w}" in warnings
  definitions = _section(markdown, "## Threat models")
  for tm in ("grey_box", "transfer", "adaptive"):
    assert f"**{tm}**" in definitions
  assert "Athalye" in definitions
  how = _section(markdown, "## How to read this")
  assert "flattering" in how and "honest" in how
  assert "![Attack success vs ε](plots/success_vs_epsilon.png)" in markdown


def test_no_warnings_reads_none(tmp_path):
  rows = [r for r in synthetic_rows() if r["threat_model"] == "grey_box"]
  paths = experiment_report.write_report(str(tmp_path), rows=rows, models=synthetic_models(),
                                 warnings=[], config={}, versions={})
  markdown = pathlib.Path(paths["report.md"]).read_text(encoding="utf-8")
  assert _section(markdown, "## Warnings").strip() == "none"
  assert "### transfer" not in markdown
  assert "plots/adversarial_examples.png" not in paths


def _accumulator(logdir):
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={
      event_accumulator.TENSORS: 0, event_accumulator.IMAGES: 0})
  acc.Reload()
  return acc


def test_tensorboard_reads_scalars_images_text(report):
  run_dir, paths = report
  logdir = pathlib.Path(run_dir) / "tensorboard" / "report"
  assert paths["tensorboard"] == str(logdir)
  acc = _accumulator(logdir)
  tags = set(acc.Tags()["tensors"])
  plugin = lambda tag: acc.SummaryMetadata(tag).plugin_data.plugin_name  # noqa: E731

  tag = "success_rate/grey_box/m2/fgsm_untargeted"
  assert plugin(tag) == "scalars"
  events = acc.Tensors(tag)
  assert [e.step for e in events] == [50, 100, 300]
  values = [float(tf_value(e)) for e in events]
  expected = [_successes("m2", "fgsm", False, eps, "grey_box") / 200 for eps in EPSILONS]
  assert values == pytest.approx(expected, abs=1e-6)
  assert "success_rate/transfer/m1/bim_targeted" in tags
  assert "success_rate/transfer/m0/bim_targeted" not in tags
  assert "ci_high/adaptive/m2/bim_targeted" in tags
  cw = acc.Tensors("mean_l2/grey_box/m1/cw_l2_untargeted")
  assert [e.step for e in cw] == [0] and float(tf_value(cw[0])) == pytest.approx(1.76)
  assert float(tf_value(acc.Tensors("model/zero_gradient_fraction/m2")[0])) == pytest.approx(0.948)

  image_tags = sorted(t for t in tags if plugin(t) == "images")
  assert image_tags == ["adversarial_examples/adaptive/m2/fgsm_untargeted_eps300",
                        "adversarial_examples/grey_box/m1/fgsm_untargeted_eps300",
                        "plots/adversarial_examples", "plots/success_vs_epsilon"]
  # An image summary stores [width, height, png...]; the grid is 2 rows x 5 tiles of 28 px.
  grid = acc.Tensors("adversarial_examples/grey_box/m1/fgsm_untargeted_eps300")[0]
  width, height, png = grid.tensor_proto.string_val[:3]
  assert (int(width), int(height)) == (5 * 29 - 1, 2 * 29 - 1)
  assert png[:8] == b"\x89PNG\r\n\x1a\n"

  assert plugin("report") == "text"
  text = acc.Tensors("report")[0].tensor_proto.string_val[0].decode("utf-8")
  assert text == pathlib.Path(paths["report.md"]).read_text(encoding="utf-8")


def tf_value(event):
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  return tensor_util.make_ndarray(event.tensor_proto)


def test_rerun_replaces_tensorboard_logs(tmp_path):
  rows = [r for r in synthetic_rows() if r["attack"] == "fgsm"]
  for _ in range(2):
    experiment_report.write_report(str(tmp_path), rows=rows, models=synthetic_models(), warnings=[],
                           config={}, versions={})
  events = list((tmp_path / "tensorboard" / "report").glob("events.out.tfevents.*"))
  assert len(events) == 1
  assert [e.step for e in _accumulator(tmp_path / "tensorboard" / "report").Tensors(
      "success_rate/grey_box/m0/fgsm_untargeted")] == [50, 100, 300]


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r.pop("ci_low"), r"rows\[3\] \(m0 fgsm grey_box targeted eps=0\.05\) is missing "
                                r"key\(s\) \['ci_low'\]"),
    (lambda r: r.update(success_rate=1.5), r"rows\[3\] .*`success_rate` must be a number in "
                                           r"\[0, 1\]; got 1\.5"),
    (lambda r: r.update(success_rate=-0.1), r"`success_rate` must be a number in \[0, 1\]"),
    (lambda r: r.update(success_rate=0.9), r"`success_rate` \(0\.9\) must equal successes / n"),
    (lambda r: r.update(successes=201), r"`successes` \(201\) must be <= `n` \(200\)"),
    (lambda r: r.update(targeted="no"), r"`targeted` must be a bool; got 'no'"),
    (lambda r: r.update(epsilon=-0.1), r"`epsilon` must be a finite number >= 0"),
    (lambda r: r.update(n=2.5), r"`n` must be an int >= 0; got 2\.5"),
    (lambda r: r.update(ci_high=0.0), r"must lie in its interval"),
    (lambda r: r.update(targeted=False), r"rows\[3\] .* repeats the grid cell of rows\[0\]"),
])
def test_validate_rows_rejects_bad_rows(mutate, match):
  rows = copy.deepcopy(synthetic_rows())
  experiment_report.validate_rows(rows)  # the synthetic rows are valid
  mutate(rows[3])
  with pytest.raises(ValueError, match=match):
    experiment_report.validate_rows(rows)


def test_validate_rows_rejects_non_list():
  with pytest.raises(TypeError, match="`rows` must be a list of dicts"):
    experiment_report.validate_rows({"model": "m0"})


def test_write_report_rejects_unknown_model_and_writes_nothing(tmp_path):
  rows = synthetic_rows()
  models = synthetic_models()
  del models["m1"]
  with pytest.raises(ValueError, match=r"rows name model\(s\) \['m1'\] that are not in `models`"):
    experiment_report.write_report(str(tmp_path), rows=rows, models=models, warnings=[], config={},
                           versions={})
  assert list(tmp_path.iterdir()) == []


def test_format_epsilon():
  assert tables.format_epsilon(0.3) == "0.3"
  assert tables.format_epsilon(8 / 255) == "8/255"
  assert tables.format_epsilon(None) == "—"


def test_threat_model_with_two_losses_labels_each(tmp_path):
  """An adaptive attacker run two ways (margin loss; CE on the unscaled logits) keeps both."""
  rows = [r for r in synthetic_rows() if r["attack"] == "bim" and r["epsilon"] is not None]
  extra = [dict(r, loss="unscaled_cross_entropy", successes=r["successes"] - 5,
                success_rate=(r["successes"] - 5) / r["n"],
                ci_low=statistics.wilson_interval(r["successes"] - 5, r["n"])[0],
                ci_high=statistics.wilson_interval(r["successes"] - 5, r["n"])[1])
           for r in rows if r["threat_model"] == "adaptive"]
  paths = experiment_report.write_report(str(tmp_path), rows=rows + extra, models=synthetic_models(),
                                 warnings=[], config={}, versions={}, title="MNIST")
  markdown = pathlib.Path(paths["report.md"]).read_text(encoding="utf-8")
  adaptive = _table(_section(markdown, "### adaptive"))
  assert len(adaptive) == 2 * 2 * len(EPSILONS)
  s = _successes("m2", "bim", False, 0.3, "adaptive")
  assert adaptive["BIM untargeted ε=0.3 (margin)"]["m2"].startswith(f"{100 * s / 200:.1f}%")
  assert adaptive["BIM untargeted ε=0.3 (unscaled_cross_entropy)"]["m2"].startswith(
      f"{100 * (s - 5) / 200:.1f}%")
  # Other threat models keep their short labels.
  assert "BIM untargeted ε=0.3" in _table(_section(markdown, "### grey_box"))
  tags = set(_accumulator(tmp_path / "tensorboard" / "report").Tags()["tensors"])
  assert {"success_rate/adaptive/m2/bim_untargeted_margin",
          "success_rate/adaptive/m2/bim_untargeted_unscaled_cross_entropy",
          "success_rate/grey_box/m2/bim_untargeted"} <= tags


def test_cifar_epsilons_are_shown_in_255ths(tmp_path):
  models = {"c0": dict(synthetic_models()["m0"], description="C0")}
  rows = [_row("c0", "fgsm", False, k / 255, "grey_box", "c0", "cross_entropy", 100, 10 * i)
          for i, k in enumerate((2, 4, 8, 16))]
  paths = experiment_report.write_report(str(tmp_path), rows=rows, models=models, warnings=[], config={},
                                 versions={}, title="CIFAR-10")
  markdown = pathlib.Path(paths["report.md"]).read_text(encoding="utf-8")
  assert markdown.startswith("# CIFAR-10")
  assert list(_table(_section(markdown, "### grey_box"))) == [
      f"FGSM untargeted ε={k}/255" for k in (2, 4, 8, 16)]
  steps = [e.step for e in _accumulator(tmp_path / "tensorboard" / "report").Tensors(
      "success_rate/grey_box/c0/fgsm_untargeted")]
  assert steps == [8, 16, 31, 63]  # round(ε·1000)


def test_tensorboard_server_data_provider_lists_everything(report):
  """The data provider the TensorBoard server uses finds the scalars, images and text."""
  # pylint: disable=g-import-not-at-top
  from tensorboard import context
  from tensorboard.backend.event_processing import data_provider
  from tensorboard.backend.event_processing import plugin_event_multiplexer
  from tensorboard.data import provider

  run_dir, _ = report
  logdir = str(pathlib.Path(run_dir) / "tensorboard")
  multiplexer = plugin_event_multiplexer.EventMultiplexer()
  multiplexer.AddRunsFromDirectory(logdir)
  multiplexer.Reload()
  tb = data_provider.MultiplexerDataProvider(multiplexer, logdir)
  ctx = context.RequestContext()
  scalars = tb.list_scalars(ctx, experiment_id="", plugin_name="scalars")
  assert list(scalars) == ["report"]  # the run is named after tensorboard/report
  tag = "success_rate/adaptive/m2/bim_untargeted"
  assert tag in scalars["report"]
  points = tb.read_scalars(ctx, experiment_id="", plugin_name="scalars", downsample=100,
                           run_tag_filter=provider.RunTagFilter(tags=[tag]))["report"][tag]
  assert [p.step for p in points] == [50, 100, 300]
  assert [p.value for p in points] == pytest.approx(
      [_successes("m2", "bim", False, eps, "adaptive") / 200 for eps in EPSILONS], abs=1e-6)
  images = tb.list_blob_sequences(ctx, experiment_id="", plugin_name="images")["report"]
  assert "adversarial_examples/grey_box/m1/fgsm_untargeted_eps300" in images
  assert "report" in tb.list_tensors(ctx, experiment_id="", plugin_name="text")["report"]


def test_examples_without_targeted_get_distinct_image_tags(tmp_path):
  examples = synthetic_examples(k=3)
  for ex in examples:
    ex.pop("targeted")
    ex.update(model="m1", threat_model="grey_box")
  rows = [r for r in synthetic_rows() if r["attack"] == "fgsm"]
  experiment_report.write_report(str(tmp_path), rows=rows, models=synthetic_models(), warnings=[],
                         config={}, versions={}, examples=examples)
  acc = _accumulator(tmp_path / "tensorboard" / "report")
  image_tags = sorted(t for t in acc.Tags()["tensors"] if t.startswith("adversarial_examples/"))
  assert image_tags == ["adversarial_examples/grey_box/m1/fgsm_eps300",
                        "adversarial_examples/grey_box/m1/fgsm_eps300_#2"]
