r"""ViM2 image classification (the MambaMixer paper's ViM2).

  python train.py --config configs/vim2.py:variant=tiny --workdir runs/vim2_t_in1k
  python train.py --workdir runs/vim2_cifar \
      --config configs/vim2.py:variant=cifar,dataset=archive:../shared/data/images/cifar10_jpg.tar.xz
  python train.py --config configs/vim2.py:variant=cifar,dataset=folder:/data/cifar10_jpg,epochs=40 \
      --workdir runs/c
  python train.py --config configs/vim2.py:smoke,dataset=folder:/data/cifar10_jpg --workdir /tmp/s
  python eval.py --workdir runs/vim2_cifar

Arguments:
  variant   tiny | small | base (the paper's ImageNet models and recipe: 224x224, 300 epochs,
            20 warm-up, batch 1024, AdamW lr 1e-3 x batch/1024, weight decay 0.05,
            RandAugment, mixup/cutmix, label smoothing, random erasing, EMA) or cifar (our
            small-image variant for 32x32 images: a 3x3 conv stem of stride 2, widths 64..512,
            in-memory pipeline with on-device crop, flip and cutout, bfloat16, warm-up +
            cosine).
  dataset   imagenet2012 | cifar10 (prepared tensorflow-datasets data sources) |
            folder:<root> (root/<split>/<class>/*.jpg) | archive:<file.tar.xz> | idx:<folder>.
  epochs    training epochs (default per variant).
  batch     global batch size (default per variant).
  mlp       the ablation with an MLP channel mixer.
  seed, smoke (a seconds-long run on a tiny model and 64x64/32x32 inputs).
"""

from __future__ import annotations

import ml_collections

from configs import common
from mmx_jax.data.batch_augment import IMAGENET_MEAN, IMAGENET_STD

FAMILY = "vim2"

# The small-image variant (our choice, sized for a 10-minute single-GPU CIFAR-10 run;
# results/vision.md has the runs behind each choice): a 3x3 conv stem of stride 2, state size
# 4 in both mixers, cutout.
CIFAR_MODEL = dict(widths=(64, 128, 256, 512), token_depths=(2, 2, 4, 2),
                   channel_depths=(1, 1, 2, 1), stem_stride=2, stem="conv", drop_path_rate=0.1,
                   dt_rank="auto", state_dim=4, channel_state_dim=4)


def get_config(arg: str | None = None, family: str = FAMILY) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg, f"configs/{family}.py", variant="tiny", dataset="imagenet2012",
                            epochs=0, batch=0, mlp=False, seed=0, smoke=False)
    variant = args["variant"]
    if variant not in ("tiny", "small", "base", "cifar"):
        raise ValueError(f"configs/{family}.py: variant={variant!r} is not tiny, small, base "
                         "or cifar")
    small_images = variant == "cifar" or args["smoke"]
    config = common.base_config(task="classification", seed=args["seed"])
    config.data = dict(
        name=args["dataset"],
        data_dir=ml_collections.config_dict.placeholder(str),  # tensorflow-datasets folder
        cache_dir=ml_collections.config_dict.placeholder(str),  # extracted archives, arrays
        train_split="train",
        eval_split="test" if small_images else "validation",
        val_holdout=1000 if small_images else 10000,
        max_eval_images=0,  # 0: every image; else that many of each evaluation split (spread)
        pipeline="memory" if small_images else "grain",
        workers=0 if small_images else 16,
        channels=0,  # 0: the source's default (idx files 1, image folders 3), else 1 or 3
        image_size=32 if small_images else 224,
        batch_size=512 if small_images else 1024,
        eval_batch_size=1000 if small_images else 1024,
        # Per-channel statistics in 0..1 units; None: measured on the training split
        mean=ml_collections.config_dict.placeholder(tuple) if small_images else IMAGENET_MEAN,
        std=ml_collections.config_dict.placeholder(tuple) if small_images else IMAGENET_STD,
        # Augmentations; each can be turned off: crop_padding=-1, flip=False,
        # randaugment_ops=0, erasing_prob=0, cutout_size=0, mixup_alpha=cutmix_alpha=0,
        # label_smoothing=0.
        crop_padding=4 if small_images else -1,  # pad-and-crop: on device (memory), per example (grain)
        flip=True,  # random left-right mirror
        randaugment_ops=2,
        randaugment_magnitude=9.0,
        erasing_prob=0.25,
        # memory pipeline: a square of this side per image set to the mean
        cutout_size=16 if variant == "cifar" else 0,
        mixup_alpha=0.0 if small_images else 0.8,
        cutmix_alpha=0.0 if small_images else 1.0,
        mix_prob=1.0,
        label_smoothing=0.1,
    )
    size = "tiny" if variant == "cifar" else variant
    # scan_layout: "walks" (the token mixers' scans read the map in place) or "permuted"
    # (the earlier layout path: a permuted copy per scan order); the same model.
    config.model = dict(name=f"{family}_{size}" + ("_mlp" if args["mlp"] else ""),
                        scan_impl="auto", scan_layout="walks", dtype="bfloat16")
    if variant == "cifar":
        config.model.update(CIFAR_MODEL)
    if args["batch"]:
        config.data.batch_size = args["batch"]
    config.optimizer.update(
        lr=(2e-3 if small_images else 1e-3) * (1 if small_images else
                                                 config.data.batch_size / 1024),
        weight_decay=0.05,
        warmup_epochs=2.0 if small_images else 20.0,
        grad_clip=5.0,
        ema_decay=0.0 if small_images else 0.9999,
    )
    config.train.update(
        num_epochs=args["epochs"] or (40 if small_images else 300),
        log_every_steps=50 if small_images else 200,
        checkpoint_every_steps=1000 if small_images else 2000,
    )
    config.eval = dict(plot_variates=0, plot_windows=0,
                       flip_tta=False)  # average the logits of each image and its mirror

    if args["smoke"]:  # tiny model and images; what the command line set stays
        common.shrink(config, args, {
            "model.widths": (16, 32, 64, 128), "model.token_depths": (1, 1, 1, 1),
            "model.channel_depths": (1, 1, 1, 1), "model.stem_stride": 2,
            "model.drop_path_rate": 0.0, "model.dt_rank": "auto", "model.dtype": "float32",
            "data.batch_size": 16, "data.eval_batch_size": 32, "data.val_holdout": 32,
            "data.max_eval_images": 256,
            "train.num_epochs": 1, "train.steps_per_epoch": 4, "train.log_every_steps": 2,
            "train.checkpoint_every_steps": 2, "optimizer.warmup_epochs": 0.0,
            "optimizer.warmup_steps": 1,
        }, by_argument={"data.batch_size": "batch", "train.num_epochs": "epochs"})
    return config
