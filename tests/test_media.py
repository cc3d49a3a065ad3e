"""media.load_image: what loads, and every refused source with the reason in its message. Nothing here
touches the network: URL checks fail before connecting, redirects are served by httpx.MockTransport, and
the one real fetch goes to a server on 127.0.0.1 with allow_private_urls."""

import argparse
import base64
import http.server
import io
import ipaddress
import os
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from tp_embed import media
from tp_embed.args import add_engine_args, add_server_args, parse_with_config
from tp_embed.media import MediaConfig, MediaError, load_image

RNG = np.random.RandomState(0)
PIXELS = RNG.randint(0, 256, (24, 40, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


PNG = encode(Image.fromarray(PIXELS))
B64 = base64.b64encode(PNG).decode()


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height, and no pixel data: what a decompression bomb's
    header looks like before anything is inflated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def refused(ref: str, cfg: MediaConfig = MediaConfig(), *, match: str) -> str:
    with pytest.raises(MediaError, match=match) as e:
        load_image(ref, cfg)
    return str(e.value)


@pytest.fixture
def allowed(tmp_path):
    """An allowed directory with an image, a secret next to it and a symlink escaping it."""
    root = tmp_path / "allowed"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "cat.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    os.symlink(tmp_path / "secret.png", root / "link.png")
    os.symlink(root / "sub" / "cat.png", root / "inner-link.png")
    return root


# --------------------------------------------------------------------------------------------------
# what loads
# --------------------------------------------------------------------------------------------------

def test_data_uri_bare_base64_and_wrapped_base64_decode_exactly():
    for ref in ("data:image/png;base64," + B64, B64, "\n".join(B64[i:i + 76] for i in range(0, len(B64), 76)),
                "DATA:image/PNG;charset=binary;base64," + B64):
        image = load_image(ref, MediaConfig())
        assert image.mode == "RGB" and image.size == (40, 24)
        np.testing.assert_array_equal(np.asarray(image), PIXELS)


def test_bare_base64_jpeg_is_not_taken_for_a_path():
    jpeg = base64.b64encode(encode(Image.fromarray(PIXELS), "JPEG")).decode()
    assert jpeg.startswith("/9j/")
    assert load_image(jpeg, MediaConfig()).size == (40, 24)


def test_allowed_local_files(allowed):
    cfg = MediaConfig(allowed_local_path=str(allowed))
    for ref in (str(allowed / "sub" / "cat.png"), "file://" + str(allowed / "sub" / "cat.png"),
                "file://localhost" + str(allowed / "sub" / "cat.png"), str(allowed / "sub" / ".." / "sub" / "cat.png"),
                str(allowed / "inner-link.png")):
        np.testing.assert_array_equal(np.asarray(load_image(ref, cfg)), PIXELS)


def test_transparency_goes_onto_white_and_gray_becomes_rgb():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque; everything else fully transparent black
    image = load_image(base64.b64encode(encode(Image.fromarray(rgba, "RGBA"))).decode(), MediaConfig())
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (10, 20, 30) and image.getpixel((1, 1)) == (255,) * 3
    gray = load_image(base64.b64encode(encode(Image.fromarray(PIXELS[..., 0], "L"))).decode(), MediaConfig())
    assert gray.mode == "RGB" and gray.getpixel((3, 2)) == (PIXELS[2, 3, 0],) * 3


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(Image.fromarray(PIXELS), "JPEG", exif=exif.tobytes())
    assert load_image(base64.b64encode(data).decode(), MediaConfig()).size == (24, 40)


# --------------------------------------------------------------------------------------------------
# refused URLs (no connection is made: the address check comes first)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:1/x.png", "127.0.0.1 is a loopback address"),
    ("http://10.0.0.1/x.png", "10.0.0.1 is a private address"),
    ("http://192.168.1.20/x.png", "192.168.1.20 is a private address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("http://localhost/x.png", "localhost resolves to 127.0.0.1, a loopback address"),
    ("http://2130706433/x.png", "2130706433 resolves to 127.0.0.1, a loopback address"),
    ("http://[::1]/x.png", "::1 is a loopback address"),
    ("http://[::ffff:127.0.0.1]/x.png", "a loopback address"),
    ("http://0.0.0.0/x.png", "0.0.0.0 is a unspecified address"),
    ("http://224.0.0.1/x.png", "224.0.0.1 is a multicast address"),
    ("http://100.64.0.1/x.png", "100.64.0.1 is a non-public address"),
])
def test_private_and_special_addresses_are_refused(url, message):
    text = refused(url, match="this server does not fetch images from loopback, private")
    assert message in text and "--allow-private-media-urls" in text


@pytest.mark.parametrize("ip, reason", [
    ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("127.8.0.1", "loopback"), ("172.16.5.4", "private"),
    ("fe80::1", "link-local"), ("fc00::1", "private"), ("ff02::1", "multicast"), ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("2002:7f00:1::", "loopback"),  # 6to4 wrapping 127.0.0.1
    ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
])
def test_refused_reason(ip, reason):
    assert media.refused_reason(ipaddress.ip_address(ip)) == reason


def test_every_resolved_address_is_checked(monkeypatch):
    """A name with one public and one private address is refused (DNS answers may alternate)."""
    monkeypatch.setattr(media, "resolve", lambda host, port: [ipaddress.ip_address("93.184.216.34"),
                                                              ipaddress.ip_address("10.1.2.3")])
    refused("http://images.example/cat.png", match="images.example resolves to 10.1.2.3, a private address")


@pytest.mark.parametrize("ref, match", [
    ("ftp://example.com/x.png", "unsupported image URI scheme 'ftp'"),
    ("javascript:alert(1)", "unsupported image URI scheme 'javascript'"),
    ("http:///x.png", "no host|not a valid URL"),
])
def test_other_schemes_are_refused(ref, match):
    refused(ref, match=match)


# --------------------------------------------------------------------------------------------------
# redirects, status and size, through httpx.MockTransport
# --------------------------------------------------------------------------------------------------

PUBLIC = "http://93.184.216.34"


def transport(routes: dict, seen: list | None = None) -> httpx.MockTransport:
    """path -> response; every request is recorded in `seen`."""
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return routes[request.url.path]()
    return httpx.MockTransport(handler)


def redirect(location: str):
    return lambda: httpx.Response(302, headers={"Location": location})


def ok(*chunks: bytes, length: bool = True):
    """A 200 answer streamed in `chunks`, announcing its Content-Length or not."""
    headers = {"Content-Length": str(sum(map(len, chunks)))} if length else {}
    return lambda: httpx.Response(200, headers=headers, stream=httpx.ByteStream(b"".join(chunks))
                                  if len(chunks) == 1 else IterStream(chunks))


class IterStream(httpx.SyncByteStream):
    def __init__(self, chunks):
        self.chunks = chunks

    def __iter__(self):
        yield from self.chunks


def fetch(url: str, routes: dict, cfg: MediaConfig = MediaConfig(), seen: list | None = None) -> bytes:
    return media.fetch_url(url, cfg, transport=transport(routes, seen))


def test_redirect_to_a_private_address_is_refused():
    seen = []
    with pytest.raises(MediaError) as e:
        fetch(PUBLIC + "/a.png", {"/a.png": redirect("http://10.0.0.1/x.png")}, seen=seen)
    assert str(e.value).startswith("redirected to http://10.0.0.1/x.png: 10.0.0.1 is a private address")
    assert len(seen) == 1  # the private address was never asked


def test_redirects_are_followed_up_to_the_limit():
    chain = {"/0": redirect("/1"), "/1": redirect(PUBLIC + "/2"), "/2": redirect("3"),
             "/3": ok(PNG), "/4": redirect("/0")}
    assert fetch(PUBLIC + "/0", chain) == PNG  # 3 redirects, relative and absolute
    with pytest.raises(MediaError, match="more than 3 redirects"):
        fetch(PUBLIC + "/4", chain)


def test_the_request_goes_to_the_checked_address(monkeypatch):
    """The name is resolved once and checked; the connection goes to that address, with the name kept in
    the Host header (and for https in SNI), so a second DNS answer cannot redirect it."""
    monkeypatch.setattr(media, "resolve", lambda host, port: [ipaddress.ip_address("93.184.216.34")])
    seen = []
    assert fetch("http://images.example:8080/cat.png", {"/cat.png": ok(PNG)},
                 seen=seen) == PNG
    assert seen[0].url.host == "93.184.216.34" and seen[0].url.port == 8080
    assert seen[0].headers["host"] == "images.example:8080"
    assert seen[0].headers["accept-encoding"] == "identity"


def test_http_errors_and_size_caps():
    cfg = MediaConfig(max_image_bytes=1000)
    with pytest.raises(MediaError, match="gave HTTP 404"):
        fetch(PUBLIC + "/x", {"/x": lambda: httpx.Response(404)})
    with pytest.raises(MediaError, match="larger than the limit of 1000 bytes"):  # announced length
        fetch(PUBLIC + "/x", {"/x": ok(b"\0" * 1001)}, cfg)
    with pytest.raises(MediaError, match="larger than the limit of 1000 bytes"):  # streamed, no length
        fetch(PUBLIC + "/x", {"/x": ok(b"\0" * 600, b"\0" * 600, length=False)}, cfg)
    with pytest.raises(MediaError, match="not an image this server can decode"):
        load_image_from(fetch(PUBLIC + "/x", {"/x": ok(b"<html></html>")}))


def load_image_from(data: bytes) -> Image.Image:
    return media.decode_image(data, MediaConfig())


# --------------------------------------------------------------------------------------------------
# a real fetch from a loopback server, allowed with allow_private_urls
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loopback_server():
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path == "/slow.png":
                time.sleep(1.5)  # the client has given up by now: answer nothing
                return
            if self.path.startswith("/late"):
                time.sleep(0.6)  # then answers
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/cat.png")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


def test_loopback_fetch_only_when_private_urls_are_allowed(loopback_server):
    base, requests = loopback_server
    refused(base + "/cat.png", match="127.0.0.1 is a loopback address")
    assert requests == []  # refused before connecting
    cfg = MediaConfig(allow_private_urls=True)
    for path in ("/cat.png", "/redirect"):
        np.testing.assert_array_equal(np.asarray(load_image(base + path, cfg)), PIXELS)
    assert requests == ["/cat.png", "/redirect", "/cat.png"]


def test_fetch_timeout(loopback_server):
    base, _ = loopback_server
    started = time.monotonic()
    refused(base + "/slow.png", MediaConfig(allow_private_urls=True, fetch_timeout=0.3),
            match=r"timed out after 0.3 s \(--media-fetch-timeout\)")
    assert time.monotonic() - started < 1.2


def test_a_requests_urls_are_fetched_at_once_and_errors_stay_in_place(loopback_server):
    """Eight URLs that each take 0.6 s: about 0.6 s together, not 4.8; None stays None and a refused
    reference comes back as its MediaError at its own position."""
    from tp_embed.media import load_images
    base, _ = loopback_server
    cfg = MediaConfig(allow_private_urls=True)
    refs = [f"{base}/late{i}.png" for i in range(8)] + [None, "data:image/png;base64,@@@"]
    started = time.monotonic()
    got = load_images(refs, cfg)
    assert time.monotonic() - started < 3.0
    for image in got[:8]:
        np.testing.assert_array_equal(np.asarray(image), PIXELS)
    assert got[8] is None and isinstance(got[9], MediaError)
    assert isinstance(load_images([base + "/cat.png", "/etc/passwd"], MediaConfig(allow_private_urls=True))[1],
                      MediaError)


# --------------------------------------------------------------------------------------------------
# local paths
# --------------------------------------------------------------------------------------------------

def test_local_paths_need_an_allowed_directory(allowed):
    for ref in (str(allowed / "sub" / "cat.png"), "file://" + str(allowed / "sub" / "cat.png")):
        refused(ref, match="does not read local image files.*--allowed-local-media-path DIR")


def test_paths_outside_the_allowed_directory_are_refused(allowed):
    cfg = MediaConfig(allowed_local_path=str(allowed))
    for ref in ("/etc/passwd", str(allowed.parent / "secret.png"), str(allowed / ".." / "secret.png"),
                "file://" + str(allowed / "sub" / ".." / ".." / "secret.png"), str(allowed / "link.png"),
                str(allowed) + "-sibling/x.png"):
        refused(ref, cfg, match="is outside the directory this server reads images from")


def test_bad_local_paths(allowed):
    cfg = MediaConfig(allowed_local_path=str(allowed), max_image_bytes=100)
    refused(str(allowed / "missing.png"), cfg, match="no such file")
    refused(str(allowed / "sub"), cfg, match="not a regular file|cannot read it")
    refused(str(allowed / "sub" / "cat.png"), cfg, match=f"has {len(PNG)} bytes, more than the limit of 100 bytes")
    refused("file://otherhost" + str(allowed / "sub" / "cat.png"), cfg, match="not host 'otherhost'")


# --------------------------------------------------------------------------------------------------
# bad data
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ref, match", [
    ("", "must be a non-empty string"),
    ("!!! not base64 !!!", "is not valid base64"),
    ("data:text/plain;base64,aGVsbG8=", "media type is 'text/plain', not an image type"),
    ("data:image/png,rawbytes", "not base64-encoded"),
    ("data:image/png;base64", "malformed data URI"),
    ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(),
     "not an image this server can decode"),
    ("data:image/png;base64," + base64.b64encode(PNG[:len(PNG) // 2]).decode(), "corrupt or truncated"),
])
def test_undecodable_input(ref, match):
    text = refused(ref, match=match)
    assert len(text) < 300  # the data itself is never echoed back


def test_pixel_cap_is_checked_from_the_header():
    cfg = MediaConfig(max_image_pixels=500)
    refused(B64, cfg, match=r"the image is 40x24 = 960 pixels, more than the limit of 500 \(--max-image-pixels\)")
    # headers of huge images with no pixel data behind them: refused before any decoding
    refused(base64.b64encode(png_header(10_000, 5_000)).decode(),
            match="10000x5000 = 50000000 pixels, more than the limit of 40000000")
    refused(base64.b64encode(png_header(100_000, 100_000)).decode(), match="more pixels than the limit of 40000000")


def test_byte_cap_before_decoding():
    cfg = MediaConfig(max_image_bytes=1000)
    refused("data:image/png;base64," + "A" * 4000, cfg, match="holds about 3000 bytes, more than the limit of 1000")
    refused(B64, MediaConfig(max_image_bytes=len(PNG) - 1), match="more than the limit")
    assert load_image(B64, MediaConfig(max_image_bytes=len(PNG))).size == (40, 24)


def test_flags_build_the_media_config(tmp_path):
    p = argparse.ArgumentParser()
    add_engine_args(p)
    add_server_args(p)
    assert MediaConfig.from_args(parse_with_config(p, [])) == MediaConfig()
    args = parse_with_config(p, ["--allow-private-media-urls", "--allowed-local-media-path", str(tmp_path),
                                 "--max-image-pixels", "1000", "--max-image-bytes", "2000",
                                 "--media-fetch-timeout", "2.5"])
    assert MediaConfig.from_args(args) == MediaConfig(True, str(tmp_path), 1000, 2000, 2.5)
    for bad in (["--max-image-bytes", "0"], ["--media-fetch-timeout", "0"]):
        with pytest.raises(SystemExit):
            parse_with_config(p, bad)
