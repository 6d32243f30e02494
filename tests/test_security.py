"""Security and robustness of ``avdiag inspect``.

Contract under test:

* exit 2 for anything unreadable, refused or malformed, with exactly one
  stderr line starting ``avdiag: error:`` that names the file and the problem,
  no traceback, and nothing on stdout (``--json -`` included);
* no code from a pickle ever runs (the sentinel file a payload would create
  never appears);
* a refused torch zip names the offending global in the error line;
* the input is never modified.

The malicious checkpoints come from ``tests/malicious.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import struct
import subprocess
import sys
import time
import textwrap
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from helpers.cli import CliRun, run_cli  # noqa: E402
from malicious import (  # noqa: E402
    ASYNC_PAYLOADS,
    MALICIOUS,
    NAMES_GLOBAL,
    CallOnLoad,
    benign_state_dict,
    benign_torch_zip_bytes,
    touch_command,
    unsafe_globals_in,
)

CASES = [name for name, _ in MALICIOUS]
BUILDERS = dict(MALICIOUS)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


# what a refusal of a malicious file says: why it was not loaded
REFUSAL = re.compile(r"refused|not a checkpoint format avdiag reads|cannot read TorchScript archive")


def assert_refused(run: CliRun, path: Path, name: str) -> str:
    """The one error line of a refused malicious checkpoint: names the file (or the shard of it that
    carries the payload), says it was refused, and names the unsafe global where one is pickled."""
    line = run.error(REFUSAL)
    assert path.name in line, f"the error line does not say which file: {line!r}"
    if name in NAMES_GLOBAL:
        assert_names_a_global(line, path)
    return line


def assert_names_a_global(line: str, path: Path) -> None:
    """The line names one of the unsafe globals the pickle really carries.

    Accepts the dotted name as pickled ('posix.system'), its Python 3 spelling
    ('commands.call' -> 'subprocess.call', '__builtin__.exec' ->
    'builtins.exec'), or the bare attribute name as a whole word ('system').
    """
    import _compat_pickle

    names = unsafe_globals_in(path)
    assert names, f"test bug: no unsafe global found statically in {path}"
    candidates: set[str] = set()
    for full in names:
        module, _, attr = full.rpartition(".")
        candidates.add(full)
        py3_module, py3_attr = _compat_pickle.NAME_MAPPING.get(
            (module, attr), (_compat_pickle.IMPORT_MAPPING.get(module, module), attr)
        )
        candidates.add(f"{py3_module}.{py3_attr}")
        if any(c in line for c in (full, f"{py3_module}.{py3_attr}")):
            return
        if re.search(rf"(?<![\w]){re.escape(attr)}(?![\w])", line):
            return
    pytest.fail(f"error line does not name any of {sorted(candidates)}: {line!r}")


def snapshot(path: Path) -> Any:
    """Bytes + mtime of a file, of every file under a folder; None if missing."""
    if not path.exists():
        return None
    if path.is_dir():
        return {
            str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))
        }
    st = path.stat()
    return (path.read_bytes(), st.st_mtime_ns, st.st_size)


def sentinel_appeared(sentinel: Path, grace: float = 0.0) -> bool:
    deadline = time.monotonic() + grace
    while True:
        if sentinel.exists():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def subprocess_env() -> dict[str, str]:
    """Make the child import the same avdiag as this process does."""
    import avdiag

    package_root = str(Path(avdiag.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    return env


def run_subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "avdiag", *args],
        cwd=cwd,
        env=subprocess_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def build_case(tmp_path: Path) -> Callable[[str], tuple[Path, Path]]:
    """Build one malicious case under tmp_path; the sentinel lives outside it."""

    def _build(name: str) -> tuple[Path, Path]:
        workdir = tmp_path / "checkpoints"
        workdir.mkdir()
        sentinel = tmp_path / f"PWNED_{name}"
        path = BUILDERS[name](workdir, sentinel)
        assert path.exists(), f"builder {name} produced nothing"
        assert not sentinel.exists(), f"building {name} already ran its payload"
        return path, sentinel

    return _build


# --------------------------------------------------------------------------
# malicious checkpoints, in-process
# --------------------------------------------------------------------------


def test_registry_is_sane() -> None:
    assert len(CASES) >= 24
    assert len(CASES) == len(set(CASES)), "duplicate case names"
    assert NAMES_GLOBAL <= set(CASES)
    assert ASYNC_PAYLOADS <= set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_malicious_refused(name: str, build_case) -> None:
    path, sentinel = build_case(name)
    before = snapshot(path)

    run = run_cli("inspect", path)

    assert not sentinel_appeared(sentinel, 1.0 if name in ASYNC_PAYLOADS else 0.0), (
        f"PAYLOAD EXECUTED: {name} created {sentinel}"
    )
    assert_refused(run, path, name)
    assert snapshot(path) == before, "the checkpoint was modified"


@pytest.mark.parametrize("name", CASES)
def test_malicious_refused_json(name: str, build_case) -> None:
    path, sentinel = build_case(name)

    run = run_cli("inspect", path, "--json", "-")

    assert not sentinel_appeared(sentinel, 1.0 if name in ASYNC_PAYLOADS else 0.0), (
        f"PAYLOAD EXECUTED: {name} created {sentinel}"
    )
    assert_refused(run, path, name)  # stdout empty too: no half JSON document


# --------------------------------------------------------------------------
# malicious checkpoints, real subprocess
# --------------------------------------------------------------------------

SUBPROCESS_CASES = [
    ("zip_nested_os_system", False),
    ("legacy_nested_os_system", False),
    ("raw_pickle_bin", False),
    ("sharded_bin_zip_shard", False),
    ("pt2_pickled_weight", False),
    ("handzip_import_getattr", True),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "with_json"), SUBPROCESS_CASES)
def test_malicious_refused_subprocess(name: str, with_json: bool, build_case, tmp_path: Path) -> None:
    path, sentinel = build_case(name)
    before = snapshot(path)
    args = ["inspect", str(path)] + (["--json", "-"] if with_json else [])

    proc = run_subprocess(args, cwd=tmp_path)

    assert not sentinel_appeared(sentinel, 1.0), f"PAYLOAD EXECUTED: {name} created {sentinel}"
    assert_refused(CliRun(tuple(args), proc.returncode, proc.stdout, proc.stderr), path, name)
    assert snapshot(path) == before


# --------------------------------------------------------------------------
# --allow-global
# --------------------------------------------------------------------------

_SYSTEM_MODULE = os.system.__module__  # 'posix' on Linux: what pickle writes


def _namespace_and_evil(directory: Path, sentinel: Path) -> Path:
    checkpoint = {
        "state_dict": benign_state_dict(),
        "hparams": argparse.Namespace(lr=0.1, batch_size=32),
        "callbacks": [CallOnLoad(os.system, touch_command(sentinel))],
    }
    path = directory / "lightning.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("allowed", "must_name_system"),
    [
        ("argparse.Namespace", True),  # a real, harmless global the file uses
        (f"{_SYSTEM_MODULE}.getcwd", True),  # harmless, same module as the evil one
        (f"{_SYSTEM_MODULE}.sys", False),  # a prefix of the evil name
        (f"{_SYSTEM_MODULE}.system_", False),  # the evil name is a prefix of it
        ("builtins.print", True),
    ],
)
def test_allow_global_does_not_let_another_through(
    allowed: str, must_name_system: bool, tmp_path: Path
) -> None:
    sentinel = tmp_path / "PWNED_allow_global"
    path = _namespace_and_evil(tmp_path, sentinel)

    run = run_cli("inspect", path, "--allow-global", allowed)

    assert not sentinel_appeared(sentinel), f"PAYLOAD EXECUTED with --allow-global {allowed}"
    line = run.error(path.name, "refused")
    if must_name_system:
        assert re.search(rf"\b{_SYSTEM_MODULE}\.system\b", line), f"error does not name {_SYSTEM_MODULE}.system: {line!r}"


def test_allow_global_positive_control(tmp_path: Path) -> None:
    """--allow-global must actually work, or the test above proves nothing."""
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": benign_state_dict(), "hparams": argparse.Namespace(lr=0.1)}, path)

    # argparse.Namespace is not allow-listed by default
    run_cli("inspect", path, "--json", "-").error(path.name, "refused", "argparse.Namespace")

    report = run_cli("inspect", path, "--allow-global", "argparse.Namespace", "--json", "-").json()
    assert report["schema_version"] == "1.1" and report["checkpoint"]["path"] == str(path)


# --------------------------------------------------------------------------
# benign controls: the refusals above are not "everything fails"
# --------------------------------------------------------------------------


def _benign_zip(d: Path) -> Path:
    path = d / "model.pt"
    torch.save(benign_state_dict(), path)
    return path


def _benign_legacy(d: Path) -> Path:
    path = d / "model.pth"
    torch.save(benign_state_dict(), path, _use_new_zipfile_serialization=False)
    return path


def _benign_safetensors(d: Path) -> Path:
    from safetensors.torch import save_file

    path = d / "model.safetensors"
    save_file({k: v.contiguous() for k, v in benign_state_dict().items()}, str(path))
    return path


def _benign_sharded(d: Path) -> Path:
    folder = d / "sharded"
    folder.mkdir()
    sd = benign_state_dict()
    keys = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    weight_map = {}
    for shard, names in shards.items():
        torch.save({k: sd[k] for k in names}, folder / shard)
        weight_map.update({k: shard for k in names})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
             "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("make", [_benign_zip, _benign_legacy, _benign_safetensors, _benign_sharded],
                         ids=["zip", "legacy", "safetensors", "sharded"])
def test_benign_control_is_analysed(make: Callable[[Path], Path], tmp_path: Path) -> None:
    path = make(tmp_path)
    before = snapshot(path)
    report = run_cli("inspect", path, "--json", "-").json()
    assert report["schema_version"] == "1.1"
    assert report["summary"]["n_bn_layers"] == 1  # the benign state dict's one BatchNorm was found
    assert snapshot(path) == before


# --------------------------------------------------------------------------
# damaged / non-checkpoint inputs
# --------------------------------------------------------------------------


def _legacy_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(benign_state_dict(), buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _write(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        path = d / name
        path.write_bytes(data)
        return path

    return make


def _safetensors(header: bytes, data: bytes, claimed_len: int | None = None) -> bytes:
    n = len(header) if claimed_len is None else claimed_len
    return struct.pack("<Q", n) + header + data


def _header(entries: dict[str, Any]) -> bytes:
    return json.dumps(entries).encode()


_GOOD_ENTRY = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}

LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    b"size 102502400\n"
)


def _truncated(kind: str, fraction: float | None, minus: int | None = None) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        data = benign_torch_zip_bytes() if kind == "zip" else _legacy_bytes()
        cut = int(len(data) * fraction) if fraction is not None else len(data) - int(minus or 0)
        cut = max(1, min(cut, len(data) - 1))
        path = d / ("model.pt" if kind == "zip" else "model.pth")
        path.write_bytes(data[:cut])
        return path

    return make


def _empty_dir(d: Path) -> Path:
    folder = d / "no_checkpoint"
    folder.mkdir()
    (folder / "README.md").write_text("# my model\nweights are on the other server\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    return folder


def _really_empty_dir(d: Path) -> Path:
    folder = d / "empty_folder"
    folder.mkdir()
    return folder


def _missing(d: Path) -> Path:
    return d / "does_not_exist.pt"


def _zip_with_text(d: Path) -> Path:
    path = d / "model.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("notes.txt", "not a checkpoint\n")
    return path


def _zip_with_text_named_bin(d: Path) -> Path:
    path = d / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/notes.txt", "still not a checkpoint\n")
    return path


NOT_A_FORMAT = "not a checkpoint format avdiag reads"
DAMAGED_ZIP = "damaged zip archive"
DAMAGED_SAFETENSORS = "damaged safetensors file"
UNREADABLE_TORCH = "cannot read torch checkpoint"
NO_INDEX = "not a sharded checkpoint (no *.index.json)"
LFS = "a Git LFS pointer, not the weights (run `git lfs pull` to fetch them)"

# case: (builder, what the error line must say about the file)
DAMAGED: dict[str, tuple[Callable[[Path], Path], str]] = {
    "empty_pt": (_write("model.pt", b""), "empty file"),
    "empty_safetensors": (_write("model.safetensors", b""), "empty file"),
    "random_pt": (_write("model.pt", random.Random(1234).randbytes(4096)), NOT_A_FORMAT),
    "random_bin": (_write("pytorch_model.bin", random.Random(5678).randbytes(64 * 1024)), NOT_A_FORMAT),
    "random_safetensors": (_write("model.safetensors", random.Random(91011).randbytes(1000)), NOT_A_FORMAT),
    "random_with_zip_magic": (_write("model.pt", b"PK\x03\x04" + random.Random(7).randbytes(2000)), DAMAGED_ZIP),
    "truncated_zip_1_byte": (_truncated("zip", None, minus=10**9), NOT_A_FORMAT),
    "truncated_zip_10pct": (_truncated("zip", 0.10), DAMAGED_ZIP),
    "truncated_zip_half": (_truncated("zip", 0.5), DAMAGED_ZIP),
    "truncated_zip_90pct": (_truncated("zip", 0.9), DAMAGED_ZIP),
    "truncated_zip_minus_22": (_truncated("zip", None, minus=22), DAMAGED_ZIP),
    "truncated_zip_minus_1": (_truncated("zip", None, minus=1), DAMAGED_ZIP),
    "truncated_legacy_1_byte": (_truncated("legacy", None, minus=10**9), "a plain pickle, not a torch checkpoint"),
    "truncated_legacy_10pct": (_truncated("legacy", 0.10), UNREADABLE_TORCH),
    "truncated_legacy_half": (_truncated("legacy", 0.5), UNREADABLE_TORCH),
    "truncated_legacy_90pct": (_truncated("legacy", 0.9), UNREADABLE_TORCH),
    "truncated_legacy_minus_1": (_truncated("legacy", None, minus=1), UNREADABLE_TORCH),
    "safetensors_bad_json": (_write("model.safetensors", _safetensors(b'{"w": {"dtype": "F32", ', b"\0" * 8)),
                             DAMAGED_SAFETENSORS),
    "safetensors_header_not_object": (_write("model.safetensors", _safetensors(b"[1, 2, 3]", b"")), NOT_A_FORMAT),
    "safetensors_oversized_claim": (
        _write("model.safetensors", _safetensors(_header(_GOOD_ENTRY), b"\0" * 8, claimed_len=10**6)),
        "safetensors header claims 1000000 bytes but the file has 77",
    ),
    "safetensors_len_2_63": (
        _write("model.safetensors", _safetensors(_header(_GOOD_ENTRY), b"\0" * 8, claimed_len=2**63)),
        f"safetensors header claims {2**63} bytes but the file has 77",
    ),
    "safetensors_len_2_64_minus_1": (
        _write("model.safetensors", _safetensors(_header(_GOOD_ENTRY), b"\0" * 8, claimed_len=2**64 - 1)),
        f"safetensors header claims {2**64 - 1} bytes but the file has 77",
    ),
    "safetensors_offsets_past_end": (
        _write("model.safetensors",
               _safetensors(_header({"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}), b"\0" * 8)),
        DAMAGED_SAFETENSORS,
    ),
    "safetensors_unknown_dtype": (
        _write("model.safetensors",
               _safetensors(_header({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}), b"\0" * 8)),
        DAMAGED_SAFETENSORS,
    ),
    "safetensors_shape_offset_mismatch": (
        _write("model.safetensors",
               _safetensors(_header({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}), b"\0" * 8)),
        DAMAGED_SAFETENSORS,
    ),
    "safetensors_only_length_field": (_write("model.safetensors", struct.pack("<Q", 64)), NOT_A_FORMAT),
    "lfs_pointer_safetensors": (_write("model.safetensors", LFS_POINTER), LFS),
    "lfs_pointer_bin": (_write("pytorch_model.bin", LFS_POINTER), LFS),
    "dir_without_checkpoint": (_empty_dir, NO_INDEX),
    "empty_dir": (_really_empty_dir, NO_INDEX),
    "missing_path": (_missing, "no such file or directory"),
    "zip_with_text_file": (_zip_with_text, "a zip archive that is not a torch checkpoint (holds 1 entries: notes.txt)"),
    "zip_with_text_file_bin": (_zip_with_text_named_bin,
                               "a zip archive that is not a torch checkpoint (holds 1 entries: archive/notes.txt)"),
    "text_file_pt": (_write("model.pt", b"hello, this is not a checkpoint\n"), NOT_A_FORMAT),
    "text_file_safetensors": (_write("model.safetensors", b"these are not the weights you are looking for\n"),
                              NOT_A_FORMAT),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_input(case: str, tmp_path: Path) -> None:
    make, problem = DAMAGED[case]
    path = make(tmp_path)
    before = snapshot(path)

    message = run_cli("inspect", path).error()

    assert message.startswith(f"{path}: ") and problem in message, message
    assert snapshot(path) == before, "the input was modified"


@pytest.mark.parametrize("case", ["truncated_zip_half", "safetensors_len_2_63", "lfs_pointer_bin", "missing_path"])
def test_damaged_input_json(case: str, tmp_path: Path) -> None:
    make, problem = DAMAGED[case]
    path = make(tmp_path)
    message = run_cli("inspect", path, "--json", "-").error()  # stdout empty: no half JSON document
    assert message.startswith(f"{path}: ") and problem in message, message


# --------------------------------------------------------------------------
# usage errors
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect"], "Missing argument 'CHECKPOINT'."),
        (["inspect", "{ckpt}", "--no-such-option"], "No such option: --no-such-option"),
        (["no-such-command", "{ckpt}"], "No such command 'no-such-command'."),
    ],
    ids=["missing-path", "unknown-option", "unknown-command"],
)
def test_usage_errors(argv: list[str], message: str, tmp_path: Path) -> None:
    ckpt = _benign_zip(tmp_path)
    argv = [a.replace("{ckpt}", str(ckpt)) for a in argv]
    assert run_cli(*argv).error() == message


# --- payloads that torch's own loaders would run -------------------------------------------------

def test_pt2_with_a_headerless_pickle_record_is_refused(tmp_path: Path) -> None:
    """torch.export.load unpickles a legacy data/weights/<model>.pt record and retries failures with
    full pickle; a protocol-0 pickle has no 0x80 header byte. avdiag refuses the archive (and never
    rebuilds the program), so --data cannot run it either."""
    from malicious import benign_pt2_bytes

    sentinel = tmp_path / "SENTINEL"
    src = tmp_path / "clean.pt2"
    src.write_bytes(benign_pt2_bytes())
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(evil, "w") as zout:
        names = zin.namelist()
        root = next(n for n in names if n.endswith("models/model.json"))[: -len("models/model.json")]
        for n in names:
            zout.writestr(zin.getinfo(n), zin.read(n))
        zout.writestr(root + "data/weights/model.pt", f"cos\nsystem\n(S'touch {sentinel}'\ntR.".encode())
    for extra in ([], ["--data", "synthetic:n=4"]):
        run_cli("inspect", evil, *extra).error(evil.name, "refused", re.compile(r"\bsystem\b"))
        assert not sentinel.exists()


@pytest.mark.slow
def test_torchscript_with_setstate_is_refused(tmp_path: Path) -> None:
    """torch.jit.load runs an archive's TorchScript __setstate__, which can write files."""
    victim = tmp_path / "victim.txt"
    path = tmp_path / "setstate.pt"
    maker = tmp_path / "make_setstate.py"
    maker.write_text(textwrap.dedent(f"""
        from typing import Tuple
        import torch

        class Setstate(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.ones(2))

            def forward(self, x):
                return x * self.w

            @torch.jit.export
            def __getstate__(self) -> Tuple[bool, torch.Tensor]:
                return (self.training, self.w)

            @torch.jit.export
            def __setstate__(self, state: Tuple[bool, torch.Tensor]) -> None:
                self.training = state[0]
                self.w = state[1]
                torch.from_file({str(victim)!r}, True, 5, dtype=torch.uint8).fill_(88)

        torch.jit.script(Setstate()).save({str(path)!r})
    """))
    subprocess.run([sys.executable, str(maker)], check=True, capture_output=True, env=subprocess_env())
    victim.write_text("hello world!")
    run_cli("inspect", path).error(path.name, "__setstate__")
    assert victim.read_text() == "hello world!"
