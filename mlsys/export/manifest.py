"""What an export folder promises, and the proof: sha256 of every file in manifest.json, an ed25519 signature of
manifest.json in manifest.sig, and the public key in public_key.pem. `verify` checks all of it."""

import base64
import json
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mlsys.errors import MlsysError
from mlsys.hashing import sha256_file

SIGNED = ("manifest.json", "manifest.sig", "public_key.pem")


class VerifyError(MlsysError):
    """An export folder's files or signature do not match its manifest."""


def key_path() -> str:
    """MLSYS_SIGNING_KEY names a PEM private key; otherwise one generated once in the user's config dir."""
    if os.environ.get("MLSYS_SIGNING_KEY"):
        return os.environ["MLSYS_SIGNING_KEY"]
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "mlsys", "signing_key.pem")


def signing_key() -> Ed25519PrivateKey:
    path = key_path()
    if not os.path.exists(path):
        if os.environ.get("MLSYS_SIGNING_KEY"):
            raise MlsysError(f"MLSYS_SIGNING_KEY={path!r}: no such file; unset it to use a generated key")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        # Written aside, then linked into place: two processes exporting at once on a fresh machine (parallel
        # tests, a sweep) never read a half-written key; the one that links second uses the first one's key.
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # readable by its owner only
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    try:
        key = serialization.load_pem_private_key(open(path, "rb").read(), password=None)
    except (ValueError, TypeError) as e:
        raise MlsysError(f"signing key {path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise MlsysError(f"signing key {path}: not an ed25519 key")
    return key


def listing(export_dir: str) -> list[str]:
    """Every file of the folder, subfolders included (a Hugging Face folder, hf/), as relative '/' paths; the
    signature's own files excluded."""
    out = []
    for root, dirs, files in os.walk(export_dir):
        dirs.sort()
        rel = os.path.relpath(root, export_dir)
        out += [name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}" for name in sorted(files)]
    return [name for name in out if name not in SIGNED]


def write_signed(export_dir: str, manifest: dict) -> None:
    """Hash every file of the folder (subfolders too) into the manifest, write it, sign it, and put the public key
    beside it."""
    manifest["files"] = {name: sha256_file(os.path.join(export_dir, name)) for name in listing(export_dir)}
    body = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    key = signing_key()
    with open(os.path.join(export_dir, "manifest.json"), "wb") as f:
        f.write(body)
    with open(os.path.join(export_dir, "manifest.sig"), "wb") as f:
        f.write(base64.b64encode(key.sign(body)))
    with open(os.path.join(export_dir, "public_key.pem"), "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))


def verify(export_dir: str, public_key: str | None = None) -> dict:
    """Check the signature of manifest.json (against `public_key`, a PEM file you trust, or the folder's own
    public_key.pem) and the sha256 of every file it lists; a file not listed is an error too. Returns the manifest."""
    def path(name):
        return os.path.join(export_dir, name)

    for name in SIGNED:
        if not os.path.isfile(path(name)) and not (name == "public_key.pem" and public_key):
            raise VerifyError(f"{path(name)}: missing; this is not a signed mlsys export")
    body = open(path("manifest.json"), "rb").read()
    try:
        pub = serialization.load_pem_public_key(open(public_key or path("public_key.pem"), "rb").read())
        if not isinstance(pub, Ed25519PublicKey):
            raise ValueError("not an ed25519 key")
        pub.verify(base64.b64decode(open(path("manifest.sig"), "rb").read(), validate=True), body)
    except (InvalidSignature, ValueError) as e:
        raise VerifyError(f"{path('manifest.sig')}: the signature does not match manifest.json "
                          f"({type(e).__name__}); the manifest was changed or signed by another key") from None
    manifest = json.loads(body)
    listed = manifest.get("files", {})
    for name, digest in listed.items():
        if not os.path.isfile(path(name)):
            raise VerifyError(f"{path(name)}: listed in the manifest but missing")
        if sha256_file(path(name)) != digest:
            raise VerifyError(f"{path(name)}: sha256 differs from the manifest's; the file was changed")
    extra = [n for n in listing(export_dir) if n not in listed]
    if extra:
        raise VerifyError(f"{path(extra[0])}: not in the manifest; the folder was changed after signing")
    return manifest
