"""A saved folder is untrusted input: crafted folders whose payload would create a marker file are refused
(or, for compiled artifacts, not used) and the marker never appears; op providers come only from installed
packages' entry points."""

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch._export.serde import schema
from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

from factories import tiny_decoder

from inferpass.capture import capture
from inferpass.errors import ModelLoadError
from inferpass.ir.program import ENCODER, ModelInfo, Program
from inferpass.ir.serialize import _sha256, load_program, manifest_checksum, save_program
from inferpass.targets import get_target


class Payload:
    """Unpickling this creates ``path``: stands in for any code a pickle can run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _pickle(path: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"x": Payload(path)}, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A folder saved from a one-layer Llama (cache of 8 slots)."""
    return save_program(capture(tiny_decoder("llama", layers=1), max_len=8), tmp_path_factory.mktemp("s") / "m")


def _copy(saved: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in saved.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def _reseal(folder: Path, edit=None) -> None:
    """Rewrite the manifest with fresh checksums, as whoever crafts a folder can."""
    manifest = json.loads((folder / "manifest.json").read_text())
    if edit:
        edit(manifest)
    for entry in manifest["graphs"].values():
        entry["sha256"] = _sha256(folder / entry["file"])
    manifest["weights"]["sha256"] = _sha256(folder / manifest["weights"]["file"])
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _crafted_pt2(path: Path, entry: str, marker: Path) -> None:
    """A genuine torch.export archive with ``entry`` (a weight, a constant, or the example inputs) a payload."""
    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))
            self.register_buffer("c", torch.ones(3), persistent=False)

        def forward(self, x):
            return x * self.w + self.c

    plain = path.with_suffix(".plain")
    torch.export.save(torch.export.export(Module(), (torch.ones(3),)), plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            kind = item.filename.split("/")[2] if item.filename.count("/") >= 3 else ""
            if entry in ("weights", "constants") and kind == entry and item.filename.endswith("_config.json"):
                config = json.loads(data)
                for meta in config["config"].values():
                    meta["use_pickle"] = True
                data = json.dumps(config).encode()
            elif entry in ("weights", "constants") and kind == entry:
                data = _pickle(marker)
            elif entry == "sample_inputs" and kind == "sample_inputs":
                data = _pickle(marker)  # fails the weights-only load, so torch falls back to a full unpickle
            dst.writestr(item, data)


@pytest.mark.parametrize("entry", ["weights", "constants", "sample_inputs"])
@pytest.mark.parametrize("as_format", ["inferpass-program/1", "inferpass-program/2"])
def test_pickled_archives_are_never_opened(saved, tmp_path, entry, as_format):
    marker = tmp_path / "marker"
    folder = _copy(saved, tmp_path / "m")
    _crafted_pt2(folder / "decode.pt2", entry, marker)

    def point_at_archive(manifest):
        manifest["format"] = as_format
        manifest["graphs"]["decode"]["file"] = "decode.pt2"

    _reseal(folder, point_at_archive)
    message = "saved by an older inferpass as pickled .pt2 archives" if as_format.endswith("1") else \
        r"decode.pt2: not a JSON graph .*never load pickled archives"
    with pytest.raises(ModelLoadError, match=message):
        load_program(folder)
    assert not marker.exists()
    with contextlib.suppress(Exception):  # the payload is live: torch's own loader runs it (then may fail)
        torch.export.load(folder / "decode.pt2")
    assert marker.exists()


def test_a_pickle_in_place_of_the_weights_is_refused(saved, tmp_path):
    marker = tmp_path / "marker"
    folder = _copy(saved, tmp_path / "m")
    (folder / "weights.safetensors").write_bytes(_pickle(marker))
    _reseal(folder)
    with pytest.raises(ModelLoadError, match="weights.safetensors: not a readable safetensors file"):
        load_program(folder)
    assert not marker.exists()


def _edit_graph(folder: Path, edit) -> None:
    data = json.loads((folder / "decode.json").read_text())
    edit(data, json.dumps(data))
    (folder / "decode.json").write_text(json.dumps(data))
    _reseal(folder)


def _first(data, key):
    """The first dict in ``data`` holding ``key``."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if key in item:
                return item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    raise KeyError(key)


@pytest.mark.parametrize("payload, live", [
    ("__import__('builtins').open({marker!r}, 'w')", True),
    ("Symbol(open({marker!r}, 'w').name)", True),
    ("Mul(Integer(2), \"open({marker!r}, 'w')\")", False),  # text as an argument: refused whatever sympy does
    ("Symbol('s16').__class__", False),
])
def test_shape_expressions_that_would_run_code_are_refused(saved, tmp_path, payload, live):
    marker = tmp_path / "marker"
    folder = _copy(saved, tmp_path / "m")
    _edit_graph(folder, lambda data, _: _first(data, "expr_str").update(expr_str=payload.format(marker=str(marker))))
    with pytest.raises(ModelLoadError, match="decode.json: shape expression .* refused"):
        load_program(folder)
    assert not marker.exists()
    serialized = _dict_to_dataclass(schema.ExportedProgram, json.loads((folder / "decode.json").read_text()))
    with contextlib.suppress(Exception):  # torch's own deserializer evaluates the expression
        ExportedProgramDeserializer().deserialize(serialized, {}, {}, None)
    assert marker.exists() == live


@pytest.mark.parametrize("target", ["builtins.open", "torch.load", "torch.hub.load", "os.system"])
def test_call_targets_that_are_not_operators_are_refused(saved, tmp_path, target):
    folder = _copy(saved, tmp_path / "m")

    def retarget(data, _):
        node = next(n for n in data["graph_module"]["graph"]["nodes"] if n["target"].startswith("torch.ops.aten"))
        node["target"] = target

    _edit_graph(folder, retarget)
    with pytest.raises(ModelLoadError, match=f"call target '{target}' is not an operator"):
        load_program(folder)


def test_operators_of_an_unknown_namespace_import_nothing(saved, tmp_path, monkeypatch):
    """A graph calling ``torch.ops.evilns...`` while a module ``evilns`` is importable: nothing is imported."""
    marker = tmp_path / "marker"
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "evilns.py").write_text(f"open({str(marker)!r}, 'w')\n")
    monkeypatch.syspath_prepend(str(modules))
    folder = _copy(saved, tmp_path / "m")

    def retarget(data, _):
        node = next(n for n in data["graph_module"]["graph"]["nodes"] if n["target"].startswith("torch.ops.aten"))
        node["target"] = "torch.ops.evilns.run.default"

    _edit_graph(folder, retarget)
    _reseal(folder, lambda m: m.update(op_providers={"evilns": "evilns"}, plugin={"module": "evilns"}))
    with pytest.raises(ModelLoadError, match=r"operators no installed package provides: torch.ops.evilns.run.default"):
        load_program(folder)
    assert not marker.exists() and "evilns" not in sys.modules


def test_foreign_compiled_artifacts_are_not_used_unless_trusted(saved, tmp_path, monkeypatch, caplog):
    """A folder carrying a compiled artifact that this machine did not save: the target does not look at it."""
    folder = _copy(saved, tmp_path / "m")
    name = "decode-foreign.vmfb"
    (folder / "artifacts" / "cpu").mkdir(parents=True)
    (folder / "artifacts" / "cpu" / name).write_bytes(b"native code")
    _reseal(folder, lambda m: m.update(artifacts={f"artifacts/cpu/{name}": _sha256(folder / "artifacts/cpu" / name)}))
    with caplog.at_level(logging.WARNING):
        program = load_program(folder)
    assert "not using its 1 compiled artifacts" in caplog.text and "--trust-artifacts" in caplog.text
    executable = get_target("cpu").compile(program)
    assert executable.store.carried == [] and executable.store.find(name) is None
    trusted = get_target("cpu").compile(load_program(folder, trust_artifacts=True))
    assert trusted.store.find(name) == folder / "artifacts" / "cpu" / name


def test_a_folder_saved_here_keeps_its_artifacts_trusted(tmp_path, monkeypatch):
    program = capture(tiny_decoder("llama", layers=1), max_len=8)
    artifact = tmp_path / "decode-x.vmfb"
    artifact.write_bytes(b"compiled here")
    out = save_program(program, tmp_path / "m", artifacts={"cpu": {artifact.name: artifact}})
    assert load_program(out).trusted_artifacts
    monkeypatch.setenv("INFERPASS_TRUST_LIST", str(tmp_path / "other-machine.txt"))
    assert not load_program(out).trusted_artifacts


PROVIDER = """
import torch
open({marker!r}, "w")
lib = torch.library.Library("ipt_testns", "DEF")
lib.define("double(Tensor x) -> Tensor")
lib.impl("double", lambda x: x * 2, "CompositeExplicitAutograd")
lib.impl("double", lambda x: torch.empty_like(x), "Meta")
"""

LOAD = """
import sys, torch
from inferpass.ir.serialize import load_program
program = load_program(sys.argv[1])
print(program.graphs["forward"].module()(torch.ones(1, 4))[0].tolist())
"""


def test_op_providers_load_only_through_installed_entry_points(tmp_path):
    """A folder whose graph calls ``ipt_testns::double``: it loads in a fresh process once a distribution declares
    an ``inferpass.op_providers`` entry point for that namespace, and is refused without one."""
    marker = tmp_path / "provider-imported"
    site = tmp_path / "site"
    site.mkdir()
    (site / "ipt_testprov.py").write_text(PROVIDER.format(marker=str(marker)))
    sys.path.insert(0, str(site))
    try:
        import ipt_testprov  # noqa: F401  (registers the op in this process, as on the machine that saved it)
    finally:
        sys.path.remove(str(site))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.eye(4))

        def forward(self, x):
            return (torch.ops.ipt_testns.double(x @ self.w),)

    ep = torch.export.export(Model(), (torch.ones(1, 4),))
    info = ModelInfo(kind="encoder", family="custom", architecture="Model", num_layers=1, hidden_size=4, num_labels=4)
    out = save_program(Program(info=info, graphs={"forward": ep}, roles={"forward": ENCODER}), tmp_path / "m")
    marker.unlink()
    run = lambda: subprocess.run([sys.executable, "-c", LOAD, str(out)], capture_output=True, text=True,  # noqa: E731
                                 env={**os.environ, "PYTHONPATH": str(site)}, timeout=300)
    refused = run()
    assert refused.returncode != 0 and "operators no installed package provides: torch.ops.ipt_testns.double" in \
        refused.stderr and not marker.exists()
    dist = site / "ipt_testprov-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ipt-testprov\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[inferpass.op_providers]\nipt_testns = ipt_testprov\n")
    loaded = run()
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == [[2.0, 2.0, 2.0, 2.0]] and marker.exists()
