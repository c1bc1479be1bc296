"""What the installed plugins provide: format drivers and storage drivers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from corefmt.errors import CorefmtError, UnknownFormatError

if TYPE_CHECKING:
    from corefmt.driver import FormatDriver
    from corefmt.filters.base import FilterDriver, StorageFilterDriver
    from corefmt.storage.base import StorageDriver

#: How many bytes of an image probes get to see.
PROBE_HEAD_SIZE = 4096


class Registry:
    """Filled by ``corefmt_register`` hooks; read by everything else."""

    def __init__(self) -> None:
        self.formats: dict[str, FormatDriver] = {}
        self.storages: dict[str, StorageDriver] = {}
        self.filters: dict[str, FilterDriver | StorageFilterDriver] = {}

    # -- registration ---------------------------------------------------------
    def add_format(self, driver: FormatDriver) -> None:
        self._check_new_name(driver, "format")
        self.formats[driver.name] = driver

    def add_filter(self, driver: FilterDriver | StorageFilterDriver) -> None:
        """A node filter (copy-on-read, throttle...) or a storage filter (blkdebug)."""
        self._check_new_name(driver, "filter")
        self.filters[driver.name] = driver

    def _check_new_name(self, driver: object, kind: str) -> None:
        """Formats and filters share one namespace: qemu's ``driver`` key."""
        name = getattr(driver, "name", "")
        if not name:
            raise CorefmtError(f"{kind} driver {driver!r} has no name")
        if name in self.formats or name in self.filters:
            raise CorefmtError(f"{kind} '{name}' is registered twice")

    def add_storage(self, driver: StorageDriver) -> None:
        if driver.name in self.storages:
            raise CorefmtError(f"storage driver '{driver.name}' is registered twice")
        self.storages[driver.name] = driver

    # -- lookup ---------------------------------------------------------------
    def format(self, name: str) -> FormatDriver:
        try:
            return self.formats[name]
        except KeyError:
            known = ", ".join(sorted(self.formats)) or "none"
            raise UnknownFormatError(
                f"Unknown file format '{name}' (installed formats: {known})"
            ) from None

    def filter(self, name: str) -> FilterDriver | StorageFilterDriver:
        try:
            return self.filters[name]
        except KeyError:
            raise UnknownFormatError(f"Unknown driver '{name}'") from None

    def storage_for(self, path: str) -> StorageDriver:
        """The storage driver a path belongs to: by prefix, else ``file``."""
        for driver in self.storages.values():
            if driver.prefix and path.startswith(driver.prefix):
                return driver
        try:
            return self.storages["file"]
        except KeyError:
            raise UnknownFormatError("no 'file' storage driver is installed") from None

    def resolve(self, path: str, relative_to: str | None) -> str:
        """Where a name recorded in (or given for) the image ``relative_to``
        points. A name with a storage prefix, or an absolute one, stands as
        it is; a relative one lives on the image's storage, next to it, as
        qemu's path_combine keeps the image's protocol (a data file named
        ``data`` of ``sim:run/top`` is ``sim:run/data``, not a local file)."""
        driver = self.storage_for(path)
        if (relative_to and driver.name == "file" and not path.startswith("/")
                and ":" not in path.split("/")[0]):
            driver = self.storage_for(relative_to)
        return driver.resolve(path, relative_to)

    def probe(self, head: bytes, path: str | None) -> FormatDriver:
        """The format whose probe scores highest (raw is the fallback)."""
        best: FormatDriver | None = None
        best_score = 0
        for driver in self.formats.values():
            score = driver.probe(head, path)
            if score > best_score:
                best, best_score = driver, score
        if best is None:
            raise UnknownFormatError(f"Could not determine the format of '{path}'")
        return best
