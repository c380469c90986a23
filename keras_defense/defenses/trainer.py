"""The training step of the trained defenses, and the robust-accuracy guard.

``DefenseTrainer`` wraps a functional classifier in a ``keras.Model`` whose
``train_step`` crafts the adversarial batch (``training.attack.craft``)
on tensors inside the compiled step, or trains at a softmax temperature on
labels or on a teacher's soft labels (defensive distillation). It is what
``training.train`` fits when a defense is on (``DefenseSetup``, made by
``defense_factory``; ``train`` composes the two), so ``BackupAndRestore``,
``EpochSeeder``, the learning-rate schedule, TensorBoard and tf.distribute
work unchanged; the wrapper itself is never exported (``training.train``
exports the inner functional model).

BatchNormalization under adversarial training (Madry et al.'s and TRADES'
common choice): the attack crafts with the model in inference mode
(``training=False``: BN normalizes with its moving statistics and updates
none of them, and Dropout is off), so the crafting's 10-40 forward passes
leave the statistics as they were; the loss step then runs the model in
training mode (``training=True``) on the adversarial batch (TRADES: on the
clean and on the adversarial batch), so BN normalizes with that batch's
statistics and its moving statistics follow the adversarial (TRADES: clean,
then adversarial) batches, the inputs the deployed model must hold on.
``tests/test_harden.py`` checks both halves.

The per-epoch guards that keep the best epoch (``RobustAccuracyGuard``, PGD;
``CertifiedAccuracyGuard``, IBP) live in ``guards``.

Certified training (IBP, Gowal et al. 2018, https://arxiv.org/abs/1810.12715;
CROWN-IBP, Zhang et al. ICLR 2020, https://arxiv.org/abs/1906.06316) is one
more ``DefenseTrainer`` mode: the step minimises ``certify.losses``'
κ·CE(clean) + (1-κ)·CE(worst-case logits at ε), with ε, κ (and CROWN-IBP's β)
ramped as functions of the optimizer's step counter
(``certify.losses.CertifiedSchedule``), so a resumed run continues the ramps
where it stopped; ``CertifiedAccuracyGuard`` keeps the epoch with the best IBP
certified accuracy on the held-out slice.
"""

from __future__ import annotations

import functools
import os
import pathlib

from keras_defense import data
from keras_defense import training
from keras_defense.certify import losses as cert_losses
from keras_defense.training import attack as at
from keras_defense.defenses.guards import CertifiedAccuracyGuard
from keras_defense.defenses.guards import RobustAccuracyGuard
from keras_defense.models import export
from keras_defense.training.config import ConfigError
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf



class _Current(keras.metrics.Metric):
  """The last value given (a schedule's ε or κ): shown as is, not averaged over the epoch."""

  def __init__(self, name: str):
    super().__init__(name=name)
    self.value = self.add_weight(name="value", initializer="zeros")

  def update_state(self, value):  # pylint: disable=arguments-differ
    self.value.assign(tf.cast(value, tf.float32))

  def result(self):
    return tf.identity(self.value)


class DefenseTrainer(keras.Model):
  """A training wrapper around ``classifier`` (logits out); never exported.

  Logs ``loss`` and, with adversarial training, ``robust_accuracy`` (accuracy
  on the crafted training batch, i.e. against the training attack) or, else,
  ``accuracy``; validation logs the clean ``loss`` and ``accuracy`` at T = 1.

  Args:
    classifier: the functional model to train.
    adversarial: None, "pgd", "fgsm_rs" or "trades".
    epsilon, step_size, steps: the inner maximisation (see ``craft``).
    trades_beta: TRADES' beta.
    temperature: the softmax temperature of the training loss (logits / T).
    teacher: a frozen model whose softmax(logits / T) replaces the labels.
    seed: seed of the random starts (with the optimizer's step counter and the
      replica id: a resumed run draws what an uninterrupted one would).
    certified: None, "ibp" or "crown_ibp": certified training; its ε, κ and β
      follow ``schedule`` (a ``certify.losses.CertifiedSchedule``) of the
      optimizer's step. Logs ``certified_accuracy``: the batch's share whose
      margins are certified at the step's ε.
  """

  def __init__(self, classifier: keras.Model, *, adversarial: str | None = None,
               epsilon: float = 0.0, step_size: float = 0.0, steps: int = 1,
               trades_beta: float = 6.0, temperature: float = 1.0,
               teacher: keras.Model | None = None, seed: int = 0,
               certified: str | None = None,
               schedule: cert_losses.CertifiedSchedule | None = None, **kwargs):
    super().__init__(name=f"{classifier.name}_trainer", **kwargs)
    self.classifier = classifier
    self.teacher = teacher
    if teacher is not None:
      teacher.trainable = False
    self._adversarial = adversarial
    self._attack = dict(epsilon=float(epsilon), step_size=float(step_size), steps=int(steps))
    self._beta = float(trades_beta)
    self._temperature = float(temperature)
    self._seed = int(seed)
    self.loss_tracker = keras.metrics.Mean(name="loss")
    self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    self.robust_tracker = keras.metrics.SparseCategoricalAccuracy(name="robust_accuracy")
    self._certified = certified
    self._schedule = schedule
    if certified is not None:
      if schedule is None:
        raise ValueError(f"`schedule` is needed with certified={certified!r}; got None.")
      self.certified_tracker = keras.metrics.SparseCategoricalAccuracy(
          name="certified_accuracy")
      self.schedule_trackers = [_Current("cert_epsilon"), _Current("cert_kappa")]

  def call(self, inputs, training=False):
    return self.classifier(inputs, training=training)

  @property
  def metrics(self):
    extra = [self.certified_tracker, *self.schedule_trackers] if self._certified else []
    return [self.loss_tracker, self.accuracy_tracker, self.robust_tracker] + extra

  def _logits(self, x, training):
    return tf.cast(self.classifier(x, training=training), tf.float32)

  def _seed_tensor(self):
    replica = tf.distribute.get_replica_context()
    replica_id = replica.replica_id_in_sync_group if replica is not None else 0
    return tf.stack([tf.cast(self._seed * 1024 + replica_id, tf.int64),
                     tf.cast(self.optimizer.iterations, tf.int64)])

  def adversarial_batch(self, x, y):
    """The crafted images for (x, y): the model in inference mode.

    No dropout, and BatchNormalization normalizes with its moving statistics
    and never updates them here (see the module docstring).
    """
    return at.craft(lambda xa: self._logits(xa, False), x, y, method=self._adversarial,
                    seed=self._seed_tensor(), **self._attack)

  def certified_step(self, x, y):
    """One certified-training step at the schedule's (ε, κ, β) for the current step."""
    epsilon, kappa, beta = self._schedule(self.optimizer.iterations)
    with tf.GradientTape() as tape:
      clean = self._logits(x, True)
      per_example, worst = cert_losses.certified_loss(
          self.classifier, x, y, epsilon, kappa, method=self._certified, beta=beta,
          clean_logits=clean)
      loss = tf.nn.compute_average_loss(per_example)
      if self.classifier.losses:
        loss += tf.nn.scale_regularization_loss(tf.add_n(self.classifier.losses))
    self.optimizer.minimize(loss, self.classifier.trainable_variables, tape=tape)
    self.loss_tracker.update_state(per_example)
    self.accuracy_tracker.update_state(y, clean)
    self.certified_tracker.update_state(y, worst)
    for tracker, value in zip(self.schedule_trackers, (epsilon, kappa)):
      tracker.update_state(value)
    return {m.name: m.result() for m in self.metrics if m is not self.robust_tracker}

  def train_step(self, data):
    x, y = data[0], tf.cast(data[1], tf.int64)
    if self._certified:
      return self.certified_step(x, y)
    x_adv = self.adversarial_batch(x, y) if self._adversarial else None
    with tf.GradientTape() as tape:
      if self._adversarial:
        per_example, scored = at.step_loss(lambda xa: self._logits(xa, True), x, x_adv, y,
                                           method=self._adversarial, trades_beta=self._beta)
      else:
        scored = self._logits(x, True)
        if self.teacher is not None:
          soft = tf.nn.softmax(tf.cast(self.teacher(x, training=False), tf.float32)
                               / self._temperature)
          per_example = tf.nn.softmax_cross_entropy_with_logits(
              labels=tf.stop_gradient(soft), logits=scored / self._temperature)
        else:
          per_example = at.cross_entropy(y, scored / self._temperature)
      # Mean over the global batch (divides by the replica count under a strategy).
      loss = tf.nn.compute_average_loss(per_example)
      if self.classifier.losses:
        loss += tf.nn.scale_regularization_loss(tf.add_n(self.classifier.losses))
    self.optimizer.minimize(loss, self.classifier.trainable_variables, tape=tape)
    self.loss_tracker.update_state(per_example)
    tracker = self.robust_tracker if self._adversarial else self.accuracy_tracker
    tracker.update_state(y, scored)
    return {"loss": self.loss_tracker.result(), tracker.name: tracker.result()}

  def test_step(self, data):
    x, y = data[0], tf.cast(data[1], tf.int64)
    logits = self._logits(x, False)
    self.loss_tracker.update_state(at.cross_entropy(y, logits))
    self.accuracy_tracker.update_state(y, logits)
    return {"loss": self.loss_tracker.result(), "accuracy": self.accuracy_tracker.result()}


class DefenseSetup:
  """A trained defense's training step for ``training.train`` (a ``training.Defense``).

  Loads the guard's held-out slice (the first ``adversarial.robust_val_size``
  or ``certified.val_size`` images of the validation split) when adversarial
  or certified training is on; ``wrap`` builds the ``DefenseTrainer``
  (loading the distillation teacher) and the guard.

  Args:
    run_dir: where the guard keeps its state.
    dataset: the dataset trained on (the guard's images).
    seed: the random starts' and the guard's seed.
    first_epoch: the epoch the run starts at (``training.resume_epoch``).
    chief: False on non-chief workers (the guard writes nothing).
    adversarial: adversarial training's attack, or None.
    temperature: the softmax temperature of the training loss (distillation).
    teacher_model_path: distillation's teacher SavedModel, or None.
    certified: certified training's spec, or None.
    batch_size, train_limit: the training batches (certified training turns
      its ramps' epochs into optimizer steps with them).
    data_dir, manual_dir, validation_size: as in ``data.info``.

  Raises:
    ConfigError: the guard needs a validation split and there is none.
  """

  def __init__(self, run_dir: str | os.PathLike, *, dataset: str, seed: int,
               first_epoch: int, chief: bool,
               adversarial: training.AdversarialSpec | None = None,
               temperature: float = 1.0, teacher_model_path: str | None = None,
               certified: training.CertifiedSpec | None = None, batch_size: int = 128,
               train_limit: int | None = None,
               data_dir: str | None = None, manual_dir: str | None = None,
               validation_size: int | None = None):
    self.adversarial = adversarial
    self.certified = certified
    self.temperature = float(temperature)
    self.teacher_model_path = teacher_model_path
    self.seed = int(seed)
    self.run_dir = pathlib.Path(run_dir)
    self.first_epoch = int(first_epoch)
    self.chief = chief
    self.guard: RobustAccuracyGuard | None = None
    self._slice = None
    self._schedule = None
    guard = None  # (flag, held-out images)
    if adversarial is not None:
      guard = ("robust_val_size", int(adversarial.robust_val_size))
    elif certified is not None:
      guard = ("cert_val_size", int(certified.val_size))
    info = None
    if certified is not None:
      info = data.info(dataset, data_dir=data_dir, manual_dir=manual_dir,
                       validation_size=validation_size)
      n_train = min(info.num_train, int(train_limit or info.num_train))
      warmup, ramp = certified.ramp_steps(-(-n_train // int(batch_size)))
      self._schedule = cert_losses.CertifiedSchedule(certified.epsilon, warmup, ramp,
                                                     certified.kappa_final)
    if guard is not None and guard[1] > 0:
      info = info or data.info(dataset, data_dir=data_dir, manual_dir=manual_dir,
                               validation_size=validation_size)
      if info.num_validation == 0:
        raise ConfigError(
            f"`{guard[0]}` ({guard[1]}) needs held-out validation images for the per-epoch "
            f"{'robust' if adversarial else 'certified'}-accuracy check, but "
            f"`validation_size` is 0; set `validation_size` > 0 or `{guard[0]}` = 0 "
            f"(no check).")
      self._slice = data.load_arrays(dataset, "validation", limit=guard[1],
                                     data_dir=data_dir, manual_dir=manual_dir,
                                     validation_size=validation_size)

  def identity(self) -> dict:
    """The defense's settings (run-dir identity and SavedModel provenance)."""
    if self.adversarial is not None:
      return self.adversarial.identity()
    if self.certified is not None:
      return self.certified.identity()
    return {"temperature": self.temperature, "teacher_model_path": self.teacher_model_path}

  def wrap(self, model: keras.Model, optimizer, *,
           first_eligible_epoch: int = 0) -> DefenseTrainer:
    """The compiled training wrapper around ``model`` (and the guard, if any).

    ``first_eligible_epoch``: the guard's (``RobustAccuracyGuard``).
    """
    spec = self.adversarial
    teacher = export.load_model(self.teacher_model_path) if self.teacher_model_path else None
    attack = {}
    if spec is not None:
      steps, step_size = spec.attack_steps()
      attack = dict(adversarial=spec.method, epsilon=spec.epsilon, step_size=step_size,
                    steps=steps, trades_beta=spec.trades_beta)
    if self.certified is not None:
      attack = dict(certified=self.certified.method, schedule=self._schedule)
    trainer = DefenseTrainer(model, **attack, temperature=self.temperature, teacher=teacher,
                             seed=self.seed)
    trainer.compile(optimizer=optimizer)
    # Built before fit, so BackupAndRestore builds the optimizer and restores it.
    trainer(tf.zeros([1, *model.input_shape[1:]]), training=False)
    if self._slice is not None:
      guard, epsilon = RobustAccuracyGuard, spec and spec.epsilon
      if self.certified is not None:
        guard, epsilon = CertifiedAccuracyGuard, self.certified.guard_epsilon()
      self.guard = guard(model, *self._slice, epsilon=epsilon,
                                       state_dir=self.run_dir, first_epoch=self.first_epoch,
                                       seed=self.seed, write=self.chief,
                                       first_eligible_epoch=first_eligible_epoch)
    return trainer

  def callbacks(self) -> list:
    return [] if self.guard is None else [self.guard]

  def restore_best(self) -> None:
    if self.guard is not None:
      self.guard.restore_best()

  def summary(self) -> dict:
    out = self.identity()
    if self.guard is not None:
      out[f"{self.guard.FILE_PREFIX}_guard"] = self.guard.state()
    return out


def defense_factory(config: training.TrainConfig) -> training.DefenseFactory:
  """The ``defense_factory`` ``training.train`` takes for ``config``'s trained defense.

  Args:
    config: a ``TrainConfig`` (its ``adversarial``, ``certified``,
      ``temperature``, ``teacher_model_path``, ``dataset``, ``seed``,
      ``batch_size`` and ``train_limit`` are read).

  Returns:
    A callable ``(run_dir, *, first_epoch, chief, data_dir, manual_dir,
    validation_size) -> DefenseSetup``.
  """
  return functools.partial(DefenseSetup, dataset=config.dataset, seed=config.seed,
                           adversarial=config.adversarial, temperature=config.temperature,
                           teacher_model_path=config.teacher_model_path,
                           certified=config.certified, batch_size=config.batch_size,
                           train_limit=config.train_limit)


def train(config: training.TrainConfig) -> training.TrainResult:
  """``training.train`` with ``config``'s trained defense, if any, as its training step.

  What ``kd-train``, ``kd.train`` and the pipelines call: standard training,
  adversarial training (``config.adversarial``), certified training
  (``config.certified``) and defensive distillation (``temperature``,
  ``teacher_model_path``) alike.

  Raises:
    ConfigError: a bad config field.
    DataError: the data cannot be found or built.
  """
  return training.train(config, defense_factory=defense_factory(config))
