"""Import-time promises of the package: what the core needs, and what it never imports."""

import os
import subprocess
import sys
import textwrap

TESTS = os.path.dirname(os.path.abspath(__file__))
#: The optional packages (module -> distribution): the [experiments] and [test] extras.
EXTRAS = {"hydra": "hydra-core", "omegaconf": "omegaconf", "wandb": "wandb", "sklearn": "scikit-learn"}
EXTRAS |= {"matplotlib": "matplotlib", "scipy": "scipy", "mnist1d": "mnist1d", "transformers": "transformers"}
EXTRAS |= {"deepspeed": "deepspeed"}
LIGHTNING = {"lightning": "lightning", "pytorch_lightning": "pytorch-lightning", "lightning_fabric": "lightning-fabric"}


def run_without(blocked: dict[str, str], body: str) -> str:
    """Run ``body`` in a fresh interpreter where the packages ``blocked`` (module -> distribution name)
    look not installed. A ``sys.meta_path`` finder takes the place of the path finder: it finds no module
    and no distribution metadata of theirs, so importing one raises ``ModuleNotFoundError`` while
    ``find_spec`` and ``importlib.metadata`` answer as they would without it (libraries probe those
    before importing optional packages, and a finder that raised would break those probes)."""
    code = textwrap.dedent(
        f"""
        import importlib.abc, importlib.machinery, re, sys

        MODULES, DISTRIBUTIONS = {set(blocked)!r}, {set(blocked.values())!r}
        PathFinder = importlib.machinery.PathFinder

        class NotInstalled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                return None if name.partition(".")[0] in MODULES else PathFinder.find_spec(name, path, target)

            def find_distributions(self, *args, **kwargs):
                for dist in PathFinder.find_distributions(*args, **kwargs):
                    if re.sub(r"[-_.]+", "-", (dist.metadata["Name"] or "").lower()) not in DISTRIBUTIONS:
                        yield dist

            def invalidate_caches(self):
                PathFinder.invalidate_caches()

        sys.meta_path[sys.meta_path.index(PathFinder)] = NotInstalled()
        sys.path.insert(0, {TESTS!r})
        import importlib.metadata, importlib.util
        assert not [name for name in MODULES if importlib.util.find_spec(name) is not None]
        assert not [name for name in DISTRIBUTIONS if list(importlib.metadata.distributions(name=name))]
        """
    ) + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_importing_lightning_mk_does_not_import_hydra_or_wandb():
    code = (
        "import sys, lightning_mk; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'omegaconf', 'wandb'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_callback_trains_and_saves_without_the_optional_dependencies(tmp_path):
    out = run_without(
        EXTRAS,
        f"""
        import torch
        import lightning_mk
        from lightning_mk import MajorityKernelCallback
        from helpers import TinyModule, loader, trainer

        path = {str(tmp_path / "small.pt")!r}
        model = TinyModule()
        callback = MajorityKernelCallback.published(k=2, save_path=path)
        trainer({str(tmp_path)!r}, limit_train_batches=3, callbacks=[callback]).fit(model, loader())
        TinyModule().load_state_dict(torch.load(path, weights_only=True), strict=True)
        print("steps", model.training_steps)
        """,
    )
    assert out.split()[-2:] == ["steps", "3"]


def test_the_core_works_with_torch_alone():
    out = run_without(
        EXTRAS | LIGHTNING,
        """
        import torch
        from torch import nn
        import sys
        import lightning_mk.apply, lightning_mk.collapsing, lightning_mk.forms, lightning_mk.parametrization, lightning_mk.schemes, lightning_mk.settings
        from lightning_mk import apply_majority_kernels
        assert "torch._dynamo" not in sys.modules, "importing the raw API must not import torch._dynamo (a second)"

        torch.manual_seed(0)
        kernels = apply_majority_kernels(nn.Linear(4, 3), k=2, init="independent")
        kernels.module(torch.randn(5, 4))
        mean = lightning_mk.kernel_copies(kernels.module)["weight"].detach().mean(0)
        plain = kernels.collapse()
        assert type(plain) is nn.Linear and torch.equal(plain.weight, mean)
        try:
            from lightning_mk import MajorityKernelCallback
        except ModuleNotFoundError as e:
            print("callback:", e.name)
        print("step", kernels.step)
        """,
    )
    assert out.split() == ["callback:", "lightning", "step", "1"]
