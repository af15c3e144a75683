"""data_modules/, callbacks/ and configs/ must import as cllm.* from a wheel and from the editable install."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = """
import pathlib, sys
import cllm, cllm.data_modules, cllm.callbacks, cllm.configs
from cllm.data_modules.prompts import load_prompts
from cllm.arguments import bundled_config_dir
for module in (cllm, cllm.data_modules, cllm.callbacks):
    assert pathlib.Path(module.__file__).resolve().is_relative_to(pathlib.Path(sys.argv[1]).resolve()), module.__file__
print(sorted(p.name for p in bundled_config_dir().glob("*.yaml")))
"""


def test_editable_install_maps_top_level_folders(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", CHECK, str(ROOT)], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    import cllm.data_modules

    assert Path(cllm.data_modules.__file__).parent == ROOT / "data_modules"


@pytest.mark.slow
def test_wheel_install_imports_and_ships_configs(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir)]
    subprocess.run([*build, str(ROOT)], check=True, capture_output=True)
    (wheel,) = wheel_dir.glob("cllm-*.whl")
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", CHECK, str(target)], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    shipped = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert all(name in out.stdout for name in shipped)
