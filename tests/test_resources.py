"""Package data: the wheel carries the recipes and calibration data, and an installed copy finds them."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_lookup_in_a_clone():
    from qwen_quant.resources import calib_dir, recipe, shipped

    assert recipe("demo.yaml").is_file() and (calib_dir() / "calib.jsonl").is_file()
    assert shipped("recipes") == REPO / "recipes"


def test_wheel_ships_recipes_and_data_and_finds_them_installed(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv*", ".git", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", "qwen-quant-demo"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("qwen_quant-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("qwen_quant/recipes/demo.yaml", "qwen_quant/recipes/qwen2-1.5b.yaml", "qwen_quant/calib_data/calib.jsonl",
              "qwen_quant/calib_data/eval.txt", "qwen_quant/calib_data/prompts.jsonl", "qwen_quant/report/schema.json"):
        assert f in names, f
    assert not any(n.startswith("qwen_quant/calib_data/textgen") or n.endswith("generate.py") for n in names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_QUANT_CALIB")} | {"PYTHONPATH": str(site)}
    code = ("import qwen_quant, qwen_quant.demo as d; from qwen_quant.calib import shipped_dir; "
            "print(qwen_quant.__file__); print(d.DEMO_RECIPE); print(shipped_dir())")
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    assert all(line.startswith(str(site)) for line in out), out
    assert Path(out[1]).is_file() and (Path(out[2]) / "calib.jsonl").is_file()
