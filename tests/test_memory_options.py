"""Memory options. Tiled MLP (``tiled_mlp_tokens``): the same loss and gradients as the plain MLP,
a fraction of the saved activations, the forward's autocast in the backward's recomputation.
CPU activation offload: saved tensors are copied to the host. Through run_cpt, each option and their
combination with checkpointing reproduce the plain loss curve. (Under DDP, FSDP2 and sequence
parallelism: tests/distributed/parallel_worker.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama_config
from helpers import cpt_argv as _argv, logged_losses as _losses
from transformers import LlamaForCausalLM, TrainerCallback

from prolong.training.collator import PackedCollator
from prolong.config import CPTConfig, RecipeError
from prolong.training.memory import activation_offload, enable_tiled_mlp
from prolong.run_cpt import main


def _packed_row(document_lengths, vocab_size=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (sum(document_lengths),), generator=generator).tolist()
    spans, start = [], 0
    for length in document_lengths:
        spans.append([start, start + length])
        start += length
    return PackedCollator()([{"input_ids": ids, "indices": spans}])


def _loss_and_gradients(model, row):
    model.zero_grad()
    out = model(input_ids=row["input_ids"], position_ids=row["position_ids"], labels=row["labels"])
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}, out.loss.grad_fn


def _graph_has(grad_fn, name: str) -> bool:
    seen, stack = set(), [grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == name:
            return True
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return False


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_gives_the_same_loss_and_gradients(checkpointing):
    torch.manual_seed(0)
    plain = LlamaForCausalLM(tiny_llama_config(320))
    tiled = copy.deepcopy(plain)
    assert enable_tiled_mlp(tiled, tile_tokens=16) == 2  # one MLP per decoder layer
    for model in (plain, tiled):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    row = _packed_row([40, 30, 29])  # 99 tokens: 7 tiles, the last one short

    loss, grads, _ = _loss_and_gradients(plain, row)
    tiled_loss, tiled_grads, grad_fn = _loss_and_gradients(tiled, row)

    if not checkpointing:  # the tiled op is in the graph (under checkpointing it is inside the recompute)
        assert _graph_has(grad_fn, "_TiledMLPFunctionBackward")
    assert torch.allclose(tiled_loss, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        assert torch.allclose(tiled_grads[name], grad, rtol=1e-5, atol=1e-7), name


def _saved_activation_bytes(model, row) -> int:
    """Bytes autograd keeps for the backward, parameters excluded."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(tensor):
        nonlocal total
        if tensor.data_ptr() not in params:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=row["input_ids"], position_ids=row["position_ids"], labels=row["labels"])
    return total


def test_tiled_mlp_keeps_a_fraction_of_the_activations():
    # a wide MLP, as in real models (intermediate = 4-8x hidden), dominates the saved activations
    torch.manual_seed(0)
    plain = LlamaForCausalLM(tiny_llama_config(320, intermediate_size=1024))
    tiled = copy.deepcopy(plain)
    enable_tiled_mlp(tiled, tile_tokens=16)
    row = _packed_row([128, 128])
    plain_bytes, tiled_bytes = _saved_activation_bytes(plain, row), _saved_activation_bytes(tiled, row)
    # per layer the MLP saves 4 x tokens x 1024 floats untiled, only its tokens x 64 input tiled
    assert tiled_bytes < 0.3 * plain_bytes, (tiled_bytes, plain_bytes)


class _AutocastRecordingMLP(torch.nn.Module):
    """A real position-wise MLP that records whether autocast was on at each call."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)
        self.autocast_on_calls = []

    def forward(self, x):
        self.autocast_on_calls.append(torch.is_autocast_enabled("cpu"))
        return self.down(torch.nn.functional.silu(self.up(x)))


def test_backward_recomputes_under_the_forwards_autocast():
    layer = torch.nn.Module()
    layer.mlp = _AutocastRecordingMLP()
    enable_tiled_mlp(layer, tile_tokens=4)
    x = torch.randn(1, 12, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer.mlp(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()  # outside autocast, as the Trainer's backward is
    assert len(layer.mlp.autocast_on_calls) == 6  # 3 tiles forward + 3 recomputed
    assert all(layer.mlp.autocast_on_calls)
    assert x.grad is not None and layer.mlp.up.weight.grad is not None


class _RecordTileSizes(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.tile_sizes = [getattr(layer.mlp, "tiled_mlp_tokens", None) for layer in model.model.layers]


@pytest.fixture(scope="module")
def plain_losses(tiny_model_dir, packed_mixture, tmp_path_factory):
    return _losses(main(_argv(tiny_model_dir, packed_mixture, tmp_path_factory.mktemp("plain") / "run", max_steps=3)))


@pytest.mark.slow  # four short training runs
@pytest.mark.parametrize(
    "options",
    [
        {"tiled_mlp_tokens": 32},  # rows are 2 x 128 tokens: 8 tiles per MLP
        {"activation_offload": "true"},
        {"activation_offload": "true", "activation_checkpointing": "true", "tiled_mlp_tokens": 32},
    ],
    ids=["tiled-mlp", "offload", "checkpointing+offload+tiled-mlp"],
)
def test_memory_options_reproduce_the_loss_curve(options, tiny_model_dir, packed_mixture, tmp_path, plain_losses):
    recorder = _RecordTileSizes()
    out = main(_argv(tiny_model_dir, packed_mixture, tmp_path / "run", max_steps=3, **options), [recorder])
    assert recorder.tile_sizes == [options.get("tiled_mlp_tokens")] * 2  # applied, or not at all
    losses = _losses(out)
    assert sorted(losses) == sorted(plain_losses) == [1, 2, 3]
    for step, loss in plain_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step


def test_activation_offload_copies_saved_tensors_to_the_host():
    # a meta tensor has no data to copy: the host copy that save_on_cpu makes of every tensor
    # autograd saves is what fails, so this shows the copy happens (on CPU the copy is free)
    x = torch.randn(8, device="meta", requires_grad=True)
    x * x  # nothing is copied without the option
    with pytest.raises(NotImplementedError, match="meta tensor"):
        with activation_offload(True):
            x * x
    with activation_offload(False):
        x * x


def test_bad_tile_sizes_are_refused():
    with pytest.raises(RecipeError, match="tiled_mlp_tokens"):
        CPTConfig(output_dir="unused", tiled_mlp_tokens=-1)
    with pytest.raises(ValueError, match="no decoder layers with an `mlp`"):
        enable_tiled_mlp(torch.nn.Linear(2, 2), 16)


def test_an_mlp_with_dropout_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, resid_pdrop=0.1))
    with pytest.raises(ValueError, match="dropout"):  # the recomputed tiles would draw other masks
        enable_tiled_mlp(model, 16)


def _liger_stand_in(calls):
    """What liger-kernel's instance patch does to a Llama (``_patch_swiglu_module``): it binds its
    own forward to every MLP instance, replacing whatever forward the instance had."""
    import types

    def swiglu_forward(mlp, x):
        calls.append(x.shape[-2])
        return mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))

    def apply_liger_kernel(model, kernel_config):
        for layer in model.model.layers:
            layer.mlp.forward = types.MethodType(swiglu_forward, layer.mlp)

    return apply_liger_kernel


def test_the_mlps_are_tiled_after_the_trainers_liger_kernels(monkeypatch, tmp_path, caplog):
    """transformers applies Liger inside train(), after the Trainer's __init__ (docs/versions.md): tiling in
    __init__ had Liger's forward replace the tiled one (the tiles silently off)."""
    import transformers.trainer

    from prolong.training.trainer import CPTTrainer

    calls = []
    # the module global that Trainer.train() calls (`if self.args.use_liger_kernel: apply_liger_kernel(...)`)
    monkeypatch.setattr(transformers.trainer, "apply_liger_kernel", _liger_stand_in(calls))
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(320))
    args = CPTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                     check_document_masking=False, tiled_mlp_tokens=16, warmup_steps=0)
    rows = [{"input_ids": list(range(3, 67)), "indices": [[0, 30], [30, 64]]}]
    with caplog.at_level("INFO", logger="prolong.training.trainer"):
        trainer = CPTTrainer(model=model, args=args, train_dataset=rows, data_collator=PackedCollator())
    assert "Loss: chunked fp32 cross-entropy" in caplog.text  # the log says which loss runs (CPU: chunked)
    trainer.args.use_liger_kernel = True  # the config turns it off without CUDA; the stand-in runs on CPU
    trainer.train()
    assert all(layer.mlp.tiled_mlp_tokens == 16 for layer in model.model.layers)
    # 2 layers x 64 tokens in 16-token tiles: 4 tiles forward + 4 recomputed in the backward, through Liger's forward
    assert calls == [16] * 4 * 2 * 2


class _CountingBackend:
    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward  # run the captured graph as is (fast on CPU)


@pytest.mark.slow
def test_compiled_decoder_layers_give_the_same_loss_curve(tiny_model_dir, packed_mixture, tmp_path, plain_losses):
    from torch._dynamo import register_backend, reset

    from prolong.training.compile import compile_decoder_layers

    backend = _CountingBackend()
    register_backend(backend, name="prolong_test_counting")
    reset()
    out = main(_argv(tiny_model_dir, packed_mixture, tmp_path / "run", max_steps=3, activation_checkpointing="true",
                     compile_decoder_layers="prolong_test_counting"))
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3]
    for step, loss in plain_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    # one graph for both layers and every step (a graph break would add a few, one per layer would double them)
    assert 1 <= backend.graphs <= 2, backend.graphs
    with pytest.raises(ValueError, match="no `layers` list"):
        compile_decoder_layers(LlamaForCausalLM(tiny_llama_config(64, num_hidden_layers=0)))
