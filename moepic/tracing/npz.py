"""Reading a .npz (numpy's zip of .npy arrays) without trusting it: each member's shape and dtype come
from its .npy header, read on its own, so a caller can check them against each other and against the
sizes it expects before a byte of data is decompressed or a buffer allocated. (np.load reads a whole
member first: a 1.4 MB file whose arrays inflate to gigabytes is allocated before any shape check.)

Side effects: reads the zip it is given. Errors are ValueError naming the member; the caller adds
the file. Pickled (object) arrays are refused, as np.load(allow_pickle=False) does.
"""

from __future__ import annotations

import zipfile

import attrs
import numpy as np

# Deflate cannot shrink data more than ~1032:1: a member declaring more is lying about its size.
_DEFLATE_RATIO = 1100
_CHUNK = 1 << 24  # read in 16 MiB pieces straight into the array: no second copy of a large member


@attrs.frozen
class Member:
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize


def members(archive: zipfile.ZipFile) -> dict[str, Member]:
    """Every `name.npy` member, by name: its declared shape and dtype, bounded by its declared size."""
    out = {}
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            continue
        name = info.filename.removesuffix(".npy")
        stored = info.compress_type == zipfile.ZIP_STORED and info.file_size > info.compress_size
        deflated = info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > _DEFLATE_RATIO * info.compress_size + 4096
        if stored or deflated:
            raise ValueError(f"field {name!r} declares {info.file_size} bytes in {info.compress_size} compressed: a corrupt file")
        with archive.open(info) as f:
            shape, dtype, fortran_order, offset = _npy_header(f, name)
        member = Member(info, shape, dtype, fortran_order)
        if offset + member.nbytes > info.file_size:
            raise ValueError(f"field {name!r} claims shape {shape} of {dtype} ({member.nbytes} bytes), "
                             f"but its member holds {info.file_size - offset} bytes")
        out[name] = member
    return out


def read(archive: zipfile.ZipFile, member: Member) -> np.ndarray:
    """The member's array (its header already checked by `members`)."""
    name = member.info.filename.removesuffix(".npy")
    array = np.empty(member.shape, dtype=member.dtype, order="F" if member.fortran_order else "C")
    flat = array.reshape(-1, order="A").view(np.uint8)  # a view: filling it fills `array`
    with archive.open(member.info) as f:
        _npy_header(f, name)
        done = 0
        while done < member.nbytes:
            piece = f.read(min(_CHUNK, member.nbytes - done))
            if not piece:
                raise ValueError(f"field {name!r} is truncated: {done} of {member.nbytes} bytes")
            flat[done : done + len(piece)] = np.frombuffer(piece, np.uint8)
            done += len(piece)
    return array


def _npy_header(f, name: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran order, bytes before the data) from an open .npy stream."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f".npy format version {version} is not supported")
    except (ValueError, EOFError) as e:  # EOFError: shorter than a header
        raise ValueError(f"field {name!r} has no valid .npy header ({e})") from None
    if dtype.hasobject:
        raise ValueError(f"field {name!r} holds Python objects (pickled data), which moepic never loads")
    return tuple(shape), dtype, fortran_order, f.tell()
