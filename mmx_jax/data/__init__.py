"""Input pipelines, one job per module; this package exports their public names.

    forecasting     the Time-Series-Library protocol: files, splits, scaling, windows
    image_sources   random-access image sources (folders, idx files, tensorflow-datasets)
    archives        image archives unpacked once into a cache folder
    decode_cache    small splits decoded once into arrays (the in-memory path)
    loader          the sampling plan, the grain loader and the in-memory batches
    augment         per-example augmentations (NumPy/PIL, in the loader's workers)
    batch_augment   batch-level augmentations and normalisation (jittable JAX, on device)
"""

from mmx_jax.data.archives import default_cache_dir, extract_archive
from mmx_jax.data.augment import (
    DeitTrainTransform,
    EvalTransform,
    SmallImageTrainTransform,
    example_rng,
    rand_augment,
    random_erasing,
    random_resized_crop,
)
from mmx_jax.data.batch_augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    cutout,
    mixup_cutmix,
    normalize,
    random_crop_flip,
    smooth_labels,
)
from mmx_jax.data.decode_cache import ImageArrays, decode_to_arrays, resize
from mmx_jax.data.forecasting import (
    DataFileNotFoundError,
    DatasetInfo,
    ForecastingData,
    ForecastingDataError,
    ForecastingSplit,
    StandardScaler,
    dataset_path,
    future_dates,
    infer_frequency,
    layout_for_file,
    list_datasets,
    load_forecasting,
    read_frame,
    split_borders,
    synthetic_forecasting,
)
from mmx_jax.data.image_sources import (
    FASHION_MNIST_CLASSES,
    CorruptImageError,
    FolderSource,
    IdxSource,
    ImageSource,
    TfdsSource,
    decode_image,
    open_image_source,
    read_idx,
    to_channels,
)
from mmx_jax.data.loader import EpochPlan, ImageLoader, Transform, array_batches, eval_view

__all__ = [
    # forecasting
    "DataFileNotFoundError", "DatasetInfo", "ForecastingData", "ForecastingDataError",
    "ForecastingSplit", "StandardScaler", "dataset_path", "future_dates", "infer_frequency",
    "layout_for_file", "list_datasets", "load_forecasting", "read_frame", "split_borders",
    "synthetic_forecasting",
    # images: sources, archives, decoded splits, loaders
    "FASHION_MNIST_CLASSES", "CorruptImageError", "FolderSource", "IdxSource", "ImageSource",
    "TfdsSource", "decode_image", "open_image_source", "read_idx", "to_channels",
    "default_cache_dir", "extract_archive", "ImageArrays", "decode_to_arrays", "resize",
    "EpochPlan", "ImageLoader", "Transform", "array_batches", "eval_view",
    # images: augmentations and statistics
    "DeitTrainTransform", "EvalTransform", "SmallImageTrainTransform", "example_rng",
    "rand_augment", "random_erasing", "random_resized_crop", "CIFAR10_MEAN", "CIFAR10_STD",
    "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "IMAGENET_MEAN", "IMAGENET_STD", "cutout",
    "mixup_cutmix", "normalize", "random_crop_flip", "smooth_labels",
]
