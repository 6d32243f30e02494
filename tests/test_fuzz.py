"""Property tests: mutated checkpoints never crash ``avdiag inspect``.

Small valid checkpoints (torch zip, legacy torch, safetensors) are built once
per module; hypothesis mutates their bytes and every mutant goes through
``avdiag inspect PATH --json -`` in-process (``helpers.cli.run_cli``, which
captures the output itself: pytest's function-scoped ``capsys`` does not mix
with hypothesis).  Whatever the bytes, the outcome is one of:

* exit 0 and stdout is exactly one JSON document with ``schema_version``;
* exit 2, exactly one stderr line ``avdiag: error: PATH: ...`` (not an
  internal error), no traceback, nothing on stdout.

No exception may escape ``main`` and the input file is never modified.
"""

from __future__ import annotations

import io
import itertools
import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from torch import nn

from helpers.cli import CliRun, run_cli

FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


# --------------------------------------------------------------------------
# valid seeds, built once per module
# --------------------------------------------------------------------------


def _tiny_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.1, 0.1)
        model[1].running_var.uniform_(0.5, 1.5)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


class Seeds:
    def __init__(self, root: Path) -> None:
        from safetensors.torch import save as safetensors_save

        sd = _tiny_state_dict()
        buf = io.BytesIO()
        torch.save(sd, buf)
        zip_bytes = buf.getvalue()
        buf = io.BytesIO()
        torch.save(sd, buf, _use_new_zipfile_serialization=False)
        legacy_bytes = buf.getvalue()
        st_bytes = safetensors_save(sd)
        # name -> (bytes, file suffix)
        self.files: dict[str, tuple[bytes, str]] = {
            "zip": (zip_bytes, ".pt"),
            "legacy": (legacy_bytes, ".pth"),
            "safetensors": (st_bytes, ".safetensors"),
        }
        with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zf:
            self.zip_records = [(info.filename, zf.read(info.filename)) for info in zf.infolist()]
        header_len = struct.unpack("<Q", st_bytes[:8])[0]
        self.st_header = json.loads(st_bytes[8 : 8 + header_len])
        self.st_header_len = header_len
        self.st_data = st_bytes[8 + header_len :]
        self.root = root
        self._counter = itertools.count()

    def path_for(self, suffix: str) -> Path:
        return self.root / f"mutant_{next(self._counter):05d}{suffix}"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    return Seeds(tmp_path_factory.mktemp("fuzz"))


BASES = ["zip", "legacy", "safetensors"]


# --------------------------------------------------------------------------
# the property
# --------------------------------------------------------------------------


def inspect_bytes(seeds: Seeds, data: bytes, suffix: str) -> int:
    path = seeds.path_for(suffix)
    path.write_bytes(data)
    try:
        run = run_cli("inspect", path, "--json", "-")
        check_outcome(run, path)
        if currently_in_test_context():
            event(f"exit {run.code}")  # shown by --hypothesis-show-statistics
        assert path.read_bytes() == data, "inspect modified its input"
        return run.code
    finally:
        path.unlink(missing_ok=True)


def check_outcome(run: CliRun, path: Path) -> None:
    assert run.code in (0, 2), str(run)
    if run.code == 2:
        message = run.error()  # one line, not an internal error, nothing on stdout
        assert message.startswith(f"{path}"), f"the error does not name the file: {message!r}"
    else:
        doc = run.json()  # exactly one strict JSON document, nothing else
        assert isinstance(doc, dict) and doc["schema_version"] == "1.1", run.out[:200]


def test_seeds_are_analysed(seeds: Seeds) -> None:
    """The unmutated seeds must be readable, or the fuzzing only tests errors."""
    for name, (data, suffix) in seeds.files.items():
        assert inspect_bytes(seeds, data, suffix) == 0, name


# --------------------------------------------------------------------------
# byte-level mutations of all three formats
# --------------------------------------------------------------------------


@pytest.mark.slow
@settings(FUZZ, max_examples=100)
@given(
    base=st.sampled_from(BASES),
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=16),
)
def test_flipped_bytes(seeds: Seeds, base: str, flips: list[tuple[int, int]]) -> None:
    data, suffix = seeds.files[base]
    mutated = bytearray(data)
    for offset, value in flips:
        mutated[offset % len(mutated)] = value
    inspect_bytes(seeds, bytes(mutated), suffix)


@pytest.mark.slow
@settings(FUZZ, max_examples=60)
@given(base=st.sampled_from(BASES), cut=st.integers(min_value=0))
def test_truncated(seeds: Seeds, base: str, cut: int) -> None:
    data, suffix = seeds.files[base]
    inspect_bytes(seeds, data[: cut % len(data)], suffix)


@pytest.mark.slow
@settings(FUZZ, max_examples=60)
@given(
    base=st.sampled_from(BASES),
    offset=st.integers(min_value=0),
    junk=st.binary(min_size=1, max_size=256),
)
def test_inserted_junk(seeds: Seeds, base: str, offset: int, junk: bytes) -> None:
    data, suffix = seeds.files[base]
    at = offset % (len(data) + 1)
    inspect_bytes(seeds, data[:at] + junk + data[at:], suffix)


# --------------------------------------------------------------------------
# safetensors: header length and header content
# --------------------------------------------------------------------------


@pytest.mark.slow
@settings(FUZZ, max_examples=60)
@given(
    claim=st.one_of(
        st.integers(0, 2**64 - 1),
        st.sampled_from([0, 1, 2, 7, 8, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1]),
        st.integers(-16, 16),  # relative to the true length
    ),
    relative=st.booleans(),
)
def test_safetensors_header_length(seeds: Seeds, claim: int, relative: bool) -> None:
    data, suffix = seeds.files["safetensors"]
    value = seeds.st_header_len + claim if relative and -16 <= claim <= 16 else claim
    value %= 2**64
    inspect_bytes(seeds, struct.pack("<Q", value) + data[8:], suffix)


_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
           "Q7", "", "f32", "float32", "U64"]


@st.composite
def safetensors_headers(draw, seeds_header: dict, data_len: int) -> dict:
    """Either the real header with a few fields perturbed, or a random one."""
    small = st.integers(0, 16)
    offset = st.one_of(st.integers(0, data_len + 8), st.integers(-(2**63), 2**64))
    dim = st.one_of(small, st.integers(-(2**63), 2**64))
    entry = st.fixed_dictionaries(
        {
            "dtype": st.one_of(st.sampled_from(_DTYPES), st.integers(), st.none()),
            "shape": st.one_of(st.lists(dim, max_size=5), st.text(max_size=4), st.none()),
            "data_offsets": st.one_of(st.lists(offset, min_size=0, max_size=3), st.none(), st.text(max_size=3)),
        }
    )
    if draw(st.booleans()):
        header = json.loads(json.dumps(seeds_header))
        names = sorted(k for k in header if k != "__metadata__")
        for _ in range(draw(st.integers(1, 3))):
            name = draw(st.sampled_from(names))
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "replace"]))
            if field == "drop":
                header.pop(name, None)
            elif field == "replace":
                header[name] = draw(st.one_of(entry, st.integers(), st.text(max_size=5), st.none()))
            elif isinstance(header.get(name), dict):
                header[name][field] = draw(entry)[field]
        if draw(st.booleans()):
            header["__metadata__"] = draw(
                st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3), st.integers(),
                          st.lists(st.integers(), max_size=3))
            )
        return header
    return draw(st.dictionaries(st.text(min_size=0, max_size=10), entry, max_size=4))


@pytest.mark.slow
@settings(FUZZ, max_examples=80)
@given(data=st.data(), pad=st.booleans())
def test_safetensors_header_content(seeds: Seeds, data: st.DataObject, pad: bool) -> None:
    header = data.draw(safetensors_headers(seeds.st_header, len(seeds.st_data)))
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    mutated = struct.pack("<Q", len(raw)) + raw + seeds.st_data
    inspect_bytes(seeds, mutated, ".safetensors")


# --------------------------------------------------------------------------
# torch zip: mutate one record, keep the zip itself valid (CRCs recomputed)
# --------------------------------------------------------------------------


@pytest.mark.slow
@settings(FUZZ, max_examples=100)
@given(
    record=st.integers(min_value=0),
    op=st.sampled_from(["flip", "truncate", "insert", "drop"]),
    offsets=st.lists(st.integers(min_value=0), min_size=1, max_size=8),
    junk=st.binary(min_size=1, max_size=32),
)
def test_zip_record_mutation(
    seeds: Seeds, record: int, op: str, offsets: list[int], junk: bytes
) -> None:
    records = list(seeds.zip_records)
    # data.pkl is the interesting one: give it half of the examples
    index = 0 if record % 2 == 0 else record % len(records)
    name, payload = records[index]
    body = bytearray(payload)
    if op == "flip" and body:
        for i, off in enumerate(offsets):
            body[off % len(body)] = junk[i % len(junk)]
    elif op == "truncate":
        del body[offsets[0] % (len(body) + 1) :]
    elif op == "insert":
        at = offsets[0] % (len(body) + 1)
        body[at:at] = junk
    if op == "drop":
        records.pop(index)
    else:
        records[index] = (name, bytes(body))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for record_name, record_data in records:
            zf.writestr(record_name, record_data)
    inspect_bytes(seeds, buf.getvalue(), ".pt")


def test_a_zip_needing_a_newer_extractor_is_one_line(tmp_path, cli):
    """A flipped byte in the central directory's 'version needed' field makes zipfile raise
    NotImplementedError; it is a damaged file like any other."""
    import struct

    import torch

    path = tmp_path / "v64.pt"
    torch.save({"bn.weight": torch.ones(4), "bn.bias": torch.zeros(4)}, path)
    raw = bytearray(path.read_bytes())
    at = raw.find(b"PK\x01\x02")
    raw[at + 6:at + 8] = struct.pack("<H", 64)
    path.write_bytes(bytes(raw))
    assert cli("inspect", path).error() == f"{path}: damaged zip archive (zip file version 6.4)"
