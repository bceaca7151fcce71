"""Tests of experiments/torch_byol_reference.py, the independent PyTorch BYOL cross-check.

Its pieces are checked against library implementations and closed forms (F.interpolate,
colorsys, float64 blends, byol_jax's kNN), so that a difference between its CIFAR-10
accuracy and byol_jax's says something about byol_jax, not about the reference.
"""

import colorsys
import json
import os
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

torch = pytest.importorskip('torch')
F = torch.nn.functional
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import results_table  # noqa: E402
import torch_byol_reference as ref  # noqa: E402


def _gen(seed=0):
  gen = torch.Generator()
  gen.manual_seed(seed)
  return gen


def test_resized_crops_equal_interpolate_of_the_crop():
  """Fails if the batched resample departs from torchvision's crop-then-resize (bilinear,
  align_corners=False), e.g. by reading pixels outside the box at its edges."""
  images = torch.rand(16, 3, 32, 32, generator=_gen())
  boxes = ref.crop_boxes(16, 32, 32, _gen(1), 'cpu')
  out = ref.resized_crops(images, boxes, 32)
  for n, (top, left, h, w) in enumerate(boxes.tolist()):
    want = F.interpolate(images[n:n + 1, :, top:top + h, left:left + w], size=(32, 32),
                         mode='bilinear', align_corners=False)[0]
    torch.testing.assert_close(out[n], want, atol=1e-6, rtol=0)


def test_crop_boxes_fit_and_fall_back_to_the_clamped_centre():
  """Boxes must lie inside the image with areas in the range; when no attempt fits (here
  the aspect range excludes a full-area square) torchvision's centre fallback is used."""
  boxes = ref.crop_boxes(5000, 32, 24, _gen(), 'cpu')
  top, left, h, w = boxes.T
  assert bool(((top >= 0) & (left >= 0) & (top + h <= 32) & (left + w <= 24)).all())
  area = (h * w).float() / (32 * 24)
  assert area.min() >= 0.07 and area.max() <= 1.0
  fallback = ref.crop_boxes(3, 32, 32, _gen(), 'cpu', scale=(1.0, 1.0), ratio=(2.0, 3.0))
  assert fallback.tolist() == [[8, 0, 16, 32]] * 3


def test_hue_rotation_matches_colorsys():
  """Fails if the batched HSV round trip differs from Python's colorsys (float64)."""
  x = torch.rand(4, 3, 5, 5, generator=_gen())
  delta = torch.tensor([0.05, -0.1, 0.37, 0.0])
  got = ref.adjust_hue(x, delta).numpy()
  arr = x.double().numpy()
  for n in range(4):
    for i in range(5):
      for j in range(5):
        h, s, v = colorsys.rgb_to_hsv(*arr[n, :, i, j])
        want = colorsys.hsv_to_rgb((h + float(delta[n])) % 1.0, s, v)
        np.testing.assert_allclose(got[n, :, i, j], want, atol=2e-6)


def test_jitter_ops_follow_torchvision_blends():
  """brightness blends with black, contrast with the grayscale mean, saturation with the
  grayscale image, each clamped (torchvision.transforms.functional), in float64 here."""
  x = torch.rand(3, 3, 6, 6, generator=_gen())
  f = torch.tensor([0.6, 1.0, 1.4])
  arr, fs = x.double().numpy(), f.double().numpy()[:, None, None, None]
  gray = np.einsum('nchw,c->nhw', arr, np.array(ref.GRAY))[:, None]
  want = {
    ref.scale_brightness: fs * arr,
    ref.blend_contrast: fs * arr + (1 - fs) * gray.mean(axis=(1, 2, 3), keepdims=True),
    ref.blend_saturation: fs * arr + (1 - fs) * gray,
  }
  for fn, expected in want.items():
    np.testing.assert_allclose(fn(x, f).numpy(), np.clip(expected, 0, 1), atol=1e-6)


def test_color_jitter_applies_each_images_drawn_order():
  """The batched slot loop must equal applying the ops one image at a time in that image's
  own order with its own factors (a shared order or factor would fail)."""
  x = torch.rand(8, 3, 4, 4, generator=_gen())
  got = ref.color_jitter(x, _gen(5), 0.4, 0.4, 0.4, 0.1)
  factors, order = ref.jitter_draw(8, _gen(5), 'cpu', 0.4, 0.4, 0.4, 0.1)
  assert len({tuple(o) for o in order.tolist()}) > 1
  for n in range(8):
    y = x[n:n + 1]
    for op in order[n].tolist():
      y = ref.JITTER_OPS[op](y, factors[op][n:n + 1])
    torch.testing.assert_close(got[n:n + 1], y, atol=1e-6, rtol=0)


def test_knn_agrees_with_byol_jax():
  """Two independent kNN implementations must give the same top-1 on the same features."""
  from byol_jax.evaluators import knn
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(5, 16))
  train_y, test_y = rng.integers(0, 5, 400), rng.integers(0, 5, 100)
  train_f = centres[train_y] + 1.5 * rng.normal(size=(400, 16))
  test_f = centres[test_y] + 1.5 * rng.normal(size=(100, 16))
  want = knn.knn_accuracy(train_f, train_y, test_f, test_y, 5, k=50)['top1']
  t = lambda a: F.normalize(torch.tensor(a, dtype=torch.float32), dim=1)
  got = ref.knn_top1(t(train_f), torch.tensor(train_y), t(test_f), torch.tensor(test_y), 5, k=50)
  assert got == pytest.approx(want) and 0.3 < got < 1.0


def test_lars_step_is_the_clipped_trust_ratio_formula():
  """Weights: d = g + wd w scaled by min(trust |w| / |d| / lr, 1), then momentum and LR;
  vectors (biases, BN) get plain momentum SGD without decay."""
  w = torch.tensor([[3.0, 4.0]], requires_grad=True)
  b = torch.tensor([1.0], requires_grad=True)
  opt = ref.LARS([w, b], lr=0.5, momentum=0.9, weight_decay=0.1, trust=0.02)
  w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([2.0])
  opt.step()
  d = np.array([0.3, 1.4])
  scale = min(0.02 * 5.0 / np.linalg.norm(d) / 0.5, 1.0)
  np.testing.assert_allclose(w.detach().numpy()[0], [3.0, 4.0] - 0.5 * scale * d, rtol=1e-6)
  np.testing.assert_allclose(b.detach().numpy(), [1.0 - 0.5 * 2.0])


def test_loss_kinds_differ_by_a_factor_four_in_gradient():
  """lightly's mean of -cos terms has a quarter of the paper's summed 2 - 2cos gradient,
  the conversion the README uses between the two recipes' learning rates."""
  p1, p2, z1, z2 = (torch.randn(6, 8, generator=_gen(i), requires_grad=i < 2) for i in range(4))
  grads = {}
  for kind in ('neg_cos', 'byol'):
    grads[kind] = torch.autograd.grad(ref.byol_loss(p1, p2, z1, z2, kind), (p1, p2))
  for a, b in zip(grads['neg_cos'], grads['byol'], strict=True):
    torch.testing.assert_close(4 * a, b)


def test_target_is_an_ema_of_the_online_parameters():
  """update_target must move each target parameter to tau t + (1 - tau) o, and only those
  of the backbone and projector (the predictor has no target)."""
  model = ref.BYOL(10, 0.125, True, 16, 8)
  with torch.no_grad():
    for p in model.online_parameters():
      p.add_(1.0)
  before = [t.clone() for t in model.target_parameters()]
  online = [p for m in (model.backbone, model.projector) for p in m.parameters()]
  model.update_target(0.9)
  for t, t0, o in zip(model.target_parameters(), before, online, strict=True):
    torch.testing.assert_close(t, 0.9 * t0 + 0.1 * o)


def test_ema_first_uses_the_online_weights_before_the_update():
  """lightly updates the EMA at the start of its step: the target must move toward the
  online weights the step started from, not the updated ones (the default order)."""
  def stepped(ema_first):
    torch.manual_seed(0)
    model = ref.BYOL(10, 0.125, True, 16, 8)
    with torch.no_grad():
      for p in model.online_parameters():
        p.add_(0.5)
    start = [p.detach().clone() for m in (model.backbone, model.projector)
             for p in m.parameters()]
    target0 = [t.clone() for t in model.target_parameters()]
    opt = torch.optim.SGD(list(model.online_parameters()), lr=0.5)
    views = torch.randn(2, 4, 3, 8, 8, generator=_gen(1))
    ref.byol_step(model, opt, views[0], views[1], 0.5, 0.9, 'neg_cos', None, ema_first)
    end = [p.detach() for m in (model.backbone, model.projector) for p in m.parameters()]
    return list(model.target_parameters()), target0, start, end

  for ema_first, pick in ((True, 2), (False, 3)):
    got = stepped(ema_first)
    assert any(not torch.equal(a, b) for a, b in zip(got[2], got[3], strict=True))
    for t, t0, o in zip(got[0], got[1], got[pick], strict=True):
      torch.testing.assert_close(t, 0.9 * t0 + 0.1 * o)


def test_stem_relu_false_leaves_the_stem_without_relu():
  """lightly_exact's backbone: conv and BatchNorm, then straight into the first block."""
  with_relu = list(ref.ResNet(10, 0.125, True).body)[:3]
  without = list(ref.ResNet(10, 0.125, True, stem_relu=False).body)[:3]
  assert [type(m) for m in with_relu] == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU]
  assert [type(m) for m in without] == [torch.nn.Conv2d, torch.nn.BatchNorm2d, ref.BasicBlock]
  assert not ref.PRESETS['lightly_exact']['stem_relu'] and ref.PRESETS['lightly']['stem_relu']


def test_imagenet_normalisation_uses_torchvisions_constants():
  x = torch.rand(2, 3, 4, 4, generator=_gen())
  mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
  std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
  torch.testing.assert_close(ref.normalise(x, 'imagenet'), (x - mean) / std)
  assert not torch.allclose(ref.normalise(x, 'cifar'), ref.normalise(x, 'imagenet'))


def test_recalibrated_bn_averages_the_batch_statistics_of_a_copy():
  """The initial evaluation's BN statistics: for the stem's BN, the mean over equal batches
  of its input's per-batch mean and (unbiased) variance, computed here in float64 from the
  stem convolution; the model's own statistics must stay PyTorch's initial ones."""
  torch.manual_seed(0)
  backbone = ref.ResNet(10, 0.125, True)
  images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
  copy = ref.recalibrated(backbone, images, 'cpu', max_images=30, batch=10)
  rows = np.sort(np.random.default_rng(0).permutation(40)[:30])
  conv = backbone.body[0].double()
  means, variances = [], []
  for i in range(0, 30, 10):
    x = torch.from_numpy(images[rows[i:i + 10]]).permute(0, 3, 1, 2).double() / 255.0
    y = conv(ref.normalise(x.float()).double())
    means.append(y.mean(dim=(0, 2, 3)))
    variances.append(y.var(dim=(0, 2, 3), unbiased=True))
  bn = copy.body[1]
  torch.testing.assert_close(bn.running_mean.double(), torch.stack(means).mean(0),
                             rtol=1e-4, atol=1e-6)
  torch.testing.assert_close(bn.running_var.double(), torch.stack(variances).mean(0),
                             rtol=1e-4, atol=1e-6)
  assert torch.equal(backbone.body[1].running_mean, torch.zeros_like(bn.running_mean))
  assert torch.equal(backbone.body[1].running_var, torch.ones_like(bn.running_var))


def _folder(root, classes=2, train=24, test=8, size=16):
  rng = np.random.default_rng(0)
  for split, n in (('train', train), ('test', test)):
    for c in range(classes):
      os.makedirs(root / split / f'class{c}', exist_ok=True)
      for i in range(n):
        image = rng.integers(0, 256, (size, size, 3)) * (0.4 + 0.6 * c)
        Image.fromarray(image.astype(np.uint8)).save(root / split / f'class{c}' / f'{i}.png')


@pytest.mark.parametrize('preset', ['lightly', 'solo', 'lightly_exact'])
def test_tiny_run_writes_byol_jax_metrics(tmp_path, preset):
  """A two-epoch run on a generated folder must write eval and train records that
  results_table reads, with a finite loss (fails on a crash or a format drift)."""
  _folder(tmp_path / 'data')
  work = tmp_path / 'run'
  ref.train(['--data', str(tmp_path / 'data'), '--workdir', str(work), '--preset', preset,
             '--epochs', '2', '--batch_size', '16', '--depth', '10', '--width', '0.125',
             '--hidden', '32', '--proj_dim', '16', '--eval_every_epochs', '1',
             '--log_every_steps', '1', '--threads', '1', '--warmup_epochs', '1'])
  table = results_table.rows(str(work))
  assert [r['epoch'] for r in table] == [1.0, 2.0]
  assert all(0.0 <= r['knn_top1'] <= 1.0 for r in table)
  train = [json.loads(line) for line in open(work / 'metrics' / 'train.jsonl')]
  assert len(train) == 6 and all(np.isfinite(r['loss']) for r in train)
  assert json.load(open(work / 'config.json'))['implementation'] == 'torch_reference'


@pytest.mark.parametrize('preset', ['lightly', 'lightly_exact'])
def test_lr_per_epoch_holds_the_cosine_through_each_epoch(tmp_path, preset):
  """lightly_exact's LR is CosineAnnealingLR stepped once per epoch: 3 steps per epoch at the
  cosine's value for the epoch's start; lightly's own preset follows the cosine every step."""
  _folder(tmp_path / 'data')
  work = tmp_path / 'run'
  ref.train(['--data', str(tmp_path / 'data'), '--workdir', str(work), '--preset', preset,
             '--epochs', '2', '--batch_size', '16', '--depth', '10', '--width', '0.125',
             '--hidden', '32', '--proj_dim', '16', '--eval_every_epochs', '2',
             '--log_every_steps', '1', '--threads', '1'])
  lrs = [json.loads(line)['lr'] for line in open(work / 'metrics' / 'train.jsonl')]
  peak = 0.06 * 16 / 128
  if preset == 'lightly_exact':
    expected = [peak] * 3 + [peak / 2] * 3  # cos(pi * epoch / 2) for epochs 0 and 1
  else:
    expected = [0.5 * peak * (1 + np.cos(np.pi * s / 6)) for s in range(6)]
  np.testing.assert_allclose(lrs, expected, rtol=1e-9)


def test_missing_folder_is_a_one_line_error(tmp_path):
  with pytest.raises(SystemExit, match='no folder'):
    ref.train(['--data', str(tmp_path / 'nothing'), '--workdir', str(tmp_path / 'run')])


def test_folder_reader_reads_the_images_byol_jax_reads(tmp_path):
  """A folder copied from a Mac (.DS_Store, ._0.png, .ipynb_checkpoints/) or holding a note
  stopped the reference with PIL's traceback; it reads the files byol_jax reads now."""
  from byol_jax import datasets
  for name in ('a', 'b'):
    os.makedirs(tmp_path / 'train' / name)
    for i in range(2):
      Image.new('RGB', (4, 4), (i, 0, 0)).save(tmp_path / 'train' / name / f'{i}.PNG')
  for junk in ('a/.DS_Store', 'a/._0.png', 'b/notes.txt', '.DS_Store'):
    (tmp_path / 'train' / junk).write_bytes(b'\0')
  os.makedirs(tmp_path / 'train' / '.ipynb_checkpoints')
  images, labels, classes = ref.load_split(str(tmp_path), 'train')
  found = datasets.scan_folder(str(tmp_path), 'trainval')
  assert classes == found.class_names == ['a', 'b']
  assert images.shape == (4, 4, 4, 3) and labels.tolist() == found.labels.tolist()


def test_failed_compiled_views_fall_back_to_eager(capsys):
  """A torch.compile failure on the GPU host must cost a message, not the run."""
  def broken(*args, **kwargs):
    raise RuntimeError('no compiler')
  batch = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
  cfg = dict(ref.PRESETS['lightly'])
  v1, v2, fn = ref._two_views(batch, _gen(), 8, cfg, broken)
  assert fn is ref.apply_view and v1.shape == v2.shape == (4, 3, 8, 8)
  assert 'torch.compile failed (RuntimeError: no compiler)' in capsys.readouterr().out


_COMPILED_VS_EAGER = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
import torch_byol_reference as ref
gen = lambda seed: torch.Generator().manual_seed(seed)
batch = torch.randint(0, 256, (32, 16, 16, 3), dtype=torch.uint8, generator=gen(0))
draws = ref.draw_view(batch, gen(3), dict(ref.PRESETS['solo']))
eager = ref.apply_view(batch, *draws, size=16, solarize_prob=0.2)
compiled = torch.compile(ref.apply_view, dynamic=False)(batch, *draws, size=16,
                                                        solarize_prob=0.2)
torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
print('same views')
"""


@pytest.mark.slow
def test_compiled_view_equals_eager():
  """The --compile path must compute the same views (float rounding aside). In a fresh
  interpreter, as the script runs: inside a pytest process that has imported Haiku,
  inductor's cache key walks into haiku.experimental.flax's stub and fails to compile."""
  import subprocess
  out = subprocess.run([sys.executable, '-c', _COMPILED_VS_EAGER,
                        os.path.join(REPO, 'experiments')], capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0 and 'same views' in out.stdout, out.stderr[-3000:]
