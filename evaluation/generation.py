"""Prompt building, context truncation and greedy generation (transformers; vLLM when installed).

HELMET layout: without a chat template the input is `user_template + separator + system_template`
(the answer prefix), tokenized with special tokens; with one, the user message goes through
`tokenizer.apply_chat_template(..., add_generation_prompt=True)`. When the prompt is over budget,
only the END of the `context` field is cut; instructions, demonstrations and question stay.
"""
import logging

import torch

logger = logging.getLogger(__name__)


class PromptBuilder:
    """Renders a task's sample into token ids for one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text(self, task, sample: dict, use_chat_template: bool) -> tuple[str, bool]:
        """The prompt string and whether it already holds the special tokens."""
        if use_chat_template:
            if self.tokenizer.chat_template is None:
                raise ValueError(f"Task {task.name} asks for a chat template but the tokenizer has none; "
                                 "pass use_chat_template=false to run it as plain text")
            messages = [{"role": "user", "content": task.user_prompt(sample)}]
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return prompt + (task.answer_prefix(sample) if task.answer_prefix_in_chat else ""), True
        return task.user_prompt(sample) + task.separator + task.answer_prefix(sample), False

    def ids(self, task, sample: dict, use_chat_template: bool) -> list[int]:
        text, has_special = self.text(task, sample, use_chat_template)
        return self.tokenizer(text, add_special_tokens=not has_special)["input_ids"]

    def count(self, task, use_chat_template: bool):
        return lambda sample: len(self.ids(task, sample, use_chat_template))

    def truncated_ids(self, task, sample: dict, use_chat_template: bool, budget: int,
                      mode: str = "fixed") -> tuple[list[int], int]:
        """Token ids within `budget`, cutting the end of sample["context"]; returns (ids, tokens cut).
        mode="helmet": HELMET's single cut (model_utils.tokenize), which may end a token or two over."""
        ids = self.ids(task, sample, use_chat_template)
        if mode == "helmet":
            return self._helmet_truncated_ids(task, sample, use_chat_template, budget, ids)
        cut_total = 0
        for _ in range(4):  # re-tokenizing at the cut can shift a token or two: iterate
            excess = len(ids) - budget
            if excess <= 0:
                return ids, cut_total
            context_ids = self.tokenizer(sample["context"], add_special_tokens=False)["input_ids"]
            if excess >= len(context_ids):
                raise ValueError(f"{task.name}: the prompt without its context already exceeds {budget} tokens")
            sample = {**sample, "context": self.tokenizer.decode(context_ids[:-excess])}
            cut_total += excess
            ids = self.ids(task, sample, use_chat_template)
        return ids[:budget], cut_total + max(0, len(ids) - budget)


    def _helmet_truncated_ids(self, task, sample, use_chat_template, budget, ids):
        """Cut the context's text at the start of its `excess`-th token from the end (character
        offsets of the context tokenized alone, special tokens included), re-render once."""
        excess = len(ids) - budget
        if excess <= 0:
            return ids, 0
        offsets = self.tokenizer(sample["context"], return_offsets_mapping=True)["offset_mapping"]
        if excess > len(offsets):
            raise ValueError(f"{task.name}: the prompt without its context already exceeds {budget} tokens")
        sample = {**sample, "context": sample["context"][:offsets[-excess][0]]}
        return self.ids(task, sample, use_chat_template), excess


def model_window(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


class HFGenerator:
    """Greedy decoding with transformers. Prompts longer than `prefill_chunk_size` are prefilled in
    chunks by `generate(prefill_chunk_size=...)` (transformers' own chunked prefill), so activations
    stay bounded; the KV cache itself still grows with the input."""

    def __init__(self, model, tokenizer, prefill_chunk_size: int | None = 8192):
        self.model = model
        self.tokenizer = tokenizer
        self.prefill_chunk_size = prefill_chunk_size or None
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str, tokenizer=None, attn_implementation: str | None = None, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        cuda = torch.cuda.is_available()
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16 if cuda else torch.float32,  # bf16 on GPU, fp32 on CPU
            attn_implementation=attn_implementation or ("sdpa"))
        model.to("cuda" if cuda else "cpu").eval()
        return cls(model, tokenizer or AutoTokenizer.from_pretrained(path), **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: list[int], max_new_tokens: int, stop_newline: bool) -> str:
        ids = torch.tensor([input_ids], device=self.device)
        kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, attention_mask=torch.ones_like(ids),
                      pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                      else self.tokenizer.eos_token_id, temperature=None, top_p=None, top_k=None)
        if stop_newline:
            kwargs.update(stop_strings=["\n"], tokenizer=self.tokenizer)
        if self.prefill_chunk_size and ids.shape[1] > self.prefill_chunk_size:
            kwargs["prefill_chunk_size"] = self.prefill_chunk_size
        out = self.model.generate(input_ids=ids, **kwargs)
        text = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return text.split("\n")[0] if stop_newline else text


class VLLMGenerator:
    """Optional vLLM backend (import-guarded: vLLM is not a dependency)."""

    def __init__(self, path: str, tokenizer, max_model_len: int | None = None, **_):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as err:
            raise ImportError("backend=vllm needs the vllm package (pip install vllm); use backend=hf otherwise") from err
        self.sampling_params = SamplingParams
        self.llm = LLM(model=path, max_model_len=max_model_len, dtype="bfloat16", enable_prefix_caching=False)
        self.tokenizer = tokenizer

    def generate(self, input_ids: list[int], max_new_tokens: int, stop_newline: bool) -> str:
        params = self.sampling_params(temperature=0.0, max_tokens=max_new_tokens, stop=["\n"] if stop_newline else None)
        return self.llm.generate([{"prompt_token_ids": input_ids}], params, use_tqdm=False)[0].outputs[0].text
