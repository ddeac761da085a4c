"""The headline job's entrypoint and the runtime environment Ray uploads with it."""
from __future__ import annotations

import zipfile

import pytest
import yaml
from ray._private.runtime_env.packaging import create_package
from support import REPO
from support.clusters import (
    CLUSTERS,
    ENTRYPOINT,
    PIPELINE_SCRIPT,
    PIPELINE_SPEC,
    README,
)


def test_entrypoint_matches_the_documented_paths():
    assert PIPELINE_SCRIPT in (REPO / "Makefile").read_text()
    readme = README.read_text()
    assert "ray job submit --working-dir . --runtime-env clusters/job_runtime_env.yaml" in readme
    assert ENTRYPOINT in readme


def test_entrypoint_files_exist():
    if not (REPO / PIPELINE_SCRIPT).exists():
        pytest.skip(f"{PIPELINE_SCRIPT} is not in the repository yet")
    assert (REPO / PIPELINE_SPEC).is_file()


def test_job_upload_leaves_the_compiled_packages_to_the_nodes(tmp_path):
    # A tree shaped like the repository, packaged by Ray's own working_dir code with the real
    # .gitignore and excludes.
    tree = tmp_path / "checkout"
    for relative in (
        "dino_core/__init__.py",
        "dino_core/ops/_ext.cpython-311-x86_64-linux-gnu.so",
        "platform/dino_platform/__init__.py",
        "pipelines/o365_pretrain_coco_ft.py",
        "pipelines/o365_pretrain_coco_ft.yaml",
        ".venv/lib/site.py",
        "pyproject.toml",
    ):
        (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        (tree / relative).write_text("x")
    (tree / ".gitignore").write_text((REPO / ".gitignore").read_text())
    excludes = yaml.safe_load((CLUSTERS / "job_runtime_env.yaml").read_text())["excludes"]
    package = tmp_path / "package.zip"
    create_package(str(tree), package, include_gitignore=True, excludes=excludes)
    names = set(zipfile.ZipFile(package).namelist())
    assert {"pipelines/o365_pretrain_coco_ft.py", "pipelines/o365_pretrain_coco_ft.yaml"} <= names
    assert not [n for n in names if n.startswith(("dino_core", "platform", ".venv"))]
