"""MPNet (all-mpnet-base-v2's family) at tp = 1, 2 and 4 (gloo, CPU, float32) against sentence-transformers
on tiny random checkpoints (tests/tiny_mpnet.py): cosine >= 0.99999 for every vector.

The texts include LONG_TEXT, truncated to the 256-token max_seq_length, so query-key distances go past the
relative position bias's max_distance of 128 (its last, shared bucket). One torchrun job per tp embeds both
checkpoints, with the other new families' (tests/family_jobs.py)."""

import json
import os
import shutil

import pytest
import torch

import tiny_models as tm
from dist_utils import assert_matches_reference, cosines
from dist_utils import load_output as load
from family_jobs import MPNET_TEXTS, TPS

BOUND = 0.99999
TEXTS = MPNET_TEXTS
NAMES = ("mpnet", "mpnet_prefixed")
BIAS_KEY = "encoder.relative_attention_bias.weight"


@pytest.fixture(scope="module")
def checkpoints(family_jobs):
    return {name: family_jobs.checkpoints[name] for name in NAMES}


@pytest.fixture(scope="module")
def outputs(family_jobs):
    """{tp: output directory} of the shared job per tp (tests/family_jobs.py)."""
    return family_jobs.dirs


@pytest.fixture(scope="module")
def references(checkpoints):
    return {name: tm.st_encode(path, TEXTS) for name, path in checkpoints.items()}



@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("name", NAMES)
def test_matches_sentence_transformers(outputs, references, name, tp):
    assert_matches_reference(load(outputs, tp, name), references[name], f"{name} tp={tp}", BOUND)


@pytest.mark.parametrize("tp", TPS)
def test_alone_equals_in_batch(outputs, tp):
    """Each text in a batch of its own (its own max_seqlen, so its own bias table) gives the batched vector."""
    assert cosines(load(outputs, tp, "mpnet"), load(outputs, tp, "mpnet", "alone.npy")).min() >= BOUND


def test_long_text_reaches_past_max_distance(outputs):
    lengths = json.load(open(os.path.join(outputs[1], "mpnet.tokens.json")))
    assert lengths[-1] == tm.MAX_SEQ_LENGTH  # truncated, as sentence-transformers does
    assert lengths[-1] - 1 > 128  # its farthest query-key distance is past max_distance
    assert max(lengths[:-1]) < lengths[-1]


def test_each_rank_reads_only_its_heads_of_the_bias(outputs):
    for rank in range(4):
        stats = json.load(open(os.path.join(outputs[4], f"mpnet.rank{rank}.json")))
        assert stats["largest_read_fraction"]["relative_attention_bias.weight"] == 0.25


def test_the_relative_bias_matters(outputs, checkpoints, references, tmp_path):
    """With the bias zeroed, sentence-transformers gives other vectors for every text, and so would a server
    that dropped it: the comparison above could fail."""
    from safetensors.torch import load_file, save_file

    zeroed = str(tmp_path / "zeroed")
    shutil.copytree(checkpoints["mpnet"], zeroed)
    state = load_file(os.path.join(zeroed, "model.safetensors"))
    state[BIAS_KEY].zero_()
    save_file(state, os.path.join(zeroed, "model.safetensors"), metadata={"format": "pt"})
    without = tm.st_encode(zeroed, TEXTS)
    assert cosines(without, references["mpnet"]).max() < 0.999
    assert cosines(without, load(outputs, 1, "mpnet")).max() < 0.999


def test_bias_table_matches_transformers(checkpoints):
    """The [heads, 2 L - 1] table over offsets j - i holds transformers' position bias for every (i, j),
    at a length past max_distance."""
    from safetensors.torch import load_file
    from transformers import MPNetConfig
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    from tp_embed.models.mpnet import RelativePositionBias

    config = MPNetConfig.from_pretrained(checkpoints["mpnet"])
    weight = load_file(os.path.join(checkpoints["mpnet"], "model.safetensors"))[BIAS_KEY]
    encoder = MPNetEncoder(config)
    encoder.relative_attention_bias.weight.data.copy_(weight)
    ours = RelativePositionBias(config.relative_attention_num_buckets, config.num_attention_heads)
    ours.weight_loader(ours.weight, weight)
    length = 300
    expected = encoder.compute_position_bias(torch.zeros(1, length, 1))[0]  # [heads, i, j]
    table = ours(length)
    i, j = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
    assert table.dtype == torch.float32 and table.shape == (config.num_attention_heads, 2 * length - 1)
    assert torch.equal(table[:, j - i + length - 1], expected)
