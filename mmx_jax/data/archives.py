"""Image archives unpacked once into a cache folder (the tar files data sets come as)."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tarfile
import tempfile

log = logging.getLogger(__name__)


def default_cache_dir() -> pathlib.Path:
    """``$MMX_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmx_jax``, else ``~/.cache/mmx_jax``."""
    if os.environ.get("MMX_CACHE_DIR"):
        return pathlib.Path(os.environ["MMX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "mmx_jax"


def _archive_stem(archive: pathlib.Path) -> str:
    name = archive.name
    for suffix in (".tar.xz", ".tar.gz", ".tar.bz2", ".tgz", ".txz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return archive.stem


def _single_top_folder(folder: pathlib.Path) -> pathlib.Path:
    entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else folder


def extract_archive(archive: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                    *, progress: bool = True) -> pathlib.Path:
    """Extracts a tar archive once into ``cache_dir`` and returns the folder root.

    The archive is unpacked into a temporary folder beside the destination and renamed into
    place only when complete, so an interrupted extraction is never taken for a finished one
    (its leftover temporary folder is ignored and can be deleted). The destination is keyed by
    the archive's name and size; later calls return at once. When the archive holds a single
    top-level folder (``cifar10_jpg/train/...``) that folder is returned, so
    ``FolderSource(root, "train")`` works on the result.

    Args:
      archive: a ``.tar``, ``.tar.xz``, ``.tar.gz`` or ``.tar.bz2`` file.
      cache_dir: where to extract; default `default_cache_dir()`.
      progress: show a tqdm bar over the members.

    Raises:
      FileNotFoundError: naming the archive when it does not exist.
    """
    archive = pathlib.Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {os.fspath(archive)!r} does not exist")
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = cache_dir / f"{_archive_stem(archive)}-{archive.stat().st_size}"
    if dest.is_dir():
        return _single_top_folder(dest)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=cache_dir))
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar
            if progress:
                from tqdm.auto import tqdm
                members = tqdm(tar, desc=f"extracting {archive.name}", unit=" files")
            for member in members:
                if hasattr(tarfile, "data_filter"):
                    tar.extract(member, tmp, filter="data")
                else:  # Python < 3.11.4: refuse what the "data" filter would refuse
                    if member.name.startswith("/") or ".." in pathlib.PurePosixPath(
                            member.name).parts or not (member.isdir() or member.isfile()):
                        raise ValueError(f"archive {os.fspath(archive)!r} has an unsafe member "
                                         f"{member.name!r}")
                    tar.extract(member, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # a concurrent extraction that finished first is fine
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _single_top_folder(dest)
