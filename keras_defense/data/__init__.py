"""Datasets: tfds by name or ``folder:PATH``, checked against their source files.

The package face re-exports ``datasets`` (loading) and ``names`` (dataset names
and slugs); ``sources`` verifies builds, ``image_folder`` reads a user's image
folders, ``arrays`` a user's ``.npz`` test set.
"""

from keras_defense.data.datasets import check_image_features
from keras_defense.data.datasets import DataError
from keras_defense.data.datasets import DatasetInfo
from keras_defense.data.datasets import default_data_dir
from keras_defense.data.datasets import DEFAULT_VALIDATION_SIZE
from keras_defense.data.names import FOLDER_PREFIX
from keras_defense.data.datasets import info
from keras_defense.data.datasets import load_arrays
from keras_defense.data.datasets import load_epochs
from keras_defense.data.datasets import load_split
from keras_defense.data.datasets import MNIST_FILES
from keras_defense.data.names import parse_image_size
from keras_defense.data.datasets import prepare
from keras_defense.data.datasets import resolve_validation_size
from keras_defense.data.datasets import SHIPPED_DIR
from keras_defense.data.names import slug
from keras_defense.data.datasets import source_image_shapes
from keras_defense.data.names import split_name
from keras_defense.data.datasets import SPLITS
from keras_defense.data.names import SUPPORTED_SHAPES
from keras_defense.data.datasets import verify_mnist_files
from keras_defense.data.names import with_image_size
