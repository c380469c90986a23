"""Shared test setup: hermetic tfds data dir, quiet logs, fixed seeds."""

import os
import shutil
import tempfile

# A fresh tfds data dir for the session: MNIST is built from the files the
# package ships, with no network, exactly as on a user's first run.
_TFDS_DIR = tempfile.mkdtemp(prefix="kd-tests-tfds-")
os.environ["TFDS_DATA_DIR"] = _TFDS_DIR
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras_defense  # noqa: E402,F401  (chooses Keras 2 before TF is imported)
import pytest  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

tfds.disable_progress_bar()


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  shutil.rmtree(_TFDS_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tfds_dir():
  return _TFDS_DIR
