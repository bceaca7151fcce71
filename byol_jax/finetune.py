"""`--worker_mode=finetune`: the whole pretrained encoder and a new linear head, on labels.

All labels, or a 1% / 10% class-balanced subset (the paper's semi-supervised protocol); the
result is appended to `<workdir>/metrics/finetune.jsonl`.

Why these choices:
- Initialisation: encoder params and BN statistics from the checkpoint (online by default),
  a zero-initialised head (so the first steps train the head before the encoder moves).
- Optimiser: SGD with Nesterov momentum 0.9 and cosine decay to zero, as the paper's
  fine-tuning; weight decay (default 0) skips biases and norm parameters (`optim.lars_mask`).
  Each LR of `finetune.learning_rates` is a separate run from the same initialisation and
  the same minibatch order; the LR with the best validation top-1 is chosen (the per-LR test
  numbers are kept for inspection only).
- Refit (`refit`, as linear_eval's): with all labels, one more run at the chosen LR trains
  on train + validation and is reported on test, as SimCLR's transfer fine-tuning, which
  BYOL follows, retrains on train + validation once validation has chosen. A label subset
  (1% / 10%) reports the sweep's run instead: the subset is the semi-supervised protocol's
  labelled set, and the validation images would add labels to it (ImageNet's 10,009 held-out
  images to 1%'s 12,811).
- BN runs in training mode with statistics of the whole (global) minibatch: the step is
  jitted over a data-sharded batch, so the batch mean spans every device.
- Views: random resized crop + flip (`linear_eval.random_crop_flip`, crop range and
  normalisation from the pretraining config); validation and test use centre crops.
- Subsets: `subsets.balanced_subset` of train_split, seeded, drawn outside the validation
  hold-out (when validation is held out of train_split; a separate validation split is
  disjoint by construction), and saved to `<workdir>/subsets/` so the exact labelled set is
  on record. For ImageNet, subset_source='tfds' uses TFDS `imagenet2012_subset` (1pct /
  10pct, the lists of SimCLR that published numbers use) instead. Those lists were drawn
  from all of ImageNet train, so about 1% / 10% of the 10,009 held-out validation images
  may also be labelled training images: the LR choice is slightly optimistic, the test
  number (official validation set) is not affected.
- All splits are decoded into host memory and the (subset) training images are kept on the
  accelerator; a split that does not fit (see datasets.choose_input_mode) is an error, which
  --config.input_mode=device overrides where memory allows (ImageNet 10% needs ~25 GB).
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from byol_jax import augment, linear_eval, networks, optim, subsets, train_step
from byol_jax import data as data_lib
from byol_jax.evaluators import common, knn
from byol_jax.evaluators import linear as linear_lib
from byol_jax.train import ConfigError

TFDS_SUBSETS = {0.01: 'imagenet2012_subset/1pct', 0.1: 'imagenet2012_subset/10pct'}
# Raw TFDS expression for a whole split: the logical name 'train' would hold out 10% of it.
WHOLE_TRAIN = 'train[:100%]'


def build_classifier(model_cfg: Any, num_classes: int) -> hk.TransformedWithState:
  """The pretraining encoder (same module names, so its params load) + a zero linear head.

  apply(params, state, rng, images, is_training) -> logits [B, num_classes].
  """

  def forward(images: jax.Array, is_training: bool) -> jax.Array:
    feats = networks.encoder_from_config(model_cfg)(images, is_training)
    return hk.Linear(num_classes, w_init=jnp.zeros, name='head')(feats)

  return hk.transform_with_state(forward)


def init_from_pretrained(net: hk.TransformedWithState, encoder: tuple[hk.Params, hk.State],
                         image_size: int, seed: int) -> tuple[hk.Params, hk.State]:
  """A fresh head, and the encoder's params and BN statistics from the checkpoint."""
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  params, state = net.init(jax.random.PRNGKey(seed), dummy, is_training=True)
  enc_params, enc_state = encoder
  if set(networks.encoder_subtree(params)) != set(enc_params):
    raise ConfigError('the checkpoint\'s encoder modules do not match the model config')
  return {**params, **enc_params}, {**state, **enc_state}


def make_optimizer(weight_decay: float, momentum: float) -> optax.GradientTransformation:
  """Decoupled-from-LR SGD direction: (g + wd * w on weights only), Nesterov momentum.

  The LR x cosine factor is applied in the step, so one compiled step serves every LR.
  """
  return optax.chain(optax.add_decayed_weights(weight_decay, mask=optim.lars_mask),
                     optax.trace(decay=momentum, nesterov=True))


def make_train_step(net: hk.TransformedWithState, tx: optax.GradientTransformation,
                    aug_cfg: Any, image_size: int, total_steps: int,
                    batch_sharding: NamedSharding) -> Callable:
  """step(params, state, opt_state, t, lr, images, labels, idx, key) -> (..., metrics)."""

  def loss_fn(params, state, views, labels):
    logits, state = net.apply(params, state, None, views, is_training=True)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    return loss, (state, jnp.mean(jnp.argmax(logits, -1) == labels))

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, state, opt_state, t, lr, images, labels, idx, key):
    batch = jax.lax.with_sharding_constraint(images[idx], batch_sharding)
    views = linear_eval.random_crop_flip(key, batch, image_size, aug_cfg)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (state, top1)), grads = grad_fn(params, state, views, labels[idx])
    updates, opt_state = tx.update(grads, opt_state, params)
    scale = -lr * 0.5 * (1.0 + jnp.cos(jnp.pi * t / total_steps))
    params = jax.tree.map(lambda p, u: p + scale * u, params, updates)
    return params, state, opt_state, dict(loss=loss, top1=top1)

  return step


def make_logits_fn(net: hk.TransformedWithState, image_size: int, crop_fraction: float,
                   aug_cfg: Any, mesh: jax.sharding.Mesh) -> Callable:
  """logits(params, state, uint8 images) with eval preprocessing, BN in inference mode."""

  @jax.jit
  def logits(params, state, images):
    views = augment.eval_view(images, image_size, crop_fraction, aug_cfg)
    return net.apply(params, state, None, views, is_training=False)[0]

  sharding = NamedSharding(mesh, P(train_step.AXIS))
  return lambda params, state, images: logits(params, state, jax.device_put(images, sharding))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Top-1 and top-5 (ties to the lower class, as every evaluator here)."""
  return {'top1': knn.topk_accuracy(logits, labels, 1),
          'top5': knn.topk_accuracy(logits, labels, 5)}


# ------------------------------------------------------------------------------------------
# Data and subsets.
# ------------------------------------------------------------------------------------------


def _require_resident(cfg: Any, split: str) -> None:
  if linear_eval.input_mode(cfg, split) == 'stream':
    raise ConfigError(f'finetune decodes {cfg.dataset}/{split} into memory and it does not '
                      'fit; pass --config.input_mode=device if host and accelerator memory '
                      'allow')


def _tfds_subset_config(cfg: Any) -> Any:
  """The config that reads ImageNet's TFDS subset as the training split."""
  base = data_lib.datasets.tfds_base_name(cfg.dataset)
  name = TFDS_SUBSETS.get(round(cfg.subset_fraction, 4))
  if base != 'imagenet2012' or name is None:
    raise ConfigError(f"subset_source='tfds' needs dataset imagenet2012 and subset_fraction "
                      f"0.01 or 0.1 (got {cfg.dataset}, {cfg.subset_fraction}); use "
                      "subset_source='balanced'")
  out = cfg.copy_and_resolve_references()
  out.dataset, out.train_split = name, WHOLE_TRAIN
  return out


def subset_path(workdir: str, cfg: Any) -> str:
  """<workdir>/subsets/<dataset>_<split>_<fraction>_seed<seed>[_holdout<v>].json"""
  slug = re.sub(r'[^A-Za-z0-9.-]+', '_', f'{cfg.dataset}_{cfg.train_split}').strip('_')
  name = f'{slug}_{cfg.subset_fraction:g}_seed{cfg.seed}'
  if not cfg.val_split:
    name += f'_holdout{cfg.val_size:g}'
  return os.path.join(workdir, 'subsets', name + '.json')


def choose_rows(cfg: Any, labels: np.ndarray, held_out: np.ndarray, seed: int,
                workdir: str) -> tuple[np.ndarray, dict[str, Any]]:
  """Rows of train_split to train on and a description; balanced subsets are saved."""
  if not cfg.subset_fraction:
    rows = np.setdiff1d(np.arange(len(labels)), held_out)
    return rows, dict(fraction=0.0, source='all', size=len(rows))
  rows = subsets.balanced_subset(labels, cfg.subset_fraction, cfg.seed,
                                 exclude=held_out if len(held_out) else None)
  counts = np.bincount(labels[rows])
  path = subset_path(workdir, cfg)
  meta = dict(seed=cfg.seed, fraction=cfg.subset_fraction, dataset=cfg.dataset,
              split=cfg.train_split,
              definition=linear_eval.split_definition(cfg, cfg.train_split, seed),
              split_size=len(labels), validation=cfg.val_split or 'held out of split',
              held_out_indices=[int(i) for i in held_out],
              per_class_min=int(counts.min()), per_class_max=int(counts.max()))
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    subsets.save_subset(path, rows, meta)
  logging.info('subset: %d of %d examples (%d-%d per class) -> %s', len(rows), len(labels),
               counts.min(), counts.max(), path)
  return rows, dict(fraction=cfg.subset_fraction, source='balanced', size=len(rows), file=path,
                    per_class_min=int(counts.min()), per_class_max=int(counts.max()))


def load_data(cfg: Any, seed: int, workdir: str) -> dict[str, Any]:
  """Training rows, validation and test arrays, and their provenance."""
  train_cfg = _tfds_subset_config(cfg) if (cfg.subset_fraction
                                           and cfg.subset_source == 'tfds') else cfg
  for c, split in ((train_cfg, train_cfg.train_split), (cfg, cfg.val_split),
                   (cfg, cfg.test_split)):
    if split:
      _require_resident(c, split)
  pool = linear_eval.load_split(train_cfg, train_cfg.train_split, seed, random_crops=True)
  train_rows, held_out = linear_eval.hold_out(cfg, len(pool.labels))
  val = (linear_eval.load_split(cfg, cfg.val_split, seed) if cfg.val_split
         else data_lib.Split(pool.images[held_out], pool.labels[held_out]))
  test = linear_eval.load_split(cfg, cfg.test_split, seed)
  if train_cfg is cfg:
    rows, subset = choose_rows(cfg, pool.labels, held_out, seed, workdir)
  else:
    rows, subset = train_rows, dict(fraction=cfg.subset_fraction, source='tfds',
                                    dataset=train_cfg.dataset, size=len(train_rows))
  splits = linear_eval.split_record(cfg, seed, dict(train=len(rows), val=len(val.labels),
                                                    test=len(test.labels)))
  if train_cfg is not cfg:
    splits['train'].update(split=WHOLE_TRAIN, definition=linear_eval.split_definition(
      train_cfg, WHOLE_TRAIN, seed))
  train = data_lib.Split(pool.images[rows], pool.labels[rows])
  classes = linear_eval.num_classes(cfg, pool.labels, val.labels, test.labels)
  return dict(train=train, val=val, test=test, splits=splits, subset=subset,
              num_classes=classes)


# ------------------------------------------------------------------------------------------
# Training and evaluation.
# ------------------------------------------------------------------------------------------


class Finetuner:
  """Everything compiled once and shared by the runs of the LR grid."""

  def __init__(self, cfg: Any, pre: linear_eval.Pretrained, train: data_lib.Split,
               num_classes: int):
    self.cfg, self.pre = cfg, pre
    self.mesh = train_step.make_mesh()
    ft = cfg.finetune
    self.batch = min(ft.batch_size, len(train.labels))
    self.batch = max(self.mesh.size, self.batch - self.batch % self.mesh.size)
    if self.batch != ft.batch_size:  # the record holds the batch used; say why it differs
      logging.info('finetune: batch %d (finetune.batch_size=%d, at most the %d training '
                   'images, a multiple of the %d devices)', self.batch, ft.batch_size,
                   len(train.labels), self.mesh.size)
    self.steps_per_epoch = max(1, len(train.labels) // self.batch)
    self.net = build_classifier(pre.config.model, num_classes)
    self.tx = make_optimizer(ft.weight_decay, ft.momentum)
    self.step = make_train_step(self.net, self.tx, pre.config.augment, cfg.image_size,
                                ft.epochs * self.steps_per_epoch,
                                NamedSharding(self.mesh, P(train_step.AXIS)))
    self.logits = make_logits_fn(self.net, cfg.image_size, cfg.crop_fraction,
                                 pre.config.augment, self.mesh)
    self.images, self.labels = train_step.replicate((train.images, train.labels), self.mesh)
    # Host copies: every run gets fresh device buffers, which the step may donate.
    self.encoder = jax.device_get(linear_eval.encoder_weights(pre.state, cfg.network))

  def train(self, lr: float) -> tuple[hk.Params, hk.State, dict[str, float]]:
    """One fine-tuning run at one LR; the minibatch order depends on the seed only."""
    cfg, ft = self.cfg, self.cfg.finetune
    params, state = init_from_pretrained(self.net, self.encoder, cfg.image_size, cfg.seed)
    params, state = train_step.replicate((params, state), self.mesh)
    opt_state = self.tx.init(params)
    order, key = np.random.default_rng(cfg.seed), jax.random.PRNGKey(cfg.seed)
    n, t, metrics = len(self.labels), 0, {}
    for epoch in range(ft.epochs):
      start, perm = time.time(), order.permutation(n)
      for s in range(self.steps_per_epoch):
        idx = perm[s * self.batch:(s + 1) * self.batch]
        params, state, opt_state, metrics = self.step(
          params, state, opt_state, jnp.int32(t), jnp.float32(lr), self.images, self.labels,
          idx, jax.random.fold_in(key, t))
        t += 1
      if (epoch + 1) % ft.log_every_epochs == 0 or epoch + 1 == ft.epochs:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        logging.info('finetune lr %g epoch %d/%d: loss %.4f  train top-1 %.3f  (%.1f s)', lr,
                     epoch + 1, ft.epochs, metrics['loss'], metrics['top1'],
                     time.time() - start)
    return params, state, {f'train_{k}': float(v) for k, v in jax.device_get(metrics).items()}

  def evaluate(self, params: hk.Params, state: hk.State,
               split: data_lib.Split) -> dict[str, float]:
    logits = common.embed_arrays(self.logits, params, state, split.images,
                                 self.cfg.embed_batch_size, self.mesh.size)
    return accuracy(logits, split.labels)


def sweep(cfg: Any, tuner: Finetuner, val: data_lib.Split,
          test: data_lib.Split) -> dict[str, Any]:
  """Fine-tunes at every LR; validation picks, test reports (same fields as linear)."""
  per_lr = []
  for lr in cfg.finetune.learning_rates:
    params, state, last = tuner.train(float(lr))
    v, te = tuner.evaluate(params, state, val), tuner.evaluate(params, state, test)
    per_lr.append(dict(lr=float(lr), val_top1=v['top1'], val_top5=v['top5'],
                       test_top1=te['top1'], test_top5=te['top5'], **last))
    logging.info('finetune lr %g: val top-1 %.4f', lr, v['top1'])
  return linear_lib.summarize_sweep(per_lr)


def no_refit_reason(cfg: Any) -> str:
  """Why the sweep's run is reported rather than one refit on train + validation ('' when
  it is refit)."""
  if not cfg.refit:
    return 'refit=False'
  if cfg.subset_fraction:
    return (f'the {cfg.subset_fraction:g} subset is the labelled set; validation images would '
            'add labels to it')
  return ''


def refit(cfg: Any, pre: linear_eval.Pretrained, data: dict[str, Any],
          result: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
  """The sweep's result, its test scores those of one run at the chosen LR on train +
  validation (`linear.with_refit`), or as they are where `no_refit_reason` says why; and
  the refit's batch (None without a refit), which the record reports."""
  reason = no_refit_reason(cfg)
  if reason:
    logging.info("finetune: reporting the sweep's run at lr %g (no refit: %s)",
                 result['best_lr'], reason)
    return dict(result, refit=False), None
  train, val = data['train'], data['val']
  both = data_lib.Split(np.concatenate([train.images, val.images]),
                        np.concatenate([train.labels, val.labels]))
  logging.info('finetune: refitting at lr %g on %d train + validation images',
               result['best_lr'], len(both.labels))
  tuner = Finetuner(cfg, pre, both, data['num_classes'])
  params, state, _ = tuner.train(result['best_lr'])
  test = tuner.evaluate(params, state, data['test'])
  refit_test = {k: np.asarray([v]) for k, v in test.items()}
  return linear_lib.with_refit(result, refit_test), tuner.batch


def _validate(cfg: Any) -> None:
  ft = cfg.finetune
  if ft.epochs < 1 or ft.batch_size < 1 or not ft.learning_rates:
    raise ConfigError('finetune needs epochs >= 1, batch_size >= 1 and at least one LR')
  # Each of these failed late or not at all: 0 ended the first epoch in ZeroDivisionError's
  # traceback; a negative decay or a momentum of 1 or more trained without a word.
  if ft.log_every_epochs < 1:
    raise ConfigError(f'finetune.log_every_epochs={ft.log_every_epochs} must be >= 1')
  if ft.weight_decay < 0:
    raise ConfigError(f'finetune.weight_decay={ft.weight_decay} must be >= 0')
  if not 0 <= ft.momentum < 1:
    raise ConfigError(f'finetune.momentum={ft.momentum} must be in [0, 1)')
  if cfg.subset_source not in ('balanced', 'tfds'):
    raise ConfigError(f"subset_source={cfg.subset_source!r}; valid: 'balanced', 'tfds'")


def evaluate(cfg: Any, pre: linear_eval.Pretrained, workdir: str) -> dict[str, Any]:
  """Fine-tunes `pre` as configured; appends and returns the record."""
  cfg = linear_eval.resolve_config(cfg, pre.config)
  _validate(cfg)
  if linear_eval.multilabel(cfg):
    raise ConfigError(f'finetune trains a softmax classifier and {cfg.dataset} is multi-label; '
                      'evaluate it with --worker_mode=linear_eval (mAP)')
  start, seed = time.time(), pre.config.seed
  labels = (f'{cfg.subset_fraction:g} of the labels' if 0 < cfg.subset_fraction < 1
            else 'all labels')
  logging.info('finetune of the %s encoder at step %d (%s) on %s, %s', cfg.network,
               pre.step, pre.weights, cfg.dataset, labels)
  data = load_data(cfg, seed, workdir)
  tuner = Finetuner(cfg, pre, data['train'], data['num_classes'])
  result = sweep(cfg, tuner, data['val'], data['test'])
  batch = tuner.batch
  del tuner  # its device copy of the training images, before the refit's
  result, refit_batch = refit(cfg, pre, data, result)
  splits, swept = data['splits'], {}
  if refit_batch is not None:  # the record describes the run whose test figure it reports
    refit_size = data['splits']['train']['size'] + data['splits']['val']['size']
    splits, swept = linear_eval.refit_splits(cfg, seed, splits, refit_size)
    swept, batch = dict(sweep=dict(swept, batch_size=batch)), refit_batch
  ft = cfg.finetune
  record = dict(linear_eval.provenance(cfg, pre, 'finetune'), splits=splits, **swept,
                subset=data['subset'], subset_fraction=cfg.subset_fraction,
                num_classes=data['num_classes'], epochs=ft.epochs, batch_size=batch,
                learning_rates=list(ft.learning_rates), weight_decay=ft.weight_decay,
                momentum=ft.momentum, **result, elapsed_sec=time.time() - start)
  record = linear_eval.write_record(workdir, 'finetune', pre.step, record)
  head = ('of the run refit on train + validation' if record['refit']
          else "of the sweep's run")
  logging.info('finetune: best lr %g, val top-1 %.4f, test top-1 %.4f, top-5 %.4f %s',
               record['best_lr'], record['val_top1'], record['test_top1'], record['test_top5'],
               head)
  return record


def run(cfg: Any, workdir: str) -> int:
  """The worker entry point: fine-tunes the checkpoint that cfg names in workdir."""
  evaluate(cfg, linear_eval.load_pretrained(cfg, workdir), workdir)
  return 0


if __name__ == '__main__':
  from byol_jax import cli
  cli.worker_module_main('byol_jax.finetune')  # not __spec__.name: None when run by path
