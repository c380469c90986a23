"""kd-evaluate on the models users bring: Keras 3 files, any shape, any pixel convention.

The models are built here with Keras 3 (``import keras`` is Keras 3 beside the
project's tf_keras; checked below), saved the way TensorFlow >= 2.16 users
save (``model.save("m.keras")``, ``model.export()``), and evaluated through
``pipelines.evaluate.run``, the library call ``kd-evaluate`` makes. Each test checks
``clean_acc`` against the model's own accuracy on the same images, computed
here with the Keras 3 model in the pixels it was built for.

The attack is a cheap stand-in (PGD, 2 steps) handed to ``run`` as
``attack_plan``, except for one case that runs the real APGD-CE through a
Keras 3 model; the strength of the ensemble is tested elsewhere.
"""

import json

import numpy as np
import pytest

import _helpers
from keras_defense import attacks
from keras_defense import data
from keras_defense import flags as kd_flags
from keras_defense.data import arrays
from keras_defense.evaluation import robustness
from keras_defense.models import classifier
from keras_defense.models import export
from keras_defense.models import keras_files
from keras_defense.pipelines import evaluate
from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError

import keras  # Keras 3, not the project's tf_keras (TF_USE_LEGACY_KERAS only redirects tf.keras)

N = 40  # MNIST test images per evaluation


def test_keras_is_keras_3():
  assert keras.__version__.startswith("3."), keras.__version__
  assert not keras_files.is_keras3_model(export.keras.Sequential())  # tf_keras


def _pgd_plan(version, norm, names):
  """PGD, 2 steps: autoattack.plan's interface, cheaply."""
  del version, names, norm

  def pgd(model, x, y, eps, *, seed, batch_size, compute_dtype):
    return attacks.pgd(model, x, y, eps, step_size=eps / 2, steps=2, seed=seed,
                       batch_size=batch_size, compute_dtype=compute_dtype)

  return [("pgd", pgd)]


def _run(model_path, run_dir, plan=_pgd_plan, **kw):
  kw.setdefault("epsilons", (0.1,))
  kw.setdefault("n_examples", N)
  config = robustness.RobustnessConfig(model=str(model_path), run_dir=str(run_dir),
                                       batch_size=64, **kw)
  return evaluate.run(config, attack_plan=plan)


def _accuracy(model, x, y):
  return float(np.mean(np.argmax(keras.ops.convert_to_numpy(model(x, training=False)), -1)
                       == y))


def _cnn_layers():
  return [keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
          keras.layers.MaxPooling2D(),
          keras.layers.Flatten(),
          keras.layers.Dense(10)]


@pytest.fixture(scope="module")
def mnist():
  x_train, y_train = data.load_arrays("mnist", "train", limit=500)
  x_test, y_test = data.load_arrays("mnist", "test", limit=N)
  return x_train, y_train, x_test, y_test


@pytest.fixture(scope="module")
def cnn(mnist):
  """A Keras 3 CNN of built-in layers on [0, 1] pixels, 1 epoch on 500 MNIST images."""
  x_train, y_train, _, _ = mnist
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((28, 28, 1)), *_cnn_layers()])
  model.compile(keras.optimizers.Adam(3e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(x_train, y_train, epochs=1, batch_size=10, verbose=0)
  return model


def _wrapped(cnn, first_layer):
  """``cnn``'s layers (shared weights) behind ``first_layer``: another pixel convention."""
  inputs = keras.Input((28, 28, 1))
  out = first_layer(inputs)
  for layer in cnn.layers:
    out = layer(out)
  return keras.Model(inputs, out)


def test_a_keras3_cnn_saved_with_model_save(cnn, mnist, tmp_path):
  _, _, x, y = mnist
  path = tmp_path / "cnn.keras"
  cnn.save(path)
  assert keras_files.inspect(path).describe().startswith("Keras 3 .keras file, saved with "
                                                         "Keras 3.")
  # The real APGD-CE, through the Keras 3 model as an opaque callable.
  result = _run(path, tmp_path / "run", plan=None, version="custom", attacks=("apgd-ce",))
  assert result.model_kind == "keras3"
  assert result.clean_acc == _accuracy(cnn, x, y) > 0.5
  assert result.robust_acc[0] < result.clean_acc
  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  assert saved["pixels"] == {"input_range": [0.0, 1.0], "mean": None, "std": None}


def test_gradients_flow_through_a_keras3_model(cnn, mnist, tmp_path):
  _, y_all, x, y = mnist
  del y_all
  cnn.save(tmp_path / "cnn.keras")
  clf = classifier.load_classifier(tmp_path / "cnn.keras")
  xt = tf.constant(x[:8])
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(xt)
    ours = tf.reduce_sum(clf(xt) * tf.one_hot(y[:8], 10))
    theirs = tf.reduce_sum(cnn(xt, training=False) * tf.one_hot(y[:8], 10))
  g_ours, g_theirs = tape.gradient(ours, xt), tape.gradient(theirs, xt)
  assert float(tf.reduce_max(tf.abs(g_ours))) > 0
  np.testing.assert_allclose(g_ours.numpy(), g_theirs.numpy(), rtol=1e-5, atol=1e-6)
  # And inside a tf.function, as the attacks call it.
  f = tf.function(lambda t: clf(t))
  np.testing.assert_allclose(f(xt).numpy(), cnn(xt).numpy(), rtol=1e-5, atol=1e-5)


def test_b_0_255_model_with_rescaling_inside(cnn, mnist, tmp_path):
  _, _, x, y = mnist
  model = _wrapped(cnn, keras.layers.Rescaling(1 / 255))
  model.save(tmp_path / "m255.keras")
  own = _accuracy(model, x * 255.0, y)
  assert own == _accuracy(cnn, x, y)
  # Read as [0, 1] pixels the model sees near-black images: the flag matters.
  clf = classifier.load_classifier(tmp_path / "m255.keras")
  from keras_defense.models import pixels  # pylint: disable=g-import-not-at-top
  clf.use_pixels(pixels.PixelConvention(input_range=(0.0, 255.0)))
  np.testing.assert_allclose(clf(x[:8]).numpy(), cnn(x[:8]).numpy(), rtol=1e-4, atol=1e-4)
  result = _run(tmp_path / "m255.keras", tmp_path / "run", input_range=(0.0, 255.0))
  assert result.clean_acc == own
  # The run directory is bound to the pixel convention: a resume with other pixels is refused.
  with pytest.raises(UserError, match=r"holds another evaluation \(pixels="):
    _run(tmp_path / "m255.keras", tmp_path / "run")
  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  assert saved["pixels"]["input_range"] == [0.0, 255.0]


def _write_npz(path, x, y, **extra):
  np.savez(path, x=x, y=y, **extra)
  return path


def test_c_64x64x3_model_on_npz_of_uint8_arrays(tmp_path):
  keras.utils.set_random_seed(1)
  model = keras.Sequential([keras.Input((64, 64, 3)), keras.layers.Conv2D(4, 5, strides=4),
                            keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5)])
  model.save(tmp_path / "m64.keras")
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (24, 64, 64, 3), dtype=np.uint8)
  y = rng.integers(0, 5, 24)
  npz = _write_npz(tmp_path / "test.npz", x, y)
  own = _accuracy(model, x.astype(np.float32) / 255.0, y)
  result = _run(tmp_path / "m64.keras", tmp_path / "run", dataset=f"npz:{npz}",
                n_examples=24)
  assert result.clean_acc == own and result.n == 24
  run = json.loads((tmp_path / "run" / "run.json").read_text())
  assert len(run["config"]["data_sha256"]) == 64
  # Images of another shape: refused, naming both and the flag that resizes.
  small = _write_npz(tmp_path / "small.npz", x[:, :32, :32], y)
  with pytest.raises(UserError, match=r"has images of shape 32x32x3; the model takes 64x64x3\. "
                                      r"Fix: pass --image_size=64x64x3"):
    _run(tmp_path / "m64.keras", tmp_path / "run2", dataset=f"npz:{small}", n_examples=24)
  result = _run(tmp_path / "m64.keras", tmp_path / "run3", dataset=f"npz:{small}@64x64x3",
                n_examples=24)
  assert result.n == 24
  # The model's output width must equal the class count.
  seven = _write_npz(tmp_path / "seven.npz", x, y, class_names=np.array(list("abcdefg")))
  with pytest.raises(UserError, match=r"outputs 5 class scores, the dataset has 7 classes"):
    _run(tmp_path / "m64.keras", tmp_path / "run4", dataset=f"npz:{seven}", n_examples=24)
  # Without class_names the labels must index the model's outputs.
  high = _write_npz(tmp_path / "high.npz", x, np.where(y == 0, 6, y))
  with pytest.raises(UserError, match=r"has label 6, but the model outputs 5 class scores"):
    _run(tmp_path / "m64.keras", tmp_path / "run5", dataset=f"npz:{high}", n_examples=24)


@pytest.mark.parametrize("arrays_kw, match", [
    (dict(x=np.zeros((2, 8, 8, 3), np.uint8)), r"has no array 'y' \(it has x\)"),
    (dict(x=np.zeros((2, 8, 8), np.uint8), y=[0, 1]), r"x must be NHWC images of rank 4"),
    (dict(x=np.zeros((2, 8, 8, 3), np.float64), y=[0, 1]), r"x must be uint8 .* got float64"),
    (dict(x=np.full((2, 8, 8, 3), 2.0, np.float32), y=[0, 1]),
     r"float32 x must lie in \[0, 1\]; its values span \[2, 2\]"),
    (dict(x=np.zeros((2, 8, 8, 3), np.uint8), y=[0, 1, 1]),
     r"x has 2 images but y has 3 labels"),
    (dict(x=np.zeros((2, 8, 8, 3), np.uint8), y=[0.0, 1.0]), r"y must be a 1-D array of integer"),
    (dict(x=np.zeros((2, 8, 8, 3), np.uint8), y=[0, 3], class_names=np.array(["a", "b"])),
     r"label y\[1\] = 3 is out of range \[0, 2\)"),
    (dict(x=np.zeros((2, 8, 8, 3), np.uint8), y=[0, -1]), r"label y\[1\] = -1 is out of range"),
])
def test_bad_npz_is_a_clear_error_naming_the_file(tmp_path, arrays_kw, match):
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays_kw)
  with pytest.raises(data.DataError, match=rf"--data file '{path}'.*{match}|{match}"):
    arrays.load_npz(path)
  with pytest.raises(data.DataError, match=r"does not exist"):
    arrays.load_npz(tmp_path / "nope.npz")


def test_d_probability_output_model(cnn, mnist, tmp_path):
  _, _, x, y = mnist
  inputs = keras.Input((28, 28, 1))
  model = keras.Model(inputs, keras.layers.Softmax()(cnn(inputs)))
  model.save(tmp_path / "softmax.keras")
  result = _run(tmp_path / "softmax.keras", tmp_path / "run")
  assert result.output == classifier.PROBABILITIES
  assert result.clean_acc == _accuracy(model, x, y)


def test_e_normalized_input_model_gradients_are_exact(cnn, mnist, tmp_path):
  _, _, x, y = mnist
  mean, std = 0.1307, 0.3081  # MNIST's, in [0, 1] units
  # The model takes (x - mean) / std: undo it first, then the [0, 1] network.
  model = _wrapped(cnn, keras.layers.Rescaling(scale=std, offset=mean))
  model.save(tmp_path / "norm.keras")
  own = _accuracy(model, (x - mean) / std, y)
  result = _run(tmp_path / "norm.keras", tmp_path / "run", mean=(mean,), std=(std,))
  assert result.clean_acc == own
  # The conversion runs inside the differentiated function: same gradients as
  # the [0, 1] network's.
  from keras_defense.models import pixels  # pylint: disable=g-import-not-at-top
  clf = classifier.load_classifier(tmp_path / "norm.keras").use_pixels(
      pixels.PixelConvention(mean=(mean,), std=(std,)))
  xt = tf.constant(x[:8])
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(xt)
    ours = tf.reduce_sum(clf(xt)[:, 3])
    theirs = tf.reduce_sum(cnn(xt)[:, 3])
  np.testing.assert_allclose(tape.gradient(ours, xt).numpy(), tape.gradient(theirs, xt).numpy(),
                             rtol=1e-3, atol=1e-5)


def test_f_mobilenetv2_with_preprocess_input_semantics(tmp_path):
  keras.utils.set_random_seed(2)
  model = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3), classes=10,
                                         alpha=0.35)
  model.save(tmp_path / "mobilenet.keras")
  rng = np.random.default_rng(3)
  x = rng.integers(0, 256, (8, 96, 96, 3), dtype=np.uint8)
  y = rng.integers(0, 10, 8)
  npz = _write_npz(tmp_path / "test.npz", x, y)
  # preprocess_input ("tf" mode) maps 0-255 to [-1, 1]: mean 0.5, std 0.5 in [0, 1] units.
  own = _accuracy(model, keras.applications.mobilenet_v2.preprocess_input(
      x.astype(np.float32)), y)
  result = _run(tmp_path / "mobilenet.keras", tmp_path / "run", dataset=f"npz:{npz}",
                n_examples=8, mean=(0.5,), std=(0.5,), epsilons=(2 / 255,))
  assert result.clean_acc == own
  assert result.output == classifier.PROBABILITIES  # its head ends in softmax


def test_saved_model_of_keras3_export_with_only_a_serve_endpoint(cnn, mnist, tmp_path):
  _, _, x, y = mnist
  # As Keras 3's model.export() writes it, minus the serving_default alias it
  # adds (other programs name their one signature as they like).
  module = tf.Module()
  module.model = cnn
  serve = tf.function(lambda keras_tensor: cnn(keras_tensor, training=False),
                      input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32)])
  tf.saved_model.save(module, str(tmp_path / "exported"), signatures={"serve": serve})
  assert list(tf.saved_model.load(str(tmp_path / "exported")).signatures) == ["serve"]
  result = _run(tmp_path / "exported", tmp_path / "run")  # signature: serving_default
  assert result.model_kind == "saved_model"
  assert result.clean_acc == _accuracy(cnn, x, y)
  clf = classifier.load_classifier(tmp_path / "exported")
  assert clf.signature == "serve" and "signature 'serve'" in clf.describe()


def test_keras3_lambda_and_custom_layers_are_refused_naming_the_layer(tmp_path):
  inputs = keras.Input((28, 28, 1))
  out = keras.layers.Lambda(lambda t: t * 2.0, name="double_it")(inputs)
  keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(out))).save(
      tmp_path / "lambda.keras")
  with pytest.raises(export.ModelLoadError,
                     match=r"\(Keras 3 \.keras file, saved with Keras 3\.[0-9.]+\): layer "
                           r"'double_it' is a Lambda: its Python code would run on load; "
                           r"refusing"):
    export.load_model(tmp_path / "lambda.keras")
  with pytest.raises(UserError, match=r"layer 'double_it' is a Lambda"):
    _run(tmp_path / "lambda.keras", tmp_path / "run")
  assert not (tmp_path / "run").exists()

  @keras.saving.register_keras_serializable(package="kd_test3")
  class Twice(keras.layers.Layer):
    def call(self, t):
      return t * 2.0

  inputs = keras.Input((4,))
  keras.Model(inputs, keras.layers.Dense(2)(Twice(name="twice")(inputs))).save(
      tmp_path / "custom.keras")
  with pytest.raises(export.ModelLoadError,
                     match=r"layer 'twice' is a 'kd_test3>Twice', which is not a built-in "
                           r"Keras class; refusing"):
    export.load_model(tmp_path / "custom.keras")


def test_a_functional_keras3_model_is_not_refused_for_its_node_records(tmp_path):
  # Keras 3 functional configs hold {"class_name": "__keras_tensor__", ...}
  # records for layer inputs: data, not classes.
  inputs = keras.Input((28, 28, 1))
  out = keras.layers.Dense(10)(keras.layers.Flatten()(inputs))
  model = keras.Model(inputs, keras.layers.Softmax()(out))
  model.save(tmp_path / "f.keras")
  model.save(tmp_path / "f.h5")
  assert "__keras_tensor__" in json.dumps(keras_files.read_configs(tmp_path / "f.keras"))
  for name in ("f.keras", "f.h5"):
    assert keras_files.is_keras3_model(export.load_model(tmp_path / name))
  assert keras_files.inspect(tmp_path / "f.h5").keras == keras_files.KERAS3


def test_flags_make_the_config(tmp_path):
  fv = _helpers.fresh_flags(kd_flags.evaluate_flags)
  fv(["kd-evaluate", "--model=m.keras", "--data=/d/test.npz", "--image_size=96x96x3",
      "--input_range=0,255", "--mean=123.68,116.78,103.94", "--std=58.4,57.1,57.4"])
  config = kd_flags.evaluate_config(None, fv).validate()
  assert config.dataset == "npz:/d/test.npz@96x96x3"
  assert config.input_range == (0.0, 255.0)
  assert config.mean == (123.68, 116.78, 103.94) and config.std == (58.4, 57.1, 57.4)
  assert config.identity()["pixels"]["input_range"] == [0.0, 255.0]
  tfds = _helpers.fresh_flags(kd_flags.evaluate_flags)
  tfds(["kd-evaluate", "--model=m.keras", "--dataset=cifar10", "--image_size=224x224x3"])
  config = kd_flags.evaluate_config(None, tfds).validate()
  assert config.dataset == "cifar10@224x224x3" and "pixels" not in config.identity()
  both = _helpers.fresh_flags(kd_flags.evaluate_flags)
  both(["kd-evaluate", "--model=m.keras", "--dataset=cifar10", "--data=x.npz"])
  with pytest.raises(UserError, match=r"pass --data \(your arrays\) or --dataset, not both"):
    kd_flags.evaluate_config(None, both)
  bad = _helpers.fresh_flags(kd_flags.evaluate_flags)
  with pytest.raises(Exception, match=r"--std must be > 0"):
    bad(["kd-evaluate", "--std=0"])
  # Training keeps the two C&W shapes.
  train = _helpers.fresh_flags()
  with pytest.raises(Exception, match=r"--image_size must be 28x28x1 or 32x32x3"):
    train(["kd-train", "--image_size=64x64x3"])
  with pytest.raises(UserError, match=r"`mean` has 2 values; the images have 3 channel"):
    robustness.RobustnessConfig(model="m", run_dir="r", mean=(0.1, 0.2)).pixels().validate(
        channels=3)


def test_64x64x3_model_on_a_folder_of_64x64_pngs(tmp_path):
  rng = np.random.default_rng(4)
  for split, n in (("train", 2), ("test", 5)):
    for label in ("cat", "dog"):
      (tmp_path / "pets" / split / label).mkdir(parents=True)
      for i in range(n):
        img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        (tmp_path / "pets" / split / label / f"{i}.png").write_bytes(
            tf.io.encode_png(img).numpy())
  keras.utils.set_random_seed(5)
  model = keras.Sequential([keras.Input((64, 64, 3)), keras.layers.Conv2D(4, 5, strides=4),
                            keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
  model.save(tmp_path / "pets.keras")
  dataset = f"folder:{tmp_path / 'pets'}"
  result = _run(tmp_path / "pets.keras", tmp_path / "run", dataset=dataset, n_examples=10)
  x, y = data.load_arrays(f"{dataset}@64x64x3", "test")
  assert result.n == 10 and result.clean_acc == _accuracy(model, x, y)
  # A 48x48x3 model on the same folder: refused unless asked to resize.
  small = keras.Sequential([keras.Input((48, 48, 3)), keras.layers.Flatten(),
                            keras.layers.Dense(2)])
  small.save(tmp_path / "small.keras")
  with pytest.raises(UserError, match=r"has images of shape 64x64x3; the model takes 48x48x3\. "
                                      r"Fix: pass --image_size=48x48x3"):
    _run(tmp_path / "small.keras", tmp_path / "run2", dataset=dataset, n_examples=10)
  assert _run(tmp_path / "small.keras", tmp_path / "run3", dataset=f"{dataset}@48x48x3",
              n_examples=10).n == 10
