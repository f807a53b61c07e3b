"""Speed-up: a static-cache decode loop for the rollout (`--rollout static`, the default), the idea
fast inference engines use, in one page.

`model.generate` decodes with a dynamic cache: every new token goes through the model's Python
layers (mask building, cache bookkeeping, output records), and each layer's key/value tensors grow
by `torch.cat`, which copies the whole cache at every step. Here a GRPO rollout is:

  1. each group's prompt prefilled once (`shared_prompt.prefill_prompts`, as SharedPrefixEngine), its
     KV cache written G times into preallocated buffers: one [N, kv_heads, S, head_dim] pair per layer,
     N = prompts x G rows, S = prompt + max_new_tokens columns rounded up to a multiple of 64;
  2. every later token one fixed-shape step (`StaticDecoder.step`): embed the N last tokens, run the
     decoder layers with the model's own modules (norms, projections with their LoRA adapters, rotary
     embedding, MLP), write each layer's new key/value into column P + t of its buffers, attend over
     the filled columns, the LM head; then the sampling in the same step (`Sampler`): the
     logits processors `generate` would apply (vision tokens suppressed, temperature, top-p), softmax,
     one `torch.multinomial` draw per row, finished rows padded;
  3. `--rollout static_compiled`: the step compiled by `torch.compile`, with one shape for every step
     (attention over the whole buffer, the columns not yet written masked): C++ kernels on a CPU; on
     CUDA the same step captured as a CUDA graph (inductor's "reduce-overhead"). The CUDA path is
     written but has NOT been run: no GPU was available to this work. docs/benchmarks.md has the
     compile time and what it buys on a CPU (not much: the default stays eager).

The same samples as `model.generate` for the same seed (tests/test_static_engine.py): the same
processors, the same random draws (one multinomial per step from torch's global generator; compiled,
inductor is told to call aten's own random ops, `fallback_random`), the same stop rule (all rows
ended, or max_new_tokens). Eager, the probabilities are SharedPrefixEngine's bit for bit (the same
kernels over the same keys: a view of the filled columns, no mask when no prompt is padded, as
`generate` does), and those equal `generate`'s up to float rounding (its prefill runs G rows per
prompt); compiled, the masked whole-buffer attention adds rounding of the same size. A draw can come
out differently only when its uniform number falls within that rounding (~1e-7) of a boundary
between two tokens: never seen in the tests, possible in a long run. The log-probs the training
forward recomputes are those the tokens were drawn from (tested against the teacher-forced forward).

Why this is not much faster on a CPU (docs/benchmarks.md, "Rollout engines"): with Qwen's 151,936-token
vocabulary a decode step of a small model is mostly reading the LM head's weight (memory-bound,
whatever the number of rows) and `torch.multinomial`'s exponential draw over every row's vocabulary,
the same work in `generate`; what this loop removes (Python layers, the cache's `torch.cat`) is a
larger share on a GPU, where a step is microseconds of kernels after milliseconds of launches.

Where it is not used (`make_engine` falls back to SharedPrefixEngine, which falls back to `generate`):
DeepSpeed ZeRO-3 (generation must step in sync across processes there: `generate(synced_gpus=True)`);
model families other than Qwen2.5-VL (the step re-wires its decoder layer, and needs its M-RoPE
`get_rope_index`: `decoder_supported`; Qwen2-VL's layers look the same but are untested: add it to
FAMILIES with a test); sliding-window layers; sampling settings that add
a logits processor `Sampler` does not implement (e.g. a checkpoint's no_repeat_ngram_size); prompts without
images (as SharedPrefixEngine).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from transformers.generation import SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

from minivr1.models import unwrap_peft
from minivr1.rollout import Rollout, eval_mode, finish, sampling_kwargs
from minivr1.shared_prompt import SharedPrefixEngine, generation_processors, prefill_prompts, supports

FAMILIES = ("qwen2_5_vl",)             # decoders whose layers StaticDecoder re-wires (tested)
COLUMN_BLOCK = 64                       # buffer length rounded up to this: fewer distinct shapes to compile


def decoder_supported(model) -> bool:
    """Whether StaticDecoder can run this model's decoder: a Qwen2.5-VL text model (M-RoPE, every layer
    full attention)."""
    hf = unwrap_peft(model)
    text = getattr(hf.config, "text_config", hf.config)
    return (hf.config.model_type in FAMILIES and supports(model)
            and all(t == "full_attention" for t in getattr(text, "layer_types", None) or ["full_attention"]))


class Sampler:
    """`generate`'s sampling for one step: its logits processors, in its order, then softmax and one
    multinomial draw per row; finished rows get the pad token.

    Built from the processors `generate` would use (`shared_prompt.generation_processors`), each
    re-implemented with the same arithmetic (suppression as one index_fill instead of an isin over
    the vocabulary at every step); any other processor is refused (NotImplementedError) and the
    engine falls back to one that runs transformers' own.
    """

    def __init__(self, processors, eos_ids, pad_id: int, device):
        self.ops = []
        for p in processors:
            if isinstance(p, SuppressTokensLogitsProcessor):
                self.ops.append(("suppress", p.suppress_tokens.to(device)))
            elif isinstance(p, TemperatureLogitsWarper):
                self.ops.append(("temperature", p.temperature))
            elif isinstance(p, TopPLogitsWarper):
                self.ops.append(("top_p", p.top_p, p.min_tokens_to_keep, p.filter_value))
            else:
                raise NotImplementedError(f"the static decode step does not implement {type(p).__name__}")
        self.eos = torch.tensor(eos_ids, device=device).flatten()
        self.pad = pad_id

    def __call__(self, logits: torch.Tensor, unfinished: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [N, V] fp32, unfinished [N] (1 = still generating) -> (tokens [N], unfinished [N])."""
        scores = logits
        for op in self.ops:
            if op[0] == "suppress":
                scores = scores.index_fill(1, op[1], -float("inf"))
            elif op[0] == "temperature":
                scores = scores / op[1]
            else:                                   # top-p, as transformers' TopPLogitsWarper
                _, top_p, keep, filler = op
                sorted_logits, sorted_indices = torch.sort(scores, descending=False)
                remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
                remove[..., -keep:] = 0
                scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), filler)
        tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        tokens = tokens * unfinished + self.pad * (1 - unfinished)
        return tokens, unfinished & ~torch.isin(tokens, self.eos)


class StaticDecoder:
    """The fixed-shape decode step of a Qwen2.5-VL model over preallocated KV buffers."""

    def __init__(self, model, sampler: Sampler, compile: bool = False):
        hf = unwrap_peft(model)
        self.lm, self.head, self.sample = hf.model.language_model, hf.get_output_embeddings(), sampler
        self.attn = [layer.self_attn for layer in self.lm.layers]
        self.rope = sys.modules[type(self.attn[0]).__module__].apply_rotary_pos_emb   # the model's own function
        self.compiled = compile
        self.step = torch.compile(self._step, options=compile_options(next(hf.parameters()).device)) \
            if compile else self._step
        self._buffers = None

    def buffers(self, N: int, S: int, like: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The K and V buffers [N, kv_heads, S, head_dim] of every layer, reused while N and S stay
        the same (a compiled step, above all a CUDA graph, wants the same tensors back)."""
        key = (N, S, like.dtype, like.device)
        if self._buffers is None or self._buffers[0] != key:
            a = self.attn[0]
            shape = (N, a.config.num_key_value_heads, S, a.head_dim)
            keys = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in self.attn]
            values = [torch.zeros_like(k) for k in keys]
            if self.compiled and like.device.type == "cuda":
                for t in keys + values:             # CUDA graphs may only write into tensors of fixed address
                    torch._dynamo.mark_static_address(t)
            self._buffers = (key, keys, values)
        return self._buffers[1], self._buffers[2]

    def _step(self, tokens, positions, column, attend, keys, values, unfinished, filled: int | None = None):
        """Feed each row's last token and sample the next: tokens, positions, unfinished [N]; column
        [1], the buffer column the new keys/values go to; attend [N, S] bool, the prompt's mask then
        ones (None: no padding). Returns (next tokens [N], unfinished [N]).

        `filled` = column + 1 (eager): attend over the filled columns only, a view of the buffers;
        the sums then run over the same keys as `generate`'s cache, and give the same numbers bit for
        bit. None (compiled): over the whole buffer with the columns after `column` masked, one shape
        for every step (the sums then differ from generate's by float rounding)."""
        N = tokens.shape[0]
        x = self.lm.embed_tokens(tokens[:, None])                                    # [N, 1, H]
        # M-RoPE: a generated token's three (time, height, width) positions are equal
        cos, sin = self.lm.rotary_emb(x, positions.view(1, N, 1).expand(3, N, 1))
        if filled is None:
            mask = (attend & (torch.arange(attend.shape[1], device=attend.device) <= column))[:, None, None, :]
        else:                       # as generate: no mask at all when no prompt is padded
            mask = None if attend is None else attend[:, None, None, :filled]         # [N, 1, 1, S or filled]
        for layer, a, k_buf, v_buf in zip(self.lm.layers, self.attn, keys, values):
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(N, 1, -1, a.head_dim).transpose(1, 2)               # [N, heads, 1, D]
            k = a.k_proj(h).view(N, 1, -1, a.head_dim).transpose(1, 2)               # [N, kv_heads, 1, D]
            v = a.v_proj(h).view(N, 1, -1, a.head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            k_buf.index_copy_(2, column, k)
            v_buf.index_copy_(2, column, v)
            if filled is not None:
                k_buf, v_buf = k_buf[:, :, :filled], v_buf[:, :, :filled]
            if mask is None:
                o = F.scaled_dot_product_attention(q, k_buf, v_buf, scale=a.scaling, enable_gqa=True)
            else:       # grouped-query attention without repeating the cache: the query heads that share a KV
                        # head attend as that head's queries ([N, kv_heads, heads / kv_heads, D])
                o = F.scaled_dot_product_attention(q.reshape(N, k_buf.shape[1], -1, a.head_dim), k_buf, v_buf,
                                                   attn_mask=mask, scale=a.scaling)
            x = x + a.o_proj(o.reshape(N, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.head(self.lm.norm(x))[:, 0].float()                           # [N, V]
        return self.sample(logits, unfinished)

    @torch.no_grad()
    def decode(self, model, lead: dict, G: int, max_new_tokens: int) -> torch.Tensor:
        """What `model.generate(**rows, ...)[:, P:]` returns for the rows that repeat each prompt of
        `lead` (one row per prompt, with its images) G times: the completions [N, C]."""
        ids = lead["input_ids"]
        prompts, P = ids.shape
        N, S = prompts * G, -(-(P + max_new_tokens) // COLUMN_BLOCK) * COLUMN_BLOCK
        cache, logits, first_pos = prefill_prompts(model, lead)
        keys, values = self.buffers(N, S, cache.layers[0].keys)
        for layer, k_buf, v_buf in zip(cache.layers, keys, values):       # the prompt's K/V, G times
            k_buf[:, :, :P].copy_(layer.keys.repeat_interleave(G, 0))
            v_buf[:, :, :P].copy_(layer.values.repeat_interleave(G, 0))
        attend = torch.ones(N, S, dtype=torch.bool, device=ids.device)
        attend[:, :P] = lead["attention_mask"].bool().repeat_interleave(G, 0)
        padded = not bool(attend.all())
        positions = first_pos.repeat_interleave(G)
        column = torch.tensor([P], device=ids.device)
        out = torch.full((N, max_new_tokens), self.sample.pad, dtype=torch.long, device=ids.device)
        tokens, unfinished = self.sample(logits.repeat_interleave(G, 0), torch.ones_like(positions))
        out[:, 0] = tokens
        steps = 1
        while steps < max_new_tokens and unfinished.max() > 0:
            if self.compiled and ids.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()     # each step one replay of the CUDA graph (untested)
            tokens, unfinished = self.step(tokens, positions, column, attend if padded or self.compiled else None,
                                           keys, values, unfinished, None if self.compiled else P + steps)
            if self.compiled:       # outputs of a CUDA graph live in its memory pool: the next replay overwrites them
                tokens, unfinished = tokens.clone(), unfinished.clone()
            out[:, steps] = tokens
            steps += 1
            positions += 1
            column += 1
        return out[:, :steps]


def compile_options(device: torch.device) -> dict:
    """torch.compile options for the step: aten's own random ops (the same draws as eager, from the
    same generator), and on CUDA the step captured as a CUDA graph (= mode "reduce-overhead";
    untested here)."""
    options = {"fallback_random": True}
    if device.type == "cuda":
        options["triton.cudagraphs"] = True
    return options


class StaticCacheEngine(SharedPrefixEngine):
    """SharedPrefixEngine's prefill, then the static-cache decode loop (`compile`: the step compiled)."""

    name = "static"

    def __init__(self, model, processor, temperature: float, top_p: float, system_prompt: str | None = None,
                 compile: bool = False):
        super().__init__(model, processor, temperature, top_p, system_prompt)
        kwargs = sampling_kwargs(model, processor, 1, temperature, top_p)
        config, processors = generation_processors(model, torch.zeros(1, 1, dtype=torch.long), **kwargs)
        sampler = Sampler(processors, config.eos_token_id, config.pad_token_id, next(model.parameters()).device)
        self.decoder = StaticDecoder(model, sampler, compile)
        self.eos = kwargs["eos_token_id"]
        self.name = "static_compiled" if compile else "static"

    @torch.no_grad()
    def generate(self, problems, G: int, max_new_tokens: int) -> Rollout:
        batch, images, counts = self.prompts(problems)
        if "mm_token_type_ids" not in batch or not images:
            return super().generate(problems, G, max_new_tokens)
        lead = {**batch, **images}
        with eval_mode(self.model):
            completion = self.decoder.decode(self.model, lead, G, max_new_tokens)
        rows = {k: v.repeat_interleave(G, 0) for k, v in batch.items()}
        return finish(completion, rows, self.processor.tokenizer, self.eos, G, images, counts)
