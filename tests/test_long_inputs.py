"""Long inputs (tp_embed/text.py LengthPolicy, pooling.combine_windows): truncation on either side against the
tokenizer's own truncation, chunking into windows of the context length combined as docs/api.md says, against
vectors computed by hand with transformers from the windows, at tp 1 (the offline entry point) and tp 2 (the
`minilm` server), and the per-request fields of /v1/embeddings, /embed and /v2/embed."""

import sys

import numpy as np
import pytest
import torch

import tiny_models as tm
from dist_utils import offline_compute, run
from tp_embed.config import SentenceTransformersConfig
from tp_embed.pooling import combine_windows
from tp_embed.text import InputTooLongError, LengthPolicy, TextProcessor

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
CONTEXT = 256  # all-MiniLM-L6-v2's max_seq_length
SIDES = ("right", "left")


@pytest.fixture(scope="module")
def minilm_text(minilm_dir) -> TextProcessor:
    return TextProcessor(minilm_dir, SentenceTransformersConfig.read(minilm_dir), 512)


@pytest.fixture(scope="module")
def decoder_text(tmp_path_factory) -> TextProcessor:
    """A byte-level BPE tokenizer with a BOS before and an EOS after every sequence (specials on both ends)."""
    path = tmp_path_factory.mktemp("bpe")
    tm.build_decoder_tokenizer(bos_token="<s>").save_pretrained(str(path))
    return TextProcessor(str(path), SentenceTransformersConfig.read(str(path)), 4096)


def long_text(num_tokens: int, text: TextProcessor) -> str:
    """A text of at least num_tokens tokens, from the test corpus repeated."""
    words = tm.LONG_TEXT.split()
    out = []
    while len(text.tokenizer(" ".join(out))["input_ids"]) < num_tokens:
        out += words
    return " ".join(out)


@pytest.mark.parametrize("which", ["minilm_text", "decoder_text"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("limit", [3, 17, 64])
def test_truncation_sides_match_the_tokenizer(request, which, side, limit):
    text = request.getfixturevalue(which)
    inputs = [tm.LONG_TEXT, tm.MIXED_TEXTS[3], "short"]
    tokenizer = text.tokenizer
    tokenizer.truncation_side = side
    try:
        expected = tokenizer(inputs, truncation=True, max_length=limit)["input_ids"]
    finally:
        tokenizer.truncation_side = "right"
    got = text.encode_windows(inputs, LengthPolicy("truncate", limit, side))
    assert [w[0] for w in got] == expected and all(len(w) == 1 for w in got)
    # token-id inputs that hold their special tokens are cut the same way
    full = tokenizer(inputs)["input_ids"]
    assert [w[0] for w in text.fit_token_ids(full, LengthPolicy("truncate", limit, side))] == expected


@pytest.mark.parametrize("which", ["minilm_text", "decoder_text"])
@pytest.mark.parametrize("mode, side", [("truncate", "left"), ("truncate", "right"), ("chunk", "right")])
def test_the_prompt_and_special_tokens_stay_in_every_sequence(request, which, mode, side):
    text = request.getfixturevalue(which)
    prompt = "Instruct: find the passage\nQuery: "
    doc = long_text(200, text)
    full = text.tokenizer(prompt + doc)["input_ids"]
    windows = text.encode_windows([doc], LengthPolicy(mode, 40, side), prompt)[0]
    head, prompt_ids, body, tail = text.split(full, prompt + doc, len(prompt))
    assert len(prompt_ids) >= 5 and body and head + prompt_ids + body + tail == full
    assert "".join(text.tokenizer.decode(prompt_ids).lower().split()).startswith("instruct:findthepassagequery:")
    for w in windows:
        assert len(w) <= 40 and w[:len(head) + len(prompt_ids)] == head + prompt_ids and w[len(w) - len(tail):] == tail
    middles = [w[len(head) + len(prompt_ids):len(w) - len(tail)] for w in windows]
    if mode == "chunk":  # the windows hold the text once, in order, every window full but the last
        assert sum(middles, []) == body and len(windows) == -(-len(body) // len(middles[0]))
        assert all(len(w) == 40 for w in windows[:-1])
    else:
        assert len(windows) == 1
        assert middles[0] == (body[:len(middles[0])] if side == "right" else body[len(body) - len(middles[0]):])


def test_limits_and_their_errors(minilm_text):
    text = long_text(300, minilm_text)
    ids = minilm_text.tokenizer(text)["input_ids"]
    with pytest.raises(InputTooLongError, match="context length of 256"):
        minilm_text.encode_windows([text], LengthPolicy("error"))
    with pytest.raises(InputTooLongError, match="more than the 100 this request allows"):
        minilm_text.encode_windows([text], LengthPolicy("error", 100))
    with pytest.raises(InputTooLongError, match="--max-input-tokens"):  # whatever the mode
        minilm_text.encode_windows([text], LengthPolicy("chunk", max_input_tokens=len(ids) - 1))
    assert len(minilm_text.encode_windows([text], LengthPolicy("chunk", max_input_tokens=len(ids)))[0]) == 2
    with pytest.raises(ValueError, match="no room for the text"):  # [CLS] query : [SEP] leave none of 4
        minilm_text.encode_windows([text], LengthPolicy("truncate", 4), "query: ")


def test_combine_windows_by_hand():
    rows = torch.arange(12, dtype=torch.float32).view(6, 2)  # inputs of 1, 3 and 2 windows
    counts, lengths = [1, 3, 2], [5, 10, 10, 4, 7, 1]
    mean = combine_windows(rows, counts, lengths, "mean")
    assert torch.allclose(mean[0], rows[0])
    assert torch.allclose(mean[1], (10 * rows[1] + 10 * rows[2] + 4 * rows[3]) / 24)
    assert torch.allclose(mean[2], (7 * rows[4] + rows[5]) / 8)
    assert torch.equal(combine_windows(rows, counts, lengths, "last"), mean)
    assert torch.equal(combine_windows(rows, counts, lengths, "cls"), rows[[0, 1, 4]])
    with pytest.raises(ValueError, match="mean, last or cls"):
        combine_windows(rows, counts, lengths, "max")


def reference_vectors(model_dir: str, windows: list[list[list[int]]], pooling: str) -> np.ndarray:
    """transformers' hidden states of each window, pooled, combined as docs/api.md says, normalized."""
    from transformers import AutoModel
    model = AutoModel.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for input_windows in windows:
            pooled, weights = [], []
            for ids in input_windows:
                hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
                pooled.append({"mean": hidden.mean(0), "cls": hidden[0], "last": hidden[-1]}[pooling])
                weights.append(len(ids))
            if pooling == "cls":
                vector = pooled[0]
            else:
                vector = sum(w * p for w, p in zip(weights, pooled)) / sum(weights)
            out.append(torch.nn.functional.normalize(vector, dim=0).numpy())
    return np.stack(out)


@pytest.fixture(scope="module")
def chunk_texts(minilm_text) -> list[str]:
    """3.5 context lengths, a short text, and one token over the context."""
    three_and_a_half = long_text(int(3.5 * CONTEXT), minilm_text)
    ids = minilm_text.tokenizer(three_and_a_half, add_special_tokens=False)["input_ids"]
    just_over = minilm_text.tokenizer.decode(ids[:CONTEXT - 1])
    return [three_and_a_half, tm.MIXED_TEXTS[0], just_over]


def test_chunking_at_tp_2_over_http(minilm, minilm_text, chunk_texts):
    windows = minilm_text.encode_windows(chunk_texts, LengthPolicy("chunk"))
    assert [len(w) for w in windows] == [4, 1, 2]
    r = minilm.post("/v1/embeddings", {"model": MINILM_NAME, "input": chunk_texts, "long_inputs": "chunk"})
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    expected = reference_vectors(minilm.model_dir, windows, "mean")
    assert np.abs(got - expected).max() < 1e-5
    assert r.json()["usage"]["prompt_tokens"] == sum(len(s) for w in windows for s in w)
    # TEI's /embed follows --long-inputs, error on this server
    tei = minilm.post("/embed", {"inputs": chunk_texts[:1]})
    assert tei.status_code == 422 and "context length" in tei.json()["error"]


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_chunking_at_tp_1_offline(minilm_dir, minilm_text, chunk_texts, tmp_path, pooling):
    """The offline entry point with --long-inputs chunk and a 64-token context: every pooling's combination;
    mean through the command, cls and last through its `compute` in this process (the same code, less startup)."""
    texts_file, out = tmp_path / "texts.txt", tmp_path / "out.npy"
    texts = [t.replace("\n", " ") for t in chunk_texts]
    texts_file.write_text("\n".join(texts) + "\n")
    flags = ["--no-progress", "--input", str(texts_file), "--output", str(out), "--long-inputs", "chunk",
             "--context-length", "64", "--pooling", pooling]
    if pooling == "mean":
        proc = run([sys.executable, "-m", "tp_embed.offline", *flags])
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        np.save(out, offline_compute(flags))
    text = TextProcessor(minilm_dir, SentenceTransformersConfig.read(minilm_dir), 512, context_length=64)
    windows = text.encode_windows(texts, LengthPolicy("chunk"))
    assert [len(w) for w in windows][0] == -(-(len(text.tokenizer(texts[0])["input_ids"]) - 2) // 62)
    assert np.abs(np.load(out) - reference_vectors(minilm_dir, windows, pooling)).max() < 1e-5


def embed(minilm, body: dict, path: str = "/v1/embeddings") -> np.ndarray:
    r = minilm.post(path, {"model": MINILM_NAME, **body})
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


@pytest.mark.parametrize("side", SIDES)
def test_truncate_prompt_tokens_and_side_over_http(minilm, minilm_text, chunk_texts, side):
    tokenizer = minilm_text.tokenizer
    tokenizer.truncation_side = side
    try:
        ids = tokenizer(chunk_texts[0], truncation=True, max_length=100)["input_ids"]
    finally:
        tokenizer.truncation_side = "right"
    expected = embed(minilm, {"input": [ids]})
    got = embed(minilm, {"input": chunk_texts[0], "truncate_prompt_tokens": 100, "truncation_side": side})
    assert np.abs(got - expected).max() < 1e-6
    cohere = minilm.post("/v2/embed", {"model": MINILM_NAME, "texts": chunk_texts[:1], "max_tokens": 100,
                                       "truncate": "END" if side == "right" else "START"})
    assert cohere.status_code == 200, cohere.text
    assert np.abs(np.array(cohere.json()["embeddings"]["float"]) - expected).max() < 1e-6
    tei = minilm.post("/embed", {"inputs": chunk_texts[0], "truncate": True, "truncation_direction": side.title()})
    assert tei.status_code == 200, tei.text
    whole = tokenizer(chunk_texts[0])["input_ids"]
    context_ids = whole[:CONTEXT - 1] + whole[-1:] if side == "right" else whole[:1] + whole[1 - CONTEXT:]
    assert np.abs(np.array(tei.json()) - embed(minilm, {"input": [context_ids]})).max() < 1e-6


@pytest.mark.parametrize("body, param, words", [
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "between 1 and 256"),
    ({"truncate_prompt_tokens": 257}, "truncate_prompt_tokens", "between 1 and 256"),
    ({"truncate_prompt_tokens": 10, "long_inputs": "chunk"}, "truncate_prompt_tokens", "chunk"),
    ({"truncate": True, "long_inputs": "chunk"}, "long_inputs", "not both"),
    ({"truncation_side": "middle"}, "truncation_side", "right"),
    ({"long_inputs": "split"}, "long_inputs", "chunk"),
    ({"truncate_prompt_tokens": 10, "truncate": False}, "input", "more than the 10 this request allows"),
    ({"truncate_prompt_tokens": 2}, "input", "no room"),
])
def test_bad_long_input_requests_are_400(minilm, chunk_texts, body, param, words):
    r = minilm.post("/v1/embeddings", {"model": MINILM_NAME, "input": chunk_texts[0], **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_an_input_over_max_input_tokens_is_400_even_when_chunking(minilm):
    r = minilm.post("/v1/embeddings", {"model": MINILM_NAME, "input": "word " * 33000, "long_inputs": "chunk"})
    assert r.status_code == 400, r.text[:300]
    assert "--max-input-tokens" in r.json()["error"]["message"]
