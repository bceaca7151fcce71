r"""Evaluation presets for a pretrained BYOL encoder: `--config=configs/linear_eval.py:PRESET`.

One config serves both evaluation workers; `--workdir` is the PRETRAINING workdir, whose
checkpoint and saved config are read, and results are appended to
`<workdir>/metrics/linear_eval.jsonl` or `<workdir>/metrics/finetune.jsonl`:

  python -m byol_jax.main --worker_mode=linear_eval \
      --config=configs/linear_eval.py:demo --workdir=runs/demo
  python -m byol_jax.main --worker_mode=finetune \
      --config=configs/linear_eval.py:demo --config.subset_fraction=0.1 --workdir=runs/demo
  python -m byol_jax.main --worker_mode=linear_eval \
      --config=configs/linear_eval.py:imagenet --workdir=runs/r50 --config.network=target

Presets:
  demo      the built-in shapes data at the pretraining resolution; cached features, 30
            epochs: 9 s for linear_eval and 71 s for finetune on 2 CPU cores (2026-11-29,
            after the demo pretraining preset, commit 2409525). Finetune's refit, added
            since, is a third run after the two of its LR grid, as long as each: 408 s in
            all on 2 cores shared with the slow tests (2026-11-29, commit b366970).
  cifar10   CIFAR-10 at the pretraining resolution (32 px for the cifar10 pretraining preset).
  imagenet  the paper's linear protocol: 80 epochs, SGD with Nesterov momentum 0.9, no weight
            decay, cosine decay, batch 1024, LR chosen on the 10,009 held-out train images
            (datasets.IMAGENET_VALID_EXAMPLES), then retrained at that LR on all training
            images (refit) and reported on the official validation set. Heads train on
            random crops + flips (mode='augmented', the paper's and the release's): the
            train split streams through tf.data (host crop, device flip and frozen encoder,
            every step), so each of the 80 epochs (and the refit's 80) is a forward pass
            over 1.27M images; the heads are kept after every epoch (<workdir>/
            linear_eval_progress/), so rerunning the command resumes an interrupted
            evaluation. --config.mode=cached trains on centre-crop features computed
            once instead (minutes, not hours; not the paper's protocol). Finetune uses the TFDS
            `imagenet2012_subset` 1pct / 10pct lists for subset_fraction 0.01 / 0.1.
  Transfer (the paper's list, where TFDS has the dataset): food101, cifar100, sun397,
            cars196 (Stanford Cars), dtd, oxford_iiit_pet, caltech101, oxford_flowers102,
            voc2007 (cifar10 above serves transfer too). Each reads a TFDS dataset prepared
            under --config.data_dir (nothing is downloaded) and follows the split table of
            byol_jax/datasets.py. The paper (after SimCLR) fits an L2-regularised logistic
            regression on centre-crop features; these presets use the same features
            (mode='cached') with the SGD LR sweep. voc2007 (TFDS 'voc/2007') is multi-label:
            one sigmoid per class, a class seen only in objects marked difficult ignored,
            the LR picked on 'validation' by 11-point mAP (VOC2007's metric, which SimCLR
            and BYOL report) and test mAP reported; linear_eval only (finetune trains a
            softmax). Not supported: Birdsnap and
            FGVC-Aircraft are not in the TFDS catalogue: arrange them as an image folder
            (root/train/<class>/*.jpg, root/test/<class>/*.jpg) and pass
            --config.dataset=folder:/path/to/root.

Fields:
  dataset, data_dir  '' = the pretraining run's (from its saved config). Any TFDS name,
                     'folder:/path' or 'demo' (see byol_jax/datasets.py).
  image_size         network input size; 0 = the pretraining image size.
  crop_fraction      centre-crop side / shorter side for evaluation views; 0 = pretraining's
                     eval_crop_fraction. Images are decoded at image_size / crop_fraction.
  train_split, val_split, test_split
                     logical splits. val_split='' holds val_size (a fraction in (0, 1) or a
                     count) of train_split out instead, chosen by `seed`.
  epochs, batch_size, learning_rates
                     the linear head's SGD: all LRs are trained at once (vmapped heads) and the
                     one with the best validation top-1 (mAP: voc2007) is chosen.
  refit              True (the protocol): one head is then retrained at the chosen LR on train
                     + validation and reported on test, as SimCLR's transfer evaluation and the
                     release's ImageNet head (TRAIN_AND_VALID) do; False reports the sweep's
                     head, trained without the validation images. Records carry `refit`, and
                     `per_lr` keeps the sweep's test columns either way; with refit,
                     `splits.train` and `batch_size` are the refit's and `sweep` the sweep's.
                     Finetune refits likewise with all labels; a label subset
                     (subset_fraction > 0) is never refit, as validation images would add
                     labels to it.
  mode               'cached': heads train on the frozen encoder's centre-crop features,
                     computed once (fast). 'augmented': the paper's protocol, every step takes
                     a random resized crop + flip and runs the frozen encoder (inference mode).
                     A train split too large for memory streams (tf.data crops); it then needs
                     a val_split, and refit needs train_split='train', val_split='valid'.
  normalize_features mode='cached' only: standardise features with training-split statistics
                     (the paper uses raw features; this makes one LR grid fit any scale).
  network            'online' (default) or 'target' encoder of the checkpoint.
  step               checkpoint step to evaluate; 0 = the latest finalised checkpoint.
  random_init        evaluate a freshly initialised encoder (the pretraining config's seed)
                     instead of a checkpoint: the baseline any pretraining must beat. Its BN
                     moving averages were never updated (mean 0, variance 0: inference-mode BN
                     would scale by 1/sqrt(eps) per layer), so they are first re-estimated
                     from training images of train_split (evaluators.common.
                     recalibrate_batch_norm); records say so in bn_statistics. Its features
                     are then on the scale of a trained encoder's and the same protocol
                     (raw features) compares the two.
  bn_calibration_examples
                     random_init only: at most this many training images (a seeded sample)
                     for that re-estimate.
  seed               head initialisation is zero; the seed drives shuffling, crops and the
                     validation hold-out.
  subset_fraction    finetune only: 0 = all labels, else a class-balanced fraction (0.01, 0.1)
                     drawn with `seed` outside the validation hold-out and saved under
                     <workdir>/subsets/.
  subset_source      'balanced' (subsets.balanced_subset) or 'tfds' (imagenet2012_subset).
  finetune.*         epochs, batch_size, learning_rates and weight_decay of fine-tuning (SGD,
                     Nesterov momentum 0.9, cosine decay, BN in training mode). The paper
                     sweeps LR and weight decay on the hold-out; the defaults are a small LR
                     grid without weight decay.
  max_examples       debugging only: keep the first N examples of every split (0 = all).
                     Refused where mode='augmented' streams its train split (the imagenet
                     preset): a stream's epochs cannot be shortened; use mode='cached'.
"""

from __future__ import annotations

import ml_collections

from byol_jax.evaluators.common import BN_CALIBRATION_EXAMPLES

# The linear head's LR grid (features are used raw, as in the paper).
LINEAR_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
FINETUNE_LRS = (0.01, 0.03, 0.1)

# name -> (TFDS dataset, linear epochs, linear batch, finetune epochs, finetune batch)
TRANSFER_PRESETS = {
  'cifar10': ('cifar10', 100, 512, 30, 256),
  'cifar100': ('cifar100', 100, 512, 30, 256),
  'food101': ('food101', 100, 512, 30, 256),
  'sun397': ('sun397', 100, 512, 30, 256),
  'cars196': ('cars196', 100, 256, 50, 64),
  'dtd': ('dtd', 100, 256, 50, 64),
  'oxford_iiit_pet': ('oxford_iiit_pet', 100, 256, 50, 64),
  'caltech101': ('caltech101', 100, 256, 50, 64),
  'oxford_flowers102': ('oxford_flowers102', 100, 256, 50, 64),
  'voc2007': ('voc/2007', 100, 256, 50, 64),
}
UNSUPPORTED = {
  'birdsnap': 'Birdsnap is not in TFDS; pass --config.dataset=folder:/path/to/birdsnap',
  'aircraft': 'FGVC-Aircraft is not in TFDS; pass --config.dataset=folder:/path/to/aircraft',
}
PRESETS = ('demo', 'imagenet', *TRANSFER_PRESETS)


def _base() -> ml_collections.ConfigDict:
  """Fields shared by every preset; '' / 0 mean 'take it from the pretraining config'."""
  return ml_collections.ConfigDict(dict(
    preset='',
    dataset='', data_dir='', image_size=0, crop_fraction=0.0, strict_data=False,
    input_mode='auto',
    train_split='train', val_split='valid', val_size=0.1, test_split='test',
    epochs=80, batch_size=1024, learning_rates=LINEAR_LRS,
    mode='cached', normalize_features=False, refit=True, network='online', step=0,
    random_init=False,
    bn_calibration_examples=BN_CALIBRATION_EXAMPLES, seed=0,
    embed_batch_size=256, max_examples=0,
    subset_fraction=0.0, subset_source='balanced',
    finetune=dict(epochs=30, batch_size=256, learning_rates=FINETUNE_LRS, weight_decay=0.0,
                  momentum=0.9, log_every_epochs=1),
  ))


def _demo() -> ml_collections.ConfigDict:
  """CPU-sized: the demo data's train/valid/test splits, cached features."""
  cfg = _base()
  cfg.dataset = 'demo'
  cfg.epochs = 30
  cfg.batch_size = 256
  cfg.embed_batch_size = 500
  cfg.finetune.update(epochs=8, batch_size=64, learning_rates=(0.01, 0.05))
  return cfg


def _imagenet() -> ml_collections.ConfigDict:
  """The paper's ImageNet protocol (see the module docstring for the mode)."""
  cfg = _base()
  cfg.dataset = 'imagenet2012'
  cfg.image_size = 224
  cfg.crop_fraction = 0.875
  cfg.subset_source = 'tfds'
  cfg.mode = 'augmented'
  cfg.finetune.update(epochs=30, batch_size=1024, learning_rates=(0.01, 0.02, 0.05, 0.1))
  return cfg


def _transfer(name: str) -> ml_collections.ConfigDict:
  """A TFDS classification dataset at the pretraining resolution."""
  dataset, epochs, batch, ft_epochs, ft_batch = TRANSFER_PRESETS[name]
  cfg = _base()
  cfg.dataset = dataset
  cfg.epochs, cfg.batch_size = epochs, batch
  cfg.finetune.update(epochs=ft_epochs, batch_size=ft_batch)
  return cfg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the preset named by `arg` ('demo', 'imagenet', 'cifar10', 'dtd', ...)."""
  name = (arg or 'demo').strip()
  if name in UNSUPPORTED:
    raise ValueError(f'preset {name!r} is not supported: {UNSUPPORTED[name]}')
  if name not in PRESETS:
    raise ValueError(f'unknown preset {name!r}; valid: {", ".join(PRESETS)}')
  if name == 'demo':
    cfg = _demo()
  elif name == 'imagenet':
    cfg = _imagenet()
  else:
    cfg = _transfer(name)
  cfg.preset = name
  return cfg
