"""prolong-plan: the memory one training step of a recipe needs per GPU, computed on the CPU in seconds.

    prolong-plan recipes/prolong-8b/stage1.yaml --gpus 8 --gpu-memory-gib 80
    prolong-plan recipes/prolong-8b/stage1-1gpu.yaml --gpu-memory-gib 141 --find-max-length
    prolong-plan recipes/prolong-8b/stage1-1gpu.yaml --gpu-memory-gib 141 --length 524288
    python -c 'from prolong.plan import plan; print(plan("recipes/prolong-8b/stage1.yaml", gpus=8).peak_gib)'

How. The recipe is parsed by the project's parser and the launch configuration read from the
accelerate config (``--accelerate-config``, else the one the recipe's launch line names). The model is
built from its config alone on ``meta`` and its parameters swapped for fake tensors
(``FakeTensorMode``: shapes and dtypes, no data). The recipe's options are applied as
``Trainer.train()`` applies them (Liger's layer kernels, activation checkpointing, ``tiled_mlp_tokens``)
plus Ulysses attention over a fake process group; the collator's row at ``max_length`` (this rank's
chunk under sequence parallelism) then goes through ``CPTTrainer.compute_loss`` with accelerate's
bf16 autocast around the forward, the backward, gradient clipping and the Trainer's fused AdamW. A
dispatch mode (``LiveBytes``) counts the bytes of every tensor storage alive, with its peak.

A CPU-only torch cannot run autograd on fake CUDA tensors, so the GPU is stood for by the fake CPU
device and the host by ``meta`` (where ``activation_offload``'s saved tensors go). CUDA-only kernels
enter as stand-ins that allocate what the kernel allocates: torch's varlen attention has fake kernels
(output + logsumexp) and its backward's fp32 workspace is added; Liger's RMSNorm / SwiGLU / RoPE and
fused linear cross-entropy are written out below; TRL's Triton folds allocate nothing.
``flash_attention_2`` and ``flex_attention`` are planned as ``varlen`` (the same memory).

Added by rule, per GPU, because no single-process run holds it: FSDP2 keeps 1/N of the fp32 master
weights, gradients and AdamW state (on the host with ``fsdp_offload_params``) plus the bf16 all-gathered
units being computed (two decoder layers and the final norm + lm_head group); each unit's gradients
are reduce-scattered through an fp32 buffer once they are all computed. DDP adds one gradient copy
(its buckets). Not counted: the CUDA context, NCCL buffers and allocator fragmentation, for which a
plan fits only with ``CUDA_OVERHEAD_GIB`` to spare.

Speed: decoder layers of one kind are traced as three (``LiveBytes.open_window``): what the forward
keeps per layer (the growth of live bytes from the start of layer 1 to the start of layer 2) and the
gradients of a layer count once more for each layer that layer 1 stands for, and are released where
the last of those layers would release them. ``tests/test_plan.py`` checks this against the full
trace, and the calibration against a real 30-layer step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import logging
import math
import os
import re
import sys
import time
import types
import weakref
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from prolong.errors import RecipeError, cli_errors

GIB = 2**30
CUDA_OVERHEAD_GIB = 2.0  # CUDA context + NCCL buffers + allocator slack: what a plan leaves free
ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "benchmarks" / "shapes"
# the recipes' Hub models -> their shipped config shape (no network needed)
HUB_SHAPES = {
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama-3-8b",
    "meta-llama/Llama-3.1-8B": "llama-3-8b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3-8b",
    "meta-llama/Llama-3.2-1B": "llama-3.2-1b",
    "meta-llama/Llama-3.2-1B-Instruct": "llama-3.2-1b",
    "HuggingFaceTB/SmolLM2-135M": "smollm2-135m",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
}
PLANNED_AS_VARLEN = ("auto", "varlen", "flash_attention_2", "flex_attention")
HOST = "meta"  # the device that stands for host memory in a GPU plan


# ---------------------------------------------------------------------------------------------
# What is planned


@dataclass
class Options:
    """Everything that decides the memory of one step on one GPU."""

    max_length: int
    batch: int = 1  # per_device_train_batch_size: the collator flattens them into one row
    gpus: int = 1
    sequence_parallel: int = 1
    fsdp: bool = False  # FSDP2 full shard
    fsdp_offload: bool = False  # fsdp_offload_params: weights, gradients, AdamW state on the host
    checkpointing: bool = False  # every decoder layer
    activation_offload: bool = False
    tiled_mlp_tokens: int = 0
    liger: bool = False  # Liger's layer kernels (use_liger_kernel)
    loss_kernel: str = "chunked"  # chunked | liger | trl
    loss_chunk_size: int = 4096
    attn: str = "varlen"
    bf16: bool = True  # bf16 compute (autocast; FSDP2's param_dtype)
    dtype: str = "float32"  # the weights as loaded
    lora: object = None  # peft LoraConfig (SFT use_peft)
    device: str = "cuda"  # cpu: plan the step as it runs on the CPU (calibration)

    def label(self) -> str:
        layout = f"FSDP2 x{self.gpus}" if self.fsdp else (f"DDP x{self.gpus}" if self.gpus > 1 else "1 device")
        parts = [layout] + [name for name, on in (
            ("CPU offload", self.fsdp_offload), ("checkpointing", self.checkpointing),
            ("activation offload", self.activation_offload), ("Liger", self.liger)) if on]
        parts += [f"tiled MLP {self.tiled_mlp_tokens}"] * bool(self.tiled_mlp_tokens)
        parts += [f"SP {self.sequence_parallel}"] * (self.sequence_parallel > 1)
        parts += ["LoRA"] * bool(self.lora)
        return " + ".join(parts)

    def to_dict(self) -> dict:
        return {**asdict(replace(self, lora=None)), "lora": bool(self.lora)}


@dataclass
class Plan:
    """Per GPU, in GiB; host: per process."""

    options: Options
    parameters_gib: float  # on the GPU (a shard under FSDP2, none with CPU offload)
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float  # kept from the forward for the backward, on the GPU
    step_peak_gib: float  # forward + backward, with the weights and optimizer state held
    optimizer_peak_gib: float  # clipping + AdamW step
    host_gib: float  # offloaded activations, and weights/gradients/AdamW under CPU offload
    gpu_memory_gib: float
    parameters: int = 0
    trainable: int = 0
    seconds: float = 0.0

    @property
    def peak_gib(self) -> float:
        return max(self.step_peak_gib, self.optimizer_peak_gib)

    @property
    def fits(self) -> bool:
        overhead = CUDA_OVERHEAD_GIB if self.options.device == "cuda" else 0.0
        return self.peak_gib + overhead <= self.gpu_memory_gib

    def to_dict(self) -> dict:
        figures = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        figures = {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}
        return {**figures, "peak_gib": round(self.peak_gib, 3), "fits": self.fits, "cuda_overhead_gib": CUDA_OVERHEAD_GIB,
                "options": self.options.to_dict(), "label": self.options.label()}


# ---------------------------------------------------------------------------------------------
# Live tensor bytes per device, from the dispatcher (rounded to the CUDA caching allocator's 512 B)


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside this mode and still alive, per device, and their
    peak. Storages made before (parameters) are excluded: the plan adds what each rank holds."""

    def __init__(self):
        super().__init__()
        self.live = {"cpu": 0, HOST: 0}
        self.peak = dict(self.live)
        self.workspace = {}  # op -> fn(args) -> (device, bytes) the kernel allocates and frees inside
        self._seen = WeakIdKeyDictionary()
        self._window = None  # live bytes when open_window was called
        self._extra = []  # (device, bytes) counted for the layers a traced layer stands for

    def add(self, device: str, nbytes: int) -> None:
        self.live[device] += nbytes
        self.peak[device] = max(self.peak[device], self.live[device])

    def bump(self, device: str, nbytes: int) -> None:
        """Memory held only for a moment (a kernel's workspace, a reduce-scatter buffer)."""
        self.peak[device] = max(self.peak[device], self.live[device] + nbytes)

    def exclude(self, tensors) -> None:
        """Storages that exist already: a view of them allocates nothing."""
        for tensor in tensors:
            self._seen[tensor.untyped_storage()] = None

    def open_window(self) -> None:
        self._window = dict(self.live)

    def close_window(self, copies: int) -> None:
        """What the live bytes grew by since open_window counts ``copies`` more times (each further
        layer keeps as much), until release_extra()."""
        for device, before in self._window.items():
            grown = max(0, self.live[device] - before) * copies
            self.add(device, grown)
            self._extra.append((device, grown))
        self._window = None

    def release_extra(self) -> None:
        for device, nbytes in self._extra:
            self.live[device] -= nbytes
        self._extra = []

    def _track(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type not in self.live:
            return
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        nbytes, device = -(-storage.nbytes() // 512) * 512, tensor.device.type

        def release(_, nbytes=nbytes, device=device):
            self.live[device] -= nbytes

        self._seen[storage] = weakref.ref(storage, release)
        self.add(device, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.workspace:
            self.bump(*self.workspace[func](args))
        for tensor in tree_flatten(out)[0]:
            self._track(tensor)
        return out


# ---------------------------------------------------------------------------------------------
# Stand-ins for CUDA-only code: the allocations of the kernel, no arithmetic that matters


def _flash_backward_workspace(args):
    """flash-attn 2's varlen backward (torch's varlen kernel): dq_accum and softmax_d in fp32 (128
    rows of padding), and K/V gradients expanded to every query head under GQA."""
    q, k = args[1], args[2]
    tokens, heads, dim = q.shape
    nbytes = (tokens + 128) * heads * (dim + 1) * 4
    if k.shape[1] != heads:
        nbytes += 2 * k.shape[0] * heads * dim * q.element_size()
    return q.device.type, nbytes


class _LigerRMSNorm(torch.autograd.Function):
    """Liger's RMSNorm: its output and an fp32 rstd; saves the input, no fp32 copies."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight, x.new_empty(x.shape[:-1], dtype=torch.float32))
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        x, weight, _ = ctx.saved_tensors
        return torch.empty_like(x), (torch.empty_like(weight) if ctx.needs_input_grad[1] else None)


class _LigerSiLUMul(torch.autograd.Function):
    """Liger's SwiGLU: saves gate and up; the backward writes their gradients over them."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.empty_like(gate)

    @staticmethod
    def backward(ctx, grad):
        return ctx.saved_tensors


class _LigerRope(torch.autograd.Function):
    """Liger's RoPE rotates q and k in place."""

    @staticmethod
    def forward(ctx, q, k):
        return q.view_as(q), k.view_as(k)

    @staticmethod
    def backward(ctx, dq, dk):
        return dq, dk


def _liger_rms_forward(self, hidden_states):
    return _LigerRMSNorm.apply(hidden_states, self.weight)


def _liger_mlp_forward(self, x):
    return self.down_proj(_LigerSiLUMul.apply(self.gate_proj(x), self.up_proj(x)))


def _liger_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    return _LigerRope.apply(q, k)


def apply_liger_stand_ins(model) -> int:
    """What liger_kernel's ``_apply_liger_kernel_to_instance`` changes in a Llama-style model (RMSNorm,
    SwiGLU MLP; RoPE is patched in the modeling module by ``trace_step``). Returns the count."""
    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_liger_rms_forward, module)
            changed += 1
        elif name.endswith("MLP") and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            module.forward = types.MethodType(_liger_mlp_forward, module)
            changed += 1
    return changed


class _LigerFusedLinearCE(torch.autograd.Function):
    """Liger's fused linear cross-entropy (``accum_dtype`` fp32): the forward computes, chunk by chunk
    (about tokens x hidden logits at a time), the gradient of the hidden states and, in fp32, of the
    lm_head, and keeps both for the backward."""

    @staticmethod
    def forward(ctx, weight, hidden, target, bias):
        tokens, width = hidden.shape
        chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(weight.shape[0] / width)))))
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32) if weight.requires_grad else None
        grad_hidden = torch.zeros_like(hidden)
        loss = torch.zeros(tokens, dtype=torch.float32)
        for start in range(0, tokens, chunk):
            logits = hidden[start : start + chunk] @ weight.t()  # the kernel turns them into their gradient in place
            torch.mm(logits, weight, out=grad_hidden[start : start + chunk])
            del logits  # grad_weight += logits.t() @ hidden: addmm with out_dtype fp32 on CUDA, in place
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss.sum()

    @staticmethod
    def backward(ctx, grad):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_weight.mul_(grad) if grad_weight is not None else None), grad_hidden.mul_(grad), None, None


def _liger_loss(weight, hidden, target, bias=None):
    """``LigerFusedLinearCrossEntropyLoss(reduction="sum")`` as CPTTrainer calls it."""
    return _LigerFusedLinearCE.apply(weight, hidden, target, bias)


def _allocates_nothing(*args, **kwargs):
    return None


class _SaveOnHost(torch.autograd.graph.saved_tensors_hooks):
    """``save_on_cpu`` in a GPU plan: the fake CPU device is the GPU there, so saved tensors move to
    ``meta``, which stands for host memory."""

    def __init__(self, pin_memory: bool = False, device_type: str = "cuda"):
        def pack(tensor):
            return tensor.device, torch.empty(tensor.size(), dtype=tensor.dtype, device=HOST)

        def unpack(packed):
            device, tensor = packed
            return torch.empty(tensor.size(), dtype=tensor.dtype, device=device)

        super().__init__(pack, unpack)


@contextlib.contextmanager
def _patched(*patches):
    """(object, attribute, value) set for the duration, restored after."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _one_document(position_ids):
    """Document boundaries from positions (a search that needs values) for a plan's one-document row."""
    length = position_ids.shape[-1]
    cu = torch.tensor([0, length], dtype=torch.int32)
    return (cu, cu), (length, length)


def _gpu_stand_ins():
    from trl.kernels import chunked_logprob

    from prolong.parallel import sequence
    from prolong.training import attention

    # TRL's Triton folds and its fp32-output GEMM work in place on CUDA: no allocation
    return _patched((torch.autograd.graph, "save_on_cpu", _SaveOnHost),
                    (sequence, "prepare_fa_kwargs_from_position_ids", _one_document),
                    (attention, "prepare_fa_kwargs_from_position_ids", _one_document),
                    (chunked_logprob, "_forward_tile", _allocates_nothing),
                    (chunked_logprob, "_backward_tile", _allocates_nothing),
                    (chunked_logprob, "_addmm_fp32", _allocates_nothing))


# ---------------------------------------------------------------------------------------------
# The model, from its config only


def shape_names() -> list[str]:
    return sorted(p.stem for p in SHAPES.glob("*.json"))


def load_model_config(source: str, trust_remote_code: bool = False, gguf_file: str | None = None):
    """A config from a shape name (benchmarks/shapes), a config JSON, a model directory, or the Hub id
    of a recipe's model. No weights are read, nothing is downloaded."""
    from transformers import AutoConfig

    shape = SHAPES / f"{HUB_SHAPES.get(source, source)}.json"
    path = shape if shape.is_file() else Path(source)
    if path.suffix == ".json" and path.is_file():
        spec = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
        return AutoConfig.for_model(**spec)
    if path.is_dir():
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)
    raise RecipeError(
        f"model: {source} is not a local model directory, a config JSON or a model whose shape ships here; "
        f"pass --model-config with a config.json, a model directory or a shape ({', '.join(shape_names())}).")


def build_model(config, opts: Options):
    """The model on ``meta`` (no memory, no initialisation), with the recipe's LoRA adapters."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, opts.dtype), attn_implementation="sdpa")
        if opts.lora:
            from peft import get_peft_model

            model = get_peft_model(model, copy.deepcopy(opts.lora))  # the adapters in fp32
    model.config.use_cache = False
    return model


def fake_parameters(model, opts: Options, fake_mode) -> None:
    """Every parameter and buffer as a fake tensor on the planned device, in the dtype the step
    computes with: FSDP2 computes with bf16 copies of its fp32 master weights; autocast casts per op."""
    compute = torch.bfloat16 if opts.fsdp and opts.bf16 else None
    with fake_mode:
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    dtype = compute if compute and param.requires_grad else param.dtype
                    module._parameters[name] = torch.nn.Parameter(torch.empty(param.shape, dtype=dtype),
                                                                  requires_grad=param.requires_grad)
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)
    if _causal_lm(model).config.tie_word_embeddings:
        _causal_lm(model).tie_weights()


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model) -> list[torch.nn.Module]:
    from prolong.training.compile import decoder_layers as layers_of

    return layers_of(_causal_lm(model))


def layers_alike(config) -> bool:
    """Whether every decoder layer is the same (one kind of attention, one MLP): then three traced
    layers stand for all of them."""
    text = config.get_text_config()
    kinds = set(getattr(text, "layer_types", None) or [])
    return len(kinds) <= 1 and not getattr(text, "first_k_dense_replace", 0) and not getattr(text, "mlp_only_layers", [])


# ---------------------------------------------------------------------------------------------
# One step on fake tensors


@contextlib.contextmanager
def _fake_process_group(size: int):
    """``size`` ranks in this process (torch's fake backend: collectives do nothing)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    importlib.import_module("torch.distributed._tools.fake_collectives")  # collectives on fake tensors
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _row(opts: Options) -> dict:
    """The collator's row: ``batch`` examples of max_length flattened into one (one document each: with
    varlen kernels no memory depends on where documents start, and sdpa's mask is dense anyway), this
    rank's chunk under sequence parallelism."""
    import numpy as np

    from prolong.parallel.batch import shard_batch_for_sequence_parallel
    from prolong.training.collator import PackedCollator

    example = {"input_ids": np.full(opts.max_length, 3), "indices": [[0, opts.max_length]]}
    batch = PackedCollator()([example] * opts.batch)
    return shard_batch_for_sequence_parallel(batch, 0, opts.sequence_parallel)


def _trainer_for_loss(model, opts: Options):
    """A CPTTrainer holding what ``compute_loss`` reads (a real one needs a real model)."""
    from prolong.training.loss import HiddenStateCapture, logit_scale_of, logit_softcap_of
    from prolong.training.trainer import CPTTrainer

    lm = _causal_lm(model)
    trainer = CPTTrainer.__new__(CPTTrainer)
    trainer.args = types.SimpleNamespace(activation_offload=opts.activation_offload, loss_chunk_size=opts.loss_chunk_size)
    trainer.accelerator = types.SimpleNamespace(num_processes=opts.gpus)
    trainer._capture = HiddenStateCapture(lm.get_decoder())
    trainer._lm_head = lm.get_output_embeddings()
    trainer._softcap, trainer._logit_scale = logit_softcap_of(lm.config), logit_scale_of(lm.config)
    trainer.loss_kernel = opts.loss_kernel
    trainer._liger_loss = _liger_loss if opts.loss_kernel == "liger" else None
    return trainer


class _Backward:
    """Gradient bookkeeping per unit (a decoder layer, the final norm + lm_head, the embedding, the rest:
    accelerate's FSDP2 units). Under FSDP2, once a unit's gradients are all computed they are copied into
    an fp32 reduce-scatter buffer and freed, and this rank keeps 1/N of them in fp32 (on the host with
    CPU offload). The traced layer that stands for ``copies`` + 1 layers releases their kept
    activations when its backward is done."""

    def __init__(self, model, opts: Options, tracker: LiveBytes, copies: int):
        self.opts, self.tracker = opts, tracker
        layers = decoder_layers(model)
        lm = _causal_lm(model)
        # accelerate's FSDP2 units: each decoder layer, the embedding, the final norm + lm_head, the rest
        tail = [*lm.get_output_embeddings().parameters(), *getattr(lm.get_decoder(), "norm", torch.nn.Module()).parameters()]
        embedding = [p for p in lm.get_input_embeddings().parameters() if all(p is not q for q in tail)]  # tied: tail's
        units = [list(layer.parameters()) for layer in layers] + [tail, embedding]
        placed = {id(p) for unit in units for p in unit}
        units.append([p for p in model.parameters() if id(p) not in placed])
        self.handles = []
        for index, unit in enumerate(units):
            trainable = [p for p in unit if p.requires_grad]
            unit_copies = copies if index == 1 and len(layers) == 3 else 0
            state = {"left": len(trainable), "params": trainable, "copies": unit_copies}
            for param in trainable:
                self.handles.append(param.register_post_accumulate_grad_hook(lambda p, s=state: self._arrived(s)))

    def _arrived(self, state) -> None:
        state["left"] -= 1
        if state["left"]:
            return
        params, copies = state["params"], state["copies"]
        if copies:  # the layers it stands for are done: their activations are freed
            self.tracker.release_extra()
        numel = sum(p.numel() for p in params)
        if not self.opts.fsdp:  # the gradients stay, one set per layer
            self.tracker.add("cpu", sum(p.grad.untyped_storage().nbytes() for p in params) * copies)
            return
        shard = -(-numel // self.opts.gpus) * 4
        self.tracker.bump("cpu", numel * 4 + shard * self.opts.fsdp_offload)  # fp32 reduce-scatter in/out
        for p in params:
            p.grad = None
        if not self.opts.fsdp_offload:  # with offload the shard goes to the host, counted with the weights
            self.tracker.add("cpu", shard * (1 + copies))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def trace_step(model, opts: Options, fake_mode, copies: int = 0) -> dict:
    """Forward + backward of one row through the recipe's code path; bytes beyond the weights.
    ``copies``: how many more layers the second of three decoder layers stands for."""
    from prolong.training.memory import enable_tiled_mlp

    lm = _causal_lm(model)
    modeling = sys.modules[type(lm).__module__]
    if opts.liger and not apply_liger_stand_ins(lm):
        raise RecipeError(f"use_liger_kernel: the planner has Liger's kernels for Llama-style models only, not "
                          f"{type(lm).__name__}; plan with --use_liger_kernel false.")
    if opts.checkpointing:
        lm.activation_checkpointing_enable()  # as Trainer.train(): every layer, non-reentrant
    if opts.tiled_mlp_tokens:
        enable_tiled_mlp(lm, opts.tiled_mlp_tokens)
    if opts.bf16:  # accelerate's bf16: autocast around the model's forward only (CUDA's casts matmuls alike)
        lm.forward = types.MethodType(torch.autocast("cpu", dtype=torch.bfloat16)(type(lm).forward), lm)
    trainer = _trainer_for_loss(model, opts)
    importlib.import_module("torch.nn.attention.varlen")  # registers torch_attn ops
    tracker = LiveBytes()
    tracker.workspace[torch.ops.torch_attn._varlen_attn_backward.default] = _flash_backward_workspace
    layers = decoder_layers(model)
    backward_started = []
    if copies:  # one period of the forward: from the start of layer 1 to the start of layer 2
        layers[1].register_forward_pre_hook(lambda *a: None if backward_started else tracker.open_window())
        layers[2].register_forward_pre_hook(lambda *a: None if backward_started else tracker.close_window(copies))
    rope = (modeling, "apply_rotary_pos_emb", _liger_rope) if opts.liger and hasattr(modeling, "apply_rotary_pos_emb") \
        else (modeling, "__name__", modeling.__name__)
    row = _row(opts)
    with fake_mode, _patched(rope), tracker:
        inputs = {k: torch.empty(v.shape, dtype=v.dtype) if isinstance(v, torch.Tensor) else v for k, v in row.items()}
        tracker.exclude([*model.parameters(), *model.buffers()])
        backward = _Backward(model, opts, tracker, copies)
        start = dict(tracker.live)
        loss = trainer.compute_loss(model, inputs, num_items_in_batch=torch.tensor(opts.max_length))
        kept = {k: tracker.live[k] - start[k] for k in start}
        backward_started.append(True)
        loss.backward()
        del loss, inputs
    backward.remove()
    trainer._capture.handle.remove()
    return {"peak": tracker.peak["cpu"] - start["cpu"], "kept": kept["cpu"], "host_peak": tracker.peak[HOST] - start[HOST]}


def trace_optimizer(model, opts: Options, fake_mode) -> dict:
    """Clipping + the Trainer's default AdamW (torch's fused kernel) on what this rank steps: every
    trainable parameter, or its 1/N shard (dim 0) under FSDP2, fp32 master weights under FSDP2. Under CPU
    offload it runs on the host; the bytes are the same."""
    tracker = LiveBytes()
    with fake_mode:
        params = []
        for p in model.parameters():
            if p.requires_grad:
                shape = (-(-p.shape[0] // opts.gpus), *p.shape[1:]) if opts.fsdp else p.shape
                param = torch.nn.Parameter(torch.empty(shape, dtype=torch.float32 if opts.fsdp else p.dtype))
                param.grad = torch.empty_like(param)
                params.append(param)
        held = sum(p.numel() * p.element_size() for p in params)
        optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        tracker.exclude(params + [p.grad for p in params])
        with tracker:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
    return {"weights": held, "grads": held, "state": tracker.live["cpu"], "peak": tracker.peak["cpu"]}


_HELD: dict = {}


def held_by_rank(config, opts: Options) -> dict:
    """What one rank holds of the weights, gradients and AdamW state (from the optimizer's fake step),
    and the FSDP2 unit sizes in the compute dtype. Cached: a length search asks again at every length."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    key = (config.to_json_string(), opts.gpus, opts.fsdp, opts.bf16, opts.dtype, repr(opts.lora))
    if key not in _HELD:
        model = build_model(config, opts)
        held = trace_optimizer(model, opts, FakeTensorMode(allow_non_fake_inputs=True))

        def compute_bytes(params):  # FSDP2 gathers trainable weights in bf16, frozen ones as loaded
            return sum(p.numel() * (2 if opts.bf16 and p.requires_grad else p.element_size()) for p in params)

        lm = _causal_lm(model)
        tail = [*lm.get_output_embeddings().parameters(), *getattr(lm.get_decoder(), "norm", torch.nn.Module()).parameters()]
        layers = decoder_layers(model)
        params = list(model.parameters())
        held.update(frozen=sum(p.numel() * p.element_size() for p in params if not p.requires_grad),
                    layer=max(compute_bytes(layer.parameters()) for layer in layers), tail=compute_bytes(tail),
                    layer_numel=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
                    parameters=sum(p.numel() for p in params), trainable=sum(p.numel() for p in params if p.requires_grad))
        _HELD[key] = held
    return _HELD[key]


def planned_attention(opts: Options) -> str:
    """On a GPU, ``auto`` and the varlen-kernel backends as torch's varlen; on a CPU, what
    ``choose_attn_implementation`` picks there."""
    if opts.device == "cuda" and opts.attn in PLANNED_AS_VARLEN:
        return "varlen"
    return "sdpa" if opts.attn == "auto" else opts.attn


def run_plan(config, opts: Options, gpu_memory_gib: float = 80.0, trace_all_layers: bool = False) -> Plan:
    """The memory of one step of ``config``'s model with ``opts`` (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from prolong.parallel.sequence import enable_sequence_parallel

    started = time.perf_counter()
    config = copy.deepcopy(config)
    attn = planned_attention(opts)
    config._attn_implementation = attn
    held = held_by_rank(config, opts)
    layers = config.get_text_config().num_hidden_layers
    copies = 0
    if layers > 3 and not trace_all_layers and layers_alike(config):
        config.get_text_config().num_hidden_layers, copies = 3, layers - 3
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    stand_ins = _gpu_stand_ins() if opts.device == "cuda" else contextlib.nullcontext()
    group = _fake_process_group(opts.sequence_parallel) if opts.sequence_parallel > 1 else contextlib.nullcontext()
    with stand_ins, group as sp_group:
        model = build_model(config, opts)
        fake_parameters(model, opts, fake_mode)
        _causal_lm(model).set_attn_implementation(attn)
        if sp_group is not None:
            enable_sequence_parallel(_causal_lm(model), sp_group)
        model.train()
        step = trace_step(model, opts, fake_mode, copies)

    on_gpu = not opts.fsdp_offload
    weights = held["weights"] + held["frozen"] // (opts.gpus if opts.fsdp else 1)
    state, grads = held["state"], held["grads"]
    if opts.fsdp:
        # all-gathered in the compute dtype: this layer and the next (prefetch), and the final norm + lm_head
        # group (kept from the end of the forward into the backward); with CPU offload, also the fp32 copies
        # of this rank's shards of those two layers, copied in before the all-gather
        working = 2 * held["layer"] + held["tail"] + (2 * 4 * held["layer_numel"] // opts.gpus) * opts.fsdp_offload
        step_peak = (weights + state) * on_gpu + working + step["peak"]  # the trace holds the gradient shards
    else:
        ddp_buckets = grads if opts.gpus > 1 else 0  # DDP's buckets: one more copy of the gradients
        step_peak = weights + state + ddp_buckets + step["peak"]
        grads += ddp_buckets
    optimizer_peak = (weights + held["peak"] + grads) * on_gpu
    host = step["host_peak"] + (weights + grads + state if opts.fsdp_offload else 0)
    return Plan(options=opts, parameters_gib=weights * on_gpu / GIB, gradients_gib=held["grads"] * on_gpu / GIB,
                optimizer_gib=state * on_gpu / GIB, activations_gib=step["kept"] / GIB, step_peak_gib=step_peak / GIB,
                optimizer_peak_gib=optimizer_peak / GIB, host_gib=host / GIB, gpu_memory_gib=gpu_memory_gib,
                parameters=held["parameters"], trainable=held["trainable"], seconds=time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# From a recipe and its launch configuration


def _truthy(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1", "yes")


def read_accelerate_config(path: str | None) -> dict:
    """The fields of an accelerate config that decide memory."""
    if path is None:
        return {}
    import yaml

    if not os.path.isfile(path):
        raise RecipeError(f"--accelerate-config: not found: {path} (see accelerate_configs/).")
    config = yaml.safe_load(Path(path).read_text()) or {}
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind == "DEEPSPEED":
        raise RecipeError(f"--accelerate-config {path}: the planner covers FSDP2 and DDP, not DeepSpeed; plan the "
                          "FSDP2 equivalent (accelerate_configs/fsdp2.yaml, fsdp2-1gpu-offload.yaml).")
    fsdp = config.get("fsdp_config") or {}
    if kind == "FSDP" and int(fsdp.get("fsdp_version", 1)) != 2:
        raise RecipeError(f"--accelerate-config {path}: fsdp_version 1 is not planned; the recipes use FSDP2.")
    return {"fsdp": kind == "FSDP", "processes": int(config.get("num_processes", 1)),
            "offload": _truthy(fsdp.get("fsdp_offload_params", False)),
            "checkpointing": _truthy(fsdp.get("fsdp_activation_checkpointing", False))}


def launch_config_of(recipe_path: str) -> str | None:
    """The accelerate config the recipe's own launch line names (``--config_file PATH``), if it exists."""
    match = re.search(r"--config_file\s+(\S+)", Path(recipe_path).read_text(encoding="utf-8"))
    if match:
        for base in (Path.cwd(), ROOT):
            if (base / match.group(1)).is_file():
                return str(base / match.group(1))
    return None


def _is_sft(recipe_path: str) -> bool:
    """An SFT recipe sets keys that only the SFT dataclasses have (dataset_name, packing, use_peft, ...)."""
    import yaml

    from prolong.config import (CPTConfig, DataConfig, ModelConfig, SFTModelConfig, SFTRecipeConfig,
                                _field_names)

    keys = set(yaml.safe_load(Path(recipe_path).read_text(encoding="utf-8")) or {})
    sft_only = set(_field_names((SFTModelConfig, SFTRecipeConfig))) - set(_field_names((ModelConfig, DataConfig, CPTConfig)))
    return bool(keys & sft_only)


def options_from_recipe(argv: list[str], gpus: int | None = None, accelerate_config: str | None = None,
                        model_config: str | None = None, device: str = "cuda"):
    """``(model config, Options, notes)`` of ``RECIPE.yaml [--field value ...]`` as launched with
    ``accelerate_config`` (default: the one the recipe's launch line names) on ``gpus`` processes."""
    from prolong.config import CPTConfig, DataConfig, ModelConfig, SFTModelConfig, SFTRecipeConfig, parse_recipe
    from prolong.model import apply_rope_settings
    from prolong.parallel.sequence import check_model_for_sequence_parallel

    recipe_path = next((a for a in argv if a.endswith((".yaml", ".yml")) and not a.startswith("-")), None)
    if recipe_path is None:
        raise RecipeError("give the recipe: prolong-plan RECIPE.yaml [--field value ...] --gpus N --gpu-memory-gib G")
    if not os.path.isfile(recipe_path):
        raise RecipeError(f"Recipe file not found: {recipe_path}")
    sft = _is_sft(recipe_path)
    quiet = logging.getLogger("prolong.training.arguments")  # "bf16 needs CUDA: turned off" is about this CPU
    level, quiet.level = quiet.level, logging.ERROR
    try:
        if sft:
            model_cfg, args, written = parse_recipe((SFTModelConfig, SFTRecipeConfig), argv, return_recipe=True)
            max_length = args.max_length
        else:
            model_cfg, data_cfg, args, written = parse_recipe((ModelConfig, DataConfig, CPTConfig), argv,
                                                              return_recipe=True)
            max_length = data_cfg.max_length
    finally:
        quiet.level = level
    notes = []
    if accelerate_config is None:
        accelerate_config = launch_config_of(recipe_path)
        if accelerate_config:
            notes.append(f"accelerate config: {os.path.relpath(accelerate_config)} (the recipe's launch line)")
    launch = read_accelerate_config(accelerate_config)
    gpus = gpus or launch.get("processes", 1)
    lora = None
    if sft and model_cfg.use_peft:
        from trl import get_peft_config

        lora = get_peft_config(model_cfg)
    low_precision = model_cfg.dtype in ("bfloat16", "float16")
    if low_precision and not launch.get("fsdp") and not lora and not model_cfg.low_precision_master_weights:
        raise RecipeError(
            f"dtype: {model_cfg.dtype} trains only under FSDP2 (fp32 master weights): pass --accelerate-config "
            "accelerate_configs/fsdp2.yaml, or plan --dtype auto.")
    config = load_model_config(model_config or model_cfg.model_name_or_path, model_cfg.trust_remote_code,
                               model_cfg.gguf_file)
    apply_rope_settings(config, model_cfg.rope_theta, model_cfg.rope_scaling, max_length)
    sp = getattr(args, "sequence_parallel_size", 1)
    if gpus % sp:
        raise RecipeError(f"sequence_parallel_size {sp} must divide the number of GPUs ({gpus}).")
    if sp > 1:
        check_model_for_sequence_parallel(config.get_text_config(), sp)
    gpu = device == "cuda"
    liger = gpu and _truthy(written.get("use_liger_kernel", False))
    loss = "trl" if sft else getattr(args, "loss_kernel", "auto")
    if loss == "auto":  # CPTTrainer's choice on CUDA (Liger's if installed, which use_liger_kernel requires)
        loss = ("liger" if liger else "trl") if gpu else "chunked"
    checkpointing = bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))
    opts = Options(
        max_length=max_length, batch=args.per_device_train_batch_size, gpus=gpus, sequence_parallel=sp, fsdp=launch.get("fsdp", False),
        fsdp_offload=launch.get("offload", False), checkpointing=checkpointing or launch.get("checkpointing", False),
        activation_offload=bool(getattr(args, "activation_offload", False)) and gpu,
        tiled_mlp_tokens=getattr(args, "tiled_mlp_tokens", 0), liger=liger, loss_kernel=loss,
        loss_chunk_size=getattr(args, "loss_chunk_size", 4096), attn=model_cfg.attn_implementation,
        bf16=gpu and _truthy(written.get("bf16", True)), dtype="float32" if model_cfg.dtype == "auto" else model_cfg.dtype,
        lora=lora, device=device)
    return config, opts, notes


# ---------------------------------------------------------------------------------------------
# Searches: the longest length that fits, the cheapest option set for a length

# Option sets from the fastest to the most frugal, each adding to the one before; the launch layout
# (FSDP2 or DDP, SP) stays the recipe's.
OPTION_SETS = [
    ("none", {}),
    ("Liger", {"liger": True, "loss_kernel": "liger"}),
    ("+ checkpointing", {"checkpointing": True}),
    ("+ activation offload", {"activation_offload": True}),
    ("+ tiled MLP 8K", {"tiled_mlp_tokens": 8192}),
    ("+ FSDP2 CPU offload", {"fsdp": True, "fsdp_offload": True}),
]


def option_sets(opts: Options) -> list[tuple[str, Options]]:
    bare = replace(opts, checkpointing=False, activation_offload=False, tiled_mlp_tokens=0, liger=False,
                   loss_kernel="trl" if opts.device == "cuda" else "chunked", fsdp_offload=False)
    sets, current = [("recipe as written", opts)], bare
    for name, change in OPTION_SETS:
        if opts.device == "cpu" and name in ("Liger", "+ activation offload", "+ FSDP2 CPU offload"):
            continue  # GPU-only options
        current = replace(current, **change)
        sets.append((name, current))
    return sets


def longest_length(config, opts: Options, gpu_memory_gib: float, granule: int = 8192,
                   limit: int = 16 * 2**20) -> tuple[int, list[Plan]]:
    """The longest max_length whose plan fits, to a multiple of ``granule`` and within 1/16 of its
    power of two (64K at 1M-2M): a secant search on the peak, which grows about linearly with the
    length, so that few of the (slower) long plans are computed."""
    granule = math.lcm(granule, opts.sequence_parallel)
    budget = gpu_memory_gib - (CUDA_OVERHEAD_GIB if opts.device == "cuda" else 0)
    plans: dict[int, Plan] = {}

    def plan_at(length: int) -> Plan:
        length = max(granule, min(limit, length // granule * granule))
        if length not in plans:
            plans[length] = run_plan(config, replace(opts, max_length=length), gpu_memory_gib)
        return plans[length]

    def secant(a: Plan, b: Plan) -> float:
        slope = (b.peak_gib - a.peak_gib) / max(b.options.max_length - a.options.max_length, 1)
        return a.options.max_length + (budget - a.peak_gib) / max(slope, 1e-12)

    def resolution(length: int) -> int:
        return max(granule, 2 ** int(math.log2(max(length, 1))) // 16 // granule * granule)

    small, large = plan_at(granule), plan_at(4 * granule)
    if not small.fits:
        return 0, list(plans.values())
    good, bad = (large, None) if large.fits else (small, large)
    previous = small
    while bad is None and good.options.max_length < limit:  # out: toward the budget, at most 8x per step
        length = good.options.max_length
        step = min(max(secant(previous, good), 1.25 * length), 8 * length)
        previous, plan = good, plan_at(int(step))
        good, bad = (plan, None) if plan.fits else (good, plan)
    sides = []
    while bad is not None and bad.options.max_length - good.options.max_length > resolution(good.options.max_length):
        lo, hi = good.options.max_length, bad.options.max_length
        gap = resolution(lo)
        guess = min(max(secant(good, bad), lo + gap), hi - gap)
        if sides[-2:] in ([True, True], [False, False]):
            guess = (lo + hi) / 2  # the secant keeps landing on one side (a kink: tile or chunk sizes): halve
        plan = plan_at(int(guess))
        if plan.options.max_length in (lo, hi):
            break
        sides.append(plan.fits)
        good, bad = (plan, bad) if plan.fits else (good, plan)
    return good.options.max_length, sorted(plans.values(), key=lambda p: p.options.max_length)


# ---------------------------------------------------------------------------------------------
# Output


def _gib(value: float) -> str:
    return f"{value:8.2f}"


def describe(plan: Plan) -> str:
    o = plan.options
    where = "GPU" if o.device == "cuda" else "CPU"
    overhead = CUDA_OVERHEAD_GIB if o.device == "cuda" else 0.0
    lines = [
        f"{o.label()}; max_length {o.max_length}, attention {planned_attention(o)}, loss {o.loss_kernel}, "
        f"{'bf16 compute' if o.bf16 else 'fp32 compute'}, {_count(plan.parameters)} parameters "
        f"({_count(plan.trainable)} trainable)" + (f", {o.batch} rows of max_length flattened into one" if o.batch > 1 else ""),
        f"  per {where}                                GiB",
        f"  parameters                        {_gib(plan.parameters_gib)}",
        f"  gradients                         {_gib(plan.gradients_gib)}",
        f"  optimizer state (AdamW)           {_gib(plan.optimizer_gib)}",
        f"  activations kept for the backward {_gib(plan.activations_gib)}",
        f"  peak, forward + backward          {_gib(plan.step_peak_gib)}",
        f"  peak, optimizer step              {_gib(plan.optimizer_peak_gib)}",
        f"  host memory (offload)             {_gib(plan.host_gib)}",
    ]
    if o.device == "cuda":
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"  peak + {overhead:g} GiB CUDA/NCCL       {_gib(plan.peak_gib + overhead)}   of "
                     f"{plan.gpu_memory_gib:g} GiB: {verdict}")
    return "\n".join(lines)


def plan_table(rows: list[tuple[str, Plan]]) -> str:
    lines = ["| option set | options | peak GiB per GPU | host GiB | fits |", "|---|---|---:|---:|---|"]
    for name, plan in rows:
        lines.append(f"| {name} | {plan.options.label()} | {plan.peak_gib:.1f} | {plan.host_gib:.1f} | "
                     f"{'yes' if plan.fits else 'no'} |")
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def _tokens(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 and length < 2**20 else f"{length / 2**20:.2f}M"


# ---------------------------------------------------------------------------------------------
# Calibration on the CPU: the plan of a step against the same step measured on real tensors

CALIBRATION = [  # (shape, lengths, activation checkpointing, tiled_mlp_tokens)
    ("tiny", (1024, 4096), False, 0),
    ("tiny", (1024, 4096), True, 0),
    ("cpu-wide-mlp", (1024, 4096), False, 0),
    ("cpu-wide-mlp", (1024, 4096), True, 0),
    ("cpu-wide-mlp", (1024, 4096), True, 512),
    ("smollm2-135m", (1024,), False, 0),  # 30 layers, which the plan traces as three
    ("smollm2-135m", (1024,), True, 0),
]


def _lenient_multi_grad_hook(tensors, fn, **kwargs):
    """MemTracker's module tracker hooks every module input that requires grad; the tiled MLP's
    no-grad tiles are views with no grad_fn, on which the hook fails. It only attributes memory to
    modules; the totals do not depend on it."""
    from torch.autograd.graph import register_multi_grad_hook

    tensors = [t for t in tensors if t.grad_fn is not None or (t.is_leaf and t._base is None)]
    return register_multi_grad_hook(tensors, fn, **kwargs) if tensors else types.SimpleNamespace(remove=lambda: None)


def measured_peaks(shape: str, lengths, checkpointing: bool = False, tiled_mlp_tokens: int = 0) -> list[float]:
    """Peak tensor memory (GiB, torch's MemTracker) of a training step of the real CPTTrainer on real
    CPU tensors, as ``Trainer.train()`` sets it up: forward + backward, clipping, AdamW step. The second
    step is measured, as a plan is of a step with the optimizer state already held."""
    from transformers import AutoModelForCausalLM

    from prolong.model import apply_rope_settings

    config = load_model_config(shape)
    apply_rope_settings(config, None, None, max(lengths))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same tensors; on a busy machine, more threads stall each other (25x slower)
    try:
        return _measure(model, config, lengths, checkpointing, tiled_mlp_tokens)
    finally:
        torch.set_num_threads(threads)


def _measure(model, config, lengths, checkpointing: bool, tiled_mlp_tokens: int) -> list[float]:
    import tempfile

    import numpy as np
    from torch.distributed._tools import mod_tracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import TrainerCallback

    from prolong.config import CPTConfig
    from prolong.training.collator import IGNORE_INDEX, PackedCollator
    from prolong.training.trainer import CPTTrainer


    def row(length):  # four documents: a packed row, which sdpa masks with a dense block-diagonal mask
        ids, ends = np.random.default_rng(length).integers(3, config.vocab_size, length), np.linspace(0, length, 5, dtype=int)
        return {"input_ids": ids, "indices": np.stack([ends[:-1], ends[1:]], 1)}

    class SetUpOnly(TrainerCallback):  # train() applies checkpointing and tiling, prepares, then stops here
        def on_train_begin(self, *args, **kwargs):
            raise InterruptedError

    with tempfile.TemporaryDirectory() as output_dir:
        args = CPTConfig(output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", max_steps=1,
                         per_device_train_batch_size=1, save_strategy="no", disable_tqdm=True, loss_kernel="chunked",
                         activation_checkpointing=checkpointing, tiled_mlp_tokens=tiled_mlp_tokens,
                         check_document_masking=False, resume_from_checkpoint=None)
        trainer = CPTTrainer(model=model, args=args, data_collator=PackedCollator(), train_dataset=[row(min(lengths))],
                             callbacks=[SetUpOnly()])
        with contextlib.suppress(InterruptedError):
            trainer.train()
    peaks = []
    for length in lengths:
        batch = PackedCollator()([row(length)])
        tokens = (batch["shift_labels"] != IGNORE_INDEX).sum()

        def step():
            trainer.training_step(trainer.model, dict(batch), tokens)
            trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), 1.0)
            trainer.optimizer.step()
            trainer.model.zero_grad(set_to_none=True)

        step()  # allocates AdamW's state
        tracker = MemTracker()
        tracker.track_external(trainer.model, trainer.optimizer)
        with tracker, _patched((mod_tracker, "register_multi_grad_hook", _lenient_multi_grad_hook)):
            step()
        peaks.append(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] / GIB)
    return peaks


def calibrate(json_path: str | None = None, cases=CALIBRATION) -> list[dict]:
    """Planner vs measured for each calibration case; writes ``json_path`` (+ a .md table) if given."""
    rows = []
    for shape, lengths, checkpointing, tiles in cases:
        measured = measured_peaks(shape, lengths, checkpointing, tiles)
        for length, peak in zip(lengths, measured):
            opts = Options(max_length=length, checkpointing=checkpointing, tiled_mlp_tokens=tiles, attn="sdpa",
                           loss_kernel="chunked", bf16=False, device="cpu")
            planned = run_plan(load_model_config(shape), opts, gpu_memory_gib=1e9)
            rows.append({"shape": shape, "length": length, "checkpointing": checkpointing, "tiled_mlp_tokens": tiles,
                         "planned_gib": round(planned.peak_gib, 4), "measured_gib": round(peak, 4),
                         "error": round(planned.peak_gib / peak - 1, 4), "plan_seconds": round(planned.seconds, 2)})
    if json_path:
        import datetime
        import platform

        meta = {"command": "prolong-plan --calibrate --json " + json_path, "date": datetime.date.today().isoformat(),
                "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores), one thread", "torch": torch.__version__,
                "measured": "torch.distributed._tools.mem_tracker.MemTracker peak over the second step of the real "
                            "CPTTrainer (training_step + clip + AdamW), real tensors; rows of four documents",
                "planned": "prolong.plan.run_plan(..., Options(device='cpu', attn='sdpa', loss_kernel='chunked', "
                           "bf16=False)) on fake tensors"}
        Path(json_path).write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
        header = "\n".join(f"{k}: {v}  " for k, v in meta.items())
        Path(json_path).with_suffix(".md").write_text(f"{header}\n\n{calibration_table(rows)}\n")
    print(calibration_table(rows))
    return rows


def calibration_table(rows: list[dict]) -> str:
    lines = ["| shape | length | checkpointing | tiled MLP | planned peak (MiB) | measured peak (MiB, MemTracker) | error |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['length']} | {'yes' if r['checkpointing'] else 'no'} | "
                     f"{r['tiled_mlp_tokens'] or '-'} | {r['planned_gib'] * 1024:.1f} | {r['measured_gib'] * 1024:.1f} | "
                     f"{100 * r['error']:+.1f}% |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="prolong-plan", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        usage="prolong-plan RECIPE.yaml [--field value ...] [--gpus N] [--gpu-memory-gib G] [options]",
        epilog="Recipe fields (--max_length, --tiled_mlp_tokens, ...) are those of `prolong-cpt --help` or "
               "`prolong-sft --help`; the figures and what they leave out: docs/scale-out.md.")
    parser.add_argument("--gpus", type=int, help="processes (GPUs); default: the accelerate config's num_processes")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (H100 80, H200 141)")
    parser.add_argument("--accelerate-config", help="default: the one the recipe's launch line names")
    parser.add_argument("--model-config", help=f"a shape ({', '.join(shape_names())}), a config.json or a model "
                        "directory, for a model that is not on this machine")
    parser.add_argument("--find-max-length", action="store_true",
                        help="the longest max_length that fits with the recipe's options")
    parser.add_argument("--option-sets", action="store_true",
                        help="with --find-max-length: also for each option set, from the fastest to the most frugal")
    parser.add_argument("--length", type=int, help="plan every option set at this length and name the cheapest that fits")
    parser.add_argument("--cpu", action="store_true", help="plan the step as it runs on this CPU (fp32, sdpa, chunked loss)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--calibrate", action="store_true", help="measure the CPU calibration table (minutes): the plan "
                        "against the real step under torch's MemTracker; --json names the file")
    ns, recipe_args = parser.parse_known_args(argv)
    if ns.gpus is not None and ns.gpus < 1:
        parser.error(f"--gpus must be at least 1, got {ns.gpus}")
    if ns.gpu_memory_gib <= 0:
        parser.error(f"--gpu-memory-gib must be positive, got {ns.gpu_memory_gib:g}")
    if ns.length is not None and ns.length < 1:
        parser.error(f"--length must be a positive number of tokens, got {ns.length}")
    return ns, recipe_args


def plan(recipe_args: str | list[str], gpus: int | None = None, gpu_memory_gib: float = 80.0,
         accelerate_config: str | None = None, model_config: str | None = None, cpu: bool = False) -> Plan:
    """The Python entry point: ``plan("recipes/prolong-8b/stage1.yaml", gpus=8).peak_gib``, or with
    overrides ``plan(["recipes/prolong-8b/stage2.yaml", "--max_length", "1048576"], gpus=16)``."""
    argv = [recipe_args] if isinstance(recipe_args, str) else list(recipe_args)
    config, opts, _ = options_from_recipe(argv, gpus, accelerate_config, model_config, "cpu" if cpu else "cuda")
    return run_plan(config, opts, gpu_memory_gib)


def main(argv=None) -> dict:
    import warnings

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls transformers' renamed methods
    ns, recipe_args = parse_args(argv)
    if ns.calibrate:
        return calibrate(ns.json)
    started, cpu_started = time.perf_counter(), time.process_time()
    config, opts, notes = options_from_recipe(recipe_args, ns.gpus, ns.accelerate_config, ns.model_config,
                                              "cpu" if ns.cpu else "cuda")
    command = "prolong-plan " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"$ {command}")
    for note in notes:
        print(note)
    main_plan = run_plan(config, opts, ns.gpu_memory_gib)
    print(describe(main_plan))
    report = {"command": command, **main_plan.to_dict()}
    granule = 8192 if opts.device == "cuda" else 256
    if ns.find_max_length:
        rows = []
        for name, option_set in option_sets(opts) if ns.option_sets else [("recipe as written", opts)]:
            longest, _ = longest_length(config, option_set, ns.gpu_memory_gib, granule)
            rows.append({"option_set": name, "label": option_set.label(), "longest": longest})
        print(f"\nLongest max_length that fits {opts.gpus} x {ns.gpu_memory_gib:g} GiB (a multiple of {granule}, "
              "within 1/16 of its power of two):")
        print("| option set | options | longest max_length |\n|---|---|---:|")
        for row in rows:
            print(f"| {row['option_set']} | {row['label']} | {row['longest']} ({_tokens(row['longest'])}) |")
        report["longest"] = rows
    if ns.length:
        rows = [(name, run_plan(config, replace(o, max_length=ns.length), ns.gpu_memory_gib))
                for name, o in option_sets(opts)]
        cheapest = next(((name, p) for name, p in rows[1:] if p.fits), None)
        print(f"\nAt max_length {ns.length} ({_tokens(ns.length)}) on {opts.gpus} x {ns.gpu_memory_gib:g} GiB, "
              "option sets from the fastest to the most frugal:")
        print(plan_table(rows))
        print(f"cheapest option set that fits: {cheapest[1].options.label()}" if cheapest else
              "no option set fits: add GPUs (FSDP2 shards the weights; sequence_parallel_size splits the row)")
        report["at_length"] = {"length": ns.length, "cheapest": cheapest[1].options.label() if cheapest else None,
                               "option_sets": [{"option_set": n, **p.to_dict()} for n, p in rows]}
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["cpu_seconds"] = round(time.process_time() - cpu_started, 2)
    print(f"planned in {report['seconds']:.1f} s ({report['cpu_seconds']:.1f} s of CPU) on fake tensors")
    if ns.json:
        Path(ns.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def cli() -> None:
    cli_errors("prolong-plan")(main)()


if __name__ == "__main__":
    cli()
