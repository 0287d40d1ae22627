"""Fine-tune a transformers GPT-2 with Majority Kernels and ship it as a plain GPT-2.

Nothing is downloaded: a small GPT-2 is built from a config and first trained plainly on generated
token sequences (counting by 1 or 2, modulo the vocabulary), standing in for a pretrained checkpoint.
It is then fine-tuned on a new task (counting by 3) with ``MajorityKernelCallback``. GPT-2's
projections are transformers' ``Conv1D`` layers, a built-in layer type, so every kernel gets copies.
``init="replicate"`` starts every copy at the pretrained weight: the model is unchanged at step 0
(checked below). The small model the callback saves loads into a fresh ``GPT2LMHeadModel`` and goes
through transformers' own ``save_pretrained``/``from_pretrained``.

    python examples/hf_gpt2.py [--pretrain-steps 150] [--finetune-steps 100] [--k 4] [--out runs/hf_gpt2]
"""

import argparse
import os
from typing import Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_mk import MajorityKernelCallback

VOCAB, LENGTH = 64, 32


def counting(strides: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    """``n`` sequences ``start, start + s, start + 2s, ...`` (mod VOCAB), each with a stride from ``strides``."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(VOCAB, (n, 1), generator=g)
    stride = torch.tensor(strides)[torch.randint(len(strides), (n, 1), generator=g)]
    return (start + stride * torch.arange(LENGTH)) % VOCAB


class CausalLM(pl.LightningModule):
    """A user's LightningModule around a transformers causal LM; it knows nothing about Majority Kernels."""

    def __init__(self, model: GPT2LMHeadModel, lr: float = 3e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


@torch.no_grad()
def eval_loss(model: GPT2LMHeadModel, ids: torch.Tensor) -> float:
    """The loss in eval mode: with majority kernels, that of the mean of the copies (the deployed model)."""
    training = model.training
    model.eval()
    loss = model(input_ids=ids, labels=ids).loss.item()
    model.train(training)
    return loss


class LossAtStart(pl.Callback):
    """The eval loss when training starts, i.e. right after MajorityKernelCallback rewrote the model."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids
        self.loss: Optional[float] = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: CausalLM) -> None:
        self.loss = eval_loss(pl_module.model, self.ids)


def fit(module: CausalLM, data: torch.Tensor, steps: int, callbacks: list, seed: int) -> None:
    loader = DataLoader(TensorDataset(data), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    """Run the example; return its eval losses on the fine-tuning task."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/hf_gpt2")
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    fit(CausalLM(model), counting((1, 2), 4096, seed=args.seed), args.pretrain_steps, [], args.seed)  # "pretraining"

    probe = counting((3,), 256, seed=args.seed + 1)
    losses = {"pretrained": eval_loss(model, probe)}
    os.makedirs(args.out, exist_ok=True)
    small_path = os.path.join(args.out, "small_model.pt")
    mk = MajorityKernelCallback(k=args.k, init="replicate", seed=args.seed, save_path=small_path, log_spread=False)
    at_start = LossAtStart(probe)
    tuned = CausalLM(model)
    fit(tuned, counting((3,), 4096, seed=args.seed + 2), args.finetune_steps, [mk, at_start], args.seed)
    losses["with copies at step 0"] = at_start.loss
    print(
        f"fine-tuning task, eval loss: pretrained {losses['pretrained']:.5f}, with copies at step 0 {at_start.loss:.5f}"
    )
    assert abs(at_start.loss - losses["pretrained"]) <= 1e-5 * max(1.0, losses["pretrained"]), (
        "replicate must keep the function"
    )

    # The saved file is the LightningModule's state: it loads into a fresh, unmodified one.
    small = CausalLM(GPT2LMHeadModel(config))
    small.load_state_dict(torch.load(small_path, weights_only=True), strict=True)
    small = small.model
    losses["fine-tuned"] = eval_loss(small, probe)
    tuned.model.eval()
    small.eval()
    with torch.no_grad():
        difference = (small(input_ids=probe).logits - tuned.model(input_ids=probe).logits).abs().max().item()
    assert difference <= 1e-5, (
        f"the small model must compute what the model with copies computes in eval mode ({difference:g})"
    )
    assert small.lm_head.weight is small.transformer.wte.weight, "the tied lm_head stays tied"

    # transformers' own format, and back
    hf_dir = os.path.join(args.out, "gpt2-mk")
    small.save_pretrained(hf_dir)
    reloaded = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, small(input_ids=probe).logits, rtol=0, atol=1e-6)
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
    n_params = sum(p.numel() for p in small.parameters())
    print(
        f"fine-tuned with k={args.k}: eval loss {losses['fine-tuned']:.4f} (pretrained {losses['pretrained']:.4f}); "
        f"a plain GPT2LMHeadModel of {n_params:,} parameters, saved with save_pretrained to {hf_dir}"
    )
    return losses


if __name__ == "__main__":
    main()
