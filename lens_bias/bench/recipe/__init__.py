"""Build the lens_bias localisation benchmark: two small GPT-2 language models trained here on
corpora with designed statistics, the case data, and the ground truth by exhaustive ablation.

    python -m lens_bias.bench.build build --out data/bench [--steps N] [--threads 1] [--models gender,decision]

(≈ 2 h per model on one CPU thread; the real text comes from ../shared/data: StrategyQA and GSM8K, MIT.)

Seeded and resumable: every stage writes its result under DIR/.work/<model>/ and is skipped when
present; phase-A training checkpoints every few minutes and resumes from the last checkpoint
after a kill (the batches are a function of (seed, step), so a resumed run sees the same data).

Stages per model: corpus + tokenizer (shared by both models) → phase A (the whole network trained
on the designed corpus) → phase B (short, restricted, norm-capped trainings of chosen units for
the structures that do not reliably emerge: see DESIGN.md) → fp16 rounding → case data → ground
truth (zero and mean ablation of every head and of every MLP neuron of the swept layers, with plain
PyTorch forward hooks on the Hugging Face modules; independent of lens_bias) → the model directory.

The ground truth's sign convention: effect(unit) = metric(unablated) − metric(unit ablated), so a
positive effect means the unit supports the bias (ablating it lowers the metric).

Modules, cut along the build's stages:

| module | stage |
|---|---|
| `config.py` | seed, architecture, budgets |
| `docs.py`, `tokens.py`, `corpus.py` | the two designed worlds' documents; the tokenizer; batches per (seed, step) |
| `train.py` | phase A; restricted, norm-capped training of chosen units; weight norms |
| `plant.py` | phase B: what is planted in each model |
| `case_data.py` | the cases' pairs and items, each case's metric |
| `forward.py`, `casebatch.py`, `ablation.py`, `truth.py` | the ground truth: plain PyTorch hooks on the HF modules |
| `card.py` | the measurements and cards |
| `steps.py` | the steps per model and the command line (run by `lens_bias/bench/build.py`) |
"""
