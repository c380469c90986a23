"""kd-certify's pipeline: certify a model (``certify.runner``), then write its TensorBoard.

``run(config)`` composes the runner (results.json, report.md, resumable
state) with the TensorBoard scalars kd-evaluate writes alike
(``reports.tensorboard_writer``): ``certified_accuracy/<method>`` at step
round(1000 ε) (ε in pixel units of [0, 1] images, L∞ or L2) and
``clean_accuracy`` at step 0, plus report.md as text, in
``<run_dir>/tensorboard/``.

Example:
  >>> results = run(CertifyConfig(model="saved_models/mnist_m0_ibp/1", run_dir="runs/cert",
  ...                             epsilons=(0.1, 0.3), method="ibp", n_examples=1000))
"""

from __future__ import annotations

import pathlib
from typing import Any

from keras_defense.certify import runner
from keras_defense.certify.runner import CertifyConfig
from keras_defense.reports import tensorboard_writer
from keras_defense.util.progress import Progress


def run(config: CertifyConfig, *, progress: Progress | None = None) -> dict[str, Any]:
  """Certifies (resuming saved state), then writes TensorBoard; returns results.json's dict.

  Raises:
    UserError: as ``runner.run``, before any certification.
  """
  results = runner.run(config, progress=progress)
  run_dir = pathlib.Path(config.run_dir)
  scalars = [("clean_accuracy", 0, results["clean_acc"])]
  scalars += [(f"certified_accuracy/{results['method']}", round(1000 * e["epsilon"]),
               e["certified_acc"]) for e in results["certified"]]
  tensorboard_writer.write_summaries(run_dir / "tensorboard", scalars=scalars,
                                     texts=[("report", (run_dir / "report.md").read_text())])
  return results
