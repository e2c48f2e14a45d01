"""Packaging: the wheel carries the library, the workbench and the embedded world (the checkout's ``assets/``
folder, installed as the package ``optimer_assets``), and nothing writes into the package or the checkout.

The slow test builds the wheel from a copy of the working tree, installs it non-editable into a fresh venv
(dependencies are borrowed from this interpreter's site-packages through a ``.pth`` file, so nothing is
downloaded), runs ``optimer demo --quick`` there from a folder outside the checkout with no ``OPTIMER_ASSETS``,
and checks that neither the checkout (``git status``) nor the installed package changed.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path

import pytest

from optimer_lib.data import assets_dir
from optimer_lib.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("optimer_lib", "workbench")


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _tracked(*paths: str) -> list[str]:
    """Files git would ship from these paths: tracked, plus untracked ones not ignored."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z", "--", *paths], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return sorted(p for p in out.split("\0") if p and (ROOT / p).is_file())


def test_every_package_folder_is_listed_for_the_wheel():
    st = _pyproject()["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for src in SOURCES for p in (ROOT / src).rglob("__init__.py")
             if "__pycache__" not in p.parts}
    assert set(st["packages"]) - {"optimer_assets"} == found, "add new package folders to [tool.setuptools] packages"
    assert "optimer_assets" in st["packages"] and st["package-dir"] == {"optimer_assets": "assets"}
    assert (ROOT / "assets" / "__init__.py").is_file()


def test_package_data_ships_every_asset_file():
    globs = _pyproject()["tool"]["setuptools"]["package-data"]["optimer_assets"]
    files = [Path(p).relative_to("assets").as_posix() for p in _tracked("assets") if not p.endswith(".py")]
    assert len(files) > 30
    unshipped = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert unshipped == [], "add these to [tool.setuptools.package-data] optimer_assets"


def test_assets_dir_is_package_data_unless_overridden(monkeypatch, tmp_path):
    monkeypatch.delenv("OPTIMER_ASSETS", raising=False)
    import optimer_assets

    assert assets_dir() == optimer_assets.path() and (assets_dir() / "base" / "config.json").is_file()
    monkeypatch.setenv("OPTIMER_ASSETS", str(tmp_path))
    assert assets_dir() == tmp_path
    monkeypatch.delenv("OPTIMER_ASSETS")
    monkeypatch.setitem(sys.modules, "optimer_assets", None)  # not installed: say how to fix it
    with pytest.raises(DataError, match="OPTIMER_ASSETS"):
        assets_dir()


_UP = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?(\.parents\[(\d+)\]|(?:\.parent\b)+)")


def test_no_module_reaches_above_its_package():
    """``Path(__file__)`` climbing above the top-level package means reading or writing the checkout."""
    bad = []
    for rel in _tracked(*SOURCES, "assets"):
        if not rel.endswith(".py"):
            continue
        depth = len(Path(rel).parts) - 1  # optimer_lib/x.py: one .parent is optimer_lib/, two the checkout
        for m in _UP.finditer((ROOT / rel).read_text()):
            levels = int(m.group(2)) + 1 if m.group(2) else m.group(1).count(".parent")
            if levels > depth:
                bad.append(f"{rel}: {m.group(0)}")
    assert bad == []


def test_the_pattern_above_catches_a_climb(tmp_path):
    assert _UP.search("p = Path(__file__).resolve().parent.parent / 'assets'").group(1).count(".parent") == 2
    assert _UP.search("Path(__file__).parents[2]").group(2) == "2"


@pytest.mark.parametrize("quick", [False, True])
def test_experiments_write_findings_only_into_the_workdir_unless_asked(monkeypatch, tmp_path, quick):
    import optimer_lib.experiments.run as run
    from optimer_lib.cli import main

    seen = []
    monkeypatch.setattr(run, "run_experiments", lambda cfg, **kw: seen.append((cfg.workdir, kw)) or {"figures": []})
    argv = ["experiments", "--workdir", str(tmp_path / "wd")] + (["--quick"] if quick else [])
    assert main(argv) == 0
    assert main([*argv, "--findings", str(tmp_path / "F.md")]) == 0
    assert [kw["findings"] for _, kw in seen] == [None, tmp_path / "F.md"]
    assert {wd for wd, _ in seen} == {tmp_path / "wd"}


def test_asset_builder_writes_only_to_an_explicit_out(capsys):
    from optimer_lib.assets.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["build", "--quick"])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err


def _git_status(repo: Path, *extra: str) -> set[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", *extra], cwd=repo,
                         capture_output=True, text=True, check=True).stdout
    return set(out.splitlines())


def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the checkout's files")
def test_wheel_installs_and_runs_the_demo_outside_the_checkout(tmp_path):
    """The checkout the wheel is built from is a git copy of this working tree (tracked and untracked files), so
    its ``git status --ignored`` before and after is exact even while people edit this tree; the installed code
    has no path to this tree (nothing points at it), and its FINDINGS.md, which older versions overwrote, is
    compared too."""
    t0 = time.perf_counter()
    findings = (ROOT / "FINDINGS.md").read_bytes()
    src = tmp_path / "src"
    for rel in _tracked("."):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy of the working tree"]):
        subprocess.run([*git, *cmd], cwd=src, check=True, capture_output=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(src),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, text=True)
    (wheel,) = (tmp_path / "dist").glob("optimer_workbench-*.whl")
    src_before = _git_status(src, "--ignored")  # the build's own build/ and *.egg-info included
    t_wheel = time.perf_counter()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # Dependencies (torch, transformers, pip itself...) from this interpreter's environment, after the venv's
    # own site-packages; .pth files there (this checkout's editable finder) are not run from a .pth path.
    Path(purelib, "_borrowed_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OPTIMER_ASSETS", "PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
                   check=True, capture_output=True, text=True, env=env)
    t_install = time.perf_counter()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([py, "-c", "import optimer_lib, optimer_assets, workbench, optimer_lib.data as d; "
                            "print(optimer_lib.__file__, optimer_assets.__file__, workbench.__file__, d.assets_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    for p in where:  # the installed copies, not the checkout
        assert Path(p).resolve().is_relative_to(Path(purelib).resolve()), where
    installed = {name: _tree_state(Path(purelib) / name) for name in ("optimer_lib", "optimer_assets", "workbench")}
    assert (Path(purelib) / "optimer_assets" / "base" / "model.safetensors").is_file()

    wd = tmp_path / "demo"
    r = subprocess.run([str(venv / "bin" / "optimer"), "demo", "--quick", "--workdir", str(wd)], cwd=elsewhere,
                       env={**env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=3600)
    t_demo = time.perf_counter()
    print(f"\nwheel {t_wheel - t0:.1f} s ({wheel.stat().st_size / 1e6:.1f} MB), install {t_install - t_wheel:.1f} s, "
          f"demo --quick {t_demo - t_install:.1f} s")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (wd / "results.json").is_file() and (wd / "best-model" / "model.safetensors").is_file()
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # nothing written into the current folder either
    assert {name: _tree_state(Path(purelib) / name) for name in installed} == installed, "the package changed"
    assert _git_status(src, "--ignored") == src_before, "the checkout the wheel came from changed"
    assert (ROOT / "FINDINGS.md").read_bytes() == findings, "the demo wrote this checkout's FINDINGS.md"
