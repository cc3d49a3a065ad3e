"""The OpenAI wire format (tp_embed/openai_protocol.py): input shapes, token-id checks, error bodies and the
response encoder."""

import base64
import json

import numpy as np
import pytest

from tp_embed.openai_protocol import (
    APIError,
    EmbeddingRequest,
    check_token_ids,
    parse_input,
    parse_json_body,
    render_embeddings,
)


def test_the_four_input_shapes():
    assert parse_input("hi") == (["hi"], None)
    assert parse_input(["a", "b"]) == (["a", "b"], None)
    assert parse_input([1, 2, 3]) == (None, [[1, 2, 3]])
    assert parse_input([[1], [2, 3]]) == (None, [[1], [2, 3]])


@pytest.mark.parametrize("raw, message", [
    ("", "empty string"), ([], "empty list"), (["a", ""], "input[1] is an empty string"),
    (["a", 1], "input[1] is an integer"), ([[1], 2], "input[1] is an integer"),
    ([[1], []], "input[1] is an empty list"), (3, "got an integer"), ([None], "input[0] is null"),
    ([1.0], "input[0] is a number"), ([True], "input[0] is a boolean"), ({"a": 1}, "got an object"),
    (["a"] * 2049, "2049 items; at most 2048"),
])
def test_bad_input_shapes(raw, message):
    with pytest.raises(APIError) as e:
        parse_input(raw)
    assert e.value.status == 400 and e.value.param == "input" and message in e.value.message


@pytest.mark.parametrize("sequences, nested, message", [
    ([[1, 2, 10]], False, "input[2] = 10 is not a token id of this model"),
    ([[1], [2, -1]], True, "input[1][1] = -1"),
    ([[1, 2.0]], False, "input[1] = 2.0 is not a token id"),
    ([[True]], False, "input[0] = true is not a token id"),
])
def test_bad_token_ids(sequences, nested, message):
    with pytest.raises(APIError) as e:
        check_token_ids(sequences, vocab_size=10, nested=nested)
    assert message in e.value.message and "from 0 to 9" in e.value.message


def test_a_long_list_of_good_token_ids_passes():
    check_token_ids([list(range(10)) * 1000], vocab_size=10, nested=False)


@pytest.mark.parametrize("body, status, param, message", [
    (b"{", 400, None, "not valid JSON"),
    (b"\xff", 400, None, "not valid JSON"),
    (b"[]", 400, None, "must be a JSON object"),
    (b'{"model": "m"}', 400, "input", "'input' is a required property"),
    (b'{"input": "a", "foo": 1}', 400, "foo", "unrecognized request argument supplied: foo"),
    (b'{"input": "a", "dimensions": 1.5}', 400, "dimensions", "invalid value for 'dimensions'"),
    (b'{"input": "a", "user": 5}', 400, "user", "invalid value for 'user'"),
])
def test_request_parsing_errors(body, status, param, message):
    with pytest.raises(APIError) as e:
        parse_json_body(body, EmbeddingRequest)
    assert (e.value.status, e.value.param) == (status, param) and message in e.value.message
    error = json.loads(e.value.body())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


def test_float_and_base64_responses_carry_the_same_float32_values():
    rng = np.random.default_rng(0)
    vectors = (rng.standard_normal((5, 33)) * 10.0 ** rng.integers(-8, 4, (5, 33))).astype(np.float32)
    as_float = json.loads(render_embeddings(vectors, "float", "m", 17))
    as_b64 = json.loads(render_embeddings(vectors, "base64", "m", 17))
    for body in (as_float, as_b64):
        assert body["object"] == "list" and body["model"] == "m"
        assert body["usage"] == {"prompt_tokens": 17, "total_tokens": 17}
        assert [d["index"] for d in body["data"]] == list(range(5))
    floats = np.array([d["embedding"] for d in as_float["data"]], dtype=np.float32)
    raw = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in as_b64["data"]])
    np.testing.assert_array_equal(floats, vectors)  # shortest float32 text round-trips exactly
    np.testing.assert_array_equal(raw, vectors)


def test_non_finite_output_is_a_server_error_not_invalid_json():
    with pytest.raises(APIError) as e:
        render_embeddings(np.array([[1.0, np.nan]], dtype=np.float32), "float", "m", 1)
    assert e.value.status == 500


def test_float_rendering_in_blocks_keeps_every_row():
    vectors = np.arange(70 * 2000, dtype=np.float32).reshape(70, 2000) / 7  # blocks of 32 rows
    body = json.loads(render_embeddings(vectors, "float", "m", 1))
    np.testing.assert_array_equal(np.array([d["embedding"] for d in body["data"]], dtype=np.float32), vectors)
