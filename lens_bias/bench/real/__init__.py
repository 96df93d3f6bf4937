"""The localisation benchmark on a real model (issue #24): SmolLM2-135M-Instruct, its ground truth measured by
exhaustive ablation on held-out prompts with plain Hugging Face modules and hooks — no lens_bias computation —
so that the truth can check lens_bias.

    python -m lens_bias.bench.real prepare          # the cases' data from the shipped data sets (once)
    python -m lens_bias.bench.real build rprof      # one case's truth (resumable; ~/.cache/lens_bias/bench-work)

data.py    the cases' prompts and splits (held-out = other professions/templates, questions, BBQ templates)
rows.py    the rows as the engine runs them (tokenizer and chat template of the model; metrics)
engine.py  exhaustive ablation with exact shortcuts (cached residuals, clean keys/values before the first
           changed position, shared prefix once, metric positions only)
check.py   the same cells from full hooked forwards (the build's self-check and the tests)
truth.py   the stages (layers, heads, sites, neurons, pairs, cumulative sets), checkpoints, the card

The cases themselves (what the methods see, what was expected) are in lens_bias/bench/cases.py.
"""
