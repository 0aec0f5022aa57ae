"""yamllint on every YAML file of the deployment (compose, docker/, k8s/)."""

import subprocess

from tests.deploy.repo import REPO, tool, yaml_files

CONFIG = REPO / "tests" / "deploy" / "yamllint.yaml"


def test_yamllint_clean():
    files = yaml_files()
    assert len(files) >= 20, files
    run = subprocess.run(
        [tool("yamllint"), "--strict", "-c", str(CONFIG), *map(str, files)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_yamllint_catches_a_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("key: value\nkey: again\n")
    run = subprocess.run([tool("yamllint"), "-c", str(CONFIG), str(bad)], capture_output=True, text=True)
    assert run.returncode != 0 and "duplication of key" in run.stdout
