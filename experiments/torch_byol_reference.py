r"""An independent PyTorch BYOL for CIFAR-sized image folders: the cross-check of issue 7.

Why: byol-jax's CIFAR-10 runs stay below the published PyTorch figures (README, Results),
and no option separates the candidate causes: the shared data (a lossy JPEG copy), the
recipe, or a defect of our own. This script trains BYOL written from the paper and
lightly's CIFAR-10 benchmark in plain PyTorch, sharing no code with byol_jax (its own folder
reader, network, augmentations, optimiser and kNN), on the same images and budget. If it
lands where byol-jax lands, the data and recipe set the ceiling; if it lands higher, the
difference is ours to find.

  python experiments/torch_byol_reference.py --data /tmp/byol_cifar10 --workdir runs/torch_ref \
      --epochs 100 --preset lightly

It writes metrics/eval.jsonl and metrics/train.jsonl in byol_jax's record format, so
`experiments/results_table.py` and `python -m byol_jax.plot` read its runs too.

Presets (each value can be overridden by its flag):
- lightly: lightly's cifar10_benchmark.py BYOL: ResNet-18 (CIFAR stem), heads 1024 wide,
  SGD LR 0.06 x batch/128, momentum 0.9, weight decay 5e-4 on every parameter (PyTorch's
  SGD), cosine LR without warm-up, constant tau 0.99, loss the mean of the two -cos terms,
  SimCLR views (colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale 0.2, no blur or
  solarisation). Its details match byol_jax's `cifar10_lightly` except the input
  normalisation (CIFAR-10's mean and std here; byol_jax uses ImageNet's for every preset),
  so the two compare as implementations; lightly_exact has lightly's remaining ones.
- lightly_exact: lightly's benchmark to the letter, so that its accuracy on these images
  calibrates lightly's published figure against the data. On top of lightly: no ReLU after
  the stem's BatchNorm (lightly's backbone keeps the ResNet's child modules, and the stem's
  ReLU lives in `forward`; byol_jax's `model.stem_relu=False`), the LR held through each
  epoch (CosineAnnealingLR stepped at Lightning's default interval), the EMA updated at the
  start of each step, before the forward pass, and ImageNet's mean and std for the inputs.
  lightly trains in float32; `--precision` picks (experiments/cifar10_sweep.sh: bfloat16).
- solo: byol_jax's cifar10 recipe (solo-learn's): heads 4096 wide, LARS (trust 0.02
  clipped, weight decay 1e-5, biases and BN exempt), LR 1.0 x batch/256 after 10 warm-up
  epochs, tau 0.99 -> 1 (cosine), loss the SUM of the two 2 - 2cos terms, BYOL's views
  (saturation 0.2, solarisation 0.2 in the second view) with torchvision's jitter ops.

Augmentations run on the device, batched, with each image's own random parameters (crop,
flip, jitter factors and order, grayscale), written to torchvision's definitions: integer
crop boxes from RandomResizedCrop's sampler, bilinear resampling of the box
(align_corners=False, edge pixels clamped to the box), ColorJitter's ops in a random
order. Needs torch (any recent version) and Pillow; no torchvision.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
  'lightly': dict(depth=18, width=1.0, cifar_stem=True, hidden=1024, proj_dim=256,
                  optimizer='sgd', base_lr=0.06, lr_batch=128, weight_decay=5e-4,
                  warmup_epochs=0.0, tau=0.99, tau_schedule='constant', loss='neg_cos',
                  saturation=0.4, solarize2=0.0, trust=0.0, stem_relu=True,
                  lr_per_epoch=False, ema_first=False, normalize='cifar'),
  'solo': dict(depth=18, width=1.0, cifar_stem=True, hidden=4096, proj_dim=256,
               optimizer='lars', base_lr=1.0, lr_batch=256, weight_decay=1e-5,
               warmup_epochs=10.0, tau=0.99, tau_schedule='cosine', loss='byol',
               saturation=0.2, solarize2=0.2, trust=0.02, stem_relu=True,
               lr_per_epoch=False, ema_first=False, normalize='cifar'),
}
# lightly's benchmark to the letter: also its backbone without the stem's ReLU, its LR stepped
# once per epoch (CosineAnnealingLR at Lightning's default interval), the EMA updated at the
# start of each step (before the forward pass), and ImageNet's mean and std.
PRESETS['lightly_exact'] = dict(PRESETS['lightly'], stem_relu=False, lr_per_epoch=True,
                                ema_first=True, normalize='imagenet')
LAYOUTS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
NORMALIZE = {  # per-channel (mean, std) of the inputs
  'cifar': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
  'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # lightly's, for every dataset
}


# ------------------------------------------------------------------------------------------
# Data: an image folder <root>/<split>/<class>/<file>, decoded once with Pillow.
# ------------------------------------------------------------------------------------------


def _visible(folder: str) -> list[str]:
  """Sorted names in a folder less hidden ones (.DS_Store, macOS's ._a.jpg), as byol_jax
  reads folders: a hidden file in a class folder stopped the run with PIL's traceback."""
  return sorted(n for n in os.listdir(folder) if not n.startswith('.'))


def load_split(root: str, split: str, classes: list[str] | None = None
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """uint8 images [N, H, W, 3] and int64 labels of one split; classes sorted by name.

  The images byol_jax reads from the same folder: its .jpg/.jpeg/.png files (any case),
  hidden names left out, so the cross-check compares the two on the same images."""
  from PIL import Image
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise SystemExit(f'error: no folder {split_dir} (expected <root>/{split}/<class>/<image>)')
  classes = classes or [d for d in _visible(split_dir)
                        if os.path.isdir(os.path.join(split_dir, d))]
  images, labels = [], []
  for label, name in enumerate(classes):
    folder = os.path.join(split_dir, name)
    for file in [f for f in (_visible(folder) if os.path.isdir(folder) else [])
                 if f.lower().endswith(('.jpg', '.jpeg', '.png'))]:
      with Image.open(os.path.join(folder, file)) as img:
        images.append(np.asarray(img.convert('RGB'), np.uint8))
      labels.append(label)
  if not images:
    raise SystemExit(f'error: no images under {split_dir}')
  return np.stack(images), np.asarray(labels, np.int64), classes


# ------------------------------------------------------------------------------------------
# Network: ResNet v1 with basic blocks, projector and predictor.
# ------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.shortcut = nn.Sequential()
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
  """CIFAR stem (3x3/1 conv, no max-pool) or ImageNet stem (7x7/2 conv, 3x3/2 max-pool)."""

  def __init__(self, depth: int = 18, width: float = 1.0, cifar_stem: bool = True,
               stem_relu: bool = True):
    super().__init__()
    widths = [max(1, round(64 * width * 2**i)) for i in range(4)]
    stem = max(1, round(64 * width))
    relu = [nn.ReLU()] if stem_relu else []  # lightly's backbone has none
    if cifar_stem:
      layers = [nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), *relu]
    else:
      layers = [nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem), *relu,
                nn.MaxPool2d(3, 2, 1)]
    cin = stem
    for stage, blocks in enumerate(LAYOUTS[depth]):
      for b in range(blocks):
        layers.append(BasicBlock(cin, widths[stage], 2 if (stage > 0 and b == 0) else 1))
        cin = widths[stage]
    self.body = nn.Sequential(*layers)
    self.output_dim = cin

  def forward(self, x):
    return self.body(x).mean(dim=(2, 3))


def mlp(cin: int, hidden: int, cout: int) -> nn.Module:
  return nn.Sequential(nn.Linear(cin, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                       nn.Linear(hidden, cout))


class BYOL(nn.Module):
  """Online (backbone, projector, predictor) and target (a copy of backbone and projector)."""

  def __init__(self, depth: int, width: float, cifar_stem: bool, hidden: int, proj_dim: int,
               stem_relu: bool = True):
    super().__init__()
    self.backbone = ResNet(depth, width, cifar_stem, stem_relu)
    self.projector = mlp(self.backbone.output_dim, hidden, proj_dim)
    self.predictor = mlp(proj_dim, hidden, proj_dim)
    self.target_backbone = ResNet(depth, width, cifar_stem, stem_relu)
    self.target_projector = mlp(self.backbone.output_dim, hidden, proj_dim)
    self.target_backbone.load_state_dict(self.backbone.state_dict())
    self.target_projector.load_state_dict(self.projector.state_dict())
    for p in self.target_parameters():
      p.requires_grad_(False)

  def online_parameters(self):
    for module in (self.backbone, self.projector, self.predictor):
      yield from module.parameters()

  def target_parameters(self):
    for module in (self.target_backbone, self.target_projector):
      yield from module.parameters()

  def online(self, x):
    return self.predictor(self.projector(self.backbone(x)))

  @torch.no_grad()
  def target(self, x):
    return self.target_projector(self.target_backbone(x))

  @torch.no_grad()
  def update_target(self, tau: float):
    """target <- tau * target + (1 - tau) * online, parameters only (BN buffers stay own)."""
    online = [p.detach() for m in (self.backbone, self.projector) for p in m.parameters()]
    target = list(self.target_parameters())
    assert len(target) == len(online)
    # two multi-tensor kernels per step on a GPU rather than two per parameter
    torch._foreach_mul_(target, tau)
    torch._foreach_add_(target, online, alpha=1.0 - tau)


def byol_loss(p1, p2, z1, z2, kind: str):
  """'neg_cos': lightly's 0.5 * (-cos(p1, z2) - cos(p2, z1)); 'byol': the paper's sum of
  the two 2 - 2cos terms (4x the gradient)."""
  c12 = F.cosine_similarity(p1, z2.detach(), dim=-1).mean()
  c21 = F.cosine_similarity(p2, z1.detach(), dim=-1).mean()
  if kind == 'neg_cos':
    return -0.5 * (c12 + c21)
  return (2 - 2 * c12) + (2 - 2 * c21)


# ------------------------------------------------------------------------------------------
# Augmentations on the device, one random draw per image.
# ------------------------------------------------------------------------------------------


def crop_boxes(n: int, height: int, width: int, gen: torch.Generator, device,
               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
  """RandomResizedCrop.get_params for n images at once: int64 [n, 4] = (top, left, h, w)."""
  area = height * width
  u = torch.rand(n, attempts, 4, generator=gen, device=device)
  target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
  log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
  aspect = torch.exp(log_r)
  w = torch.round(torch.sqrt(target * aspect)).long()
  h = torch.round(torch.sqrt(target / aspect)).long()
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = torch.argmax(ok.int(), dim=1)
  rows = torch.arange(n, device=device)
  h, w = h[rows, first], w[rows, first]
  top = torch.floor(u[rows, first, 2] * (height - h + 1)).long()
  left = torch.floor(u[rows, first, 3] * (width - w + 1)).long()
  # Fallback (no attempt fitted): the centre crop with the aspect ratio clamped.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    fw, fh = width, round(width / ratio[0])
  elif in_ratio > ratio[1]:
    fw, fh = round(height * ratio[1]), height
  else:
    fw, fh = width, height
  any_ok = ok.any(dim=1)
  fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], device=device)
  boxes = torch.stack([top, left, h, w], dim=1)
  return torch.where(any_ok[:, None], boxes, fallback)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
  """Bilinear resample of each box to size x size (align_corners=False, clamped to the box),
  as F.interpolate of the cropped tensor. images float [n, 3, H, W]."""
  n = images.shape[0]
  out = torch.arange(size, device=images.device, dtype=torch.float32) + 0.5

  def coords(start, length):
    pos = (out[None] * length[:, None].float() / size - 0.5).clamp(min=0)
    lo = torch.minimum(pos.floor().long(), length[:, None] - 1)
    hi = torch.minimum(lo + 1, length[:, None] - 1)
    frac = (pos - lo.float()).clamp(0, 1)
    return start[:, None] + lo, start[:, None] + hi, frac

  y0, y1, fy = coords(boxes[:, 0], boxes[:, 2])
  x0, x1, fx = coords(boxes[:, 1], boxes[:, 3])
  idx = torch.arange(n, device=images.device)[:, None, None]

  def gather(ys, xs):  # [n, size, size, 3] -> [n, 3, size, size]
    return images.permute(0, 2, 3, 1)[idx, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)

  fy, fx = fy[:, None, :, None], fx[:, None, None, :]
  top = gather(y0, x0) * (1 - fx) + gather(y0, x1) * fx
  bottom = gather(y1, x0) * (1 - fx) + gather(y1, x1) * fx
  return top * (1 - fy) + bottom * fy


def grayscale(x: torch.Tensor) -> torch.Tensor:
  w = torch.tensor(GRAY, device=x.device, dtype=x.dtype)[None, :, None, None]
  return (x * w).sum(dim=1, keepdim=True)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
  r, g, b = x.unbind(dim=1)
  maxc, _ = x.max(dim=1)
  minc, _ = x.min(dim=1)
  delta = maxc - minc
  safe = torch.where(delta > 0, delta, torch.ones_like(delta))
  h = torch.where(maxc == r, torch.remainder((g - b) / safe, 6.0),
                  torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
  h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
  s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)),
                  torch.zeros_like(maxc))
  return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
  h, s, v = x.unbind(dim=1)
  i = torch.floor(h * 6.0)
  f = h * 6.0 - i
  i = i.long() % 6
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  table = torch.stack([torch.stack(c, dim=0) for c in
                       ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))], dim=0)
  # table [3 channels, 6 sextants, n, H, W]; pick the sextant i per pixel.
  return torch.gather(table, 1, i[None, None].expand(3, 1, *i.shape)).squeeze(1).permute(1, 0, 2, 3)


def adjust_hue(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
  hsv = rgb_to_hsv(x)
  hue = torch.remainder(hsv[:, 0] + delta[:, None, None], 1.0)
  return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))


def scale_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
  return (x * _per_image(f)).clamp(0, 1)


def blend_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
  """Blend with the mean of the grayscale image (torchvision's adjust_contrast)."""
  mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
  return (_per_image(f) * x + (1 - _per_image(f)) * mean).clamp(0, 1)


def blend_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
  """Blend with the grayscale image (torchvision's adjust_saturation)."""
  return (_per_image(f) * x + (1 - _per_image(f)) * grayscale(x)).clamp(0, 1)


def _per_image(v: torch.Tensor) -> torch.Tensor:
  return v[:, None, None, None]


def jitter_draw(n: int, gen: torch.Generator, device, brightness: float, contrast: float,
                saturation: float, hue: float) -> tuple[list[torch.Tensor], torch.Tensor]:
  """Per image: the four ops' factors (brightness, contrast, saturation, hue) and an order."""
  u = torch.rand(n, 8, generator=gen, device=device)
  factors = [1 + brightness * (2 * u[:, 0] - 1), 1 + contrast * (2 * u[:, 1] - 1),
             1 + saturation * (2 * u[:, 2] - 1), hue * (2 * u[:, 3] - 1)]
  return factors, torch.argsort(u[:, 4:], dim=1)


JITTER_OPS = (scale_brightness, blend_contrast, blend_saturation, adjust_hue)


def color_jitter(x: torch.Tensor, gen: torch.Generator, brightness: float, contrast: float,
                 saturation: float, hue: float) -> torch.Tensor:
  """torchvision's ColorJitter per image: factors and the order of the four ops drawn per
  image; each op clamps to [0, 1] (hue keeps values there)."""
  factors, order = jitter_draw(x.shape[0], gen, x.device, brightness, contrast, saturation, hue)
  return apply_jitter(x, factors, order)


def apply_jitter(x: torch.Tensor, factors: list[torch.Tensor], order: torch.Tensor
                 ) -> torch.Tensor:
  for slot in range(4):
    op = _per_image(order[:, slot])
    x = sum(torch.where(op == k, fn(x, f), torch.zeros_like(x))
            for k, (fn, f) in enumerate(zip(JITTER_OPS, factors, strict=True)))
  return x


def draw_view(images: torch.Tensor, gen: torch.Generator, cfg: dict) -> tuple:
  """Every random choice of one view of a batch: crop boxes, flip/jitter/grayscale/solarise
  uniforms, jitter factors and orders (drawn apart from `apply_view`, which is pure)."""
  n, height, width = images.shape[:3]
  boxes = crop_boxes(n, height, width, gen, images.device)
  u = torch.rand(n, 4, generator=gen, device=images.device)
  factors, order = jitter_draw(n, gen, images.device, 0.4, 0.4, cfg['saturation'], 0.1)
  return boxes, u, *factors, order


def apply_view(images: torch.Tensor, boxes: torch.Tensor, u: torch.Tensor,
               brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
               hue: torch.Tensor, order: torch.Tensor, size: int, solarize_prob: float,
               normalize: str = 'cifar') -> torch.Tensor:
  """One view of uint8 [n, H, W, 3] images from its draws: float [n, 3, size, size],
  normalised. Crop, flip (p 0.5), jitter (p 0.8), grayscale (p 0.2), solarise."""
  x = resized_crops(images.permute(0, 3, 1, 2).float() / 255.0, boxes, size)
  x = torch.where(_per_image(u[:, 0] < 0.5), x.flip(3), x)
  jittered = apply_jitter(x, [brightness, contrast, saturation, hue], order)
  x = torch.where(_per_image(u[:, 1] < 0.8), jittered, x)
  x = torch.where(_per_image(u[:, 2] < 0.2), grayscale(x).expand_as(x), x)
  if solarize_prob > 0:
    x = torch.where(_per_image(u[:, 3] < solarize_prob), torch.where(x >= 0.5, 1 - x, x), x)
  return normalise(x, normalize)


def augment(images: torch.Tensor, gen: torch.Generator, size: int, cfg: dict,
            solarize_prob: float, view_fn=apply_view) -> torch.Tensor:
  """One view of a batch; view_fn may be a torch.compile'd apply_view (same values)."""
  return view_fn(images, *draw_view(images, gen, cfg), size=size, solarize_prob=solarize_prob,
                 normalize=cfg['normalize'])


def normalise(x: torch.Tensor, kind: str = 'cifar') -> torch.Tensor:
  mean, std = (torch.tensor(v, device=x.device)[None, :, None, None] for v in NORMALIZE[kind])
  return (x - mean) / std


# ------------------------------------------------------------------------------------------
# Optimisers, schedules, kNN.
# ------------------------------------------------------------------------------------------


class LARS(torch.optim.Optimizer):
  """solo-learn's LARS: d = g + wd * w, scaled by trust * |w| / |d| (clipped so the step
  never exceeds SGD's: min(ratio / lr, 1)), then momentum and LR. Biases and BN parameters
  (1-D) get neither weight decay nor the trust ratio."""

  def __init__(self, params, lr: float, momentum: float, weight_decay: float, trust: float):
    super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                  trust=trust))

  @torch.no_grad()
  def step(self):
    for group in self.param_groups:
      for p in group['params']:
        if p.grad is None:
          continue
        d = p.grad
        if p.ndim > 1:
          d = d.add(p, alpha=group['weight_decay'])
          w_norm, d_norm = torch.norm(p), torch.norm(d)
          ratio = torch.where((w_norm > 0) & (d_norm > 0),
                              group['trust'] * w_norm / d_norm.clamp(min=1e-12),
                              torch.ones_like(w_norm))
          d = d * torch.clamp(ratio / group['lr'], max=1.0)
        buf = self.state[p].setdefault('momentum', torch.zeros_like(p))
        buf.mul_(group['momentum']).add_(d)
        p.add_(buf, alpha=-group['lr'])


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
  if step < warmup:
    return peak * step / max(warmup, 1)
  progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
  return 0.5 * peak * (1 + math.cos(math.pi * progress))


def tau_at(step: int, base: float, total: int, schedule: str) -> float:
  if schedule == 'constant':
    return base
  return 1 - (1 - base) * (math.cos(math.pi * min(step / max(total, 1), 1.0)) + 1) / 2


@torch.no_grad()
def features(backbone: nn.Module, images: np.ndarray, device, batch: int = 1024,
             normalize: str = 'cifar') -> torch.Tensor:
  """Backbone features of un-augmented images, inference-mode BN, L2-normalised."""
  backbone.eval()
  out = []
  for i in range(0, len(images), batch):
    x = torch.from_numpy(images[i:i + batch]).to(device).permute(0, 3, 1, 2).float() / 255.0
    out.append(F.normalize(backbone(normalise(x, normalize)).float(), dim=1))
  backbone.train()
  return torch.cat(out)


@torch.no_grad()
def recalibrated(backbone: nn.Module, images: np.ndarray, device, normalize: str = 'cifar',
                 max_images: int = 10_000, batch: int = 1000, seed: int = 0) -> nn.Module:
  """A copy of backbone whose BN running statistics are re-estimated on training images.

  Why: an untrained network's running statistics are PyTorch's initial mean 0 / variance 1,
  which describe none of its layers, so its kNN measures that artefact. byol_jax evaluates
  the encoder at initialisation after the same re-estimation (precise BN: one pass in
  training mode over a seeded sample of up to 10,000 training images, the per-batch means
  and variances averaged), so the two initial figures compare. The copy leaves the model's
  own statistics, and so its training, untouched."""
  backbone = copy.deepcopy(backbone)
  bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
  for m in bns:
    m.reset_running_stats()
    m.momentum = None  # cumulative average over the batches
  n = min(len(images), max_images)
  batch = min(batch, n)
  rows = np.sort(np.random.default_rng(seed).permutation(len(images))[:n - n % batch])
  backbone.train()
  for i in range(0, len(rows), batch):
    x = torch.from_numpy(images[rows[i:i + batch]]).to(device).permute(0, 3, 1, 2).float()
    backbone(normalise(x / 255.0, normalize))
  return backbone


@torch.no_grad()
def knn_top1(train_f, train_y, test_f, test_y, num_classes: int, k: int = 200,
             temperature: float = 0.1) -> float:
  """Weighted kNN (Wu et al. 2018): top-k cosine neighbours vote exp(sim / t)."""
  k = min(k, train_f.shape[0])
  correct = 0
  for i in range(0, test_f.shape[0], 1024):
    sims, idx = (test_f[i:i + 1024] @ train_f.T).topk(k, dim=1)
    scores = torch.zeros(sims.shape[0], num_classes, device=sims.device)
    scores.scatter_add_(1, train_y[idx], torch.exp(sims / temperature))
    correct += (scores.argmax(1) == test_y[i:i + 1024]).sum().item()
  return correct / test_f.shape[0]


# ------------------------------------------------------------------------------------------
# Training.
# ------------------------------------------------------------------------------------------


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--data', required=True, help='image folder root: <root>/{train,test}/<class>/')
  p.add_argument('--workdir', required=True)
  p.add_argument('--preset', choices=sorted(PRESETS), default='lightly')
  p.add_argument('--epochs', type=float, default=100)
  p.add_argument('--batch_size', type=int, default=512)
  p.add_argument('--eval_every_epochs', type=float, default=10)
  p.add_argument('--log_every_steps', type=int, default=50)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--precision', choices=('float32', 'bfloat16'), default='float32',
                 help='bfloat16: autocast on CUDA (parameters, BN and loss stay float32)')
  p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
  p.add_argument('--timeout_s', type=float, default=0, help='stop training after this long')
  p.add_argument('--threads', type=int, default=0, help='CPU threads (0: torch default)')
  p.add_argument('--compile', action='store_true',
                 help='torch.compile the augmentation (fuses its ~750 small ops per view on '
                      'a GPU; falls back to eager if compiling fails)')
  choices = dict(optimizer=('sgd', 'lars'), tau_schedule=('constant', 'cosine'),
                 loss=('neg_cos', 'byol'), normalize=tuple(NORMALIZE))
  for key, value in PRESETS['lightly'].items():  # every preset value; unset = the preset's
    kind = {bool: _boolean, int: int, float: float, str: str}[type(value)]
    p.add_argument(f'--{key}', type=kind, default=None, choices=choices.get(key))
  args = p.parse_args(argv)
  cfg = dict(PRESETS[args.preset])
  cfg.update({k: getattr(args, k) for k in cfg if getattr(args, k) is not None})
  return args, cfg


def _boolean(text: str) -> bool:
  if text.lower() not in ('1', '0', 'true', 'false', 'yes', 'no'):
    raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')
  return text.lower() in ('1', 'true', 'yes')


def make_optimizer(cfg: dict, params: list, lr: float) -> torch.optim.Optimizer:
  if cfg['optimizer'] == 'sgd':  # PyTorch's SGD: weight decay on every parameter
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg['weight_decay'])
  return LARS(params, lr=lr, momentum=0.9, weight_decay=cfg['weight_decay'], trust=cfg['trust'])


def byol_step(model: BYOL, opt: torch.optim.Optimizer, v1: torch.Tensor, v2: torch.Tensor,
              lr: float, tau: float, loss_kind: str, autocast,
              ema_first: bool = False) -> torch.Tensor:
  """One update: online on both views, target on both, the loss, the optimiser, the EMA
  (ema_first: the EMA before the forward pass, as lightly's training_step does)."""
  for group in opt.param_groups:
    group['lr'] = lr
  if ema_first:
    model.update_target(tau)
  if v1.is_cuda:
    v1 = v1.contiguous(memory_format=torch.channels_last)
    v2 = v2.contiguous(memory_format=torch.channels_last)
  with autocast or contextlib.nullcontext():
    p1, p2 = model.online(v1), model.online(v2)
    z1, z2 = model.target(v1), model.target(v2)
  loss = byol_loss(p1.float(), p2.float(), z1.float(), z2.float(), loss_kind)
  opt.zero_grad(set_to_none=True)
  loss.backward()
  opt.step()
  if not ema_first:
    model.update_target(tau)
  return loss


def peak_lr(cfg: dict, batch: int) -> float:
  """The linear scaling rule of the preset's source: base_lr * batch / lr_batch."""
  return cfg['base_lr'] * batch / cfg['lr_batch']


def _two_views(batch, gen, size, cfg, view_fn):
  """The two views; if a compiled view_fn fails (first call), says so and goes on eager."""
  try:
    return (augment(batch, gen, size, cfg, 0.0, view_fn),
            augment(batch, gen, size, cfg, cfg['solarize2'], view_fn), view_fn)
  except Exception as error:  # torch.compile raises many types; eager is the same maths
    if view_fn is apply_view:
      raise
    print(f'torch.compile failed ({type(error).__name__}: {str(error)[:200]}); eager from '
          'here', flush=True)
    return _two_views(batch, gen, size, cfg, apply_view)


def _append(path: str, record: dict) -> None:
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')


def train(argv: list[str] | None = None) -> dict:
  args, cfg = parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  device = torch.device(args.device)
  metrics = os.path.join(args.workdir, 'metrics')
  os.makedirs(metrics, exist_ok=True)
  for name in ('eval.jsonl', 'train.jsonl'):
    if os.path.exists(os.path.join(metrics, name)):
      os.remove(os.path.join(metrics, name))
  with open(os.path.join(args.workdir, 'config.json'), 'w') as f:
    json.dump(dict(vars(args), **cfg, implementation='torch_reference'), f, indent=1)

  t0 = time.time()
  train_x, train_y, classes = load_split(args.data, 'train')
  test_x, test_y, _ = load_split(args.data, 'test', classes)
  print(f'{len(train_x)} train / {len(test_x)} test images, {len(classes)} classes, '
        f'loaded in {time.time() - t0:.1f} s; config {cfg}', flush=True)
  size = train_x.shape[1]
  images = torch.from_numpy(train_x).to(device)
  train_labels = torch.from_numpy(train_y).to(device)
  test_labels = torch.from_numpy(test_y).to(device)

  model = BYOL(cfg['depth'], cfg['width'], cfg['cifar_stem'], cfg['hidden'],
               cfg['proj_dim'], cfg['stem_relu']).to(device)
  if device.type == 'cuda':
    model = model.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True
  steps_per_epoch = len(train_x) // args.batch_size
  total = int(round(args.epochs * steps_per_epoch))
  warmup = int(round(cfg['warmup_epochs'] * steps_per_epoch))
  peak = peak_lr(cfg, args.batch_size)
  opt = make_optimizer(cfg, list(model.online_parameters()), peak)
  gen = torch.Generator(device=device)
  gen.manual_seed(args.seed)
  autocast = (torch.autocast('cuda', dtype=torch.bfloat16)
              if args.precision == 'bfloat16' and device.type == 'cuda' else None)

  view_fn = torch.compile(apply_view, dynamic=False) if args.compile else apply_view

  def evaluate(backbone: nn.Module) -> float:
    return knn_top1(features(backbone, train_x, device, normalize=cfg['normalize']),
                    train_labels,
                    features(backbone, test_x, device, normalize=cfg['normalize']),
                    test_labels, len(classes))

  init_acc = evaluate(recalibrated(model.backbone, train_x, device, cfg['normalize']))
  print(f'kNN top-1 of the encoder at initialisation: {init_acc:.4f}', flush=True)
  eval_every = max(1, int(round(args.eval_every_epochs * steps_per_epoch)))
  start, last_log, last_log_step = time.time(), time.time(), 0
  result = dict(knn_top1_init=init_acc)
  step = 0
  while step < total:
    perm = torch.randperm(len(train_x), generator=gen, device=device)
    for b in range(steps_per_epoch):
      if step >= total:
        break
      batch = images[perm[b * args.batch_size:(b + 1) * args.batch_size]]
      # lr_per_epoch: the LR held through each epoch at its first step's value
      lr = lr_at(step - step % steps_per_epoch if cfg['lr_per_epoch'] else step, peak, warmup,
                 total)
      tau = tau_at(step, cfg['tau'], total, cfg['tau_schedule'])
      with torch.no_grad():
        v1, v2, view_fn = _two_views(batch, gen, size, cfg, view_fn)
      loss = byol_step(model, opt, v1, v2, lr, tau, cfg['loss'], autocast, cfg['ema_first'])
      step += 1
      if step % args.log_every_steps == 0 or step == total:
        loss_value = loss.item()  # syncs
        now = time.time()
        rate = (step - last_log_step) * args.batch_size / (now - last_log)
        last_log, last_log_step = now, step
        _append(os.path.join(metrics, 'train.jsonl'), dict(
          step=step, loss=loss_value, lr=lr, tau=tau, images_per_sec=rate,
          epoch=step / steps_per_epoch))
        print(f'step {step}/{total} loss {loss_value:.4f} lr {lr:.4f} tau {tau:.5f} '
              f'{rate:.0f} img/s', flush=True)
        if not math.isfinite(loss_value):
          raise SystemExit(f'error: loss is {loss_value} at step {step}')
      timed_out = args.timeout_s and time.time() - start > args.timeout_s
      if step % eval_every == 0 or step == total or timed_out:
        acc = evaluate(model.backbone)
        record = dict(step=step, knn_top1=acc, knn_top1_init=init_acc,
                      epoch=step / steps_per_epoch, network='online', split='test',
                      protocol='knn', implementation='torch_reference',
                      elapsed_sec=time.time() - start)
        _append(os.path.join(metrics, 'eval.jsonl'), record)
        print(f'epoch {step / steps_per_epoch:.1f}: kNN top-1 {acc:.4f}', flush=True)
        result = dict(record)
        last_log, last_log_step = time.time(), step  # evaluating is not training throughput
      if timed_out:
        print(f'stopped after {args.timeout_s} s at step {step} of {total}', flush=True)
        return result
  return result


if __name__ == '__main__':
  train(sys.argv[1:])
  sys.exit(0)
