"""Import-time promises of the package."""

import subprocess
import sys


def test_importing_lightning_mk_does_not_import_hydra_or_wandb():
    code = (
        "import sys, lightning_mk; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'omegaconf', 'wandb'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
