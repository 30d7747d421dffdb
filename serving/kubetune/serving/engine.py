"""The transformers engine: tokenizing, request validation against the context, batched generation.

Plain Python (no Ray), so it is tested directly; `kubetune.serving.server.TransformersServer` puts it
behind HTTP. Models come through `kubetune.trainer.model` (local directory, `pvc://`, `s3://`...,
or a Hugging Face id), so a checkpoint the trainer wrote is served as it is.

Why a decoding loop of our own rather than transformers' `generate`: a batch here mixes requests with
their own max_tokens, stop strings, stop ids, temperature, top_p and seed, and each row leaves the batch
when it is done; prompts are prefilled in groups of similar length (see `_prefill`). Measured against
`model.generate` (left padding + attention mask, one batch of 32 ViGGO-style prompts, SmolLM2-135M on one
CPU thread, greedy, max_tokens 48; outputs identical) this loop needs about 0.7x the CPU time (16-18 s
vs 22-24 s); transformers' continuous batching (`generate_batch`) was slower still on CPU, and takes one
generation config for all requests. On a GPU, the vllm engine serves instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from kubetune.serving.options import ServeOptions, cache_dir
from kubetune.serving.protocol import OpenAIError, message_text, param
from kubetune.serving.protocol import stops as parse_stops

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PREFILL_GROUP = 8  # prompts prefilled together (sorted by length, so a group pads little)


@dataclass(frozen=True)
class GenRequest:
    """One sequence to generate. `stop_ids` end it like EOS (the tokenizer's EOS ids are always added);
    `stop` strings are searched in the decoded text, which is cut before them."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class GenResult:
    """What one GenRequest produced: the text (cut before a stop string), token counts, why it ended."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


class TransformersEngine:
    """Tokenizing, request validation against the context, and batched generation.

    Plain Python (no Ray), so it is tested directly; `TransformersServer` puts it behind HTTP.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 max_model_len: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        eos: set[int] = set()
        for ids in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            eos.update([ids] if isinstance(ids, int) else (ids or []))
        if not eos:
            raise ValueError("the tokenizer and the model's generation config name no EOS token")
        self.eos_ids = frozenset(eos)
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
        limits = [n for n in (max_model_len, getattr(model.config, "max_position_embeddings", None)) if n]
        self.context_length: int = min(limits) if limits else 2048
        # Special tokens that are one token: a `stop` string equal to one ends generation on its id (the
        # token never shows in text decoded without special tokens, e.g. a template's <END_A>).
        self.special_ids: dict[str, int] = {}
        for token in tokenizer.all_special_tokens:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                self.special_ids[token] = token_id

    # -- requests

    def encode_prompt(self, prompt: str) -> list[int]:
        ids: list[int] = self.tokenizer(prompt)["input_ids"]
        return ids

    def encode_chat(self, messages: Any) -> list[int]:
        """The prompt of a chat: the tokenizer's chat template with the assistant's turn opened."""
        if not self.tokenizer.chat_template:
            raise OpenAIError("this model's tokenizer has no chat template: use /v1/completions",
                              param="messages")
        if not isinstance(messages, list) or not messages:
            raise OpenAIError("'messages' must be a non-empty list", param="messages")
        plain = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise OpenAIError("each message needs a 'role' and 'content'", param="messages")
            plain.append({"role": m["role"], "content": message_text(m.get("content"))})
        text = self.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
        ids: list[int] = self.tokenizer(cast(str, text), add_special_tokens=False)["input_ids"]
        return ids

    def request(self, body: Mapping[str, Any], prompt_ids: list[int], default_max_tokens: int | None) -> GenRequest:
        """A GenRequest from an OpenAI request body (sampling params, stop) and the encoded prompt."""
        n_prompt = len(prompt_ids)
        room = self.context_length - n_prompt
        if room < 1:
            raise OpenAIError(f"This model's maximum context length is {self.context_length} tokens; the "
                              f"prompt has {n_prompt} tokens.", param="prompt")
        max_tokens = param(body, "max_tokens", (int,), None)
        max_tokens = param(body, "max_completion_tokens", (int,), max_tokens)
        if max_tokens is None:
            max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
        if max_tokens < 1:
            raise OpenAIError("'max_tokens' must be >= 1", param="max_tokens")
        if n_prompt + max_tokens > self.context_length:
            raise OpenAIError(f"This model's maximum context length is {self.context_length} tokens; "
                              f"{n_prompt} prompt tokens + max_tokens {max_tokens} exceed it.", param="max_tokens")
        temperature = float(param(body, "temperature", (int, float), 1.0))
        top_p = float(param(body, "top_p", (int, float), 1.0))
        if temperature < 0 or not 0 < top_p <= 1:
            raise OpenAIError("'temperature' must be >= 0 and 'top_p' in (0, 1]",
                              param="temperature" if temperature < 0 else "top_p")
        extra_ids = param(body, "stop_token_ids", (list,), [])  # vLLM's extension
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in extra_ids):
            raise OpenAIError("'stop_token_ids' must be a list of integers", param="stop_token_ids")
        stops, stop_ids = [], set(extra_ids)
        for s in parse_stops(body):
            if s in self.special_ids:
                stop_ids.add(self.special_ids[s])
            else:
                stops.append(s)
        return GenRequest(prompt_ids=tuple(prompt_ids), max_tokens=max_tokens, temperature=temperature,
                          top_p=top_p, seed=param(body, "seed", (int,), None), stop=tuple(stops),
                          stop_ids=frozenset(stop_ids))

    # -- generation

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """Results in the order of `requests`, all generated as one batch.

        Prompts are prefilled in groups of similar length (see `_prefill`) and their KV caches joined,
        left-padded; then one decoding step at a time, every row with its own limits: a row leaves the batch (its KV-cache rows are dropped) as soon as it hits EOS or one
        of its stop ids, its max_tokens, or a stop string, so finished rows cost nothing while long ones go
        on. Sampling is per row too (temperature, top_p, and a `seed` gives the row its own random
        generator), so requests with different parameters share a batch and a seeded request's answer
        does not depend on what it was batched with. Greedy rows take the argmax, as `generate` does.
        """
        import torch

        if not requests:
            return []
        device = self.model.device
        generators = [_generator(r.seed, device) for r in requests]
        generated: list[list[int]] = [[] for _ in requests]
        active = list(range(len(requests)))  # the requests still in the batch, in batch order
        with torch.inference_mode():
            logits, cache, attention_mask, position_ids = self._prefill(requests)
            while True:
                tokens = self._choose(logits, [requests[i] for i in active], [generators[i] for i in active])
                keep = []
                for row, (i, token) in enumerate(zip(active, tokens, strict=True)):
                    generated[i].append(token)
                    if not self._finished(requests[i], generated[i]):
                        keep.append(row)
                if not keep:
                    break
                next_positions = position_ids[:, -1:] + 1
                step_tokens = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
                if len(keep) < len(active):
                    index = torch.tensor(keep, dtype=torch.long, device=device)
                    cache.batch_select_indices(index)
                    attention_mask, next_positions, step_tokens = (
                        attention_mask[index], next_positions[index], step_tokens[index])
                    active = [active[row] for row in keep]
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)
                position_ids = next_positions
                logits = self._forward(step_tokens, attention_mask, position_ids, cache)
        return [self._result(r, g) for r, g in zip(requests, generated, strict=True)]

    def _prefill(self, requests: Sequence[GenRequest]) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """Next-token logits, the KV cache, attention mask and position ids of every prompt, in order.

        Prompts of one batch differ in length (ViGGO sentences: 20 to 75 tokens), and a left-padded
        prefill spends its compute on the padding too (40-50% of it on such a batch). So the prompts are
        sorted by length and prefilled in groups of PREFILL_GROUP, each padded only to its own longest;
        the groups' caches are then left-padded (zeros, masked) to the batch's longest and joined. Models
        with other layers than plain dynamic ones (sliding window, linear attention) get one padded
        prefill (their caches do not join this way).
        """
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        device = self.model.device
        lengths = [len(r.prompt_ids) for r in requests]
        width = max(lengths)
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], dtype=torch.long, device=device)
        # As `generate` does for left padding: positions count real tokens only.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        order = sorted(range(len(requests)), key=lambda i: lengths[i])
        groups = [order[k:k + PREFILL_GROUP] for k in range(0, len(order), PREFILL_GROUP)]
        caches, logits = [], []
        for group in groups:
            cache = DynamicCache(config=self.model.config)
            if not all(type(layer) is DynamicLayer for layer in cache.layers):  # sliding window, linear, ...
                return self._forward(self._padded(requests), mask, positions, cache), cache, mask, positions
            g_width = max(lengths[i] for i in group)
            rows = torch.tensor(group, dtype=torch.long, device=device)
            logits.append(self._forward(self._padded([requests[i] for i in group]), mask[rows, -g_width:],
                                        positions[rows, -g_width:], cache))
            caches.append(cache)
        back = torch.tensor(sorted(range(len(order)), key=order.__getitem__), dtype=torch.long, device=device)

        def joined(tensors: list[torch.Tensor]) -> torch.Tensor:  # [rows, heads, seq, dim] each
            padded = [torch.nn.functional.pad(t, (0, 0, width - t.shape[-2], 0)) for t in tensors]
            return torch.cat(padded)[back]

        merged = DynamicCache(ddp_cache_data=[
            (joined([_tensor(c.layers[k], "keys") for c in caches]),
             joined([_tensor(c.layers[k], "values") for c in caches]))
            for k in range(len(caches[0].layers))], config=self.model.config)
        return torch.cat(logits)[back], merged, mask, positions

    def _padded(self, requests: Sequence[GenRequest]) -> torch.Tensor:
        """The prompts as one left-padded batch of input ids."""
        import torch

        width = max(len(r.prompt_ids) for r in requests)
        return torch.tensor([[self.pad_id] * (width - len(r.prompt_ids)) + list(r.prompt_ids) for r in requests],
                            dtype=torch.long, device=self.model.device)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: Any) -> torch.Tensor:
        """The next-token logits (float32) of each row."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits: torch.Tensor = out.logits[:, -1, :].float()
        return logits

    def _choose(self, logits: torch.Tensor, requests: Sequence[GenRequest],
                generators: Sequence[torch.Generator | None]) -> list[int]:
        """The next token of each row: argmax when greedy, else a top-p sample at the row's temperature."""
        import torch

        tokens: list[int] = logits.argmax(dim=-1).tolist()
        for row, (r, gen) in enumerate(zip(requests, generators, strict=True)):
            if r.temperature == 0:
                continue
            probs = torch.softmax(logits[row] / r.temperature, dim=-1)
            if r.top_p < 1:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(-1) - sorted_probs >= r.top_p  # never the most likely token
                probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
            tokens[row] = int(torch.multinomial(probs, 1, generator=gen).item())
        return tokens

    def _finished(self, request: GenRequest, generated: list[int]) -> bool:
        return (len(generated) >= request.max_tokens or generated[-1] in self.eos_ids
                or generated[-1] in request.stop_ids
                or bool(request.stop) and _first_stop(self._decode(generated), request.stop) is not None)

    def _result(self, request: GenRequest, generated: list[int]) -> GenResult:
        """Cut one row at its first stop id (counted, as vLLM counts EOS), its length limit or the first
        stop string (the tokens up to the one that completed it are counted; the text ends before it)."""
        tokens = generated[:request.max_tokens]
        finish: Literal["stop", "length"] = "length"
        stop_ids = self.eos_ids | request.stop_ids
        for k, token in enumerate(tokens):
            if token in stop_ids:
                tokens, finish = tokens[:k + 1], "stop"
                break
        text_tokens = tokens[:-1] if finish == "stop" else tokens
        text = self._decode(text_tokens)
        cut = _first_stop(text, request.stop)
        if cut is None:
            return GenResult(text, len(request.prompt_ids), len(tokens), finish)
        count = next(k for k in range(1, len(text_tokens) + 1)
                     if _first_stop(self._decode(text_tokens[:k]), request.stop) is not None)
        return GenResult(text[:cut], len(request.prompt_ids), count, "stop")

    def _decode(self, tokens: Sequence[int]) -> str:
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True)
        return cast(str, text)


def _tensor(layer: object, name: Literal["keys", "values"]) -> torch.Tensor:
    """A filled (dynamic) cache layer's keys or values."""
    import torch

    value = getattr(layer, name, None)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected a filled KV-cache layer, got {type(value).__name__}")
    return value


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A row's own random generator when it has a seed (else the global one)."""
    if seed is None:
        return None
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def load_engine(opts: ServeOptions) -> TransformersEngine:
    """Model and tokenizer of `opts.model_uri` through kubetune.trainer.model (path, s3/pvc, hub id)."""
    import torch

    from kubetune.trainer.model import ModelSource, load_model, load_tokenizer

    uri = opts.model_uri
    is_path = "://" in uri or uri.startswith((".", "/", "~")) or Path(uri).exists()
    source = (ModelSource.resolve(uri=str(Path(uri).expanduser()) if "://" not in uri else uri,
                                  cache_dir=cache_dir())
              if is_path else ModelSource.resolve(name=uri, cache_dir=cache_dir()))
    use_gpu = opts.num_gpus > 0 and torch.cuda.is_available()  # from_pretrained returns it in eval mode
    dtype: Any = opts.dtype if opts.dtype != "auto" else ("auto" if use_gpu else torch.float32)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    tokenizer = load_tokenizer(source, cache_dir())
    model = load_model(source, cache_dir(), dtype=dtype)
    if use_gpu:
        model.cuda()  # type: ignore[call-arg]  # transformers wraps nn.Module.cuda
    return TransformersEngine(model, tokenizer, max_model_len=opts.max_model_len)

