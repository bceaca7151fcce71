"""Shared test fixtures: tiny configs that compile in seconds on a 2-core CPU."""

import atexit
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # so `configs` imports in tests as it does from the repo root

# XLA's CPU backend optimisations cost seconds per program and buy nothing for tiny test
# models; subprocess tests pass the same flag on.
FAST_COMPILE = '--xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + FAST_COMPILE).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Many tests compile the same tiny programs (in this process and in subprocesses, which
# inherit the environment): one persistent XLA cache per session compiles each once. A cached
# executable is the binary a fresh compile gives, so results are unchanged; the folder is
# new per session (timings stay those of a fresh machine) and removed at exit.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='byol_jax_test_xla_cache_')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


def checkout_env(**extra: str) -> dict[str, str]:
  """The environment for a subprocess that runs outside the repository root: this checkout
  first on its path, so it tests this code, not whichever byol_jax pip installed last (an
  editable install of another clone, or none)."""
  path = os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p)
  return dict(os.environ, PYTHONPATH=path, **extra)


def tiny_config(**overrides):
  """The demo preset shrunk to a model and data that train a step in about a second."""
  from configs import byol
  cfg = byol.get_config('demo')
  cfg.model.depth, cfg.model.width, cfg.model.cifar_stem = 10, 0.125, True
  cfg.model.projector_hidden = cfg.model.predictor_hidden = 32
  cfg.model.projection_dim = 16
  cfg.image_size = 16
  cfg.batch_size = 16
  cfg.demo.train_examples, cfg.demo.test_examples = 64, 32
  cfg.steps = 4
  cfg.log_every_steps = 2
  cfg.knn.k = 10
  for key, value in overrides.items():
    target = cfg
    *path, leaf = key.split('.')
    for p in path:
      target = target[p]
    target[leaf] = value
  return cfg



def config_fields() -> set[str]:
  """Every dotted field of every preset of the three config files (what --config.FIELD may
  name)."""
  from configs import ablation, byol, linear_eval
  fields = set()

  def walk(cfg, prefix=''):
    for key, value in cfg.items():
      fields.add(prefix + key)
      if hasattr(value, 'items'):
        walk(value, f'{prefix}{key}.')

  for module, presets in ((byol, byol.PRESETS), (linear_eval, linear_eval.PRESETS),
                          (ablation, ablation.VARIANTS)):
    for preset in presets:
      walk(module.get_config(preset))
  return fields

@pytest.fixture
def tiny_cfg():
  return tiny_config()


@pytest.fixture(scope='session')
def pretrained_workdir(tmp_path_factory):
  """A pretraining workdir with a finalised checkpoint of a tiny run (4 steps), built once."""
  from byol_jax import train
  path = str(tmp_path_factory.mktemp('pretrain'))
  cfg = tiny_config()
  cfg.eval_at_init = False
  train.train_and_evaluate(cfg, path)
  return path


def prepare_fake_voc2007(data_dir: str, sizes: dict[str, int],
                         seed: int = 0) -> dict[str, list[dict]]:
  """A stand-in for TFDS's prepared 'voc/2007' under data_dir: the real builder's version
  and features (objects with difficult flags, 'labels', 'labels_no_difficult'), random
  images, nothing downloaded. Returns each split's examples' class sets, in TFDS order."""
  tfds = pytest.importorskip('tensorflow_datasets')
  builder = tfds.builder('voc/2007', data_dir=data_dir)
  rng = np.random.default_rng(seed)

  def example(name):
    n = int(rng.integers(1, 4))
    label = rng.integers(0, 20, n)
    difficult = rng.random(n) < 0.4
    return {'image': rng.integers(0, 256, (36, 44, 3), np.uint8), 'image/filename': name,
            'labels': np.unique(label), 'labels_no_difficult': np.unique(label[~difficult]),
            'objects': {'bbox': np.tile(np.float32([[0.1, 0.2, 0.6, 0.7]]), (n, 1)),
                        'is_difficult': difficult, 'is_truncated': np.zeros(n, bool),
                        'label': label, 'pose': np.zeros(n, np.int64)}}

  splits = {s: [(f'{s}_{i}', example(f'{s}_{i}.jpg')) for i in range(k)]
            for s, k in sizes.items()}
  tfds.dataset_builders.store_as_tfds_dataset(
    name='voc', config='2007', version=str(builder.version), features=builder.info.features,
    data_dir=data_dir, split_datasets=splits)
  prepared = tfds.builder('voc/2007', data_dir=data_dir)
  return {s: [dict(labels=set(ex['labels'].tolist()),
                   positive=set(ex['labels_no_difficult'].tolist()))
              for ex in tfds.as_numpy(prepared.as_dataset(split=s, shuffle_files=False))]
          for s in sizes}


def prepare_fake_stl10(data_dir: str, sizes: dict[str, int], num_classes: int = 3) -> None:
  """A stand-in for TFDS's prepared 'stl10' under data_dir: the real builder's version and
  features, random 96 px images; 'unlabelled' images carry label -1 as TFDS stores them,
  the other splits cycle through the first num_classes classes."""
  tfds = pytest.importorskip('tensorflow_datasets')
  builder = tfds.builder('stl10', data_dir=data_dir)
  rng = np.random.default_rng(0)
  splits = {s: [(f'{s}_{i}', {'image': rng.integers(0, 256, (96, 96, 3), np.uint8),
                              'label': -1 if s == 'unlabelled' else i % num_classes})
                for i in range(k)] for s, k in sizes.items()}
  tfds.dataset_builders.store_as_tfds_dataset(
    name='stl10', version=str(builder.version), features=builder.info.features,
    data_dir=data_dir, split_datasets=splits)


@pytest.fixture(scope='session')
def voc_dir(tmp_path_factory):
  """A stand-in for TFDS's prepared VOC2007: 24 train, 12 validation, 16 test images."""
  data_dir = str(tmp_path_factory.mktemp('voc_tfds'))
  prepare_fake_voc2007(data_dir, {'train': 24, 'validation': 12, 'test': 16})
  return data_dir


@pytest.fixture(scope='session')
def stl10_dir(tmp_path_factory):
  """A stand-in for TFDS's STL-10: 12 labelled train, 6 test and 20 unlabelled images."""
  data_dir = str(tmp_path_factory.mktemp('stl10_tfds'))
  prepare_fake_stl10(data_dir, {'train': 12, 'test': 6, 'unlabelled': 20})
  return data_dir


@pytest.fixture(scope='module')
def png_folder(tmp_path_factory):
  """3 classes of 16 px PNGs (lossless: both readers decode the same pixels), 12 train and 6
  test images."""
  from PIL import Image
  root = tmp_path_factory.mktemp('knn_folder')
  rng = np.random.default_rng(0)
  for split, per_class in (('train', 4), ('test', 2)):
    for c in range(3):
      os.makedirs(root / split / f'c{c}')
      for i in range(per_class):
        pixels = np.clip(rng.normal(60 + 70 * c, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / f'c{c}' / f'{i}.png')
  return f'folder:{root}'
