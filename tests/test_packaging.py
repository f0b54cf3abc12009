"""The wheel a user installs: the default weights inside it, dependencies as ranges, pins kept apart."""

import subprocess
import sys
import zipfile

import tomllib
from conftest import DEFAULT_CHECKPOINT, ROOT


def test_the_wheel_carries_the_default_weights_and_ranges(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("rpn_cli-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("rpn_cli/weights/rpn_mobilenet_v2_fpn.safetensors") == DEFAULT_CHECKPOINT.read_bytes()
        assert "rpn_cli/weights/README.md" in archive.namelist()
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requirements = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requirements if "extra ==" not in r]
    assert any(r.startswith("torch") for r in core)
    versions = [r.split(";")[0] for r in requirements]  # the markers (extra == "test") aside
    assert all("==" not in v and "<" in v for v in versions), versions  # ranges with an upper bound


def test_constraints_pin_what_the_ranges_allow():
    """constraints.txt (what CI and the README install) pins every direct dependency inside its range."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    wanted = project["dependencies"] + [r for extra in ("test",) for r in project["optional-dependencies"][extra]]
    for text in wanted:
        requirement = Requirement(text)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (text, pins[name])
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
