"""The wheel alone runs the app: configs ship inside it (lightning_mk.conf), nothing is read from the checkout."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["logger=none", "trainer.max_epochs=1", "data.module.num_samples=600", "+trainer.limit_train_batches=2"]


def test_the_installed_wheel_runs_the_app_from_an_empty_folder(tmp_path):
    source = tmp_path / "source"  # a copy, so the build writes nothing into the checkout
    for part in ("lightning_mk", "conf"):
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, source / part)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("lightning_mk-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True, cwd=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def python(*args):
        done = subprocess.run([sys.executable, *args], cwd=empty, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    where = python("-c", "import lightning_mk, lightning_mk.conf; print(lightning_mk.__file__, lightning_mk.conf.__file__)")
    assert all(Path(path).is_relative_to(site) for path in where.split()), where
    job = python("-m", "lightning_mk.experiments.run", "--cfg", "job", "experiment=comparison")
    assert "_target_: lightning_mk.experiments.models.MLP" in job and "max_epochs: 20" in job

    runs = {"module": ["-m", "lightning_mk.experiments.run"]}
    script = site / "bin" / "lightning-mk-run"
    if script.exists():  # pip writes console scripts under --target/bin
        runs["script"] = []
    for name, command in runs.items():
        out = tmp_path / name
        done = subprocess.run(
            [*([sys.executable, *command] if command else [script]), *TINY, "method=mk", "k=2", f"hydra.run.dir={out}"],
            cwd=empty, env=env, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert (out / "model.pt").stat().st_size > 0
        (result,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert result["method"] == "mk" and result["config"]["trainer.max_epochs"] == 1
    assert list(empty.iterdir()) == [], "the app writes only into its run folder"
