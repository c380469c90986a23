"""``kd-certify``'s library side: a model and a dataset in, certified accuracy per ε out.

``run(CertifyConfig(...))`` loads the model and the first ``n_examples`` test
images, then for every ε counts the images that are provably classified
correctly in the ε-ball: by bounds (``method`` "ibp", "crown_ibp", "crown";
the model must be a tf_keras model of the layers ``network.parse`` reads) or by
randomized smoothing ("smoothing": any model ``kd-evaluate`` loads; the ε are
L2 radii and the certificate holds with probability >= 1 - alpha per image).

Artifacts in ``run_dir``: ``run.json`` (the settings the directory is bound
to), ``state/eps_<ε>.json`` per finished ε (bounds) or
``state/smoothing_<start>.npz`` per chunk of images (smoothing), so a rerun
skips the finished work; ``results.json`` (clean_acc, certified_acc and
certified_indices per ε, indices into the evaluated images) and
``report.md``, each written atomically.

Example:
  >>> result = run(CertifyConfig(model="saved_models/mnist_m0/1", run_dir="runs/cert",
  ...                            epsilons=(0.1,), method="crown_ibp", n_examples=1000))
  >>> result["certified_acc"]
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any

import numpy as np

from keras_defense.data import test_images
from keras_defense.certify import bounds
from keras_defense.certify import smoothing
from keras_defense.models import classifier as clf_lib
from keras_defense.models import export
from keras_defense.util import config_checks
from keras_defense.models import pixels as pixels_lib
from keras_defense.util import io_utils
from keras_defense.util import provenance
from keras_defense.util.errors import UserError
from keras_defense.util.progress import Progress

METHODS = bounds.METHODS + ("smoothing",)
NORMS = ("linf", "l2")
SMOOTHING_CHUNK = 50  # images per resumable smoothing state file


@dataclasses.dataclass
class CertifyConfig(pixels_lib.PixelFields):
  """What ``kd-certify`` certifies; field names match its flags.

  Attributes:
    model: a SavedModel directory or a .keras/.h5 file (bounds: a tf_keras
      model; smoothing: any model kd-evaluate loads).
    run_dir: where state, results.json and report.md go.
    dataset: a tfds dataset, ``folder:PATH`` or ``npz:PATH`` (kd-certify's
      ``--data``), optionally ``@HxWxC`` (``data.test_images``, as
      kd-evaluate); its test split is used.
    norm: "linf" or "l2" ("smoothing" certifies L2 only).
    epsilons: radii > 0 in pixel units of [0, 1] images.
    method: "ibp", "crown_ibp", "crown" or "smoothing".
    n_examples: the first n test images.
    batch_size: images per bound computation; noisy samples per model call
      for smoothing.
    sigma, n0, n, alpha: smoothing's noise level and sample counts, and the
      failure probability of each certificate (Cohen et al.: n0 100,
      n 100,000, alpha 0.001).
    seed: smoothing's noise seed.
    signature, output_key: which SavedModel signature and output to use.
    data_dir, manual_dir: see ``data.prepare``.
    command: the command line, recorded in the report.
    input_range, mean, std: the model's pixel convention
      (``pixels.PixelConvention``, as kd-evaluate); ε stay in [0, 1] units.
      The bounds read the map as the network's first layer (exact: it is
      elementwise and increasing); smoothing adds noise in [0, 1] units.
    allow_ops: ops a SavedModel may hold although they touch the outside
      world (``models.scan``), as kd-evaluate.
  """
  model: str
  run_dir: str
  dataset: str = "mnist"
  norm: str = "linf"
  epsilons: tuple[float, ...] = (0.3,)
  method: str = "ibp"
  n_examples: int = 10000
  batch_size: int = 256
  sigma: float = 0.25
  n0: int = 100
  n: int = 100_000
  alpha: float = 0.001
  seed: int = 0
  signature: str = "serving_default"
  output_key: str | None = None
  data_dir: str | None = None
  manual_dir: str | None = None
  command: str | None = None
  allow_ops: tuple[str, ...] = ()

  def validate(self) -> "CertifyConfig":
    """Checks every field; returns self.

    Raises:
      UserError: a field out of range, naming it.
    """
    need = config_checks.run_checker(self.model, self.run_dir)
    need(self.method in METHODS,
         f"`method` must be one of {', '.join(METHODS)}; got {self.method!r}.")
    need(self.norm in NORMS, f"`norm` must be one of {', '.join(NORMS)}; got {self.norm!r}.")
    need(self.method != "smoothing" or self.norm == "l2",
         f"`method` 'smoothing' certifies L2 radii; pass norm 'l2' (got {self.norm!r}).")
    config_checks.check_epsilons(self.norm, self.epsilons)
    for name in ("n_examples", "batch_size", "n0", "n"):
      value = getattr(self, name)
      need(isinstance(value, int) and value >= 1,
           f"`{name}` must be an integer >= 1; got {value!r}.")
    need(np.isfinite(self.sigma) and self.sigma > 0, f"`sigma` must be > 0; got {self.sigma!r}.")
    need(0 < self.alpha < 1, f"`alpha` must be in (0, 1); got {self.alpha!r}.")
    self.pixels().validate()
    return self

  def identity(self) -> dict[str, Any]:
    """The fields that decide the numbers (a run directory is bound to them)."""
    out = {"model": str(self.model), "dataset": self.dataset, "norm": self.norm,
           "method": self.method, "n_examples": self.n_examples,
           "signature": self.signature, "output_key": self.output_key}
    if self.method == "smoothing":
      out.update(sigma=self.sigma, n0=self.n0, n=self.n, alpha=self.alpha, seed=self.seed)
    if not self.pixels().is_identity:  # only then: run directories made before resume
      out["pixels"] = self.pixels().to_dict()
    return out


def _eps_key(eps: float) -> str:
  return f"{eps:.6g}"


def _clean_predictions(model: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
  return np.concatenate([np.argmax(np.asarray(model(x[i:i + batch_size])), axis=1)
                         for i in range(0, len(x), batch_size)]).astype(np.int64)


def _load_keras(config: CertifyConfig):
  try:
    model = export.load_model(config.model, allow_ops=config.allow_ops)
  except export.ModelLoadError as e:
    raise UserError(f"{e} The bound methods need a tf_keras model (a SavedModel exported "
                    f"by Keras, or a .keras/.h5 file); method 'smoothing' takes any model.") \
        from e
  bounds.bounded(model, config.pixels()).check(config.method, config.norm, "adaptive")
  return model


def _certify_bounds(config: CertifyConfig, model, x, y, state: pathlib.Path,
                    progress: Progress) -> dict[str, dict]:
  per_eps = {}
  epsilons = sorted(float(e) for e in config.epsilons)
  for k, eps in enumerate(epsilons):
    path = state / f"eps_{_eps_key(eps)}.json"
    if path.exists():
      per_eps[_eps_key(eps)] = io_utils.read_json(path)
      continue
    progress(k, len(epsilons), f"ε={eps:g} {config.method}")
    start = time.perf_counter()
    ok = bounds.certify(model, x, y, eps, method=config.method, norm=config.norm,
                        pixels=config.pixels(), batch_size=config.batch_size)
    entry = {"epsilon": eps, "certified": int(ok.sum()),
             "certified_acc": float(ok.mean()),
             "certified_indices": [int(i) for i in np.flatnonzero(ok)],
             "seconds": time.perf_counter() - start}
    io_utils.write_json(path, entry)
    per_eps[_eps_key(eps)] = entry
  progress(len(epsilons), len(epsilons), "done")
  return per_eps


def _certify_smoothing(config: CertifyConfig, model, x, y, num_classes: int,
                       state: pathlib.Path, progress: Progress) -> tuple[dict, dict]:
  preds, radii = [], []
  seconds = 0.0
  starts = range(0, len(x), SMOOTHING_CHUNK)
  for k, start in enumerate(starts):
    path = state / f"smoothing_{start}.npz"
    if not path.exists():
      progress(k, len(starts), f"smoothing images {start}..")
      t = time.perf_counter()
      pred, radius, p_lower = smoothing.certify(
          model, x[start:start + SMOOTHING_CHUNK], sigma=config.sigma,
          num_classes=num_classes, n0=config.n0, n=config.n, alpha=config.alpha,
          seed=config.seed, batch_size=config.batch_size, first_index=start)
      with io_utils.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
          np.savez(f, pred=pred, radius=radius, p_lower=p_lower,
                   seconds=np.float64(time.perf_counter() - t))
    with np.load(path) as st:
      preds.append(st["pred"])
      radii.append(st["radius"])
      seconds += float(st["seconds"])
  progress(len(starts), len(starts), "done")
  pred, radius = np.concatenate(preds), np.concatenate(radii)
  per_eps = {}
  for eps in sorted(float(e) for e in config.epsilons):
    ok = (pred == y) & (radius >= eps)
    per_eps[_eps_key(eps)] = {"epsilon": eps, "certified": int(ok.sum()),
                              "certified_acc": float(ok.mean()),
                              "certified_indices": [int(i) for i in np.flatnonzero(ok)]}
  extra = {"smoothed_acc": float(np.mean(pred == y)),
           "abstentions": int(np.sum(pred == smoothing.ABSTAIN)),
           "mean_radius_correct": float(np.mean(np.where(pred == y, radius, 0.0))),
           "smoothing_seconds": seconds}
  return per_eps, extra


def _report(results: dict) -> str:
  lines = [f"# Certified robustness: {results['model']}", "",
           f"Method **{results['method']}**, norm {results['norm']}, "
           f"{results['n_examples']} test images of {results['dataset']}; clean accuracy "
           f"{100 * results['clean_acc']:.2f}%.", ""]
  if results["method"] == "smoothing":
    s = results["smoothing"]
    lines += [f"Randomized smoothing (Cohen et al. 2019): σ {s['sigma']}, n0 {s['n0']}, "
              f"n {s['n']}, α {s['alpha']}; smoothed accuracy {100 * s['smoothed_acc']:.2f}%, "
              f"{s['abstentions']} abstentions. Each certificate holds with probability "
              f">= 1 - α.", ""]
  lines += ["| ε | certified | certified accuracy |", "|---|---|---|"]
  for entry in results["certified"]:
    lines.append(f"| {entry['epsilon']:g} | {entry['certified']} / {results['n_examples']} "
                 f"| {100 * entry['certified_acc']:.2f}% |")
  lines += ["", "Certified accuracy is a lower bound on robust accuracy (no perturbation in "
            "the ball changes these images' predictions); an attack's robust accuracy is an "
            "upper bound.", "", f"Command: `{results.get('command') or ''}`", ""]
  return "\n".join(lines)


def run(config: CertifyConfig, *, progress: Progress | None = None) -> dict[str, Any]:
  """Certifies the model at every ε, resuming finished work; writes the artifacts.

  Args:
    config: what to certify (validated here).
    progress: called as ``progress(done, total, description)``.

  Returns:
    The results.json content as a dict.

  Raises:
    UserError: a bad config, model (an unsupported layer for the bound
      methods, named), data or run directory, before any certification.
    RuntimeError: an image certified but misclassified clean (a bug).
  """
  wall = time.perf_counter()
  config.validate()
  progress = progress or (lambda done, total, desc: None)
  run_dir = pathlib.Path(config.run_dir)
  blocker = io_utils.file_in_the_way(run_dir)
  if blocker is not None:
    raise UserError(f"`run_dir` {str(run_dir)!r} cannot be a directory: {str(blocker)!r} "
                    f"exists and is not a directory.")
  if config.method == "smoothing":
    clf = clf_lib.load_classifier(config.model, signature=config.signature,
                                  output_key=config.output_key,
                                  allow_ops=config.allow_ops).use_pixels(config.pixels())
    model, model_shape = clf, clf.input_shape
  else:
    model = _load_keras(config)
    model_shape = model.input_shape
  images = test_images.load_test_images(config.dataset, n_examples=config.n_examples,
                                        model_shape=model_shape, data_dir=config.data_dir,
                                        manual_dir=config.manual_dir)
  x, y = images.x, images.y
  if config.method == "smoothing":
    clf.check_input(images.image_shape, dataset=config.dataset)
    num_classes = test_images.resolve_num_classes(images, clf.scores)
    clf.use_output(clf_lib.detect_output(clf, x[:min(len(x), 256)], num_classes=num_classes))
  else:
    num_classes = bounds.bounded(model, config.pixels()).num_classes
    if images.num_classes is not None and images.num_classes != num_classes:
      raise UserError(f"model {config.model!r} outputs {num_classes} class scores but "
                      f"dataset {config.dataset!r} has {images.num_classes} classes.")
    if int(y.max()) >= num_classes:
      raise UserError(f"dataset {config.dataset!r} has label {int(y.max())}, but the model "
                      f"outputs {num_classes} class scores.")
  sha256 = clf_lib.fingerprint(config.model)
  io_utils.bind_settings(run_dir / "run.json", dict(config.identity(), model_sha256=sha256,
                                                   **images.identity),
                         what="a certification")
  state = run_dir / "state"
  state.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  predict = model if config.method == "smoothing" else (  # the classifier maps pixels itself
      lambda xb: model(config.pixels().to_model(xb), training=False))
  clean = _clean_predictions(predict, x, config.batch_size) == y
  clean_seconds = time.perf_counter() - start
  results: dict[str, Any] = {
      "model": str(config.model), "model_sha256": sha256, "dataset": config.dataset,
      "method": config.method, "norm": config.norm, "n_examples": len(y),
      "clean_acc": float(clean.mean()), "clean_seconds": clean_seconds}
  if config.method == "smoothing":
    per_eps, extra = _certify_smoothing(config, model, x, y, num_classes, state, progress)
    results["smoothing"] = dict(sigma=config.sigma, n0=config.n0, n=config.n,
                                alpha=config.alpha, seed=config.seed, **extra)
  else:
    per_eps = _certify_bounds(config, model, x, y, state, progress)
    for entry in per_eps.values():
      bad = [i for i in entry["certified_indices"] if not clean[i]]
      if bad:
        raise RuntimeError(f"images {bad[:10]} are certified at ε {entry['epsilon']} but "
                           f"misclassified clean: the bounds are unsound (a bug).")
  order = sorted(per_eps.values(), key=lambda e: e["epsilon"])
  results["certified"] = [{k: v for k, v in e.items() if k != "certified_indices"}
                          for e in order]
  results["certified_acc"] = {_eps_key(e["epsilon"]): e["certified_acc"] for e in order}
  results["certified_indices"] = {_eps_key(e["epsilon"]): e["certified_indices"]
                                  for e in order}
  results["wall_seconds"] = time.perf_counter() - wall
  results["command"] = config.command
  results["versions"] = provenance.versions()
  io_utils.write_json(run_dir / "results.json", results)
  io_utils.write_text(run_dir / "report.md", _report(results))
  return results
