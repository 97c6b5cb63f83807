"""Measuring sparse prefill on a real model: accuracy, perplexity, attention fidelity, memory, pictures.

Modules (each behind a ``sparseattn`` command):

- :mod:`.ruler` - RULER-style tasks generated offline with the model's tokenizer (needles,
  passkey, variable tracking, key-value retrieval, common / frequent words); :mod:`.haystack`
  their text; :mod:`.scoring` string-match recall and token F1; :mod:`.external` LongBench /
  InfiniteBench files a user has.
- :mod:`.runner` - ``sparseattn eval``: dense vs each method on the same prompts, resumable
  JSONL; :mod:`.perplexity` on real long text; :mod:`.report` JSON, CSV, Markdown and PNG.
- :mod:`.fidelity` - ``sparseattn fidelity``: recall of exact attention mass and output error per
  layer and head on captured q/k/v, heatmaps.
- :mod:`.viz` - ``sparseattn viz``: a method's selected blocks for one layer and head.
- :mod:`.memory` - ``sparseattn memory``: peak memory of a whole-model prefill, eager vs SDPA vs
  each method.
"""
