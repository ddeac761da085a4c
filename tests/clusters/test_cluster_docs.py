"""clusters/ holds no credentials, documents every placeholder, and its sizing table follows from its
stated assumptions."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from support import REPO
from support.clusters import CLUSTERS, README

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key setting": re.compile(r"aws_secret_access_key\s*[=:]", re.I),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "service-account key file": re.compile(r'"private_key(?:_id)?"\s*:'),
    "credentials in a URL": re.compile(r"://[^/\s:@<>]+:[^/\s@<>]+@"),
    # A password/secret/token setting with a long literal value (not a --flag naming a secret).
    "secret literal": re.compile(
        r"(?<![-\w])\w*(?:password|passwd|secret|token)\w*\s*[:=]\s*['\"]?[A-Za-z0-9+/_\-]{16,}", re.I
    ),
}


def secret_findings(text: str) -> list[str]:
    return [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


def cluster_files() -> list[Path]:
    return sorted(p for p in CLUSTERS.rglob("*") if p.is_file())


def test_no_credentials_in_cluster_files():
    findings = {str(p.relative_to(REPO)): secret_findings(p.read_text()) for p in cluster_files()}
    assert {path: found for path, found in findings.items() if found} == {}


@pytest.mark.parametrize(
    "planted",
    [
        "AKIA" + "Q" * 16,
        "aws_secret_access_key = " + "x" * 40,
        "-----BEGIN RSA " + "PRIVATE KEY-----",
        '{"private_key": "..."}',
        "MLFLOW_TRACKING_URI=https://user:" + "pw" + "@mlflow.example.com",
        "MLFLOW_TRACKING_TOKEN: " + "a1B2" * 6,
    ],
)
def test_the_credential_scan_finds_planted_secrets(planted):
    assert secret_findings(f"ok: 1\n{planted}\n")


def test_every_placeholder_is_documented():
    documented = set(re.findall(r"^\| ((?:`<[A-Z0-9_]+>`(?:, )?)+) \|", README.read_text(), re.M))
    documented = {p for cell in documented for p in re.findall(r"<[A-Z0-9_]+>", cell)}
    used = {p for f in cluster_files() if f != README for p in re.findall(r"<[A-Z][A-Z0-9_]*>", f.read_text())}
    assert used and used <= documented, sorted(used - documented)


def sizing_rows(assumptions: dict) -> list[list[str]]:
    """The sizing table as README shows it, computed from the stated assumptions."""
    prices = assumptions["usd_per_node_hour"]
    rows = []
    for dataset, images in assumptions["images_per_epoch"].items():
        for model, speed in assumptions["train_images_per_s_per_gpu"].items():
            for gpus, efficiency in assumptions["scaling_efficiency"].items():
                hours = {gpu: images / (speed[gpu] * gpus * efficiency) / 3600 for gpu in ("H100", "A100")}
                node_hours = {gpu: h * gpus / 8 for gpu, h in hours.items()}
                rows.append([
                    dataset, model, str(gpus),
                    "{}:{:02d}".format(*divmod(round(hours["H100"] * 60), 60)),
                    str(round(node_hours["H100"] * prices["p5.48xlarge"])),
                    "{}:{:02d}".format(*divmod(round(hours["A100"] * 60), 60)),
                    str(round(node_hours["A100"] * prices["p4d.24xlarge"])),
                    str(round(node_hours["H100"] * prices["a3-highgpu-8g"])),
                ])
    return rows


def test_sizing_table_follows_from_its_stated_assumptions():
    readme = README.read_text()
    [block] = re.findall(r"```yaml\n(# sizing assumptions\n.*?)```", readme, re.S)
    assumptions = yaml.safe_load(block)
    table = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in readme.splitlines()
        if re.match(r"\| (Objects365|COCO) \|", line)
    ]
    assert table == sizing_rows(assumptions)
    assert "estimates, not measurements" in readme
