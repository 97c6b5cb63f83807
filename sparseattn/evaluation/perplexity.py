"""Perplexity on real long text, with the model's own attention or a sparse method.

The whole text is prefilled in one forward (so a sparse method sees the full length, as in a
real long prompt); the logits are then computed a chunk of positions at a time from the final
hidden states, so nothing of size ``L x vocab`` exists (Gemma 3's 262K vocabulary at 32K tokens
would be 17 GB in bf16). Models whose logits are ``lm_head(hidden)``, soft-capped when the config
has ``final_logit_softcapping`` (Gemma), are supported: Llama, Qwen, Mistral, Gemma 3.

Example:
    >>> import torch, transformers
    >>> from sparseattn.evaluation.perplexity import token_nll
    >>> cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> ids = torch.randint(0, 128, (1, 300))
    >>> nll = token_nll(model, ids, chunk=64)
    >>> nll.shape, torch.allclose(nll.mean(), model(ids, labels=ids).loss, atol=1e-5)
    (torch.Size([299]), True)
"""

from __future__ import annotations

import math

import torch

__all__ = ["perplexity", "token_nll"]


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor, *, chunk: int = 1024) -> torch.Tensor:
    """Negative log-likelihood of each next token: `[L - 1]` float32 on the CPU, for `input_ids [1, L]`.

    Args:
        model: a causal LM (``model.base_model`` gives hidden states, ``get_output_embeddings()`` logits).
        input_ids: `[1, L]` token ids.
        chunk: positions whose logits are computed at once.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [1, L] with L >= 2, got {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[0]  # [L, hidden]
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    targets = input_ids[0, 1:]
    out = []
    for start in range(0, targets.shape[0], chunk):
        logits = head(hidden[start:start + chunk][: targets.shape[0] - start]).float()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        out.append(torch.nn.functional.cross_entropy(logits, targets[start:start + chunk], reduction="none").cpu())
    return torch.cat(out)


def perplexity(model, input_ids: torch.Tensor, *, chunk: int = 1024) -> dict[str, float]:
    """``{"ppl", "ppl_second_half", "tokens"}``: perplexity over every predicted token and over the second half.

    The second half's tokens have the longest contexts, where a sparse method drops the most.
    """
    nll = token_nll(model, input_ids, chunk=chunk)
    half = nll[nll.shape[0] // 2:]
    exp = lambda x: math.exp(min(x, 700.0))  # noqa: E731  (a broken method must not crash the run)
    return {"ppl": exp(nll.mean().item()), "ppl_second_half": exp(half.mean().item()), "tokens": int(nll.shape[0])}
