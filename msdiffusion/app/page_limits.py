"""What one request to `msdiff ui` may ask of the server, and what the page says when it asks for
more (or for something wrong): the bounds of every request, the server's `PageLimits` (its options)
and `PageError`, bad input on the page, tied to the subject or field it belongs to."""

from __future__ import annotations

from dataclasses import dataclass

from msdiffusion.errors import UserInputError

MAX_SUBJECTS = 4

# Bounds every request is held to (not options: beyond them the models make nothing useful).
MAX_GUIDANCE = 30.0
MAX_SCALE = 2.0
MAX_TEXT = 1000  # characters of a prompt, negative prompt or phrase (the text encoders read 77 tokens)
MAX_SEED = 2**63 - 1024  # torch seeds are 64-bit; each image adds one


@dataclass
class PageLimits:
    """What one request may ask of the server; each is a `msdiff ui` option (`--max-size`, ...)."""

    max_size: int = 1536  # pixels, the larger of width and height
    max_steps: int = 100
    max_images: int = 4  # images per request
    max_photos: int = 4  # photos per subject
    max_upload_mb: float = 20.0  # any one uploaded file
    max_megapixels: float = 40.0  # a photo's width x height, read from its header before decoding
    queue_size: int = 20  # requests waiting for the model; more are refused until one starts
    job_seconds: float = 600.0  # a generation running longer is stopped
    keep_minutes: float = 60.0  # a visitor's files are removed when they leave, or this long after last use

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1_000_000)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class PageError(UserInputError):
    """Bad input on the page. `slot`: the subject it belongs to; `field`: the page field it sits
    next to ("size"), where it is not a subject's; `also`: the job's other problems, if several."""

    def __init__(self, message: str, slot: int | None = None, field: str | None = None):
        super().__init__(message)
        self.slot = slot
        self.field = field
        self.also: list[PageError] = []
