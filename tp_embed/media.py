"""Client image references -> PIL RGB images, with the checks a server that reads and fetches on a
client's behalf needs.

A reference is one of

    data:image/png;base64,iVBORw0KGgo...   a data URI (base64-encoded)
    iVBORw0KGgo...                         bare base64
    https://host/cat.jpg, http://...       fetched with httpx: a deadline, a byte cap, at most
                                           `max_redirects` redirects; every hop's host is resolved and
                                           every address checked, and the request goes to a checked
                                           address (a second DNS answer cannot swap in another)
    file:///srv/media/cat.jpg, /srv/...    a local file, read only under `allowed_local_path`
                                           (symlinks and `..` resolved before the containment check)

Every refusal raises MediaError with a message for the client; the caller adds which input it was.
Decoding is bounded twice: by bytes before anything is decoded (`max_image_bytes`), and by pixels read
from the image header before the pixel data is decoded (`max_image_pixels`, against decompression bombs).
"""

import base64
import binascii
import io
import ipaddress
import os
import re
import socket
import stat
import time
import urllib.parse
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
from PIL import Image, ImageOps

# data:image/png;base64,...  (media-type parameters such as ;charset=... may come before ;base64)
DATA_URI = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.DOTALL | re.IGNORECASE)
# IPv6 prefix of NAT64 (RFC 6052): the last 32 bits are an IPv4 address a gateway will connect to
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")


class MediaError(ValueError):
    """An image reference that was refused or could not be read; the message says why."""


@dataclass(frozen=True)
class MediaConfig:
    allow_private_urls: bool = False  # fetch from loopback, private, link-local, ... addresses
    allowed_local_path: str | None = None  # the directory local files may be read from; None: no files
    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 20 * 1024 * 1024
    fetch_timeout: float = 10.0  # seconds for one URL, redirects included
    max_redirects: int = 3

    @staticmethod
    def from_args(args) -> "MediaConfig":
        return MediaConfig(allow_private_urls=args.allow_private_media_urls,
                           allowed_local_path=args.allowed_local_media_path,
                           max_image_pixels=args.max_image_pixels, max_image_bytes=args.max_image_bytes,
                           fetch_timeout=args.media_fetch_timeout)


def uri_scheme(ref: str) -> str:
    """The lower-cased URI scheme a reference starts with ("data", "https", ...), or "" (base64, a path)."""
    return ref.split(":", 1)[0].lower() if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", ref) else ""


def load_image(ref: str, cfg: MediaConfig) -> Image.Image:
    """A client's image reference -> a decoded RGB image; raises MediaError."""
    if not isinstance(ref, str) or not ref.strip():
        raise MediaError("an image must be a non-empty string: a data URI, base64, an http(s) URL or a file path")
    ref = ref.strip()
    scheme = uri_scheme(ref)
    if scheme == "data":
        data = decode_data_uri(ref, cfg)
    elif scheme in ("http", "https"):
        data = fetch_url(ref, cfg)
    elif scheme == "file":
        data = read_local_file(file_uri_path(ref), cfg)
    elif ref.startswith("/") and not ref.startswith("/9j/"):  # "/9j/" begins every base64 JPEG
        data = read_local_file(ref, cfg)
    elif scheme:  # base64 has no ':', so this was meant as a URI
        raise MediaError(f"unsupported image URI scheme {scheme!r}: use a data: URI, http(s)://, file:// "
                         f"or bare base64")
    else:
        data = decode_base64(ref, cfg, "base64 image")
    return decode_image(data, cfg)


FETCH_THREADS = 8  # the URLs of one request fetched at once


def load_images(refs: list, cfg: MediaConfig) -> list:
    """load_image for every reference (None stays None), in order; a refused one comes back as its
    MediaError instead of an image. With several http(s) URLs they are fetched FETCH_THREADS at a time, so
    N slow URLs hold the caller for about N / FETCH_THREADS fetch timeouts, not N."""
    def load(ref):
        if ref is None:
            return None
        try:
            return load_image(ref, cfg)
        except MediaError as e:
            return e

    urls = sum(isinstance(r, str) and uri_scheme(r.strip()) in ("http", "https") for r in refs)
    if urls < 2:
        return [load(ref) for ref in refs]
    with ThreadPoolExecutor(min(FETCH_THREADS, len(refs)), thread_name_prefix="tp-embed-fetch") as pool:
        return list(pool.map(load, refs))


def describe(ref: str, limit: int = 80) -> str:
    """A reference as an error message may quote it: data and base64 are not echoed back."""
    if ref[:5].lower() == "data:" or "://" not in ref and not ref.startswith("/"):
        return f"the {len(ref)}-character {'data URI' if ref[:5].lower() == 'data:' else 'base64 string'}"
    return ref if len(ref) <= limit else ref[:limit] + "..."


# ---------------------------------------------------------------------------------------------------------
# data URIs and base64
# ---------------------------------------------------------------------------------------------------------

def decode_base64(text: str, cfg: MediaConfig, what: str) -> bytes:
    text = "".join(text.split())  # clients may wrap base64 in lines
    # 4 characters carry 3 bytes, less the padding: refuse before decoding anything too large
    size = len(text) * 3 // 4 - text[-2:].count("=")
    if size > cfg.max_image_bytes:
        raise MediaError(f"the {what} holds about {size} bytes, more than the limit of "
                         f"{cfg.max_image_bytes} bytes (--max-image-bytes)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"the {what} is not valid base64 (an image must be a data:image/...;base64, URI, "
                         f"base64, an http(s) URL or a file path)") from None


def decode_data_uri(ref: str, cfg: MediaConfig) -> bytes:
    m = DATA_URI.fullmatch(ref)
    if m is None:
        raise MediaError("malformed data URI: expected data:image/<type>;base64,<data>")
    mime, params = m["mime"].strip().lower(), [p.strip().lower() for p in m["params"].split(";")[1:]]
    if not mime.startswith("image/"):
        raise MediaError(f"the data URI's media type is {mime or 'missing'!r}, not an image type (image/png, "
                         f"image/jpeg, ...)")
    if "base64" not in params:
        raise MediaError("the data URI is not base64-encoded: expected data:image/<type>;base64,<data>")
    return decode_base64(m["data"], cfg, "data URI")


# ---------------------------------------------------------------------------------------------------------
# local files
# ---------------------------------------------------------------------------------------------------------

def file_uri_path(ref: str) -> str:
    parts = urllib.parse.urlsplit(ref)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(f"{describe(ref)}: a file URI must name a local path (file:///path), not host "
                         f"{parts.netloc!r}")
    return urllib.parse.unquote(parts.path)


def read_local_file(path: str, cfg: MediaConfig) -> bytes:
    """The bytes of `path` if it lies, after resolving symlinks and `..`, inside the allowed directory."""
    if not cfg.allowed_local_path:
        raise MediaError("this server does not read local image files (start it with "
                         "--allowed-local-media-path DIR to allow files under DIR)")
    if "\0" in path:
        raise MediaError("a file path may not contain NUL characters")
    root = os.path.realpath(cfg.allowed_local_path)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise MediaError(f"{describe(path)} is outside the directory this server reads images from")
    try:
        with open(real, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise MediaError(f"{describe(path)} is not a regular file")
            if info.st_size > cfg.max_image_bytes:
                raise MediaError(f"{describe(path)} has {info.st_size} bytes, more than the limit of "
                                 f"{cfg.max_image_bytes} bytes (--max-image-bytes)")
            return f.read(cfg.max_image_bytes + 1)
    except FileNotFoundError:
        raise MediaError(f"{describe(path)}: no such file") from None
    except OSError as e:
        raise MediaError(f"{describe(path)}: cannot read it ({e.strerror})") from None


# ---------------------------------------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------------------------------------

def refused_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a server must not fetch from `ip` on a client's behalf (None: a public address).
    IPv6 forms that carry an IPv4 address (mapped, 6to4, NAT64) are judged by that address."""
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64_PREFIX else None)
        if embedded is not None:
            return refused_reason(embedded)
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-public"


def resolve(host: str, port: int) -> list:
    """Every address `host` resolves to (an IP literal resolves to itself)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise MediaError(f"cannot resolve the image URL's host {host!r} ({e})") from None
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def checked_target(url: httpx.URL, cfg: MediaConfig, redirected: bool = False) -> httpx.URL:
    """`url` with its host replaced by a resolved address that passed the checks."""
    where = ("redirected to " if redirected else "") + describe(str(url))
    if url.scheme not in ("http", "https"):
        raise MediaError(f"{where}: only http and https image URLs are fetched")
    if not url.host:
        raise MediaError(f"{where}: the URL has no host")
    addresses = resolve(url.host, url.port or (443 if url.scheme == "https" else 80))
    if not cfg.allow_private_urls:
        for ip in addresses:
            reason = refused_reason(ip)
            if reason:
                what = f"is a {reason} address" if url.host == str(ip) else f"resolves to {ip}, a {reason} address"
                raise MediaError(f"{where}: {url.host} {what}; this server does not fetch images from "
                                 f"loopback, private or other non-public addresses (--allow-private-media-urls)")
    return url.copy_with(host=str(addresses[0]))


def fetch_url(ref: str, cfg: MediaConfig, transport: httpx.BaseTransport | None = None) -> bytes:
    """GET an image URL; redirects are followed by hand so that every hop is checked like the first.
    `transport` replaces the network (tests use httpx.MockTransport)."""
    try:
        url = httpx.URL(ref)
    except (httpx.InvalidURL, ValueError) as e:
        raise MediaError(f"{describe(ref)}: not a valid URL ({e})") from None
    deadline = time.monotonic() + cfg.fetch_timeout
    # trust_env=False: a proxy from the environment would connect to hosts we never checked
    with httpx.Client(transport=transport, timeout=cfg.fetch_timeout, trust_env=False) as client:
        for hop in range(cfg.max_redirects + 1):
            target = checked_target(url, cfg, redirected=hop > 0)
            # the request goes to the checked address; Host and TLS (SNI, certificate) keep the name
            headers = {"Host": url.netloc.decode("ascii"), "Accept-Encoding": "identity"}
            extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
            try:
                with client.stream("GET", target, headers=headers, extensions=extensions) as response:
                    if response.is_redirect:
                        url = redirect_url(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise MediaError(f"fetching {describe(str(url))} gave HTTP {response.status_code}")
                    return read_body(response, str(url), cfg, deadline)
            except httpx.TimeoutException:
                raise MediaError(f"fetching {describe(str(url))} timed out after {cfg.fetch_timeout:g} s "
                                 f"(--media-fetch-timeout)") from None
            except httpx.HTTPError as e:
                raise MediaError(f"fetching {describe(str(url))} failed: {e}") from None
    raise MediaError(f"{describe(ref)}: more than {cfg.max_redirects} redirects")


def redirect_url(url: httpx.URL, location: str) -> httpx.URL:
    try:
        return url.join(location)
    except (httpx.InvalidURL, ValueError) as e:
        raise MediaError(f"{describe(str(url))} redirected to an invalid URL ({e})") from None


def read_body(response: httpx.Response, url: str, cfg: MediaConfig, deadline: float) -> bytes:
    too_big = (f"the image at {describe(url)} is larger than the limit of {cfg.max_image_bytes} bytes "
               f"(--max-image-bytes)")
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > cfg.max_image_bytes:
        raise MediaError(too_big)
    body = bytearray()
    # raw bytes: with Accept-Encoding: identity nothing is compressed, and a compressed answer is not
    # inflated (a small gzip body can inflate to gigabytes); it then fails to decode as an image
    for chunk in response.iter_raw():
        body += chunk
        if len(body) > cfg.max_image_bytes:
            raise MediaError(too_big)
        if time.monotonic() > deadline:  # httpx's timeout bounds each read, not a slow trickle
            raise MediaError(f"fetching {describe(url)} took longer than {cfg.fetch_timeout:g} s "
                             f"(--media-fetch-timeout)")
    return bytes(body)


# ---------------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------------

def decode_image(data: bytes, cfg: MediaConfig) -> Image.Image:
    """Image bytes -> RGB, as transformers' load_image and convert_to_rgb would: EXIF orientation
    applied, transparency composited onto white. The pixel count is checked from the header first."""
    if len(data) > cfg.max_image_bytes:
        raise MediaError(f"the image has {len(data)} bytes, more than the limit of {cfg.max_image_bytes} bytes "
                         f"(--max-image-bytes)")
    try:
        with warnings.catch_warnings():
            # our own pixel limit below decides; PIL's error above 2 * MAX_IMAGE_PIXELS is caught below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise MediaError(f"the image has more pixels than the limit of {cfg.max_image_pixels} "
                         f"(--max-image-pixels)") from None
    except Exception as e:  # PIL raises many kinds on bad data
        raise MediaError(f"the data is not an image this server can decode ({type(e).__name__}: {e})") from None
    width, height = image.size
    if width * height > cfg.max_image_pixels:
        raise MediaError(f"the image is {width}x{height} = {width * height} pixels, more than the limit of "
                         f"{cfg.max_image_pixels} (--max-image-pixels)")
    try:
        image = ImageOps.exif_transpose(image)
        if "A" in image.getbands() or "transparency" in image.info:
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image.convert("RGBA"))
        return image.convert("RGB")
    except Exception as e:
        raise MediaError(f"the image data is corrupt or truncated ({type(e).__name__}: {e})") from None
