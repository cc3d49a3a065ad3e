"""Greedy batch packing: the one rule every batch is filled by.

Inputs are taken in order while the batch stays within its budgets: at most `max_tokens` tokens, at most
`max_seqs` inputs and, when `max_images` is set, at most that many images. An input is always taken into
an empty batch, so one longer than the token budget gets a batch of its own. The engine (`pack`), the
scheduler (slices of queued requests, whole multimodal requests) and CLIP's processor (texts and images)
all fill batches through `Packer`.
"""

from dataclasses import dataclass


@dataclass
class Packer:
    """One batch being filled: ask `fits`, then `add`."""
    max_tokens: int
    max_seqs: int
    max_images: int | None = None
    num_tokens: int = 0
    num_seqs: int = 0
    num_images: int = 0

    def fits(self, cost: int, image: bool = False) -> bool:
        """Whether an input of `cost` tokens (an image when `image`) may join the batch."""
        if self.num_seqs == 0:
            return True
        return (self.num_tokens + cost <= self.max_tokens and self.num_seqs < self.max_seqs
                and not (image and self.max_images is not None and self.num_images >= self.max_images))

    def add(self, cost: int, image: bool = False) -> None:
        self.num_tokens += cost
        self.num_seqs += 1
        self.num_images += image

    def reset(self) -> None:
        self.num_tokens = self.num_seqs = self.num_images = 0


def pack(costs: list[int], max_tokens: int, max_seqs: int, images: list[bool] | None = None,
         max_images: int | None = None) -> list[list[int]]:
    """Positions 0..n-1 of `costs` (tokens per input), in order, grouped into batches by `Packer`'s rule;
    `images[i]` says whether input i is an image (counted against `max_images`)."""
    packer = Packer(max_tokens, max_seqs, max_images)
    batches, current = [], []
    for i, cost in enumerate(costs):
        image = bool(images[i]) if images is not None else False
        if not packer.fits(cost, image):
            batches.append(current)
            current = []
            packer.reset()
        current.append(i)
        packer.add(cost, image)
    if current:
        batches.append(current)
    return batches
