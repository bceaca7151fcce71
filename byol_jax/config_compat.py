"""Configs saved by earlier versions: the fields added or removed since, with old values.

One table of the trajectory fields added since runs were first saved, with the value that
reproduces the code before each existed. Code that reads such a field calls `setting`, so
the old behaviour is written down once, here: the resume check
(`checkpointing.config_differences`) and the networks, optimiser and augmentations built
from an old run's saved config agree on it. A field missing from the table fails at once
(KeyError) instead of silently taking a second, different default.

A second table holds removed fields with the value under which today's code behaves as the
old did, and `LARS_ONLY_FIELDS` lists the fields an SGD run never reads: between two SGD
configs a difference in them is ignored by the resume check (`unread_fields`).
"""

from __future__ import annotations

from typing import Any

# Trajectory fields added after runs were first saved, with the value that reproduces how the
# code behaved before each existed: a run saved without the field resumes when the current
# config holds that value (and is refused, naming the field, when it holds another).
ADDED_FIELD_DEFAULTS = {
  'tau_schedule': 'cosine',  # 2026-11-27
  'augment.jitter_style': 'tf',  # 2026-11-27
  'model.weight_init': 'release',  # 2026-11-27
  'optimizer.decay_all_params': False,  # 2026-11-27
  'target_init': 'random',  # 2026-11-27
  'optimizer.trust_clip': False,  # 2026-11-26
  'model.stem_relu': True,  # 2026-11-27
  'model.head_output_bias': True,  # 2026-11-28
  'pretrain_split': 'trainval',  # 2026-11-28
  'optimizer.momentum_before_lr': False,  # 2026-11-29: optax.lars's order before
  'model.arch': 'resnet',  # 2026-11-29: networks.ENCODERS
}

# Trajectory fields that were removed, with the value under which the current code behaves
# as the old code did: a run saved with that value resumes, one saved with another is
# refused, naming the field.
REMOVED_FIELD_VALUES = {
  # 2026-11-26 to 11-27, replaced by augment.jitter_style; 'multiplicative' changed only the
  # brightness, which no jitter_style reproduces alone.
  'augment.brightness_mode': 'additive',
}

# Trajectory fields read only by LARS: SGD has no trust ratio, and its momentum always comes
# before the LR. Between two SGD configs a difference in one changes nothing, so an SGD run
# saved before one existed (momentum_before_lr: False) resumes under today's default.
LARS_ONLY_FIELDS = ('optimizer.trust_coefficient', 'optimizer.trust_clip',
                    'optimizer.momentum_before_lr')


def unread_fields(flat: dict[str, Any]) -> set[str]:
  """The trajectory fields that a flattened config ('optimizer.name': ...) never reads."""
  return set(LARS_ONLY_FIELDS) if flat.get('optimizer.name') == 'sgd' else set()


def setting(cfg: Any, field: str) -> Any:
  """`field`'s value in `cfg`, or its value from before it existed.

  `field` is the dotted name from the config's root ('model.stem_relu'); `cfg` is the
  (sub-)config that holds its last part (the model config for 'model.stem_relu'), so
  functions that take only their part of the config can use it.
  """
  default = ADDED_FIELD_DEFAULTS[field]
  return cfg.get(field.rsplit('.', 1)[-1], default)
