"""The model gallery: a curated index (catalog), the models on disk (store), the installer.

    index = load_index(config.gallery)          # built-in index.yaml + user indexes
    entry = resolve(index, "smollm2")           # by id or alias; ModelNotFound suggests names
    model = await install(entry, Store(dir))    # verified files, then model.yaml
"""

from gallery.catalog import FileSpec, GalleryEntry, ModelConfig, Sampling, load_index, resolve
from gallery.installer import PeerFetcher, Progress, install, is_installed
from gallery.store import InstalledModel, Store

__all__ = ["FileSpec", "GalleryEntry", "ModelConfig", "Sampling", "load_index", "resolve",
           "PeerFetcher", "Progress", "install", "is_installed", "InstalledModel", "Store"]
