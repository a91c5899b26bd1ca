r"""ViQS image classification: ViM2 with quasi-separable mixers and Switch of Scans (README).

  python train.py --config configs/viqs.py:variant=tiny --workdir runs/viqs_t_in1k
  python train.py --workdir runs/viqs_cifar \
      --config configs/viqs.py:variant=cifar,dataset=archive:../shared/data/images/cifar10_jpg.tar.xz
  python eval.py --workdir runs/viqs_cifar

Arguments: as configs/vim2.py (variant, dataset, epochs, batch, seed, smoke); the recipes are
the same, the models are `viqs_<size>`.
"""

from __future__ import annotations

import ml_collections

from configs import vim2


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return vim2.get_config(arg, family="viqs")
