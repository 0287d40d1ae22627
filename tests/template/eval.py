"""The template's ``src/eval.py``, reduced: test a checkpoint with the user's own model and no callback."""

import json
import os

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate


@hydra.main(version_base="1.3", config_path="configs", config_name="eval.yaml")
def main(cfg):
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    trainer = instantiate(cfg.trainer)
    (tested,) = trainer.test(model=model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=False)
    with open(os.path.join(HydraConfig.get().runtime.output_dir, "result.json"), "w") as f:
        json.dump({"test_acc": tested["test/acc"]}, f)


if __name__ == "__main__":
    main()
