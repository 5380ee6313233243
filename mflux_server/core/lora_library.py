"""The LoRA library clients choose from: the .safetensors files under --lora-dir, and the families each fits.

A client names a LoRA by its path inside the folder without the suffix ("styles/ink"), never by a path on the
server's disk; names that leave the folder (.., absolute paths, symlinks pointing out) are not in the library.
Which families a file fits is read from its tensor names only (the safetensors header, a few KiB), matched the
way mflux's LoRA loader matches them against each family's mapping (lora_patterns.json.gz, generated from mflux
by `python -m mflux_server.worker.catalog_build`), so the API never imports mflux.
"""

from __future__ import annotations

import gzip
import json
import re
import struct
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PATTERNS_FILE = Path(__file__).with_name("lora_patterns.json.gz")
SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 64 * 2**20  # a safetensors header past this is not a LoRA's
RESCAN_AFTER = 2.0  # seconds a listing is reused: a file copied in shows up this soon
# A file fits no family unless at least this share of its tensors map onto one; mflux skips the rest with a warning.
FIT_SHARE = 0.5
_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True, slots=True)
class LoraFile:
    """One LoRA of the library."""

    name: str  # its path under --lora-dir, without .safetensors, with forward slashes
    path: Path
    bytes: int
    families: tuple[str, ...]  # the catalog families it fits, empty when none

    def as_dict(self) -> dict[str, object]:
        """What GET /api/loras shows of it (never its path on the server)."""
        return {"name": self.name, "bytes": self.bytes, "families": list(self.families)}


@cache
def patterns() -> dict[str, frozenset[str]]:
    """Each family's LoRA tensor patterns, {block} standing for a block number."""
    data = json.loads(gzip.decompress(PATTERNS_FILE.read_bytes()))
    return {family: frozenset(found) for family, found in data.items()}


def header_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, read from its header alone; ValueError when it is not one."""
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= MAX_HEADER_BYTES:
            raise ValueError(f"a header of {length} bytes is not a safetensors one")
        header = json.loads(file.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return [key for key in header if key != "__metadata__"]


def _matches(key: str, known: frozenset[str]) -> bool:
    """Whether mflux would map this tensor name with one of a family's patterns (LoRALoader._match_pattern)."""
    candidates = [key] + [key[:m.start()] + "{block}" + key[m.end():] for m in _DIGITS.finditer(key)
                          if str(int(m.group())) == m.group()]
    # ComfyUI's adapters name the tensor itself "lora_B", not "lora_B.weight"; mflux accepts both spellings.
    return any(candidate in known or candidate + ".weight" in known for candidate in candidates)


def families_of(keys: list[str]) -> tuple[str, ...]:
    """The families that map the most of these tensor names (at least FIT_SHARE of them), by name.

    Several families accept some of the same spellings (diffusers' transformer_blocks.N.attn.to_q…); the ones
    that take the most are the file's, and a tie (FLUX.1 and its Fill and Kontext twins) lists them all.
    """
    if not keys:
        return ()
    matched = {family: sum(1 for key in keys if _matches(key, known)) for family, known in patterns().items()}
    best = max(matched.values())
    if best == 0 or best < FIT_SHARE * len(keys):
        return ()
    return tuple(sorted(family for family, count in matched.items() if count == best))


# A Hugging Face LoRA reference as mflux resolves one: org/repo, or org/repo:file.safetensors in a folder of it.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9_-])?"
HUB_REFERENCE = re.compile(rf"{_PART}/{_PART}(?::(?:{_PART}/)*{_PART}\.safetensors)?")


def hub_reference(name: str) -> bool:
    """Whether a LoRA name reads as a Hugging Face reference (never a path: no leading slash, no '..' part)."""
    return bool(HUB_REFERENCE.fullmatch(name)) and ".." not in name


class Library:
    """The LoRA files under one folder, rescanned at most every RESCAN_AFTER seconds."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder).expanduser().resolve() if folder else None
        self._files: dict[str, LoraFile] = {}
        self._read_at = -RESCAN_AFTER
        self._fits: dict[tuple[Path, int, int], tuple[str, ...]] = {}  # by (path, size, mtime): read each once

    def files(self) -> dict[str, LoraFile]:
        """Every LoRA by name, sorted by name."""
        if self.folder is None:
            return {}
        if time.monotonic() - self._read_at >= RESCAN_AFTER:
            self._files = self._scan(self.folder)
            self._read_at = time.monotonic()
        return self._files

    def get(self, name: str) -> LoraFile | None:
        """The LoRA a client named, or None."""
        return self.files().get(name)

    def path_of(self, name: str) -> Path | None:
        """The file a name stands for, or None: what a worker needs, without listing the folder or reading any
        header (the API checked the name and its fit at submit)."""
        if self.folder is None:
            return None
        real = (self.folder / f"{name}{SUFFIX}").resolve()
        return real if self.folder in real.parents and real.is_file() else None

    def _scan(self, folder: Path) -> dict[str, LoraFile]:
        found, fits = {}, {}
        for path in sorted(folder.rglob(f"*{SUFFIX}")):
            real = path.resolve()
            if folder not in real.parents or not real.is_file():
                continue  # a symlink out of the folder, or a folder named like a file
            stat = real.stat()
            key = (real, stat.st_size, stat.st_mtime_ns)
            if key in self._fits:
                fits[key] = self._fits[key]
            else:
                try:
                    fits[key] = families_of(header_keys(real))
                except (OSError, ValueError):
                    fits[key] = ()  # unreadable: listed, fitting nothing, so a request names the reason
            name = path.relative_to(folder).as_posix().removesuffix(SUFFIX)
            found[name] = LoraFile(name, real, stat.st_size, fits[key])
        self._fits = fits  # only the files there now: a folder that changes often does not grow it
        return found
