"""Weight transforms of the Dense layers: logits augmentation and gradient inhibition.

Both return a NEW model (a clone with copied weights; the input model is
untouched) built from plain Keras layers only -- no Lambda, no custom layer --
so the result saves and loads with Keras, exports as a SavedModel and serves
with plain TensorFlow.

* ``augment_logits`` (the defense's second stage, M1 -> M2; the authors' code
  calls it "modified gradient inhibition"): only the output Dense (logits)
  kernel is scaled, W <- W + eps*W = (1 + eps)*W, bias unchanged, so
  z' = (1 + eps)*W*h + b. The authors' code recommends eps = 20 for MNIST and
  10 for CIFAR-10; later defaults were 100.
* ``gradient_inhibition`` (Liu et al., "Security analysis and enhancement of
  model compressed deep learning under adversarial attacks", ASP-DAC 2018):
  every Dense kernel W <- W + eps*sign(W), eps ~= 0.1, biases unchanged.

Zeros stay zero in both (0*(1+eps) = 0, sign(0) = 0), so a pruned model keeps
its sparsity. Why these "work" against FGSM/BIM: the softmax saturates and the
cross-entropy gradient underflows to exactly zero (gradient masking; Athalye,
Carlini & Wagner 2018) -- see the attack reports.

Example:
  >>> m2 = augment_logits(m1, epsilon=20.0)
  >>> m2.layers[-1].kernel  # == 21 * m1.layers[-1].kernel
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from keras_defense import data
from keras_defense.models import export
from keras_defense.util import config_checks
from keras_defense.util import provenance
from keras_defense import training
from keras_defense.util.compat import keras
from keras_defense.defenses import base
from keras_defense.training import initial_model
from keras_defense.training.config import ConfigError

TRANSFORMS = ("logits_augmentation", "gradient_inhibition")
# Authors' code (S. Ye's cleverhans fork): 20 for MNIST, 10 for CIFAR-10.
RECOMMENDED_LOGITS_EPSILON = {"mnist": 20.0, "cifar10": 10.0}
GRADIENT_INHIBITION_EPSILON = 0.1  # Liu et al. ASP-DAC 2018


def _validate_epsilon(epsilon: float, name: str = "epsilon") -> float:
  if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating)):
    raise TypeError(f"`{name}` must be a float >= 0; got {type(epsilon).__name__}.")
  if not (math.isfinite(float(epsilon)) and float(epsilon) >= 0):
    raise ValueError(f"`{name}` must be a finite float >= 0; got {epsilon!r}.")
  return float(epsilon)


def output_dense_layer(model: keras.Model) -> keras.layers.Dense:
  """The Dense layer that produces ``model``'s (single) output.

  Raises:
    TypeError: ``model`` is not a Keras model.
    ValueError: the model has several outputs or its last layer is not a Dense.
  """
  if not isinstance(model, keras.Model):
    raise TypeError(f"`model` must be a tf_keras Model; got {type(model).__name__}.")
  if len(model.outputs or []) != 1:
    raise ValueError(f"`model` must have exactly one output (the logits); "
                     f"got {len(model.outputs or [])}.")
  last = model.layers[-1] if model.layers else None
  if not isinstance(last, keras.layers.Dense) or last.output is not model.outputs[0]:
    raise ValueError(
        f"`model` has no Dense output layer: its last layer is "
        f"{type(last).__name__} {getattr(last, 'name', '')!r}; logits augmentation "
        f"scales the kernel of a Dense layer that outputs the logits.")
  return last


def _checked_copy(model: keras.Model, epsilon: float) -> tuple[float, keras.Model]:
  """Both transforms' start: checks ``epsilon`` then ``model``; (epsilon, a copy)."""
  epsilon = _validate_epsilon(epsilon)
  output_dense_layer(model)
  return epsilon, initial_model.fresh_copy(model)


def augment_logits(model: keras.Model, epsilon: float) -> keras.Model:
  """Scales the logits layer's kernel by (1 + epsilon); returns a new model.

  Args:
    model: a tf_keras model whose last layer is a Dense producing the logits
      (e.g. M1, float32 images in [0, 1] -> logits [batch, K]).
    epsilon: >= 0; the kernel becomes ``float32(1 + epsilon) * W``. The
      authors' code recommends 20 (MNIST) and 10 (CIFAR-10).

  Returns:
    A new model with the same architecture; every weight equals the input's
    except the logits kernel. The bias is unchanged and zeros stay zero.

  Raises:
    ValueError: ``epsilon`` < 0 or not finite; no Dense output layer.
    TypeError: ``model`` is not a Keras model or ``epsilon`` not a number.
  """
  epsilon, clone = _checked_copy(model, epsilon)
  layer = output_dense_layer(clone)
  kernel = keras.backend.get_value(layer.kernel)
  layer.kernel.assign(kernel * np.asarray(1.0 + epsilon, dtype=kernel.dtype))
  return clone


def gradient_inhibition(model: keras.Model, epsilon: float = GRADIENT_INHIBITION_EPSILON
                        ) -> keras.Model:
  """W <- W + epsilon * sign(W) on every Dense kernel (Liu et al., ASP-DAC 2018).

  Args:
    model: a tf_keras model whose last layer is a Dense producing the logits.
    epsilon: >= 0 (paper: about 0.1).

  Returns:
    A new model; Dense kernels changed as above, biases and all other layers'
    weights identical, zeros still zero (sign(0) = 0).

  Raises:
    ValueError: ``epsilon`` < 0 or not finite; no Dense output layer.
    TypeError: ``model`` is not a Keras model or ``epsilon`` not a number.
  """
  epsilon, clone = _checked_copy(model, epsilon)
  for layer in clone.layers:
    if isinstance(layer, keras.layers.Dense):
      kernel = keras.backend.get_value(layer.kernel)
      layer.kernel.assign(kernel + np.asarray(epsilon, kernel.dtype) * np.sign(kernel))
  return clone


def apply_transform(model: keras.Model, transform: str, epsilon: float) -> keras.Model:
  """``augment_logits`` or ``gradient_inhibition`` by name (see ``TRANSFORMS``).

  Raises:
    ValueError: unknown ``transform`` (and whatever the transform raises).
  """
  if transform == "logits_augmentation":
    return augment_logits(model, epsilon)
  if transform == "gradient_inhibition":
    return gradient_inhibition(model, epsilon)
  raise ValueError(f"`transform` must be one of {', '.join(TRANSFORMS)}; got {transform!r}.")


# --------------------------------------------------------------------------
# The transform run: config in, M2 SavedModel + agreement out.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class AugmentConfig:
  """What ``augment`` needs. Field names match the flags that fill them."""
  base_model_path: str = "saved_models/mnist_m1/1"
  transform: str = "logits_augmentation"
  logits_epsilon: float = 20.0  # authors' code: 20 MNIST, 10 CIFAR-10 (later 100)
  inhibition_epsilon: float = GRADIENT_INHIBITION_EPSILON
  dataset: str = "mnist"
  test_limit: int | None = None
  data_dir: str | None = None
  manual_dir: str | None = None
  export_dir: str | None = None
  export_version: int | None = None

  @property
  def epsilon(self) -> float:
    return (self.logits_epsilon if self.transform == "logits_augmentation"
            else self.inhibition_epsilon)

  def validate(self) -> "AugmentConfig":
    """Checks every field; returns self. Raises ConfigError naming the field."""
    need = config_checks.checker(ConfigError)
    need(self.transform in TRANSFORMS,
         f"`transform` must be one of {', '.join(TRANSFORMS)}; got {self.transform!r}.")
    for name in ("logits_epsilon", "inhibition_epsilon"):
      try:
        _validate_epsilon(getattr(self, name), name)
      except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    need(bool(self.base_model_path),
         "`base_model_path` must name a SavedModel, e.g. saved_models/mnist_m1/1.")
    need(self.test_limit is None or int(self.test_limit) >= 1,
         f"`test_limit` must be >= 1; got {self.test_limit}.")
    need(self.export_version is None or int(self.export_version) >= 1,
         f"`export_version` must be >= 1; got {self.export_version}.")
    training.check_output_dir("export_dir", self.export_dir)
    return self


@dataclasses.dataclass
class AugmentResult:
  """What ``augment`` produced."""
  model: keras.Model
  transform: str
  epsilon: float
  agreement: float  # fraction of test images where argmax matches the base model
  base_accuracy: float
  accuracy: float
  test_examples: int
  saved_model_path: str | None

  def to_dict(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if k != "model"}

  def summary(self) -> str:
    return (f"{self.transform} (epsilon={self.epsilon:g}): agreement with the base model "
            f"{100 * self.agreement:.2f}% on {self.test_examples} test images; accuracy "
            f"{100 * self.base_accuracy:.2f}% -> {100 * self.accuracy:.2f}%")


def augment(config: AugmentConfig) -> AugmentResult:
  """Loads the base SavedModel, applies the transform, measures, exports.

  Raises:
    ConfigError: a bad config field.
    ModelLoadError: the base model cannot be loaded.
    ValueError: the base model has no Dense output layer.
  """
  config.validate()
  ds_info = data.info(config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir)
  base_record = export.read_provenance(config.base_model_path)
  if base_record is not None and base_record.get("dataset") != config.dataset:
    export.check_model_dataset(config.base_model_path, config.dataset, what="base model")
  base = export.load_model(config.base_model_path)
  try:
    model = apply_transform(base, config.transform, config.epsilon)
  except ValueError as e:
    raise ConfigError(f"{config.base_model_path}: {e}") from None
  test_ds = data.load_split(config.dataset, "test", batch_size=1000,
                            limit=config.test_limit, data_dir=config.data_dir,
                            manual_dir=config.manual_dir)
  same = base_ok = ok = n = 0
  for x, y in test_ds:
    p0 = np.argmax(base(x, training=False).numpy(), axis=-1)
    p1 = np.argmax(model(x, training=False).numpy(), axis=-1)
    y = y.numpy()
    same += int(np.sum(p0 == p1))
    base_ok += int(np.sum(p0 == y))
    ok += int(np.sum(p1 == y))
    n += len(y)
  saved = None
  if config.export_dir:
    saved = export.export_saved_model(
        model, config.export_dir, version=config.export_version,
        provenance=provenance.model_provenance(
            config.transform, ds_info, base_model=str(config.base_model_path)))
  return AugmentResult(model=model, transform=config.transform, epsilon=config.epsilon,
                       agreement=same / max(n, 1), base_accuracy=base_ok / max(n, 1),
                       accuracy=ok / max(n, 1), test_examples=n, saved_model_path=saved)


def augment_defense(model: str | None, data_spec: base.DataSpec,
                    config: AugmentConfig) -> tuple[keras.Model, dict]:
  """The registry's entry: ``augment`` of the SavedModel at ``model`` (default: the config's).

  Args:
    model: path of the SavedModel to transform, or None for ``config.base_model_path``.
    data_spec: the dataset (measured on its test split).
    config: an ``AugmentConfig``.

  Returns:
    (the transformed model, provenance with agreement and accuracies).
  """
  config = data_spec.apply(dataclasses.replace(
      config, base_model_path=model or config.base_model_path))
  result = augment(config)
  return result.model, base.record(config.transform, config, result.to_dict())
