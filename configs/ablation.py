"""Normalisation ablation on CIFAR-10: `--config=configs/ablation.py:VARIANT`.

Each variant is the `cifar10` preset of configs/byol.py with one change to which of the
projector / predictor MLPs carries a norm layer, or the explicitly contrastive loss
(InfoNCE with in-batch negatives across all devices, no norm layers in the heads):

  bn_both       batch norm in projector and predictor (BYOL as published)
  bn_projector  batch norm in the projector only
  bn_predictor  batch norm in the predictor only
  ln_both       layer norm in both
  none          no norm layer in either
  contrastive   InfoNCE, no norm layers (temperature `infonce_temperature`)

The randomly initialised encoder is the run's `knn_top1_init` (set `eval_at_init`).
`experiments/ablation.sh` runs all of them with one budget and prints the kNN table.
"""

from __future__ import annotations

import ml_collections

from configs import byol

# variant -> (projector norm, predictor norm, loss)
VARIANTS = {
  'bn_both': ('batchnorm', 'batchnorm', 'byol'),
  'bn_projector': ('batchnorm', 'none', 'byol'),
  'bn_predictor': ('none', 'batchnorm', 'byol'),
  'ln_both': ('layernorm', 'layernorm', 'byol'),
  'none': ('none', 'none', 'byol'),
  'contrastive': ('none', 'none', 'infonce'),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The cifar10 preset with the variant's heads and loss; `VARIANT,epochs=N` also works."""
  variant, _, rest = (arg or 'bn_both').partition(',')
  if variant not in VARIANTS:
    raise ValueError(f'unknown ablation variant {variant!r}; valid: {", ".join(VARIANTS)}')
  cfg = byol.get_config('cifar10' + (',' + rest if rest else ''))
  cfg.model.projector_norm, cfg.model.predictor_norm, cfg.loss = VARIANTS[variant]
  cfg.preset = f'ablation:{variant}'
  cfg.eval_at_init = True
  return cfg
