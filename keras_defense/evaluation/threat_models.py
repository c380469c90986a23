"""The three threat models of the reproduction, each a clear definition.

The seed paper's "grey-box" setting is undefined, so keras-defense states what
the attacker knows in each column of the report:

* ``grey_box`` -- the seed's setting: the attacker differentiates the deployed
  model (M1 or M2 as exported) with the standard softmax cross-entropy loss
  and does not know about the defense. Logits augmentation saturates the
  softmax here, so this column is the flattering one.
* ``transfer`` -- examples crafted on M0 (the original, unprotected model) with
  cross-entropy and applied to M1/M2: the attacker knows the model before
  compression and defense, not the deployed one.
* ``adaptive`` -- defense-aware white box: the attacker knows logits
  augmentation is a rescaling of the logits and uses the logit-margin loss
  (C&W's f6), which never passes through the softmax and so cannot be masked by
  its saturation (Athalye, Carlini & Wagner 2018, "Obfuscated gradients give a
  false sense of security", https://arxiv.org/abs/1802.00420). The honest
  column.

For the Carlini-Wagner attacks (whose loss is already the logit margin) only
``grey_box`` (crafted on the deployed model) and ``transfer`` apply.
"""

from __future__ import annotations

import dataclasses

GREY_BOX = "grey_box"
TRANSFER = "transfer"
ADAPTIVE = "adaptive"
THREAT_MODELS = (GREY_BOX, TRANSFER, ADAPTIVE)

CROSS_ENTROPY = "cross_entropy"
MARGIN = "margin"
CW_LOSS = "cw"


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one threat model attacks one target: which model to craft on, which loss."""
  threat_model: str
  target: str
  source: str
  loss: str


def plan(threat_model: str, target: str, *, source: str, attack: str) -> Plan | None:
  """Returns how ``threat_model`` attacks ``target``, or None where it does not apply.

  Args:
    threat_model: one of ``THREAT_MODELS``.
    target: the evaluated (deployed) model's name, e.g. "m2".
    source: the unprotected original model's name ("m0"), used by transfer.
    attack: attack name; names starting with "cw_" use the C&W loss.

  Raises:
    ValueError: unknown threat model.
  """
  is_cw = attack.startswith("cw_")
  if threat_model == GREY_BOX:
    return Plan(GREY_BOX, target, target, CW_LOSS if is_cw else CROSS_ENTROPY)
  if threat_model == TRANSFER:
    if target == source:
      return None  # identical to grey_box on the source model
    return Plan(TRANSFER, target, source, CW_LOSS if is_cw else CROSS_ENTROPY)
  if threat_model == ADAPTIVE:
    if is_cw:
      return None  # C&W's loss is already the margin: its grey_box row is adaptive
    return Plan(ADAPTIVE, target, target, MARGIN)
  raise ValueError(f"`threat_model` must be one of {', '.join(THREAT_MODELS)}; "
                   f"got {threat_model!r}.")


DESCRIPTIONS = {
    GREY_BOX: ("the attacker differentiates the deployed model with the standard "
               "cross-entropy loss and does not know about the defense (the seed "
               "paper's setting)."),
    TRANSFER: ("examples crafted on M0 with cross-entropy, applied to the compressed / "
               "defended model (the attacker knows the original model only)."),
    ADAPTIVE: ("defense-aware white box: the logit-margin loss (C&W f6) on the "
               "deployed model, which softmax saturation cannot mask "
               "(Athalye et al. 2018)."),
}
