"""byol-jax: BYOL (Bootstrap Your Own Latent) in JAX and Haiku."""

from setuptools import find_packages, setup

setup(
  name='byol-jax',
  version='0.1.0',
  description='BYOL self-supervised learning in JAX/Haiku: fast, faithful, resumable.',
  long_description=open('README.md').read() if __import__('os').path.exists('README.md') else '',
  long_description_content_type='text/markdown',
  license='Apache-2.0',
  python_requires='>=3.10',
  packages=find_packages(include=['byol_jax', 'byol_jax.*']),
  install_requires=[
    'jax>=0.7.0',  # jax.shard_map with check_vma
    'jaxlib>=0.7.0',
    'dm-haiku>=0.0.14',
    'optax>=0.2.5',  # optax.tree.norm
    'chex>=0.1.88',
    'ml-collections>=0.1.1',
    'absl-py>=2.0',
    'numpy>=1.26',
    'orbax-checkpoint>=0.11.0',
    'pillow>=10.0',
    'tensorboardX>=2.6',
    'matplotlib>=3.8',  # python -m byol_jax.plot
    # tf.data streaming (large TFDS datasets, image folders). The device-resident path
    # (demo, CIFAR-sized data) never imports TensorFlow, so GPU hosts without it still train.
    'tensorflow>=2.16',
    'tensorflow-datasets>=4.9.6',
    'importlib_resources>=6.0',  # tfds 4.9.x needs it to prepare datasets on Python 3.11
  ],
  extras_require={
    'torch': ['torch>=2.1'],  # python -m byol_jax.export --format=torch
    'test': [
      'pytest>=8.0',
      'pytest-xdist>=3.5',  # pytest.ini runs the suite on 2 processes
      'ruff>=0.6',
      'matplotlib>=3.8',
      'nbclient>=0.10',
      'nbformat>=5.10',
      'ipykernel>=6.29',
    ],
  },
  entry_points={'console_scripts': [
    'byol-jax=byol_jax.main:main',
    'byol-jax-export=byol_jax.export:main',
    'byol-jax-plot=byol_jax.plot:main',
  ]},
  classifiers=['License :: OSI Approved :: Apache Software License',
               'Programming Language :: Python :: 3'],
)
