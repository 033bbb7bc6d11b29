"""Each visitor's files on the `msdiff ui` page: `VisitorFiles`, and receiving their photos and picture.

The page is made to be shared (README: "Sharing the page"). Each visitor's photos, picture, painted
regions and results live in a folder of their own, removed when they leave (or, for API callers, after
`--keep-minutes`); photos and pictures come only from what that visitor uploaded (and the package's
example photos), checked (upload size and pixels, read from the header before decoding) and shrunk on
receipt. A painted region is decoded within fixed bounds (`regions`); every request is held to the
server's `PageLimits` (`page_limits`).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

from msdiffusion.app.page_limits import PageError, PageLimits
from msdiffusion.app.regions import REGION_NAME

ASSETS = Path(__file__).resolve().parents[1] / "assets"

# The package's example photos: public, so any visitor's page (or imported job) may use them by name.
EXAMPLE_PHOTOS = {p.name: p for p in sorted(ASSETS.rglob("*")) if p.suffix.lower() in (".jpg", ".png")}

# Photos are shrunk on receipt to this longest side: the encoder squashes each to 512x512 (and CLIP
# to 224), so more pixels only cost memory.
PHOTO_SIDE = 1024
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")


def unreadable_message(name: str, what: str = "photo") -> str:
    return f"{name}: cannot read it as an image; upload a JPEG, PNG or WebP {what}."


def fitted_picture_size(width: int, height: int, most: int) -> tuple[int, int]:
    """The size a picture of `width` x `height` is worked on at: shrunk, keeping its proportions, so that its
    sides fit `most`, and rounded down to multiples of 8 (as the pipelines round a picture's sides)."""
    scale = min(1.0, most / max(width, height))
    return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8


class VisitorFiles:
    """Each visitor's folder under one folder of the server's: the photos they sent (checked and
    shrunk on receipt) and their results. A visitor's folder is removed when they leave, and by
    `sweep` once they have asked for nothing for `keep_seconds` (API callers never "leave").

    `sources`: the folders photos may come from (Gradio's upload folder, the package's examples):
    a path a request names anywhere else is refused, whatever it points to.
    """

    def __init__(self, keep_seconds: float, sources: list[Path] | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="msdiff-ui-"))
        self.keep_seconds = keep_seconds
        self.sources = [Path(p).resolve() for p in (sources if sources is not None else _photo_sources())]
        self.protected: set[str] = set()  # the page's own initial files (Gradio's copies of the examples)
        self._lock = threading.Lock()
        self._photos: dict[str, dict[str, Path]] = {}  # visitor -> file name -> the photo as sent
        self._senders: dict[Path, set[str]] = {}  # a photo as sent -> the visitors who sent it
        self._last: dict[str, float] = {}  # visitor -> when they last asked for something
        self._stop = threading.Event()

    def folder(self, visitor: str) -> Path:
        """The visitor's folder (not made until something is written into it)."""
        return self.root / hashlib.sha256(visitor.encode()).hexdigest()[:16]

    def results(self, visitor: str) -> Path:
        """Where the visitor's request writes its results; asking for it counts as a use (for `sweep`)."""
        with self._lock:
            self._last[visitor] = time.time()
        return self.folder(visitor) / "results"

    def _allowed(self, path: str | Path) -> Path | None:
        resolved = Path(path).resolve()
        if resolved.is_file() and any(resolved.is_relative_to(d) for d in self.sources):
            return resolved
        return None

    def remember(self, visitor: str, path: str | Path) -> None:
        """A photo the visitor has on their page, found later by its file name (an imported job names its photos)."""
        resolved = self._allowed(path)
        if resolved is not None:
            with self._lock:
                self._photos.setdefault(visitor, {})[resolved.name] = resolved
                self._senders.setdefault(resolved, set()).add(visitor)
                self._last[visitor] = time.time()

    def find(self, visitor: str, name: str) -> str | None:
        """The photo (or picture) called `name` that this visitor sent, else the package's example of that name."""
        with self._lock:
            found = self._photos.get(visitor, {}).get(name)
        if found is not None and found.is_file():
            return str(found)
        return str(EXAMPLE_PHOTOS[name]) if name in EXAMPLE_PHOTOS else None

    def receive(self, visitor: str, path: str | Path, limits: PageLimits, slot: int | None = None) -> str:
        """A photo the visitor sent, checked (an upload of this page, its size and pixels read from its
        header before anything is decoded) and shrunk to `PHOTO_SIDE`; returns the copy in their folder.

        A photo within `PHOTO_SIDE` is copied as it is, so that `msdiff generate --from` with the
        visitor's own file makes the same image.
        """
        return self._receive(visitor, path, limits, "photo", {"slot": slot})

    def receive_picture(self, visitor: str, path: str | Path, limits: PageLimits) -> str:
        """The picture to work on, checked as photos are and shrunk, keeping its proportions, so that its sides
        fit `--max-size` (`fitted_picture_size`); returns the copy in the visitor's folder. A picture within
        the limit is copied as it is (the pipelines round its sides down to multiples of 8)."""
        return self._receive(visitor, path, limits, "picture", {"field": "picture"})

    def _receive(self, visitor: str, path: str | Path, limits: PageLimits, what: str, where: dict) -> str:
        """`receive` (`what`: photo) and `receive_picture` (picture); `where`: the `PageError` place of its errors."""
        import PIL.Image

        from msdiffusion.settings import MIN_SIZE
        from msdiffusion.subjects import opaque_rgb, upright, upright_size

        name = Path(str(path)).name
        source = self._allowed(path)
        if source is None:
            raise PageError(f"{name}: not a {what} uploaded to this page; upload it again.", **where)
        size = source.stat().st_size
        if size > limits.max_upload_bytes:
            raise PageError(
                f"{name}: {size / 2**20:.1f} MB; this server takes files up to {limits.max_upload_mb:g} MB "
                "(msdiff ui --max-upload-mb).",
                **where,
            )
        # One folder per file sent (Gradio names an upload's folder by its content): two files of one name stay apart.
        digest = hashlib.sha256(str(source).encode()).hexdigest()[:12]
        target = self.folder(visitor) / f"{what}s" / digest / name
        try:
            with warnings.catch_warnings():
                # PIL warns of a decompression bomb above 89 megapixels; this server's own limit decides.
                warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
                image = PIL.Image.open(source)
            with image:
                if image.format not in PHOTO_FORMATS:
                    raise PageError(f"{name}: a {image.format} file; upload a JPEG, PNG or WebP {what}.", **where)
                width, height = upright_size(image)  # as the pipelines and the browser turn it
                if width * height > limits.max_pixels:
                    raise PageError(
                        f"{name}: {width}x{height} pixels; this server takes {what}s up to "
                        f"{limits.max_megapixels:g} megapixels (msdiff ui --max-megapixels): upload a smaller one.",
                        **where,
                    )
                if what == "picture":
                    fitted = fitted_picture_size(width, height, limits.max_size)
                    shrink = fitted if max(width, height) > limits.max_size else None
                    if min(fitted) < MIN_SIZE and shrink is None:
                        raise PageError(
                            f"{name}: {width}x{height} pixels, below {MIN_SIZE} on a side once rounded down to "
                            "multiples of 8: upload a larger one.",
                            **where,
                        )
                    if min(fitted) < MIN_SIZE:
                        raise PageError(
                            f"{name}: {width}x{height} pixels would be {fitted[0]}x{fitted[1]} here (at most "
                            f"{limits.max_size} pixels a side), below {MIN_SIZE} on a side: crop it to a less narrow one.",
                            **where,
                        )
                else:
                    shrink = (width, height) if max(width, height) > PHOTO_SIDE else None
                if not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if shrink is None:
                        image.load()  # it decodes (the pipeline will decode it again)
                        shutil.copyfile(source, target)
                    else:
                        side = PHOTO_SIDE if what == "photo" else max(shrink)
                        image.draft("RGB", (side, side))  # a JPEG decodes at a fraction of its size
                        small = opaque_rgb(upright(image))
                        if what == "photo":
                            small.thumbnail((PHOTO_SIDE, PHOTO_SIDE), PIL.Image.Resampling.LANCZOS)
                        else:
                            small = small.resize(shrink, PIL.Image.Resampling.LANCZOS)
                        small.save(target, format="JPEG" if image.format == "JPEG" else "PNG", quality=95)
        except PageError:
            raise
        except (OSError, SyntaxError, ValueError, PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError):
            target.unlink(missing_ok=True)
            raise PageError(unreadable_message(name, what), **where) from None
        self.remember(visitor, source)
        return str(target)

    def regions(self, visitor: str) -> Path:
        """Where the visitor's painted regions are written as mask images (`regions_to_masks`)."""
        return self.folder(visitor) / "regions"

    def find_region(self, visitor: str, name: str) -> str | None:
        """The mask image called `name` of a region this visitor painted (an imported job names it)."""
        if not REGION_NAME.fullmatch(name):
            return None
        found = self.regions(visitor) / name
        return str(found) if found.is_file() else None

    def forget(self, visitor: str) -> None:
        """The visitor left: remove their folder, and the uploads only they sent."""
        with self._lock:
            self._photos.pop(visitor, None)
            self._last.pop(visitor, None)
            mine = []
            for path, senders in list(self._senders.items()):
                senders.discard(visitor)
                if not senders:
                    del self._senders[path]
                    mine.append(path)
        shutil.rmtree(self.folder(visitor), ignore_errors=True)
        upload_folders = [d for d in self.sources if d != ASSETS.resolve()]
        for path in mine:
            # Gradio's copy of an upload; never the page's own examples, nor anything outside its upload folder
            if str(path) not in self.protected and any(path.is_relative_to(d) for d in upload_folders):
                path.unlink(missing_ok=True)
                try:
                    path.parent.rmdir()
                except OSError:
                    pass

    def sweep(self, now: float | None = None) -> list[str]:
        """Forget the visitors who asked for nothing for `keep_seconds` (their files too); returns them."""
        now = time.time() if now is None else now
        with self._lock:
            idle = [visitor for visitor, last in self._last.items() if now - last > self.keep_seconds]
        for visitor in idle:
            self.forget(visitor)
        return idle

    def start_sweeping(self) -> None:
        """Sweep in the background, a few times per `keep_seconds` (at most every 10 minutes)."""
        interval = min(max(self.keep_seconds / 4, 1.0), 600.0)

        def loop():
            while not self._stop.wait(interval):
                try:
                    self.sweep()
                except OSError:
                    pass  # a folder removed meanwhile; the next sweep sees the rest

        threading.Thread(target=loop, name="msdiff-ui-sweep", daemon=True).start()

    def close(self) -> None:
        """Stop sweeping and remove every visitor's files (the server is stopping)."""
        self._stop.set()
        shutil.rmtree(self.root, ignore_errors=True)


def _photo_sources() -> list[Path]:
    """Where a photo a request names may be: Gradio's upload folder, the package's examples."""
    from gradio.utils import get_upload_folder

    return [Path(get_upload_folder()), ASSETS]


def receive_photos(job, slots: list[int], visitor: str, files: VisitorFiles, limits: PageLimits):
    """The job with each subject's photos replaced by the visitor's checked, shrunk copies."""
    for j, subject in enumerate(job.subjects):
        subject.images = [files.receive(visitor, path, limits, slots[j]) for path in subject.images]
    return job
