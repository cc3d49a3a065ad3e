"""Images in /v1/embeddings: items {"text"}, {"image"} or both, one embedding per item, served by the
real server under torchrun at tp = 2 (gloo, CPU).

CLIP: text and image vectors equal transformers' get_text_features / get_image_features (normalized)
for images sent as data URIs and as local files under --allowed-local-media-path, mixed with texts in
one request; refused sources and a text+image item get a 400 naming the item, and the server answers
afterwards. GME: text, image and fused items with the gme-qwen2-vl template and an instruction."""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import tiny_clip
from server_utils import ServerProcess, cosine_rows, response_vectors

BOUND = 0.99999


def data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def clip_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    model = tiny_clip.make_clip(str(root / "clip"))
    media = root / "media"
    media.mkdir()
    images = tiny_clip.make_images()
    for name, image in images.items():
        image.save(media / f"{name}.png")
    args = ["--model-path", model, "--tp", "2", "--allowed-local-media-path", str(media),
            "--max-image-pixels", "100000", "--max-request-images", "4"]
    with ServerProcess(args, nproc=2, log_path=root / "server.log") as server:
        yield server, model, media, images


def test_clip_texts_and_images_in_one_request(clip_server):
    server, model, media, images = clip_server
    texts = ["a photo of a cat", "two dogs playing in the snow on a sunny winter day", "x"]
    items = [{"text": texts[0]}, {"image": data_uri(images["wide"])}, {"text": texts[1]},
             {"image": str(media / "tall.png")}, {"image": "file://" + str(media / "gray.png")}, {"text": texts[2]}]
    r = server.post("/v1/embeddings", json={"input": items})
    assert r.status_code == 200, r.text
    got = response_vectors(r.json())
    ref_text = tiny_clip.reference_text(model, texts)
    ref_image = tiny_clip.reference_images(model, [Image.open(media / f"{n}.png") for n in ("wide", "tall", "gray")])
    assert cosine_rows(got[[0, 2, 5]], ref_text).min() >= BOUND
    assert cosine_rows(got[[1, 3, 4]], ref_image).min() >= BOUND
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # one item a request, all at once: requests that wait together share batches; each gets its own vector
    with ThreadPoolExecutor(len(items)) as pool:
        answers = list(pool.map(lambda item: server.post("/v1/embeddings", json={"input": [item]}), items))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    singles = np.concatenate([response_vectors(a.json()) for a in answers])
    assert cosine_rows(singles, got).min() >= BOUND
    # usage counts what the batches held: each text's tokens and each image's 1 + (S/P)^2 patch tokens
    from transformers import AutoTokenizer
    text_tokens = sum(map(len, AutoTokenizer.from_pretrained(model)(texts)["input_ids"]))
    per_image = 1 + (tiny_clip.IMAGE_SIZE // 8) ** 2
    assert r.json()["usage"]["prompt_tokens"] == text_tokens + 3 * per_image


def test_cohere_v2_embed_images_with_the_cohere_client(clip_server):
    """Cohere's images and image_url inputs become items: the same vectors /v1/embeddings gives them."""
    import cohere

    server, model, media, images = clip_server
    uris = [data_uri(images["wide"]), data_uri(images["gray"])]
    expected = response_vectors(server.post("/v1/embeddings", json={"input": [{"image": u} for u in uris]}).json())
    name = server.get("/v1/models").json()["data"][0]["id"]
    client = cohere.ClientV2(base_url=server.url, api_key="unused")
    response = client.embed(model=name, images=uris, input_type="image", embedding_types=["float", "binary"])
    assert np.abs(np.array(response.embeddings.float_) - expected).max() < 1e-6
    binary = np.packbits(expected > 0, axis=-1).astype(np.int16) - 128
    assert np.array_equal(np.array(response.embeddings.binary), binary)
    inputs = [{"content": [{"type": "image_url", "image_url": {"url": uris[1]}}]},
              {"content": [{"type": "text", "text": "a photo"}, {"type": "text", "text": "of a cat"}]}]
    r = server.post("/v2/embed", json={"inputs": inputs, "input_type": "search_document"})
    assert r.status_code == 200, r.text
    text = response_vectors(server.post("/v1/embeddings", json={"input": ["a photo of a cat"]}).json())
    got = np.array(r.json()["embeddings"]["float"])
    assert np.abs(got - np.concatenate([expected[1:], text])).max() < 1e-6
    assert r.json()["texts"] == ["a photo of a cat"]


@pytest.mark.parametrize("image,message", [
    ("http://127.0.0.1:1/x.png", "input[1].image"),
    ("http://10.0.0.1/x.png", "input[1].image"),
    ("/etc/passwd", "input[1].image"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "input[1].image"),
])
def test_refused_image_sources_name_the_item(clip_server, image, message):
    server = clip_server[0]
    r = server.post("/v1/embeddings", json={"input": [{"text": "ok"}, {"image": image}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["code"] == "invalid_image"
    assert server.post("/v1/embeddings", json={"input": [{"text": "still serving"}]}).status_code == 200


def test_image_over_the_pixel_cap_is_refused(clip_server):
    server = clip_server[0]
    big = data_uri(Image.new("RGB", (400, 400)))  # 160,000 pixels over the 100,000 cap
    r = server.post("/v1/embeddings", json={"input": [{"image": big}]})
    assert r.status_code == 400 and "input[0].image" in r.json()["error"]["message"]


def test_more_images_than_allowed_is_refused_before_any_is_fetched(clip_server):
    server, _, media, images = clip_server
    # five images over the limit of 4; the last is a URL nothing answers, so fetching would fail another way
    items = [{"image": data_uri(images["square"])}] * 4 + [{"text": "a"}, {"image": "http://127.0.0.1:1/x.png"}]
    r = server.post("/v1/embeddings", json={"input": items})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "input has 5 images; at most 4 are allowed per request (--max-request-images)" in message
    r = server.post("/v1/embeddings", json={"input": items[:4] + [{"text": "a"}]})
    assert r.status_code == 200 and len(r.json()["data"]) == 5


def test_clip_refuses_text_and_image_in_one_item(clip_server):
    server, _, _, images = clip_server
    r = server.post("/v1/embeddings", json={"input": [{"text": "a cat", "image": data_uri(images["square"])}]})
    assert r.status_code == 400, r.text
    assert "CLIP embeds text and images separately" in r.json()["error"]["message"]
    assert server.get("/health").status_code == 200
    assert server.post("/v1/embeddings", json={"input": "plain text still works"}).status_code == 200


@pytest.mark.parametrize("body,message", [
    ({"input": [{"text": "a", "video": "x"}]}, "unknown fields ['video']"),
    ({"input": [{}]}, "empty object"),
    ({"input": [{"text": ""}]}, "input[0].text must be a non-empty string"),
    ({"input": [{"text": "a"}, "b"]}, "input[1] is a string"),
])
def test_malformed_items(clip_server, body, message):
    r = clip_server[0].post("/v1/embeddings", json=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_text_only_model_takes_text_items_and_refuses_images(tiny_mistral_dir, tmp_path):
    with ServerProcess(["--model-path", tiny_mistral_dir], nproc=1, log_path=tmp_path / "s.log") as server:
        plain = server.post("/v1/embeddings", json={"input": ["hello world"]})
        items = server.post("/v1/embeddings", json={"input": [{"text": "hello world"}]})
        assert items.status_code == 200
        assert cosine_rows(response_vectors(items.json()), response_vectors(plain.json())).min() >= BOUND
        r = server.post("/v1/embeddings", json={"input": [{"image": data_uri(Image.new("RGB", (8, 8)))}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "images_not_supported"


def test_gme_items_over_http(tmp_path):
    import test_gme as g

    model = g.make_qwen2_vl(str(tmp_path / "gme"), "legacy")
    rng = np.random.default_rng(0)
    paths = {}
    for name, (h, w) in g.IMAGES.items():
        paths[name] = str(tmp_path / f"{name}.png")
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(paths[name])
    ref = g.reference(model, paths)["vectors"]
    args = ["--model-path", model, "--tp", "2", "--chat-template", "gme-qwen2-vl",
            "--allowed-local-media-path", str(tmp_path)] + g.pixel_flags()
    with ServerProcess(args, nproc=2, log_path=tmp_path / "server.log") as server:
        plain = [i for i, item in enumerate(g.ITEMS) if "instruction" not in item]
        items = [{k: (paths[v] if k == "image" else v) for k, v in g.ITEMS[i].items()} for i in plain]
        r = server.post("/v1/embeddings", json={"input": items})
        assert r.status_code == 200, r.text
        assert cosine_rows(response_vectors(r.json()), ref[plain]).min() >= BOUND
        with_instruction = [i for i, item in enumerate(g.ITEMS) if "instruction" in item]
        items = [{k: (paths[v] if k == "image" else v) for k, v in g.ITEMS[i].items() if k != "instruction"}
                 for i in with_instruction]
        r = server.post("/v1/embeddings", json={"input": items, "instruction": g.QUERY_INSTRUCTION})
        assert r.status_code == 200, r.text
        assert cosine_rows(response_vectors(r.json()), ref[with_instruction]).min() >= BOUND
        # one item a request, all at once: requests that wait together share batches; each gets its own
        singles = [{k: (paths[v] if k == "image" else v) for k, v in g.ITEMS[i].items()} for i in plain]
        with ThreadPoolExecutor(len(singles)) as pool:
            answers = list(pool.map(lambda item: server.post("/v1/embeddings", json={"input": [item]}), singles))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        got = np.concatenate([response_vectors(a.json()) for a in answers])
        assert cosine_rows(got, ref[plain]).min() >= BOUND
        # bad items are refused before they are queued, naming the item; the server goes on
        Image.new("RGB", (450, 2)).save(tmp_path / "thin.png")  # aspect ratio 225, over Qwen2-VL's 200
        for bad, message in [({"image": str(tmp_path / "thin.png")}, "item 1: "),
                             ({"text": "a <|image_pad|> here"}, "image placeholder")]:
            r = server.post("/v1/embeddings", json={"input": [{"text": "fine"}, bad]})
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
        assert server.post("/v1/embeddings", json={"input": [{"text": "still serving"}]}).status_code == 200
