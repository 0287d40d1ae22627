"""The template's ``src/train.py``, reduced: fit, then test the best checkpoint."""

import json
import os

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate


@hydra.main(version_base="1.3", config_path="configs", config_name="train.yaml")
def main(cfg):
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values() if "_target_" in callback]
    trainer = instantiate(cfg.trainer, callbacks=callbacks)
    trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    best = trainer.checkpoint_callback.best_model_path
    # weights_only=False: the checkpoint pickles the network (the template needs it on torch >= 2.6 with or without MK)
    (tested,) = trainer.test(model=model, datamodule=datamodule, ckpt_path=best, weights_only=False)
    with open(os.path.join(HydraConfig.get().runtime.output_dir, "result.json"), "w") as f:
        json.dump({"best": best, "test_acc": tested["test/acc"]}, f)


if __name__ == "__main__":
    main()
