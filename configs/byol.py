"""BYOL pretraining presets: `--config=configs/byol.py:PRESET[,epochs=N]`.

Presets:
  demo     ResNet-10 (width 1/2) on the built-in shapes data, 32 px, 300 steps, CPU-sized:
           `python -m byol_jax.main --config=configs/byol.py:demo --workdir=runs/demo`
           (about 2 minutes on 2 idle CPU cores, compilation and evaluation included;
           kNN top-1 rises from about 0.3 for the random encoder to about 0.6).
  cifar10  ResNet-18 with the CIFAR stem, 32 px, batch 512, data resident on the device.
  cifar10_lightly  the same network and data with lightly's CIFAR-10 recipe (SGD, PyTorch
           init; see _cifar10_lightly).
  r18 r50 r101 r152 r50x2 r50x4 r200x2
           ImageNet presets with the paper's defaults (batch 4096, LARS, base LR 0.2 for 1000
           epochs, tau 0.996). `,epochs=N` picks the release's table for 40/100/300/1000;
           another N trains N epochs with the nearest entry's settings (ties: the shorter).
Without a preset (`--config=configs/byol.py`) the config is r50.
Every field can be overridden on the command line, e.g. `--config.batch_size=512`.
The learning rate is derived at run time as base_lr * batch_size / 256, so overriding the
batch size rescales it.
"""

from __future__ import annotations

import ml_collections

from byol_jax import augment

# The release's hyperparameters per schedule length: (base LR, weight decay, tau_base).
EPOCH_TABLE = {
  40: (0.45, 1e-6, 0.97),
  100: (0.45, 1e-6, 0.99),
  300: (0.3, 1e-6, 0.99),
  1000: (0.2, 1.5e-6, 0.996),
}

# name -> (depth, width)
IMAGENET_PRESETS = {
  'r18': (18, 1), 'r50': (50, 1), 'r101': (101, 1), 'r152': (152, 1),
  'r50x2': (50, 2), 'r50x4': (50, 4), 'r200x2': (200, 2),
}
PRESETS = ('demo', 'cifar10', 'cifar10_lightly', *IMAGENET_PRESETS)
ARG_KEYS = ('epochs',)


def _model(depth: int, width: float, cifar_stem: bool) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
    arch='resnet',  # a name in networks.ENCODERS; depth, width and the stem are ResNet's
    depth=depth, width=float(width), cifar_stem=cifar_stem, zero_init_last_bn=True,
    stem_relu=True,  # False: no ReLU after the stem's BN (lightly's CIFAR-10 benchmark)
    weight_init='release',  # or 'he_fan_out', 'pytorch' (see networks.WEIGHT_INITS)
    # The release's projector and predictor end in a Linear without bias; lightly's keep one.
    head_output_bias=False,
    bn_decay=0.9, bn_eps=1e-5, projector_hidden=4096, predictor_hidden=4096,
    projection_dim=256, projector_norm='batchnorm', predictor_norm='batchnorm'))


def _base(epochs: int) -> ml_collections.ConfigDict:
  """The paper's ImageNet recipe (ResNet-50, 224 px, global batch 4096)."""
  base_lr, weight_decay, tau = EPOCH_TABLE[epochs]
  return ml_collections.ConfigDict(dict(
    preset='r50',
    dataset='imagenet2012', data_dir='', input_mode='auto', image_size=224,
    # The split BYOL trains on: a logical split (datasets.py) or a raw TFDS expression such
    # as 'unlabelled+train' (STL-10). Images without a class (label -1) train BYOL but stay
    # out of the online probe and the kNN evaluation, whose reference set is the split's
    # labelled images.
    pretrain_split='trainval',
    eval_crop_fraction=0.875, strict_data=False, shuffle_buffer=10_000,
    batch_size=4096, epochs=epochs, steps=0, seed=0,
    # Start a new run from an earlier run's networks (its workdir; step 0: its newest
    # checkpoint), with a fresh schedule, optimiser and probe: to train longer or on other
    # data (train_step.warm_start_state). Ignored once this run has checkpoints of its own.
    init_from='', init_from_step=0,
    model=_model(50, 1, False),
    loss='byol', infonce_temperature=0.1,
    optimizer=dict(name='lars', base_lr=base_lr, weight_decay=weight_decay, momentum=0.9,
                   trust_coefficient=1e-3, trust_clip=False, warmup_epochs=10,
                   # False: momentum on the LR-scaled update (optax.lars), not the release's
                   momentum_before_lr=True,
                   decay_all_params=False),  # True: decay biases and norm parameters too
    # 'random': the target gets its own random init (the release); 'copy': starts as the
    # online network (PyTorch implementations, lightly's).
    target_init='random',
    tau_base=tau,
    tau_schedule='cosine',  # or 'constant' (see optim.tau_schedule)
    augment=augment.default_augment_config(),
    precision='float32',
    # True: both views through one network call with per-view BN statistics, the same
    # maths as one call per view (train_step._forward_views). Off: on an H200 it gained
    # 1.5% on ResNet-18 at 32 px and nothing on ResNet-50, and on a 2-core CPU it was 1.3x
    # slower (2026-11-27, docs/performance.md "Fused views measured").
    fuse_views=False,
    log_every_steps=100, eval_every_steps=0, eval_at_init=False,
    knn=dict(k=200, temperature=0.1, train_examples=0, batch_size=256),
    demo=dict(train_examples=0, test_examples=0),
    checkpoint=dict(every_steps=5000, every_secs=600, keep=3, keep_every_steps=0),
    deterministic=False,
    max_bad_steps=10,  # non-finite steps in a row (each skipped) before training stops
    # --worker_mode=eval: follows the trainer's checkpoints in the same workdir.
    eval_dataset='',  # '' = the training dataset
    eval_network='online',  # or 'target'
    eval_poll_secs=10.0,
    eval_idle_timeout_secs=3600.0,  # stop after this long without a new checkpoint (0: never)
    # Several processes (see README "Multi-host"): how long to wait for all to
    # join, for a silent process before stopping the others, and at each barrier.
    multihost=dict(join_timeout_secs=300.0, peer_timeout_secs=120.0, barrier_timeout_secs=900.0),
  ))


def _demo() -> ml_collections.ConfigDict:
  """A CPU-sized run on the generated shapes data that learns visibly in a few minutes.

  `python -m byol_jax.main --config=configs/byol.py:demo --workdir=runs/demo` takes about
  2 minutes on 2 idle CPU cores, compilation and both kNN evaluations included (102-107 s
  at commit 2b4197c, 134-146 s on a loaded machine since: README Results); kNN top-1 on
  the test split rises from about 0.3 (the random encoder, `knn_top1_init`) to about 0.6
  (three seeds). What makes that possible in 300 steps:
  - the data (byol_jax/demo_data.py): light shapes on dark backgrounds, large and near the
    centre. With a random contrast sign per image BYOL learnt colour, not shape;
  - a ResNet-10 at half width with the ImageNet stem on 32 px images (8x8 maps after the
    stem): about 4x cheaper per image than the CIFAR stem at 24 px, so more steps fit;
  - base LR 2 (LR 1 at batch 128): with LARS the relative weight change per step is about
    LR x trust coefficient (1e-3), so few steps need a high LR; one warmup epoch;
  - the paper's augmentations, except crops of at least 30% of the area (not 8%) and no
    blur (a 3 px kernel at 32 px only erases detail).
  """
  cfg = _base(100)
  cfg.preset = 'demo'
  cfg.dataset = 'demo'
  cfg.image_size = 32
  cfg.eval_crop_fraction = 1.0
  cfg.batch_size = 128
  cfg.epochs = 15  # 20 steps per epoch: 300 steps
  cfg.model = _model(10, 0.5, False)
  cfg.model.projector_hidden = cfg.model.predictor_hidden = 512
  cfg.model.projection_dim = 128
  cfg.optimizer.base_lr = 2.0
  cfg.optimizer.weight_decay = 1e-6
  cfg.optimizer.warmup_epochs = 1
  cfg.tau_base = 0.99
  cfg.augment.blur = False
  cfg.augment.crop_area_min = 0.3
  cfg.log_every_steps = 20
  cfg.eval_every_steps = 0  # kNN at initialisation and at the end only
  cfg.eval_at_init = True
  cfg.demo.train_examples = 2560
  cfg.demo.test_examples = 1000
  cfg.checkpoint.every_steps = 100
  return cfg


def _cifar10(epochs: int) -> ml_collections.ConfigDict:
  """ResNet-18 (CIFAR stem) on 32 px CIFAR-10, resident on the device.

  Departures from the ImageNet recipe, and why:
  - 32 px images: CIFAR stem (3x3/1 conv, no max-pool), or the 4x4 maps vanish.
  - batch 512, base LR 1.0 (LR 2.0), weight decay 1e-5, tau_base 0.99, 10 warmup epochs, and
    LARS with trust coefficient 0.02 clipped LARC-style (`trust_clip`: a layer's step never
    exceeds plain SGD's): the short-schedule values of solo-learn's CIFAR BYOL recipe. With
    the paper's 1e-3 the relative weight change per step (about LR x trust coefficient) is
    20x smaller; on a 5,000-image validation split (docs/cifar10.md, "How the LARS setting
    was chosen") 4 epochs left kNN where the random encoder was (0.2775 vs 0.276), while
    0.02 with clipping reached 0.295 and kept the projections' rank (34 of 256; 8 without
    clipping).
  - No Gaussian blur: a 3 px kernel on 32 px images only destroys detail.
  - Evaluation uses the whole 32 px image (no 0.875 centre crop).
  Run (GPU): `bash experiments/cifar10_gpu.sh` (see the README's results section).
  """
  cfg = _base(1000)
  cfg.preset = 'cifar10'
  cfg.dataset = 'cifar10'
  cfg.image_size = 32
  cfg.eval_crop_fraction = 1.0
  cfg.batch_size = 512
  cfg.epochs = epochs
  cfg.model = _model(18, 1, True)
  cfg.optimizer.base_lr = 1.0
  cfg.optimizer.weight_decay = 1e-5
  cfg.optimizer.warmup_epochs = 10
  cfg.optimizer.trust_coefficient = 0.02
  cfg.optimizer.trust_clip = True
  cfg.tau_base = 0.99
  cfg.augment.blur = False
  cfg.log_every_steps = 50
  cfg.eval_every_steps = 970  # about every 10 epochs (97 steps per epoch at batch 512)
  cfg.eval_at_init = True
  return cfg


def _cifar10_lightly(epochs: int) -> ml_collections.ConfigDict:
  """lightly's CIFAR-10 BYOL benchmark (kNN 0.868 after 200 epochs at batch 512), as far as
  our options express it; the cifar10 recipe otherwise.

  - SGD with momentum 0.9, no warm-up, cosine LR. lightly's LR is 0.06 x batch/128 with
    weight decay 5e-4 on the mean of two -cos terms; our loss, the sum of two 2 - 2cos
    terms, has 4x that gradient, so base LR 0.03 (LR 0.06 at batch 512) and weight decay
    2e-3 make the same update.
  - A constant tau of 0.99, heads 1024 wide, whose last Linear keeps its bias (the
    release's has none).
  - SimCLR's views: torchvision's colour jitter (0.4, 0.4, 0.4, 0.1), no blur or solarisation.
  - PyTorch's default layer init and no zero-init of the last BN of each block (lightly's
    ResNet keeps PyTorch's defaults). Under SGD a weight followed by BatchNorm has an
    effective LR of LR / |w|^2, and with 2.4x larger convolutions ('he_fan_out', then
    called 'release'; the release's own are 1.5x larger) this recipe left the encoder
    where it started on a 10-epoch CPU budget, where the independent
    PyTorch reference (experiments/torch_byol_reference.py) learns, and this preset learns
    at least as well (docs/cifar10.md, "The PyTorch cross-check").
  - Weight decay on every parameter, biases and BatchNorm's included (PyTorch's SGD), and
    a target that starts as a copy of the online network.
  - Inputs normalised with ImageNet's mean and std (every preset's `augment.mean/std`), as
    lightly's benchmark does.
  Not expressed: lightly's backbone has no ReLU after the stem's BatchNorm (it keeps the
  ResNet's child modules, and the stem's ReLU lives in `forward`). `model.stem_relu=False`
  drops it; the preset keeps it, as its GPU figures (README) were measured with it. Nor
  lightly's LR held through each epoch (ours moves every step) or its EMA update before
  the forward pass (ours follows the optimiser step).
  """
  cfg = _cifar10(epochs)
  cfg.preset = 'cifar10_lightly'
  cfg.optimizer.name = 'sgd'
  cfg.optimizer.base_lr = 0.03
  cfg.optimizer.weight_decay = 2e-3
  cfg.optimizer.warmup_epochs = 0
  cfg.optimizer.decay_all_params = True
  cfg.target_init = 'copy'
  cfg.tau_schedule = 'constant'
  cfg.model.projector_hidden = cfg.model.predictor_hidden = 1024
  cfg.model.weight_init = 'pytorch'
  cfg.model.zero_init_last_bn = False
  cfg.model.head_output_bias = True
  cfg.augment.jitter_style = 'torchvision'
  cfg.augment.saturation = 0.4
  cfg.augment.view2.solarize_prob = 0.0
  return cfg


def _parse_arg(arg: str) -> tuple[str, dict[str, int]]:
  preset, *pairs = [p for p in (arg or 'r50').split(',') if p]
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}; valid: {", ".join(PRESETS)}')
  kwargs = {}
  for pair in pairs:
    key, sep, value = pair.partition('=')
    # epochs=0 was taken for "not given" (r50,epochs=0 trained 1000 epochs), and of a key
    # given twice the last won without a word.
    if not sep or key not in ARG_KEYS or not value.isdigit() or not int(value):
      raise ValueError(f'bad preset argument {pair!r}; valid: '
                       f'{", ".join(ARG_KEYS)}=<positive int>')
    if key in kwargs:
      raise ValueError(f'preset argument {key} is given twice ({arg}): give it once')
    kwargs[key] = int(value)
  return preset, kwargs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the preset named by `arg` ("r50", "r50,epochs=300", "cifar10", "demo")."""
  preset, kwargs = _parse_arg(arg or 'r50')
  epochs = kwargs.get('epochs')
  if preset == 'demo':
    cfg = _demo()
    if epochs:
      cfg.epochs = epochs
    return cfg
  if preset == 'cifar10':
    return _cifar10(epochs or 200)
  if preset == 'cifar10_lightly':
    return _cifar10_lightly(epochs or 200)
  epochs = epochs or 1000
  if epochs not in EPOCH_TABLE:
    cfg = _base(min(EPOCH_TABLE, key=lambda e: abs(e - epochs)))
    cfg.epochs = epochs
  else:
    cfg = _base(epochs)
  depth, width = IMAGENET_PRESETS[preset]
  cfg.preset = preset
  cfg.model.depth, cfg.model.width = depth, width
  # kNN is a progress signal here (the paper's protocol is linear evaluation): the first
  # 100,000 training images (about 100 per class; TFDS shuffles when it prepares) keep its
  # feature bank at 0.8 GB for ResNet-50, where all 1.28M would need 10 GB on one device.
  cfg.knn.train_examples = 100_000
  return cfg
