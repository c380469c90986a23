"""Weight clustering with tfmot: every kernel's weights shared among N centroids.

``cluster_model`` wraps the Conv2D and Dense layers (every layer tfmot can
cluster in our models) with
``tfmot.clustering.keras.cluster_weights`` (Han et al., *Deep Compression*,
ICLR 2016: weight sharing; tfmot's guide
https://www.tensorflow.org/model_optimization/guide/clustering). Centroids start
linearly spaced over each kernel's range: k-means++ fails on the sparse
kernels of a pruned model (conv1 of M1 keeps 14 nonzero weights, fewer than 16
centroids). For a pruned model ``preserve_sparsity`` keeps the zeros at zero
(tfmot's sparsity-preserving clustering), so the two compressions add up.
Fine-tune the wrapped model (Keras fit), then ``strip_clustering``; the
stripped model is a plain tf_keras model whose kernels hold at most N distinct
values (plus 0 when sparsity is preserved), which gzip and int8 conversion
exploit.

Example:
  >>> clustered = cluster_model(m1, number_of_clusters=16, preserve_sparsity=True)
  >>> clustered.compile(...); clustered.fit(...)
  >>> plain = strip_clustering(clustered)
  >>> max(unique_weight_counts(plain).values()) <= 17
"""

from __future__ import annotations

import numpy as np

from keras_defense.util.compat import keras
from keras_defense.util.errors import UserError

# tfmot's collaborative-optimization examples use 16 (8 and 32 also common).
DEFAULT_CLUSTERS = 16
CLUSTERED_LAYERS = (keras.layers.Conv2D, keras.layers.Dense)


def _tfmot():
  import tensorflow_model_optimization as tfmot  # pylint: disable=g-import-not-at-top  (heavy)
  return tfmot


def cluster_model(model: keras.Model, *, number_of_clusters: int = DEFAULT_CLUSTERS,
                  preserve_sparsity: bool = False) -> keras.Model:
  """Wraps the Conv2D and Dense kernels of ``model`` for clustering.

  Args:
    model: a functional or Sequential tf_keras model (no tfmot wrappers).
    number_of_clusters: centroids per kernel, >= 2.
    preserve_sparsity: keep zero weights at zero (for a pruned model).

  Returns:
    A new model with clustering wrappers (``model`` is left as it was);
    fine-tune it, then ``strip_clustering``.

  Raises:
    UserError: ``number_of_clusters`` < 2 or not an int.
  """
  if isinstance(number_of_clusters, bool) or not isinstance(number_of_clusters, int) \
      or number_of_clusters < 2:
    raise UserError(f"`number_of_clusters` must be an integer >= 2; got {number_of_clusters!r}.")
  tfmot = _tfmot()
  params = {
      "number_of_clusters": number_of_clusters,
      "cluster_centroids_init": tfmot.clustering.keras.CentroidInitialization.LINEAR,
      "preserve_sparsity": bool(preserve_sparsity),
  }

  # tfmot's wrappers hold the very layers they wrap, so fine-tuning the
  # clustered model would change ``model`` too: wrap a copy.
  copy = keras.models.clone_model(model)
  copy.set_weights(model.get_weights())
  # The whole model: tfmot wraps every layer it can cluster (Conv2D, Dense).
  return tfmot.clustering.keras.cluster_weights(copy, **params)


def strip_clustering(model: keras.Model) -> keras.Model:
  """The clustered model without its wrappers (kernels set to their centroids)."""
  return _tfmot().clustering.keras.strip_clustering(model)


def unique_weight_counts(model: keras.Model) -> dict[str, int]:
  """Distinct values in each Conv2D/Dense kernel of ``model``, by layer name."""
  return {layer.name: int(np.unique(layer.kernel.numpy()).size)
          for layer in model.layers if isinstance(layer, CLUSTERED_LAYERS)}
