"""tp_embed/packing.py: the one greedy packing rule, and that the engine, the scheduler and CLIP fill batches by it."""

import random

import pytest

from tp_embed.packing import Packer, pack


def reference_pack(costs, max_tokens, max_seqs, images=None, max_images=None):
    """The rule written out once more, plainly: start a new batch when the next input would break a budget."""
    batches = []
    for i, cost in enumerate(costs):
        image = bool(images and images[i])
        if batches:
            current = batches[-1]
            tokens = sum(costs[j] for j in current)
            num_images = sum(bool(images and images[j]) for j in current)
            if (tokens + cost <= max_tokens and len(current) < max_seqs
                    and not (image and max_images is not None and num_images >= max_images)):
                current.append(i)
                continue
        batches.append([i])
    return batches


def test_budgets_and_order():
    assert pack([3, 3, 3, 3], max_tokens=6, max_seqs=8) == [[0, 1], [2, 3]]
    assert pack([1] * 5, max_tokens=100, max_seqs=2) == [[0, 1], [2, 3], [4]]
    assert pack([], max_tokens=10, max_seqs=2) == []


def test_an_input_over_the_budget_gets_a_batch_of_its_own():
    assert pack([2, 50, 2], max_tokens=10, max_seqs=8) == [[0], [1], [2]]
    assert pack([50], max_tokens=10, max_seqs=8) == [[0]]


def test_images_have_their_own_limit():
    images = [True, True, False, True, True]
    assert pack([1] * 5, 100, 8, images, max_images=2) == [[0, 1, 2], [3, 4]]
    assert pack([1] * 5, 100, 8, images) == [[0, 1, 2, 3, 4]]  # no image limit


@pytest.mark.parametrize("seed", range(20))
def test_matches_the_rule_written_plainly(seed):
    rng = random.Random(seed)
    n = rng.randint(0, 40)
    costs = [rng.randint(1, 30) for _ in range(n)]
    images = [rng.random() < 0.4 for _ in range(n)]
    budgets = dict(max_tokens=rng.randint(1, 80), max_seqs=rng.randint(1, 6), max_images=rng.choice([None, 1, 2]))
    got = pack(costs, images=images, **budgets)
    assert got == reference_pack(costs, images=images, **budgets)
    assert [i for batch in got for i in batch] == list(range(n))


def test_packer_always_takes_into_an_empty_batch():
    packer = Packer(max_tokens=4, max_seqs=1, max_images=0)
    assert packer.fits(100, image=True)
    packer.add(100, image=True)
    assert not packer.fits(1)
    packer.reset()
    assert packer.fits(1) and (packer.num_tokens, packer.num_seqs, packer.num_images) == (0, 0, 0)


def test_scheduler_fills_batches_by_the_same_rule():
    """Slices of queued requests, taken by Scheduler._pack, fall where `pack` puts the same inputs."""
    from tp_embed.scheduler import Job, Scheduler

    rng = random.Random(0)
    jobs = [Job([[0] * rng.randint(1, 20) for _ in range(rng.randint(1, 5))]) for _ in range(12)]
    scheduler = Scheduler(lambda: None, lambda jobs: None, lambda engine: None, lambda error: None)
    scheduler._waiting.extend(jobs)
    batches = []
    while scheduler._waiting:
        batch = scheduler._pack(max_batch_tokens=40, max_batch_seqs=4)
        batches.append(sum(end - start for _, start, end in batch))
    lengths = [len(s) for job in jobs for s in job.sequences]
    assert batches == [len(b) for b in pack(lengths, 40, 4)]
