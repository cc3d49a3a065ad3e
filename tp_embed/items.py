"""One input of a multimodal request: text, an image, or both (one embedding per item)."""

from dataclasses import dataclass

from PIL import Image


@dataclass
class Item:
    text: str | None = None
    image: Image.Image | None = None  # decoded RGB image; fetching and safety checks happen before
    instruction: str | None = None  # per-request system instruction (GME's chat template)

    def __post_init__(self):
        if self.text is None and self.image is None:
            raise ValueError("an item needs text, an image, or both")
