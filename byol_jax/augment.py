"""BYOL's two-view image augmentations, written in JAX so they run on the accelerator.

CPU augmentation is the usual bottleneck of two-view training, so everything here is on-device
float32 code that works per image and is vmapped over the batch, with one PRNG key per image.
TensorFlow is deliberately not imported: the accelerator machines do not have it (the tests use
it as an independent reference for the colour ops).

`default_augment_config` is the single table of augmentation parameters (paper, section 3.3 and
appendix B); configs derive from it instead of repeating numbers.

Design choices:
- Random-resized crops use continuous (sub-pixel) boxes and an antialiased bicubic resample, so
  the crop works with traced boxes and never needs rounding. When none of the candidate boxes
  fits, the fallback is torchvision's: a centre crop whose aspect ratio is clamped to the range.
- Gaussian blur pads with zeros by default (the 'SAME' depthwise convolution of the released
  BYOL/SimCLR code); 'reflect' (torchvision's choice) is available through `gaussian_blur`.
- Colour jitter applies brightness, contrast, saturation and hue in a random order. Under vmap
  a `lax.switch` evaluates every branch at every step, so the order is laid out statically
  instead: contrast (a per-image reduction, slow on GPUs) and hue (the HSV maths) are
  evaluated at two pivot slots only; brightness and saturation (cheap elementwise ops) fill
  the gaps before, between and after them. Saturation is done in RGB (exactly equivalent to
  scaling S in HSV and clipping it).
- `jitter_style` picks the colour ops' definitions: 'tf' (the release's tf.image ops, the
  default) or 'torchvision' (ColorJitter's, which the PyTorch CIFAR-10 recipes use; milder on
  dark images, see JITTER_STYLES).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections

from byol_jax import config_compat

Array = jax.Array

# tf.image.rgb_to_grayscale's luma weights.
GRAYSCALE_WEIGHTS = (0.2989, 0.5870, 0.1140)

# Names of the colour-jitter ops; an order is a permutation of their indices.
JITTER_OPS = ('brightness', 'contrast', 'saturation', 'hue')
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)


def default_augment_config() -> ml_collections.ConfigDict:
  """Returns BYOL's augmentation parameters, the one place where these numbers live."""
  return ml_collections.ConfigDict(
      dict(
          crop_area_min=0.08,
          crop_area_max=1.0,
          crop_aspect_min=3 / 4,
          crop_aspect_max=4 / 3,
          flip_prob=0.5,
          color_jitter_prob=0.8,
          brightness=0.4,
          jitter_style='tf',  # Or 'torchvision'; see JITTER_STYLES.
          contrast=0.4,
          saturation=0.2,
          hue=0.1,
          grayscale_prob=0.2,
          blur=True,  # Master switch; small-image presets turn blur off.
          blur_sigma_min=0.1,
          blur_sigma_max=2.0,
          blur_kernel_fraction=0.1,
          view1=ml_collections.ConfigDict(dict(blur_prob=1.0, solarize_prob=0.0)),
          view2=ml_collections.ConfigDict(dict(blur_prob=0.1, solarize_prob=0.2)),
          mean=(0.485, 0.456, 0.406),
          std=(0.229, 0.224, 0.225),
      )
  )


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one line) for augmentation values that would fail deep inside the
  traced step (a traceback wall) or silently produce other views than asked for."""
  def need(ok: bool, what: str) -> None:
    if not ok:
      raise ValueError(f'augment.{what}')

  style = config_compat.setting(cfg, 'augment.jitter_style')
  need(style in JITTER_STYLES, f'jitter_style={style!r}; valid: {", ".join(JITTER_STYLES)}')
  need(0 < cfg.crop_area_min <= cfg.crop_area_max <= 1,
       f'crop_area_min={cfg.crop_area_min} and crop_area_max={cfg.crop_area_max} must satisfy '
       '0 < min <= max <= 1 (fractions of the image area)')
  need(0 < cfg.crop_aspect_min <= cfg.crop_aspect_max,
       f'crop_aspect_min={cfg.crop_aspect_min} and crop_aspect_max={cfg.crop_aspect_max} must '
       'satisfy 0 < min <= max')
  probabilities = {name: cfg[name] for name in ('flip_prob', 'color_jitter_prob',
                                                'grayscale_prob')}
  for view in ('view1', 'view2'):
    probabilities.update({f'{view}.{k}': v for k, v in cfg[view].items()})
  for name, p in probabilities.items():
    need(0 <= p <= 1, f'{name}={p} must be a probability in [0, 1]')
  for name in ('brightness', 'contrast', 'saturation'):
    need(cfg[name] >= 0, f'{name}={cfg[name]} must be >= 0')
  need(0 <= cfg.hue <= 0.5, f'hue={cfg.hue} must be in [0, 0.5] (a fraction of the hue circle)')
  need(0 < cfg.blur_sigma_min <= cfg.blur_sigma_max,
       f'blur_sigma_min={cfg.blur_sigma_min} and blur_sigma_max={cfg.blur_sigma_max} must '
       'satisfy 0 < min <= max')
  need(0 < cfg.blur_kernel_fraction <= 1,
       f'blur_kernel_fraction={cfg.blur_kernel_fraction} must be in (0, 1] (of the image side)')
  for name in ('mean', 'std'):
    need(len(cfg[name]) == 3, f'{name}={tuple(cfg[name])} must hold 3 numbers, one per RGB channel')
  need(all(s > 0 for s in cfg.std), f'std={tuple(cfg.std)} must be positive')


# ---------------------------------------------------------------------------------------------
# Random resized crop.
# ---------------------------------------------------------------------------------------------


def sample_crop_box(
    rng: Array, height: float, width: float, cfg: ml_collections.ConfigDict, num_attempts: int = 10
) -> Array:
  """Samples a random-resized-crop box (y0, x0, h, w) in continuous pixel coordinates.

  The candidates are drawn all at once (no loop) and the first that fits is kept, which gives the
  same distribution as torchvision's sequential rejection loop.
  """
  height = jnp.asarray(height, jnp.float32)
  width = jnp.asarray(width, jnp.float32)
  u = jax.random.uniform(rng, (4, num_attempts), jnp.float32)
  area = height * width * _lerp(cfg.crop_area_min, cfg.crop_area_max, u[0])
  log_aspect = _lerp(math.log(cfg.crop_aspect_min), math.log(cfg.crop_aspect_max), u[1])
  aspect = jnp.exp(log_aspect)
  w = jnp.sqrt(area * aspect)
  h = jnp.sqrt(area / aspect)
  fits = (h <= height) & (w <= width)
  first = jnp.argmax(fits)
  box = jnp.stack([u[2] * (height - h), u[3] * (width - w), h, w])[:, first]
  return jnp.where(fits.any(), box, _fallback_box(height, width, cfg))


def _lerp(lo: float, hi: float, u: Array) -> Array:
  """Maps uniforms in [0, 1) to [lo, hi)."""
  return lo + (hi - lo) * u


def _fallback_box(height: Array, width: Array, cfg: ml_collections.ConfigDict) -> Array:
  """Torchvision's fallback: the largest centred box whose aspect is clamped to the range."""
  aspect = jnp.clip(width / height, cfg.crop_aspect_min, cfg.crop_aspect_max)
  h = jnp.minimum(height, width / aspect)
  w = jnp.minimum(width, height * aspect)
  return jnp.stack([(height - h) / 2, (width - w) / 2, h, w])


def crop_and_resize(image: Array, box: Array, out_size: int) -> Array:
  """Resamples the box (y0, x0, h, w) of a float HWC image to out_size x out_size.

  Antialiased bicubic, via scale_and_translate, so the box may be traced and fractional. Cubic
  overshoot can leave values slightly outside [0, 1]; callers clip.
  """
  scale = out_size / box[2:]
  translation = -box[:2] * scale
  out_shape = (out_size, out_size, image.shape[-1])
  return jax.image.scale_and_translate(
      image, out_shape, (0, 1), scale, translation, method='cubic', antialias=True
  )


def centre_crop_box(height: int, width: int, crop_fraction: float) -> Array:
  """The eval crop: a centred square with side crop_fraction of the shorter image side."""
  side = crop_fraction * min(height, width)
  return jnp.array([(height - side) / 2, (width - side) / 2, side, side], jnp.float32)


# ---------------------------------------------------------------------------------------------
# Colour ops (single float HWC images in [0, 1]; the same maths as tf.image).
# ---------------------------------------------------------------------------------------------


def adjust_brightness(image: Array, delta: Array | float) -> Array:
  """Adds delta to every value, like tf.image.adjust_brightness (no clipping)."""
  return image + delta


def adjust_contrast(image: Array, factor: Array | float) -> Array:
  """Scales each channel about its spatial mean, like tf.image.adjust_contrast (no clipping)."""
  mean = spatial_mean(image)
  return (image - mean) * factor + mean


def spatial_mean(image: Array) -> Array:
  """Per-channel mean over the H and W axes of [..., H, W, C], shaped [..., 1, 1, C].

  On accelerators not jnp.mean over (H, W): with the 3 channels as the minor axis that is
  a column reduction, which XLA on GPU ran far below memory bandwidth (H200 profile,
  2026-11-26: about 1.5 ms per 256 images of 224 px, 18 of a ResNet-50 step's 125 ms for
  the jitter's contrast slots). `_masked_row_mean` makes C row reductions over contiguous
  memory instead. On CPU, where it measured 1.3x slower, the plain mean stays.
  """
  return jax.lax.platform_dependent(
      image, cpu=lambda x: jnp.mean(x, axis=(-3, -2), keepdims=True), default=_masked_row_mean)


def _masked_row_mean(image: Array) -> Array:
  """spatial_mean as one sum of the flattened image per channel, other channels masked."""
  *lead, height, width, channels = image.shape
  flat = image.reshape(*lead, height * width * channels)
  channel = jnp.arange(height * width * channels) % channels
  sums = [jnp.sum(jnp.where(channel == c, flat, 0.0), axis=-1) for c in range(channels)]
  return (jnp.stack(sums, axis=-1) / (height * width)).reshape(*lead, 1, 1, channels)


def adjust_saturation(image: Array, factor: Array | float) -> Array:
  """Scales HSV saturation and clips it to [0, 1], like tf.image.adjust_saturation.

  Done in RGB without an HSV round trip: with hue and value fixed, each channel is
  v - v * s * g(hue), so scaling s scales the distance of each channel from v = max(r, g, b).
  Clipping s' = s * factor to [0, 1] clips that scale to [0, v / (v - min)].
  """
  v = jnp.max(image, axis=-1, keepdims=True)
  chroma = v - jnp.min(image, axis=-1, keepdims=True)
  limit = v / jnp.maximum(chroma, jnp.finfo(jnp.float32).tiny)
  scale = jnp.clip(factor, 0.0, limit)
  return v - scale * (v - image)


def scale_brightness(image: Array, factor: Array | float) -> Array:
  """Scales every value, like torchvision's adjust_brightness before its clamp."""
  return image * factor


def blend_contrast(image: Array, factor: Array | float) -> Array:
  """Scales about the grayscale image's mean, like torchvision's adjust_contrast (no clamp)."""
  mean = jnp.mean(rgb_to_grayscale(image), axis=(-3, -2, -1), keepdims=True)
  return mean + factor * (image - mean)


def blend_saturation(image: Array, factor: Array | float) -> Array:
  """Scales about the pixel's grayscale value, like torchvision's adjust_saturation (no clamp)."""
  gray = rgb_to_grayscale(image)
  return gray + factor * (image - gray)


def adjust_hue(image: Array, delta: Array | float) -> Array:
  """Rotates the HSV hue by delta (in turns), like tf.image.adjust_hue."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  v = jnp.max(image, axis=-1)
  chroma = v - jnp.min(image, axis=-1)
  safe = jnp.where(chroma > 0, chroma, 1.0)
  # Hue in sextants, [0, 6) up to the modulo below.
  hue = jnp.where(
      v == r, (g - b) / safe, jnp.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
  )
  hue = hue + 6.0 * delta
  # HSV -> RGB: channel n (5 for red, 3 for green, 1 for blue) is v - chroma * f(k).
  k = jnp.mod(jnp.array([5.0, 3.0, 1.0]) + hue[..., None], 6.0)
  return v[..., None] - chroma[..., None] * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def rgb_to_grayscale(image: Array) -> Array:
  """Luma with tf.image.rgb_to_grayscale's weights; returns [..., 1] like TensorFlow.

  A sum over the channel axis rather than a dot with the weights: on GPUs XLA sends the dot
  to a matrix unit that rounds float32 to TF32 and cannot fuse it with the jitter around it.
  """
  return jnp.sum(image * jnp.array(GRAYSCALE_WEIGHTS, image.dtype), axis=-1, keepdims=True)


def solarize(image: Array, threshold: float = 0.5) -> Array:
  """Inverts the values at or above threshold (BYOL's solarisation)."""
  return jnp.where(image >= threshold, 1.0 - image, image)


# ---------------------------------------------------------------------------------------------
# Gaussian blur.
# ---------------------------------------------------------------------------------------------


def blur_kernel_size(image_size: int, cfg: ml_collections.ConfigDict) -> int:
  """Kernel side 2 * int(image_size * fraction / 2) + 1, the release's (224 -> 23, 96 -> 9,
  32 -> 3): its kernel is image_size / 10 px, and its blur takes a radius of half that,
  truncated."""
  return 2 * int(image_size * cfg.blur_kernel_fraction / 2) + 1


def gaussian_blur(
    image: Array, sigma: Array | float, kernel_size: int, padding: str = 'zero'
) -> Array:
  """Separable Gaussian blur of a float HWC image with an odd kernel side.

  The taps are summed as shifted slices rather than a convolution: the sigma may differ per image
  under vmap (a batched conv kernel turns into a grouped conv), XLA fuses the sum into one pass,
  and it stays exact float32 (GPU convolutions may use TF32). padding: 'zero' matches the release
  ('SAME' convolution, which darkens borders slightly); 'reflect' matches torchvision.
  """
  if kernel_size % 2 != 1:
    raise ValueError(f'kernel_size must be odd, got {kernel_size}')
  if padding not in ('zero', 'reflect'):
    raise ValueError(f"padding must be 'zero' or 'reflect', got {padding!r}")
  radius = kernel_size // 2
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.exp(-0.5 * jnp.square(offsets / sigma))
  weights = weights / jnp.sum(weights)
  mode = 'constant' if padding == 'zero' else 'reflect'
  return _blur_axis(_blur_axis(image, weights, 0, mode), weights, 1, mode)


def _blur_axis(image: Array, weights: Array, axis: int, mode: str) -> Array:
  """1-D correlation of image with weights along axis, keeping the size."""
  radius = (weights.shape[0] - 1) // 2
  size = image.shape[axis]
  pad = [(0, 0)] * image.ndim
  pad[axis] = (radius, radius)
  padded = jnp.pad(image, pad, mode=mode)
  out = jnp.zeros_like(image)
  for tap in range(weights.shape[0]):
    out = out + weights[tap] * jax.lax.slice_in_dim(padded, tap, tap + size, axis=axis)
  return out


# ---------------------------------------------------------------------------------------------
# Colour jitter in a random order.
# ---------------------------------------------------------------------------------------------


# The (brightness, contrast, saturation) ops of each jitter style; hue is the same HSV
# rotation in both.
# - 'tf': the release's tf.image ops. Brightness adds U(-b, b); contrast scales each channel
#   about its own mean; saturation scales HSV saturation.
# - 'torchvision': ColorJitter's. Brightness scales by 1 + U(-b, b) (much milder on dark
#   images); contrast blends with the mean of the grayscale image; saturation blends with
#   the grayscale image.
_STYLE_OPS = {
    'tf': (adjust_brightness, adjust_contrast, adjust_saturation),
    'torchvision': (scale_brightness, blend_contrast, blend_saturation),
}
JITTER_STYLES = tuple(_STYLE_OPS)


def apply_color_jitter(
    image: Array,
    order: Array,
    brightness: Array | float,
    contrast: Array | float,
    saturation: Array | float,
    hue: Array | float,
    style: str = 'tf',
) -> Array:
  """Applies the four jitter ops in `order` (indices into JITTER_OPS), clipping after each.

  brightness is the added delta ('tf') or the factor ('torchvision'); contrast and saturation
  are factors; hue is the rotation in turns. Equivalent to a loop over the order, but laid out
  for vmap, where a data-dependent choice evaluates every candidate: contrast and hue fill two
  pivot slots (each evaluates both), and brightness and saturation, which are cheap, get a
  slot each in the three gaps around the pivots. So each image costs two contrast means, not
  one per slot. Hue leaves values in [0, 1], so no clip follows it.
  """
  if style not in _STYLE_OPS:
    raise ValueError(f'jitter_style={style!r}; valid: {", ".join(JITTER_STYLES)}')
  adjust_b, adjust_c, adjust_s = _STYLE_OPS[style]
  place = jnp.argsort(jnp.asarray(order))  # place[op]: where op comes in the order.
  first_pivot = jnp.where(place[_CONTRAST] < place[_HUE], _CONTRAST, _HUE)
  pivots = (first_pivot, _CONTRAST + _HUE - first_pivot)
  first_cheap = jnp.where(place[_BRIGHTNESS] < place[_SATURATION], _BRIGHTNESS, _SATURATION)
  cheap_ops = (first_cheap, _BRIGHTNESS + _SATURATION - first_cheap)
  # The gap (0: before both pivots, 1: between, 2: after) each cheap op falls in.
  gaps = [(place[op] > place[_CONTRAST]).astype(jnp.int32) + (place[op] > place[_HUE])
          for op in cheap_ops]
  for gap in range(3):
    if gap:
      pivot = pivots[gap - 1]
      image = jnp.where(pivot == _CONTRAST, jnp.clip(adjust_c(image, contrast), 0.0, 1.0),
                        adjust_hue(image, hue))
    for op, op_gap in zip(cheap_ops, gaps, strict=True):
      cheap = jnp.where(op == _BRIGHTNESS, adjust_b(image, brightness),
                        adjust_s(image, saturation))
      image = jnp.where(op_gap == gap, jnp.clip(cheap, 0.0, 1.0), image)
  return image


# ---------------------------------------------------------------------------------------------
# One view, then batches.
# ---------------------------------------------------------------------------------------------

# Layout of the uniforms drawn once per view (one PRNG call instead of a dozen).
_U_FLIP, _U_JITTER, _U_GRAY, _U_BLUR, _U_SIGMA, _U_SOLARIZE = range(6)
_U_PARAMS = slice(6, 10)  # Brightness, contrast, saturation, hue.
_U_ORDER = slice(10, 14)  # Argsort of these is a uniform random permutation.
_NUM_UNIFORMS = 14


def normalize(image: Array, cfg: ml_collections.ConfigDict) -> Array:
  """Standardises [0, 1] images with the configured per-channel mean and std."""
  mean = jnp.array(cfg.mean, jnp.float32)
  std = jnp.array(cfg.std, jnp.float32)
  return (image - mean) / std


def augment_view(
    rng: Array, image: Array, cfg: ml_collections.ConfigDict, view_cfg: ml_collections.ConfigDict
) -> Array:
  """Flip, colour jitter, grayscale, blur and solarise one float HWC crop, then normalise.

  Random choices are jnp.where blends (vmap evaluates both sides of a cond anyway); ops whose
  probability is statically zero are not traced at all.
  """
  u = jax.random.uniform(rng, (_NUM_UNIFORMS,), jnp.float32)
  image = jnp.clip(image, 0.0, 1.0)
  if cfg.flip_prob > 0:
    image = jnp.where(u[_U_FLIP] < cfg.flip_prob, image[:, ::-1], image)
  if cfg.color_jitter_prob > 0:
    image = jnp.where(u[_U_JITTER] < cfg.color_jitter_prob, _random_jitter(image, u, cfg), image)
  if cfg.grayscale_prob > 0:
    gray = jnp.broadcast_to(rgb_to_grayscale(image), image.shape)
    image = jnp.where(u[_U_GRAY] < cfg.grayscale_prob, gray, image)
  if cfg.blur and view_cfg.blur_prob > 0:
    sigma = _lerp(cfg.blur_sigma_min, cfg.blur_sigma_max, u[_U_SIGMA])
    blurred = gaussian_blur(image, sigma, blur_kernel_size(image.shape[0], cfg))
    image = jnp.where(u[_U_BLUR] < view_cfg.blur_prob, blurred, image)
  if view_cfg.solarize_prob > 0:
    image = jnp.where(u[_U_SOLARIZE] < view_cfg.solarize_prob, solarize(image), image)
  return normalize(jnp.clip(image, 0.0, 1.0), cfg)


def _random_jitter(image: Array, u: Array, cfg: ml_collections.ConfigDict) -> Array:
  """Colour jitter with strengths from cfg, parameters and order taken from the uniforms u."""
  ub, uc, us, uh = 2.0 * u[_U_PARAMS] - 1.0  # Each in [-1, 1).
  style = config_compat.setting(cfg, 'augment.jitter_style')
  return apply_color_jitter(
      image,
      jnp.argsort(u[_U_ORDER]),
      brightness=cfg.brightness * ub + (1.0 if style == 'torchvision' else 0.0),
      contrast=1.0 + cfg.contrast * uc,
      saturation=1.0 + cfg.saturation * us,
      hue=cfg.hue * uh,
      style=style,
  )


def _to_float(images_uint8: Array) -> Array:
  """uint8 [0, 255] -> float32 [0, 1]."""
  return images_uint8.astype(jnp.float32) / 255.0


def make_views(
    rng: Array, images: Array, cfg: ml_collections.ConfigDict, out_size: int
) -> tuple[Array, Array]:
  """Two augmented views of uint8 images [B, H, W, 3], each float32 [B, out, out, 3], normalised.

  Each view gets its own random-resized crop of the source image, then its view ops.
  """
  height, width = images.shape[1:3]

  def one_image(key, image):
    k_crop1, k_crop2, k_view1, k_view2 = jax.random.split(key, 4)
    image = _to_float(image)
    views = []
    for k_crop, k_view, view_cfg in ((k_crop1, k_view1, cfg.view1), (k_crop2, k_view2, cfg.view2)):
      crop = crop_and_resize(image, sample_crop_box(k_crop, height, width, cfg), out_size)
      views.append(augment_view(k_view, crop, cfg, view_cfg))
    return tuple(views)

  return jax.vmap(one_image)(jax.random.split(rng, images.shape[0]), images)


def finish_views(
    rng: Array, crops: Array, cfg: ml_collections.ConfigDict
) -> tuple[Array, Array]:
  """Augments host-made uint8 crops [B, 2, S, S, 3] into two normalised float32 views.

  The streaming input path crops on the host; this does the rest (flip, colour, grayscale,
  blur, solarise, normalise) on the accelerator.
  """

  def one_image(key, pair):
    k_view1, k_view2 = jax.random.split(key)
    pair = _to_float(pair)
    return (
        augment_view(k_view1, pair[0], cfg, cfg.view1),
        augment_view(k_view2, pair[1], cfg, cfg.view2),
    )

  return jax.vmap(one_image)(jax.random.split(rng, crops.shape[0]), crops)


def eval_view(
    images: Array,
    out_size: int,
    crop_fraction: float = 0.875,
    cfg: ml_collections.ConfigDict | None = None,
) -> Array:
  """Eval preprocessing of uint8 [B, H, W, 3]: centre crop, bicubic resize, normalise."""
  cfg = default_augment_config() if cfg is None else cfg
  box = centre_crop_box(images.shape[1], images.shape[2], crop_fraction)
  resize = lambda image: crop_and_resize(_to_float(image), box, out_size)
  return normalize(jnp.clip(jax.vmap(resize)(images), 0.0, 1.0), cfg)
