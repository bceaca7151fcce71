"""Benchmark of the tf.data two-view training stream on ImageNet-sized JPEGs.

Why: CPU-side decoding and cropping is the usual bottleneck of two-view training, so this
measures what one host delivers. It writes N synthetic JPEGs (about 500x375, smooth random
content, quality 90, like a typical ImageNet photo) into a temporary image folder, builds
`input_pipeline.train_stream` with 224 px views, warms up, times M batches and prints one line
with images/s in total and per core (os.cpu_count()), and images per CPU-second used by this
process, which stays meaningful when other jobs share the machine.

  python experiments/bench_input_pipeline.py --num_images=256 --batch_size=64 --steps=20
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from byol_jax import datasets, input_pipeline  # noqa: E402


def _crop_config():
  """The augmentation config of the device path (crop fields are all this script needs)."""
  try:
    from byol_jax import augment
    return augment.default_augment_config()
  except ImportError:
    import ml_collections
    return ml_collections.ConfigDict(dict(crop_area_min=0.08, crop_area_max=1.0,
                                          crop_aspect_min=3 / 4, crop_aspect_max=4 / 3))


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """Random low-frequency colour field plus mild noise: compresses like a photo."""
  coarse = rng.uniform(0, 255, (height // 25 + 2, width // 25 + 2, 3)).astype(np.uint8)
  img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
  noisy = np.asarray(img, np.float32) + rng.normal(0, 6, (height, width, 3))
  return np.clip(noisy, 0, 255).astype(np.uint8)


def write_jpegs(root: str, num_images: int, seed: int = 0) -> None:
  """Writes num_images JPEGs into root/train/<class>/ (4 classes), sizes near 500x375."""
  rng = np.random.default_rng(seed)
  for i in range(num_images):
    class_dir = os.path.join(root, 'train', f'class_{i % 4}')
    os.makedirs(class_dir, exist_ok=True)
    width, height = (500, 375) if i % 3 else (375, 500)
    width += int(rng.integers(-40, 40))
    image = Image.fromarray(smooth_image(rng, height, width))
    image.save(os.path.join(class_dir, f'{i:05d}.jpg'), quality=90)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_images', type=int, default=256)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--steps', type=int, default=20, help='timed batches')
  parser.add_argument('--warmup', type=int, default=3, help='untimed batches first')
  parser.add_argument('--threads', type=int, default=0, help='tf.data threads (0: default)')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--antialias', action='store_true', help='antialiased bicubic resize')
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  with tempfile.TemporaryDirectory(prefix='byol_bench_') as root:
    t0 = time.perf_counter()
    write_jpegs(root, args.num_images)
    print(f'wrote {args.num_images} JPEGs in {time.perf_counter() - t0:.1f} s', flush=True)
    stream = input_pipeline.train_stream(
      datasets.parse_dataset(f'folder:{root}'), batch_size_per_process=args.batch_size,
      image_size=args.image_size, aug_cfg=_crop_config(), split='trainval',
      threads=args.threads or None, antialias=args.antialias)
    for _ in range(args.warmup):
      next(stream)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
      next(stream)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    del stream  # Stop prefetching before the folder is deleted.
  images = args.steps * args.batch_size
  cores = os.cpu_count() or 1
  print(f'{images / wall:.1f} images/s total, {images / wall / cores:.1f} per core '
        f'({cores} cores); {images / cpu:.1f} images per CPU-second of this process '
        f'(two {args.image_size} px views each; {vars(args)})')

if __name__ == '__main__':
  main()
