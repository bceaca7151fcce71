"""Tests of dataset names, splits, folder scanning and whole-dataset decoding."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import prepare_fake_voc2007
from PIL import Image

from byol_jax import datasets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOUR = (200, 100, 30)
SIZE = (20, 16)  # Pillow (width, height).


def _shared_cifar10() -> str:
  shared = os.environ.get('BYOL_SHARED') or os.path.join(os.path.dirname(REPO), 'shared')
  return os.path.join(shared, 'datasets', 'cifar10', 'cifar10_jpeg_bytes.npz')


def write_mixed_images(class_dir) -> dict[str, tuple[int, int, int]]:
  """Writes one solid-colour image per awkward format; returns file name -> expected RGB."""
  os.makedirs(class_dir, exist_ok=True)
  rgb = Image.new('RGB', SIZE, COLOUR)
  rgb.save(os.path.join(class_dir, 'a_rgb.jpg'), quality=95)
  rgb.convert('L').save(os.path.join(class_dir, 'b_grey.JPG'), quality=95)
  rgb.convert('RGBA').save(os.path.join(class_dir, 'c_rgba.png'))
  rgb.convert('CMYK').save(os.path.join(class_dir, 'd_cmyk.jpeg'), quality=95)
  Image.fromarray(np.full(SIZE[::-1], 40000, np.uint16)).save(os.path.join(class_dir,
                                                                           'e_grey16.PNG'))
  rgb.convert('P').save(os.path.join(class_dir, 'f_palette.png'))
  grey = round(0.299 * COLOUR[0] + 0.587 * COLOUR[1] + 0.114 * COLOUR[2])
  return {'a_rgb.jpg': COLOUR, 'b_grey.JPG': (grey,) * 3, 'c_rgba.png': COLOUR,
          'd_cmyk.jpeg': COLOUR, 'e_grey16.PNG': (156,) * 3, 'f_palette.png': None}


def write_corrupt_images(class_dir) -> None:
  """A truncated JPEG, a text file named .jpg, a TIFF named .png (Pillow reads it, tf.data
  does not: the stream dropped it where the resident copy kept it), and a non-image
  extension (ignored)."""
  good = os.path.join(class_dir, 'z_trunc.jpg')
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(good)
  with open(good, 'rb') as f:
    data = f.read()
  with open(good, 'wb') as f:
    f.write(data[:len(data) // 2])
  with open(os.path.join(class_dir, 'z_text.jpg'), 'w') as f:
    f.write('not an image')
  Image.new('RGB', (8, 8), (1, 2, 3)).save(os.path.join(class_dir, 'z_tiff.png'), format='TIFF')
  with open(os.path.join(class_dir, 'notes.txt'), 'w') as f:
    f.write('ignored')


def make_folder(root, classes=('cat', 'dog'), per_class=3, splits=('train', 'test')) -> str:
  """root/<split>/<class>/<i>.jpg|png, solid colours, the label in the red channel."""
  for split in splits:
    for label, name in enumerate(classes):
      class_dir = os.path.join(root, split, name)
      os.makedirs(class_dir, exist_ok=True)
      for i in range(per_class):
        img = Image.new('RGB', SIZE, (40 * label + 20, 10 * i, 128))
        img.save(os.path.join(class_dir, f'{i:03d}.' + ('png' if i % 2 else 'jpg')), quality=95)
  return str(root)


def test_modules_import_without_tensorflow():
  """The device-resident path runs on GPU machines that have no TensorFlow."""
  code = ('import sys; import byol_jax.datasets, byol_jax.input_pipeline, byol_jax.preview; '
          'assert "tensorflow" not in sys.modules, "tensorflow imported"')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO, timeout=120)


def test_parse_dataset_forms(tmp_path):
  """Misparsed names would train on the wrong data or reject valid ones."""
  assert datasets.parse_dataset('demo') == datasets.DatasetSpec('demo', 'demo')
  spec = datasets.parse_dataset(f'folder:{tmp_path}')
  assert (spec.kind, spec.root) == ('folder', str(tmp_path))
  for name in ('cifar10', 'imagenet2012', 'oxford_iiit_pet', 'imagenet2012/subset:5.1.0'):
    assert datasets.parse_dataset(name).kind == 'tfds'


@pytest.mark.parametrize('name', ['', '   ', 'Foo Bar', 'folder:', 'hf:foo', '../data', '9x'])
def test_parse_dataset_rejects_garbage(name):
  """Garbage must fail early with a message naming the valid forms."""
  with pytest.raises(datasets.DataError, match="valid forms: 'demo'"):
    datasets.parse_dataset(name)


def test_a_url_dataset_folder_is_refused_by_name():
  """folder:gs://b/x would otherwise be reported missing as '<cwd>/gs:/b/x', which hides
  that URLs are not read at all."""
  with pytest.raises(datasets.DataError, match=r"^dataset folder 'gs://b/x' is a URL"):
    datasets.parse_dataset('folder:gs://b/x')


def test_tfds_split_table():
  """The split table decides what every reported number is measured on."""
  imagenet = datasets.tfds_split_table('imagenet2012')
  assert imagenet == dict(train='train[10009:]', valid='train[:10009]', trainval='train',
                          test='validation')
  assert datasets.tfds_split_table('cifar10:3.0.2')['valid'] == 'train[:10%]'
  assert datasets.tfds_split_table('cifar10')['train'] == 'train[10%:]'
  assert datasets.tfds_split_table('food101')['test'] == 'validation'
  assert datasets.tfds_split_table('dtd')['valid'] == 'validation'
  assert datasets.tfds_split_table('some_new', ['train', 'validation'])['test'] == 'validation'
  assert datasets.tfds_split_table('other', ['train', 'test'])['valid'] == 'train[:10%]'


def test_a_pretraining_split_that_takes_test_images_is_recognised():
  """Pretraining on test images makes every reported kNN and linear figure not held out;
  train_and_evaluate warns on these. Breaks if ImageNet's test split (TFDS 'validation')
  or a slice or sum of it is missed, or a training split is taken for the test one."""
  imagenet, cifar = datasets.parse_dataset('imagenet2012'), datasets.parse_dataset('cifar10')
  for spec, split in ((cifar, 'test'), (cifar, 'train+test'), (cifar, 'test[:50%]'),
                      (imagenet, 'validation'), (imagenet, 'train + validation[:10%]')):
    assert datasets.includes_test_split(spec, split), (spec.name, split)
  for spec, split in ((cifar, 'trainval'), (cifar, 'train[:90%]'), (imagenet, 'train'),
                      (datasets.parse_dataset('stl10'), 'unlabelled+train'),
                      (datasets.parse_dataset('demo'), 'trainval')):
    assert not datasets.includes_test_split(spec, split), (spec.name, split)


def _missing_root(tmp_path):
  return str(tmp_path / 'nope'), 'train', 'nope'


def _root_is_a_file(tmp_path):  # it said 'does not exist'
  (tmp_path / 'images.zip').write_bytes(b'PK')
  return str(tmp_path / 'images.zip'), 'train', 'images.zip is a file'


def _missing_train(tmp_path):
  os.makedirs(tmp_path / 'test' / 'a')
  return str(tmp_path), 'train', 'train is missing'


def _missing_test(tmp_path):
  return make_folder(tmp_path, splits=('train',)), 'test', 'test is missing'


def _empty_class(tmp_path):
  root = make_folder(tmp_path)
  os.makedirs(tmp_path / 'train' / 'empty')
  os.makedirs(tmp_path / 'test' / 'empty')
  return root, 'train', os.path.join('train', 'empty')


def _nested_images(tmp_path):  # Tiny-ImageNet's <class>/images/: the error did not say why
  root = make_folder(tmp_path)
  for split in ('train', 'test'):
    make_folder(tmp_path / split / 'fox', classes=('images',), splits=('.',))
  return root, 'train', 'not in subfolders such as images/'


def _class_mismatch(tmp_path):
  root = make_folder(tmp_path)
  os.rename(tmp_path / 'test' / 'dog', tmp_path / 'test' / 'wolf')
  return root, 'test', 'differ from train'


@pytest.mark.parametrize('setup', [_missing_root, _root_is_a_file, _missing_train,
                                   _missing_test, _empty_class, _nested_images,
                                   _class_mismatch])
def test_folder_errors_name_the_path(tmp_path, setup):
  """Users must learn from one line which folder is wrong and what to do."""
  root, split, fragment = setup(tmp_path)
  with pytest.raises(datasets.DataError) as info:
    datasets.load_arrays(datasets.parse_dataset(f'folder:{root}'), split)
  message = str(info.value)
  assert str(tmp_path) in message and fragment in message
  assert '\n' not in message


def test_load_arrays_mixed_formats_and_corrupt_files(tmp_path):
  """Grey, RGBA, CMYK, 16-bit and palette images must decode to the right RGB colours."""
  root = make_folder(tmp_path, per_class=2)
  expected = write_mixed_images(tmp_path / 'train' / 'zebra')
  write_corrupt_images(tmp_path / 'train' / 'zebra')
  os.makedirs(tmp_path / 'test' / 'zebra')
  write_mixed_images(tmp_path / 'test' / 'zebra')
  images, labels, info = datasets.load_arrays(datasets.parse_dataset(f'folder:{root}'),
                                              'trainval')
  assert info == dict(num_classes=3, class_names=['cat', 'dog', 'zebra'], skipped=3,
                      centre_square_area=1.0)  # not resized: nothing cropped
  assert images.shape == (4 + len(expected), 16, 20, 3) and images.dtype == np.uint8
  files = datasets.scan_folder(root, 'trainval').paths  # the documented order, then shuffled
  names = [os.path.basename(files[i]) for i in datasets.folder_order(len(files))]
  names = [n for n in names if n not in ('z_trunc.jpg', 'z_text.jpg', 'z_tiff.png')]
  assert labels.dtype == np.int32
  assert sorted(labels.tolist()) == [0, 0, 1, 1] + [2] * len(expected)
  decoded = dict(zip(names, images, strict=True))
  for name, colour in expected.items():
    if colour is not None:
      np.testing.assert_allclose(decoded[name].reshape(-1, 3).mean(0), colour, atol=3)


def test_folder_images_come_shuffled(tmp_path):
  """A folder lists its files class by class; the loaded order must not, or the first N
  images (knn.train_examples, linear evaluation's max_examples) and each device's contiguous
  shard of resident data hold one class (kNN scored exactly chance, 0.1000, on CIFAR-10)."""
  root = make_folder(tmp_path, classes=('a', 'b', 'c', 'd'), per_class=8)
  _, labels, _ = datasets.load_arrays(datasets.parse_dataset(f'folder:{root}'), 'trainval')
  assert sorted(labels.tolist()) == [c for c in range(4) for _ in range(8)]  # nothing lost
  for part in np.split(labels, 4):  # what 4 devices, or a first quarter, would get
    assert len(set(part.tolist())) >= 3, labels


def test_strict_mode_rejects_corrupt_files(tmp_path):
  """strict=True promises that no file is silently dropped."""
  root = make_folder(tmp_path)
  write_corrupt_images(tmp_path / 'train' / 'cat')
  with pytest.raises(datasets.DataError, match='z_t'):
    datasets.load_arrays(datasets.parse_dataset(f'folder:{root}'), 'trainval', strict=True)
  with pytest.raises(datasets.DataError, match='z_t'):
    datasets.scan_folder(root, 'trainval', validate=True, strict=True)
  assert datasets.scan_folder(root, 'trainval', validate=True).skipped == 3


def test_a_split_without_one_readable_image_is_a_data_error(tmp_path):
  """A split whose every file is unreadable (WebP or HEIC files named .jpg, say) loaded as
  an empty split after a warning: kNN then said the split had 'no labelled images (label
  -1 throughout)', and linear evaluation stopped with a traceback. Loading it (resident or
  scanned for the stream) is a one-line DataError now; a split with some readable files
  still skips the others."""
  root = make_folder(tmp_path, splits=('train',))
  for name in ('cat', 'dog'):
    os.makedirs(tmp_path / 'test' / name)
    (tmp_path / 'test' / name / 'photo.jpg').write_bytes(b'RIFF\x00\x00\x00\x00WEBPVP8 ')
  spec = datasets.parse_dataset(f'folder:{root}')
  message = f'^none of the 2 files under {root} \\(test\\) is a readable image'
  with pytest.raises(datasets.DataError, match=message):
    datasets.load_arrays(spec, 'test', image_size=8)
  with pytest.raises(datasets.DataError, match=message):
    datasets.scan_folder(root, 'test', validate=True)
  (tmp_path / 'test' / 'cat' / 'photo.jpg').unlink()
  make_folder(tmp_path, classes=('cat',), splits=('test',), per_class=1)
  _, labels, info = datasets.load_arrays(spec, 'test', image_size=8)
  assert labels.tolist() == [0] and info['skipped'] == 1


def test_a_process_whose_shard_has_no_readable_image_goes_on_empty(tmp_path):
  """In a run of several processes each reads its own shard of a split. A shard whose every
  file is unreadable, while the others' shards hold readable ones, is no empty split: one
  process stopping there alone left the others waiting in their collectives. It loads empty
  (its files counted as skipped); the whole split, or a single process, still raises."""
  from byol_jax import input_pipeline
  root = make_folder(tmp_path, splits=('train', 'test'), per_class=2)
  for name in ('cat', 'dog'):  # files 1 and 3 of test/: process 1's shard of two
    (tmp_path / 'test' / name / '001.png').write_bytes(b'RIFF\x00\x00\x00\x00WEBPVP8 ')
  spec = datasets.parse_dataset(f'folder:{root}')
  images, labels, info = datasets.load_arrays(spec, 'test', image_size=8, process_index=1,
                                              process_count=2)
  assert len(images) == len(labels) == 0 and info['skipped'] == 2
  paths, _, skipped, total = input_pipeline._folder_shard(spec, 'test', 1, 2, strict=False)
  assert (paths, skipped, total) == ([], 2, 4)
  _, labels, info = datasets.load_arrays(spec, 'test', image_size=8, process_index=0,
                                         process_count=2)
  assert sorted(labels.tolist()) == [0, 1] and info['skipped'] == 0
  with pytest.raises(datasets.DataError, match='^none of the 2 files under'):
    datasets.readable_subset([str(tmp_path / 'test' / n / '001.png') for n in ('cat', 'dog')],
                             np.zeros(2), 'test')


def test_resize_short_side_then_centre_crop(tmp_path):
  """Images of other sizes must be resized and centre-cropped, not squashed or padded."""
  stripes = np.zeros((20, 40, 3), np.uint8)
  stripes[:, :10] = (255, 0, 0)
  stripes[:, 10:30] = (0, 255, 0)
  stripes[:, 30:] = (0, 0, 255)
  class_dir = tmp_path / 'train' / 'a'
  os.makedirs(class_dir)
  Image.fromarray(stripes).save(class_dir / 'wide.png')
  Image.fromarray(stripes.transpose(1, 0, 2)).save(class_dir / 'tall.png')
  spec = datasets.parse_dataset(f'folder:{tmp_path}')
  with pytest.raises(datasets.DataError, match='image_size'):
    datasets.load_arrays(spec, 'trainval')
  images, _, info = datasets.load_arrays(spec, 'trainval', image_size=10)
  assert images.shape == (2, 10, 10, 3)
  np.testing.assert_allclose(images[:, 2:8, 2:8].reshape(-1, 3).mean(0), (0, 255, 0), atol=2)
  assert info['centre_square_area'] == 0.5  # each keeps its centre half


def test_centre_squares_of_wide_images_warn_before_random_crops(tmp_path, caplog):
  """Resident data holds centre squares, which random crops (pretraining, augmented linear
  evaluation, finetune) cannot see past; breaks if the share kept is miscounted or the
  training data says nothing where 2:1 images lose half their area, or if square images
  (CIFAR) or centre-crop evaluation warn."""
  import logging

  from conftest import tiny_config

  from byol_jax import data as data_lib
  for split in ('train', 'test'):
    for c, (h, w) in enumerate(((16, 32), (16, 16))):
      os.makedirs(tmp_path / split / f'c{c}')
      for i in range(4):
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(
          tmp_path / split / f'c{c}' / f'{i}.png')
  spec = datasets.parse_dataset(f'folder:{tmp_path}')
  _, _, info = datasets.load_arrays(spec, 'test', image_size=8)
  assert info['centre_square_area'] == 0.75  # half the images keep 1/2, half all
  assert datasets.centre_square_warning(info, 'x', '').startswith('x: images are held')
  assert datasets.centre_square_warning(dict(info, centre_square_area=0.96), 'x', '') == ''
  cfg = tiny_config(dataset=f'folder:{tmp_path}', image_size=8, batch_size=4,
                    input_mode='device')
  with caplog.at_level(logging.WARNING):
    data_lib.load_split(cfg, 'test')
    assert 'centre squares' not in caplog.text  # kNN's centre crops: nothing lost
    data_lib.make_train_data(cfg)
  assert 'on average 75% of each image' in caplog.text
  assert '--config.input_mode=stream' in caplog.text


def test_valid_is_held_out_of_train(tmp_path):
  """Hyperparameters chosen on 'valid' must not be chosen on training images."""
  root = make_folder(tmp_path, per_class=25)
  scans = {s: datasets.scan_folder(root, s) for s in ('train', 'valid', 'trainval')}
  assert not set(scans['train'].paths) & set(scans['valid'].paths)
  assert sorted(scans['train'].paths + scans['valid'].paths) == sorted(scans['trainval'].paths)
  assert len(scans['valid'].paths) == 2 * 3  # Files 0, 10, 20 of each class.
  make_folder(tmp_path, per_class=2, splits=('val',))
  spec = datasets.parse_dataset(f'folder:{root}')
  assert datasets.dataset_size(spec, 'valid') == 4
  assert datasets.dataset_size(spec, 'train') == 50
  assert datasets.dataset_size(spec, 'trainval') == 54
  os.rename(tmp_path / 'val', tmp_path / 'validation')  # the third name in use; it was ignored
  assert datasets.dataset_size(spec, 'valid') == 4


def test_two_validation_folders_are_refused(tmp_path):
  """With both val/ and valid/ under the root, the first name looked for (valid/) was used
  without a word, and the other folder's images were in no split: hyperparameters were
  chosen on a folder the user may not have meant. It is a one-line DataError naming both."""
  root = make_folder(tmp_path, per_class=3, splits=('train', 'val', 'valid'))
  spec = datasets.parse_dataset(f'folder:{root}')
  with pytest.raises(datasets.DataError, match=r'both valid/ and val/.*keep one'):
    datasets.dataset_size(spec, 'valid')


def test_split_folders_are_found_in_any_case(tmp_path):
  """A Val/ folder (or VALID/, Validation/) was not a validation split on Linux: every 10th
  training image was held out instead, without a word, while a case-insensitive filesystem
  (macOS) used Val/. Train/ and Test/ were 'missing'. Split folders match in any case now;
  val/ next to Val/ (a case-sensitive filesystem holds both) is refused like valid/ and val/."""
  make_folder(tmp_path, per_class=20, splits=('Train', 'TEST'))
  make_folder(tmp_path, per_class=2, splits=('Val',))
  spec = datasets.parse_dataset(f'folder:{tmp_path}')
  assert datasets.dataset_size(spec, 'valid') == 4
  assert datasets.dataset_size(spec, 'train') == 40
  assert datasets.dataset_size(spec, 'test') == 40
  assert datasets.missing_split(spec, 'test') == ''
  assert datasets.class_names(spec) == ['cat', 'dog']
  make_folder(tmp_path, per_class=2, splits=('val',))
  with pytest.raises(datasets.DataError, match=r'holds both Val/ and val/: keep one validation '
                     r'folder \(valid/, val/ or validation/, in any case\)$'):
    datasets.dataset_size(spec, 'valid')


def test_images_outside_class_folders_are_a_warning(tmp_path, caplog):
  """Images put directly in train/ (or test/) next to its class folders were in no split,
  without a word. Each folder says so once, in one line; with no class folder at all the
  error says the images are there."""
  root = make_folder(tmp_path / 'flat', classes=('.',), per_class=3, splits=('train',))
  with pytest.raises(datasets.DataError, match=r'train has no class folders \(it holds 3 '
                     r'image files directly\): expected'):
    datasets.scan_folder(root, 'train')
  root = make_folder(tmp_path / 'mixed')
  make_folder(tmp_path / 'mixed', classes=('.',), per_class=2, splits=('train', 'test'))
  spec = datasets.parse_dataset(f'folder:{root}')
  with caplog.at_level('WARNING'):
    for split in ('train', 'valid', 'test', 'train'):
      datasets.dataset_size(spec, split)
  said = [r.getMessage() for r in caplog.records if 'directly in' in r.getMessage()]
  assert said == [f'ignored 2 image files directly in {root}/{split} (first: 000.jpg): only '
                  'images in its class folders <class_name>/ are used'
                  for split in ('train', 'test')]


def test_other_entries_of_class_folders_are_a_warning(tmp_path, caplog):
  """A .webp, .gif or .tif image, or a subfolder, in a class folder that also holds JPEGs was
  in no split, without a word. Each split folder says how many, once, in one line; hidden
  files (.DS_Store, macOS's ._a.jpg) are no images and stay unmentioned."""
  root = make_folder(tmp_path)
  cat = tmp_path / 'train' / 'cat'
  Image.new('RGB', SIZE).save(cat / 'x.webp')
  Image.new('RGB', SIZE).save(cat / 'y.gif')
  make_folder(cat, classes=('more',), per_class=1, splits=('.',))
  for hidden in ('.DS_Store', '._000.jpg'):
    (cat / hidden).write_bytes(b'\0')
  spec = datasets.parse_dataset(f'folder:{root}')
  with caplog.at_level('WARNING'):
    assert [datasets.dataset_size(spec, s) for s in ('trainval', 'train', 'test')] == [6, 4, 6]
  said = [r.getMessage() for r in caplog.records if 'ignored' in r.getMessage()]
  assert said == [f'ignored 3 entries of the class folders of {root}/train (first: cat/more): '
                  'only .jpg/.jpeg/.png files directly in <class_name>/ are used'], said


def test_folders_that_name_no_split_are_a_warning(tmp_path, caplog):
  """A dataset with train/ and dev/ (or eval/) pretrained without kNN, dev/'s images in no
  split and nothing said: the split folder names are fixed. It says once which folders it
  ignored; hidden folders (.ipynb_checkpoints) stay unmentioned."""
  root = make_folder(tmp_path / 'd', splits=('train', 'dev'))
  os.makedirs(tmp_path / 'd' / '.ipynb_checkpoints')
  spec = datasets.parse_dataset(f'folder:{root}')
  with caplog.at_level('WARNING'):
    assert datasets.missing_split(spec, 'test')  # dev/ is not test/
    datasets.dataset_size(spec, 'train')
  said = [r.getMessage() for r in caplog.records if 'ignored folders' in r.getMessage()]
  assert said == [f'ignored folders dev/ in {root}: split folders are train/, test/ and '
                  'valid/, val/ or validation/, in any case; rename one to use its images'], said

def test_a_broken_link_to_a_class_folder_is_a_data_error(tmp_path):
  """A class folder linked from elsewhere counts as any other; a link whose target is gone
  (an unmounted disk) was left out without a word: the class vanished and every later
  class's label moved down by one. It is a one-line DataError naming the link."""
  root = make_folder(tmp_path / 'd')
  make_folder(tmp_path / 'elsewhere', classes=('fox',))
  os.symlink(tmp_path / 'elsewhere' / 'train' / 'fox', tmp_path / 'd' / 'train' / 'fox')
  os.symlink(tmp_path / 'elsewhere' / 'test' / 'fox', tmp_path / 'd' / 'test' / 'fox')
  assert datasets.scan_folder(root, 'trainval').class_names == ['cat', 'dog', 'fox']
  link = tmp_path / 'd' / 'train' / 'bee'
  os.symlink(tmp_path / 'unmounted' / 'bee', link)
  with pytest.raises(datasets.DataError, match=f'^{link} is a link to {tmp_path}/unmounted/bee, '
                     'which does not exist: fix or remove it$'):
    datasets.class_names(datasets.parse_dataset(f'folder:{root}'))


def test_the_valid_hold_out_never_takes_a_class_out_of_train(tmp_path):
  """A class folder with one image went wholly to 'valid' (file 0 of every class is held
  out), so 'train' lost the class: a linear head fitted on it never saw that class. It stays
  in 'train' now; classes with more images still give every 10th file to 'valid'."""
  root = make_folder(tmp_path, classes=('big', 'two'), per_class=11)
  make_folder(tmp_path, classes=('one',), per_class=1)
  for name in ('002.jpg', '003.png', '004.jpg', '005.png', '006.jpg', '007.png', '008.jpg',
               '009.png', '010.jpg'):
    os.remove(tmp_path / 'train' / 'two' / name)
  spec = datasets.parse_dataset(f'folder:{root}')
  train, valid = (datasets.scan_folder(root, s) for s in ('train', 'valid'))
  assert train.class_names == ['big', 'one', 'two']
  assert np.bincount(train.labels, minlength=3).tolist() == [9, 1, 1]
  assert np.bincount(valid.labels, minlength=3).tolist() == [2, 0, 1]
  _, labels, _ = datasets.load_arrays(spec, 'train')
  assert sorted(set(labels.tolist())) == [0, 1, 2]
  assert datasets.dataset_size(spec, 'trainval') == 11 + 1 + 2


def test_a_folder_with_nothing_to_hold_out_has_no_valid_split(tmp_path):
  """With a single image in every class, nothing is held out for 'valid' (each stays in
  'train'): the empty split reached linear evaluation, which stopped with a traceback
  ('cannot evaluate on an empty set'). It is a one-line DataError naming the remedy."""
  root = make_folder(tmp_path, per_class=1)
  spec = datasets.parse_dataset(f'folder:{root}')
  with pytest.raises(datasets.DataError, match=f'^{root} has no valid/ folder, and no class '
                     f'folder of {root}/train has a second image'):
    datasets.load_arrays(spec, 'valid')
  assert datasets.dataset_size(spec, 'train') == datasets.dataset_size(spec, 'trainval') == 2
  make_folder(tmp_path, per_class=1, splits=('valid',))
  assert datasets.dataset_size(spec, 'valid') == 2


def test_a_class_folder_that_cannot_be_listed_is_a_data_error(tmp_path, monkeypatch):
  """A folder without read permission stopped the run with a PermissionError traceback.
  (Root lists any folder, so the refusal is simulated.)"""
  root = make_folder(tmp_path)
  locked, scandir = str(tmp_path / 'train' / 'dog'), os.scandir

  def refuse(path):
    if os.fspath(path) == locked:
      raise PermissionError(13, 'Permission denied', locked)
    return scandir(path)

  monkeypatch.setattr(datasets.os, 'scandir', refuse)
  with pytest.raises(datasets.DataError, match=f'^cannot list {locked}: Permission denied$'):
    datasets.scan_folder(root, 'train')


def test_load_arrays_process_shards_are_disjoint_and_cover(tmp_path):
  """Each process must load its own examples, together all of them once."""
  root = make_folder(tmp_path, classes=tuple('abcdefg'), per_class=1)
  spec = datasets.parse_dataset(f'folder:{root}')
  for count in (2, 3):
    parts = [datasets.load_arrays(spec, 'trainval', process_index=i, process_count=count)[1]
             for i in range(count)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(7))
  with pytest.raises(datasets.DataError, match='process_index'):
    datasets.load_arrays(spec, 'trainval', process_index=2, process_count=2)


def test_demo_dataset_through_load_arrays():
  """The demo dataset must load like any other (no files, no TensorFlow)."""
  spec = datasets.parse_dataset('demo')
  images, labels, info = datasets.load_arrays(spec, 'test', image_size=16, process_count=2)
  assert images.shape == (datasets.DEMO_SIZES['test'] // 2, 16, 16, 3)
  assert labels.dtype == np.int32 and info['num_classes'] == 10
  valid, _, _ = datasets.load_arrays(spec, 'valid', image_size=16)
  train, _, _ = datasets.load_arrays(spec, 'train', image_size=16)
  assert not np.array_equal(valid[:10], train[:10])
  assert datasets.num_classes(spec) == 10


def test_choose_input_mode():
  """Datasets that fit must stay on the device; overrides must win."""
  assert datasets.decoded_size_bytes(10, 4) == 480
  gib = 2**30
  assert datasets.choose_input_mode(50_000, 32, 16 * gib)[0] == 'device'
  mode, reason = datasets.choose_input_mode(1_281_167, 224, 80 * gib)
  assert mode == 'stream' and 'GiB' in reason
  assert datasets.choose_input_mode(50_000, 32, 16 * gib, 'stream')[0] == 'stream'
  assert datasets.choose_input_mode(1_281_167, 224, 80 * gib, 'device')[0] == 'device'
  with pytest.raises(datasets.DataError, match='input_mode'):
    datasets.choose_input_mode(1, 1, 1, 'gpu')


def test_unprepared_tfds_dataset_is_a_one_line_error(tmp_path, monkeypatch, caplog):
  """A missing TFDS dataset must explain itself and never start a download."""
  tfds = pytest.importorskip('tensorflow_datasets')

  def no_download(*args, **kwargs):
    raise AssertionError('download_and_prepare must not be called')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', no_download)
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(datasets.DataError) as info:
    datasets.load_arrays(datasets.parse_dataset('cifar10'), 'train', data_dir=data_dir)
  assert data_dir in str(info.value) and 'tfds build cifar10' in str(info.value)
  assert '--config.data_dir' in str(info.value)  # the flag that exists, not --data_dir
  # Half prepared (the version folder without dataset_info.json): the error alone, without
  # TFDS's 'Variant folder ... has no dataset_info.json' warning saying it twice.
  os.makedirs(os.path.join(data_dir, 'cifar10', '3.0.2'))
  with caplog.at_level('WARNING'), pytest.raises(datasets.DataError, match='not prepared'):
    datasets.load_arrays(datasets.parse_dataset('cifar10'), 'train', data_dir=data_dir)
  assert 'Variant folder' not in caplog.text
  with pytest.raises(datasets.DataError) as info:
    datasets.dataset_size(datasets.parse_dataset('imagenet2012'), 'train', data_dir)
  message = str(info.value)
  assert 'ILSVRC2012_img_train.tar' in message and f'{data_dir}/downloads/manual' in message
  assert '\n' not in message
  with pytest.raises(datasets.DataError, match='no dataset'):
    datasets.dataset_size(datasets.parse_dataset('no_such_dataset_xyz'), 'train', data_dir)
  # Without a data_dir the message says where TFDS looks, not 'data_dir=None'.
  with pytest.raises(datasets.DataError) as info:
    datasets.dataset_size(datasets.parse_dataset('no_such_dataset_xyz'), 'train', None)
  assert 'None' not in str(info.value) and '~/tensorflow_datasets' in str(info.value)
  assert '.;' not in str(info.value)


@pytest.mark.slow
def test_cifar10_folder_round_trip(tmp_path):
  """The unpacking script and folder loader must reproduce all of CIFAR-10's training set."""
  src = _shared_cifar10()
  if not os.path.isfile(src):
    pytest.skip(f'{src} not found (set BYOL_SHARED)')
  out = tmp_path / 'cifar10'
  subprocess.run([sys.executable, os.path.join(REPO, 'experiments', 'cifar10_to_folder.py'),
                  '--src', src, '--out', str(out)], check=True, timeout=600,
                 stdout=subprocess.DEVNULL)
  spec = datasets.parse_dataset(f'folder:{out}')
  sizes = {s: datasets.dataset_size(spec, s) for s in datasets.LOGICAL_SPLITS}
  assert sizes == dict(train=45_000, valid=5_000, trainval=50_000, test=10_000)
  images, labels, info = datasets.load_arrays(spec, 'trainval')
  assert images.shape == (50_000, 32, 32, 3) and info['num_classes'] == 10
  assert info['skipped'] == 0 and np.bincount(labels).tolist() == [5000] * 10
  assert info['class_names'][0] == 'airplane'


def test_cifar10_to_folder_refuses_repo(tmp_path):
  """Decoded CIFAR-10 must never land in the git work tree."""
  script = os.path.join(REPO, 'experiments', 'cifar10_to_folder.py')
  result = subprocess.run([sys.executable, script, '--src', str(tmp_path / 'x.npz'),
                           '--out', os.path.join(REPO, 'runs', 'cifar10')],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and 'git work tree' in result.stderr
  assert not os.path.exists(os.path.join(REPO, 'runs', 'cifar10'))


def _fake_cifar_npz(path, per_class: int = 6) -> None:
  """A CIFAR-shaped npz whose 'JPEG' bytes name their split and row, to trace every file."""
  arrays = {'class_names': np.array(['a', 'b'])}
  for split in ('train', 'test'):
    labels = np.repeat([0, 1], per_class)
    blobs = [f'{split}-{i}'.encode() for i in range(len(labels))]
    arrays[f'{split}_jpeg'] = np.frombuffer(b''.join(blobs), np.uint8)
    arrays[f'{split}_offsets'] = np.cumsum([0] + [len(b) for b in blobs])
    arrays[f'{split}_labels'] = labels
  np.savez(path, **arrays)


def _written(out, split) -> dict[str, set[bytes]]:
  root = out / split
  return {c.name: {f.read_bytes() for f in c.iterdir()} for c in root.iterdir()}


def test_cifar10_to_folder_holdout_is_a_validation_split(tmp_path):
  """--holdout_per_class: the 'test' split must be further training images, never the test set
  and never the kept training images (else tuning on it would leak or be optimistic)."""
  src = tmp_path / 'fake.npz'
  _fake_cifar_npz(src)
  script = os.path.join(REPO, 'experiments', 'cifar10_to_folder.py')
  out = tmp_path / 'val'
  subprocess.run([sys.executable, script, '--src', str(src), '--out', str(out),
                  '--train_per_class', '2', '--holdout_per_class', '3'],
                 check=True, timeout=60, capture_output=True)
  assert _written(out, 'train') == {'a': {b'train-0', b'train-1'}, 'b': {b'train-6', b'train-7'}}
  assert _written(out, 'test') == {'a': {b'train-2', b'train-3', b'train-4'},
                                   'b': {b'train-8', b'train-9', b'train-10'}}
  plain = tmp_path / 'plain'
  subprocess.run([sys.executable, script, '--src', str(src), '--out', str(plain),
                  '--train_per_class', '2', '--test_per_class', '1'],
                 check=True, timeout=60, capture_output=True)
  assert _written(plain, 'test') == {'a': {b'test-0'}, 'b': {b'test-6'}}
  bad = subprocess.run([sys.executable, script, '--src', str(src), '--out', str(tmp_path / 'x'),
                        '--holdout_per_class', '3'], capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and 'needs --train_per_class' in bad.stderr


def test_cifar10_to_folder_reuses_only_a_finished_conversion_of_the_same_request(tmp_path):
  """The experiment scripts reused any folder with a train/ in it: after a TINY=1 check, a
  real run trained on its 30 images per class without a word. --reuse keeps a finished
  conversion of the same request, rewrites one of another, refuses one of unknown origin."""
  src = tmp_path / 'fake.npz'
  _fake_cifar_npz(src)
  script = os.path.join(REPO, 'experiments', 'cifar10_to_folder.py')
  out = tmp_path / 'cifar'

  def convert(*flags):
    return subprocess.run([sys.executable, script, '--reuse', '--src', str(src), '--out',
                           str(out), *flags], capture_output=True, text=True, timeout=60)

  tiny = ('--train_per_class', '2', '--test_per_class', '1')
  assert convert(*tiny).returncode == 0
  (out / 'train' / 'a' / 'extra.jpg').write_bytes(b'kept')  # shows the folder was kept
  again = convert(*tiny)
  assert again.returncode == 0 and again.stdout.startswith('reusing')
  assert (out / 'train' / 'a' / 'extra.jpg').exists()
  full = convert()
  assert full.returncode == 0 and 'rewriting' in full.stdout
  assert {k: len(v) for k, v in _written(out, 'train').items()} == {'a': 6, 'b': 6}
  os.remove(out / 'CONVERTED.json')  # as a conversion stopped half-way leaves it
  stopped = convert()
  assert stopped.returncode == 2 and 'without CONVERTED.json' in stopped.stderr


def test_parallel_map_uses_threads_only_for_slow_items():
  """Results come back in order either way; cheap calls (32 px decodes) stay in the calling
  thread, where threads would only fight over the GIL, and slow ones (large decodes) go to
  worker threads after the timed probe. Breaks if the choice is inverted or order is lost."""
  import threading
  import time

  def traced(delay):
    def fn(x):
      if delay:
        time.sleep(delay)
      return x * 2, threading.current_thread() is threading.main_thread()
    return fn

  items = list(range(datasets._PROBE_ITEMS + 100))
  fast = datasets._parallel_map(traced(0.0), items)
  assert [v for v, _ in fast] == [2 * i for i in items] and all(main for _, main in fast)
  slow = datasets._parallel_map(traced(2 * datasets._THREADS_FROM_SEC), items)
  assert [v for v, _ in slow] == [2 * i for i in items]
  on_main = [main for _, main in slow]
  assert all(on_main[:datasets._PROBE_ITEMS]) and not any(on_main[datasets._PROBE_ITEMS:])
  assert datasets._parallel_map(traced(0.0), []) == []


@pytest.mark.parametrize('delay', [0.0, 2e-3])  # in a row, in threads
def test_long_decodes_say_how_far_they_are(delay, monkeypatch, caplog):
  """Decoding a large folder on a few cores takes minutes: it must report progress and the
  total, in order and without changing the results; a short or unnamed map stays quiet."""
  import time
  monkeypatch.setattr(datasets, '_PROGRESS_EVERY_SEC', 0.0)
  monkeypatch.setattr(datasets, '_CHUNK_ITEMS', 50)

  def fn(x):
    if delay:
      time.sleep(delay)
    return -x

  items = list(range(datasets._PROBE_ITEMS + 120))
  with caplog.at_level('INFO'):
    assert datasets._parallel_map(fn, items, 'decoding /data/x (train)') == [-i for i in items]
  lines = [r.getMessage() for r in caplog.records if '/data/x' in r.getMessage()]
  n, probe = len(items), datasets._PROBE_ITEMS
  assert [line.split(':')[1].split(' images')[0].strip() for line in lines[:-1]] == [
    f'{probe + 50} of {n}', f'{probe + 100} of {n}'], lines
  assert 'left)' in lines[0] and lines[-1].startswith(f'decoding /data/x (train): {n} images in')
  caplog.clear()
  with caplog.at_level('INFO'):
    datasets._parallel_map(fn, items)
  assert not caplog.records


def test_multilabel_row_marks_difficult_only_classes_ignored():
  """Breaks if a class seen only in difficult objects counts as a positive or a negative."""
  row = datasets.multilabel_row({'labels': np.array([2, 5, 7]),
                                 'labels_no_difficult': np.array([5])}, 8)
  np.testing.assert_array_equal(row, [0, 0, -1, 0, 0, 1, 0, -1])
  # Without the no-difficult list every class present is a positive.
  np.testing.assert_array_equal(datasets.multilabel_row({'labels': np.array([1])}, 3), [0, 1, 0])


def test_voc2007_loads_as_multilabel_targets(tmp_path):
  """Breaks if VOC's class sets do not become [N, 20] rows in TFDS order (1 for a
  non-difficult class, -1 for a difficult-only one), or a single-label load of VOC stops
  giving label -1 (unlabelled, as pretraining reads it)."""
  data_dir = str(tmp_path / 'tfds')
  written = prepare_fake_voc2007(data_dir, {'train': 6, 'validation': 4, 'test': 5})
  spec = datasets.parse_dataset('voc/2007')
  assert datasets.is_multilabel(spec, data_dir)
  assert not datasets.is_multilabel(datasets.parse_dataset('demo'))
  for split, tfds_split in (('train', 'train'), ('valid', 'validation'), ('test', 'test')):
    images, rows, info = datasets.load_arrays(spec, split, data_dir=data_dir, image_size=16,
                                              multilabel=True)
    assert images.shape == (len(written[tfds_split]), 16, 16, 3)
    assert rows.shape == (len(images), 20) and info['num_classes'] == 20
    assert info['class_names'][:3] == ['aeroplane', 'bicycle', 'bird']
    for row, ex in zip(rows, written[tfds_split], strict=True):
      assert set(np.flatnonzero(row == 1)) == ex['positive']
      assert set(np.flatnonzero(row == -1)) == ex['labels'] - ex['positive']
  _, labels, _ = datasets.load_arrays(spec, 'train', data_dir=data_dir, image_size=16)
  np.testing.assert_array_equal(labels, -1)
  with pytest.raises(datasets.DataError, match='TFDS datasets'):
    datasets.load_arrays(datasets.parse_dataset('demo'), 'train', multilabel=True)


def test_unreadable_files_are_reported_once(tmp_path, caplog):
  """A corrupt file in a resident training folder was reported twice (by the loader and by
  data.load_split), which reads as two problems."""
  from conftest import tiny_config

  from byol_jax import data
  root = make_folder(tmp_path)
  (tmp_path / 'train' / 'cat' / 'broken.jpg').write_bytes(b'not a jpeg')
  cfg = tiny_config(dataset=f'folder:{root}')
  with caplog.at_level('WARNING'):
    split = data.load_split(cfg, 'trainval')  # all of train/
  assert len(split.labels) == 6
  said = [r.getMessage() for r in caplog.records if 'skipped' in r.getMessage()]
  assert len(said) == 1 and 'broken.jpg' in said[0], said


def test_cifar10_to_folder_without_reuse_leaves_no_files_of_an_earlier_conversion(tmp_path):
  """Converting into a folder that holds another conversion wrote the new files over the old
  ones: a plain conversion after a --holdout_per_class one kept the held-out training images
  in its test split, under a marker that named the plain request (which --reuse then kept)."""
  src = tmp_path / 'fake.npz'
  _fake_cifar_npz(src)
  script = os.path.join(REPO, 'experiments', 'cifar10_to_folder.py')
  out = tmp_path / 'cifar'

  def convert(*flags):
    return subprocess.run([sys.executable, script, '--src', str(src), '--out', str(out),
                           '--train_per_class', '2', *flags], capture_output=True, text=True,
                          timeout=60)

  assert convert('--holdout_per_class', '3').returncode == 0
  assert convert('--test_per_class', '1').returncode == 0
  assert _written(out, 'test') == {'a': {b'test-0'}, 'b': {b'test-6'}}
  os.remove(out / 'CONVERTED.json')  # a stopped conversion, or a folder of other images
  refused = convert('--test_per_class', '1')
  assert refused.returncode == 2 and 'without CONVERTED.json' in refused.stderr


def _convert(src, out, *flags: str) -> subprocess.CompletedProcess:
  script = os.path.join(REPO, 'experiments', 'cifar10_to_folder.py')
  return subprocess.run([sys.executable, script, '--src', str(src), '--out', str(out), *flags],
                        capture_output=True, text=True, timeout=60)


def test_cifar10_to_folder_reuse_is_of_the_same_source(tmp_path):
  """The marker named the counts but not --src, so --reuse kept a conversion of another
  copy (a stand-in, an older file) as if it were of this one. It records the source's real
  path now, and a conversion of another source is rewritten."""
  first, second = tmp_path / 'first.npz', tmp_path / 'second.npz'
  _fake_cifar_npz(first)
  _fake_cifar_npz(second, per_class=7)
  out = tmp_path / 'cifar'
  assert _convert(first, out, '--reuse').returncode == 0
  marker = json.loads((out / 'CONVERTED.json').read_text())
  assert marker['src'] == os.path.realpath(first)
  assert _convert(tmp_path / '.' / 'first.npz', out, '--reuse').stdout.startswith('reusing')
  other = _convert(second, out, '--reuse')
  assert other.returncode == 0 and 'rewriting' in other.stdout, other.stdout
  assert {k: len(v) for k, v in _written(out, 'train').items()} == {'a': 7, 'b': 7}
  assert json.loads((out / 'CONVERTED.json').read_text())['src'] == os.path.realpath(second)


@pytest.mark.parametrize('flags, message', [
  (('--train_per_class', '4', '--holdout_per_class', '3'),
   "--train_per_class + --holdout_per_class = 7 exceeds the 6 train images of class 'a'"),
  (('--train_per_class', '7'), "--train_per_class = 7 exceeds the 6 train images of class 'a'"),
  (('--test_per_class', '9'), "--test_per_class = 9 exceeds the 6 test images of class 'a'"),
  (('--train_per_class', '-1'), '--train_per_class must be 0 (all) or more'),
  (('--train_per_class', '2', '--holdout_per_class', '2', '--test_per_class', '1'),
   '--test_per_class has no effect with --holdout_per_class'),
  (('--src-is-text',), 'is not a readable .npz'),
])
def test_cifar10_to_folder_refuses_counts_a_class_cannot_fill(tmp_path, flags, message):
  """A holdout past the end of a class wrote fewer images than asked without a word (a
  validation split of 1 image per class for --holdout_per_class 200 after 4,900), a
  negative count kept every image, and --test_per_class beside --holdout_per_class was
  ignored. Each is one line on stderr now, before anything is written: an earlier
  conversion in --out stays."""
  src, out = tmp_path / 'fake.npz', tmp_path / 'cifar'
  _fake_cifar_npz(src)
  assert _convert(src, out, '--train_per_class', '1').returncode == 0
  if flags == ('--src-is-text',):
    src, flags = tmp_path / 'notes.npz', ()
    src.write_text('not an npz')
  result = _convert(src, out, *flags)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert result.stderr.startswith('error: ')
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert {k: len(v) for k, v in _written(out, 'train').items()} == {'a': 1, 'b': 1}


def test_cifar10_to_folder_refuses_labels_outside_its_classes(tmp_path):
  """A foreign npz whose labels fall outside its class_names (a -1 for unlabelled rows, say)
  ended in numpy's traceback from np.bincount, or wrote a folder for a class that has no
  name. It is one line on stderr (exit 2), before anything is written."""
  src, out = tmp_path / 'fake.npz', tmp_path / 'cifar'
  _fake_cifar_npz(src)
  with np.load(src) as data:
    arrays = dict(data)
  arrays['train_labels'] = np.concatenate([[-1], arrays['train_labels'][1:]])
  np.savez(src, **arrays)
  result = _convert(src, out)
  assert result.returncode == 2 and 'labels outside' in result.stderr, result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert not out.exists()
