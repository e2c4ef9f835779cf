"""Our own exception types: each names the field, file or value at fault and what was expected."""


class KVTunerError(Exception):
    """Base class of every error this package raises on purpose."""


class ManifestError(KVTunerError, ValueError):
    """A manifest is malformed or does not fit the model. The message starts with the JSON path at fault."""

    def __init__(self, path: str, message: str, file: str | None = None):
        self.path = path
        self.file = file
        where = f"{file}: " if file else ""
        super().__init__(f"{where}{path}: {message}")


class AssetError(KVTunerError, FileNotFoundError):
    """A model, tokenizer or data file is missing or unreadable."""


class ModelError(KVTunerError, ValueError):
    """A model file or config is unsupported or inconsistent."""


class CacheError(KVTunerError, ValueError):
    """A cache request does not fit: out of pages, prompt longer than the cache, bad sequence slot."""


class OutOfPagesError(CacheError):
    """The page allocator has fewer free pages than a request needs."""
