"""Majority kernels on models users did not write, built from tiny configs (nothing is downloaded):
transformers' GPT-2 (Conv1D projections, tied lm_head), BERT (tied decoder weight and bias), a
Llama-style decoder with tied embeddings, and Lightning's demo Transformer and LSTM. Each trains a few
steps with the callback; its small model loads with ``strict=True`` into a fresh, unmodified instance,
computes what the model with copies computes in eval mode, and keeps the ties."""

import importlib.util
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.lstm import LightningLSTM, SimpleLSTM
from lightning.pytorch.demos.transformer import LightningTransformer, Transformer
from torch.utils.data import DataLoader, TensorDataset

from helpers import trainer
from lightning_mk import MajorityKernelCallback, apply_majority_kernels, copy_spread, kernel_copies, register_layer

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH = 64, 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tokens(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))


class HFModule(pl.LightningModule):
    """A user's LightningModule around a transformers model, trained on its own ``labels`` loss."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def outputs(self, ids):
        return self.model(input_ids=ids).logits


class DemoTransformer(LightningTransformer):
    """Lightning's demo, smaller, on generated tokens (its own data is a download)."""

    def __init__(self) -> None:
        super().__init__(vocab_size=VOCAB)
        self.model = Transformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=64, nlayers=1)

    def prepare_data(self) -> None:
        pass

    def outputs(self, ids):
        return self.model(ids, ids.roll(-1, 1))


class DemoLSTM(LightningLSTM):
    """Lightning's demo, smaller, on generated tokens (its own data is a download)."""

    def __init__(self) -> None:
        super().__init__(vocab_size=VOCAB)
        self.model = SimpleLSTM(vocab_size=VOCAB, ninp=32, nhid=32, nlayers=2)

    def prepare_data(self) -> None:
        pass

    def outputs(self, ids):
        return self.model(ids, self.model.init_hidden(ids.shape[0]))[0]


def gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return HFModule(transformers.GPT2LMHeadModel(config))


def bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
    )
    return HFModule(transformers.BertForMaskedLM(config))


def llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
        tie_word_embeddings=True,
    )
    return HFModule(transformers.LlamaForCausalLM(config))


def hf_batches(ids):
    return DataLoader(TensorDataset(ids), batch_size=4)


def next_token_batches(ids):
    return DataLoader(TensorDataset(ids, ids.roll(-1, 1)), batch_size=4, drop_last=True)


# name: (builder, batches, tied parameter paths, callback options)
MODELS = {
    "gpt2": (gpt2, hf_batches, [("model.transformer.wte.weight", "model.lm_head.weight")], {}),
    "bert": (
        bert,
        hf_batches,
        [
            ("model.bert.embeddings.word_embeddings.weight", "model.cls.predictions.decoder.weight"),
            ("model.cls.predictions.bias", "model.cls.predictions.decoder.bias"),  # held by the head itself
        ],
        {"biases": True},
    ),
    "llama": (llama, hf_batches, [("model.model.embed_tokens.weight", "model.lm_head.weight")], {}),
    "lightning-demo-transformer": (DemoTransformer, next_token_batches, [], {}),
    "lightning-demo-lstm": (DemoLSTM, next_token_batches, [], {}),
}


def _copies(module: torch.nn.Module, path: str) -> torch.Tensor:
    layer, _, name = path.rpartition(".")
    return module.get_submodule(layer).parametrizations[name].original


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_real_model_trains_with_copies_and_ships_plain(name, tmp_path):
    build, batches, ties, options = MODELS[name]
    torch.manual_seed(0)
    model = build()
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    path = tmp_path / "small.pt"
    cb = MajorityKernelCallback.published(k=2, save_path=path, **options)
    trainer(tmp_path, max_steps=3, callbacks=[cb]).fit(model, batches(tokens()))
    small = torch.load(path, weights_only=True)
    assert small.keys() == initial.keys()
    kernels = list(kernel_copies(model))
    assert [key for key in kernels if not torch.equal(small[key], initial[key])] == kernels, "every kernel trained"
    assert cb.kernels.coverage.share >= 0.9, str(cb.kernels.coverage)
    assert cb.kernels.coverage.unregistered_share == 0, str(cb.kernels.coverage)
    for a, b in ties:
        assert _copies(model, a) is _copies(model, b), "tied kernels share one set of copies"

    fresh = build()
    fresh.load_state_dict(small, strict=True)
    ids = tokens(4, seed=1)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.outputs(ids), model.outputs(ids), rtol=0, atol=1e-5)
    for a, b in ties:
        assert fresh.get_parameter(a) is fresh.get_parameter(b)


def test_gpt2_layers_are_transformers_conv1d_a_built_in_type():
    model = gpt2()
    conv1d = transformers.pytorch_utils.Conv1D
    assert isinstance(model.model.transformer.h[0].attn.c_attn, conv1d)
    handle = apply_majority_kernels(model, k=2)
    assert kernel_copies(model)["model.transformer.h.0.attn.c_attn.weight"].shape == (2, 32, 96)
    assert set(handle.coverage.single) == {conv1d, torch.nn.LayerNorm}, "only biases and norms stay single"
    with pytest.raises(ValueError, match=r"reset_parameters\(\), which \['Conv1D'\] lack; use init='replicate'"):
        apply_majority_kernels(gpt2(), k=2, init="independent")
    with pytest.raises(ValueError, match=r"'transformers.pytorch_utils.Conv1D' is already registered"):
        register_layer(conv1d)


def test_the_gpt2_example_runs(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("hf_gpt2", os.path.join(ROOT, "examples", "hf_gpt2.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    made = []
    monkeypatch.setattr(example, "MajorityKernelCallback", lambda **options: made.append(MajorityKernelCallback.published(**options)) or made[-1])
    losses = example.main(["--pretrain-steps", "5", "--finetune-steps", "5", "--k", "2", "--out", str(tmp_path)])
    assert losses["with copies at step 0"] == pytest.approx(losses["pretrained"], rel=1e-5)
    assert losses["fine-tuned"] < losses["pretrained"]
    (mk,) = made  # fine-tuning lowers the loss with or without copies: check that they were there and drawn
    assert mk.kernels.coverage.share > 0.9
    assert min(copy_spread(mk.kernels.module).values()) > 0, "every kernel's copies were trained apart by the draws"
    assert os.path.isfile(tmp_path / "gpt2-mk" / "config.json")
