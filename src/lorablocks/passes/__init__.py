"""Forward passes of a model over a domain's examples: evaluation, probes and input statistics.

* :mod:`~lorablocks.passes.evaluate` / :mod:`~lorablocks.passes.eval_job`: answer-token perplexity;
* :mod:`~lorablocks.passes.probe` / :mod:`~lorablocks.passes.activations`: function overlap of blocks;
* :mod:`~lorablocks.passes.statistics`: the input Grams a ``regmean`` composition needs;
* :mod:`~lorablocks.passes.hooks`: the one hooked pass they share (batches of a domain, hooks on the
  inputs of target modules, padding masked).

Training (:mod:`lorablocks.training`) is the only place that updates weights; nothing here does.
"""
