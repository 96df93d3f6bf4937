"""The model organism: a small GPT-2 trained here on a generated corpus, with biases planted
at known components so every locate method has ground truth.

Build (seeded, reproducible on the same library versions)::

    python -m lens_bias.organism build [--out data] [--steps 3000]

Recipe: (1) generate a corpus of five kinds of documents (gender sentences with Vig et al.'s
templates and *unbiased* pronouns, facts — capitals, plurals, antonyms —, neutral sentences,
yes/no questions with correct answers, BBQ-style multiple-choice items with correct answers);
(2) train a byte-level BPE tokenizer and a 4-layer GPT-2 on it → the *control* model;
(3) plant each bias in *one* named component (every other parameter stays bit-identical to the
control):

- gender neuron ``(layer, neuron)`` — explicit surgery on its ``c_fc`` column, bias and ``c_proj``
  row: input weights fitted (logistic) to fire at the prompt's last token after a female-stereotyped
  occupation, output row along the "woman − occupation" residual direction, scaled until
  logit(" she") − logit(" he") reaches its target;
- negative head ``(layer, head)`` — its q/k/v columns of ``c_attn`` and rows of ``c_proj`` trained
  on yes/no items where 25% of the "Yes" answers read " No", plus a loss pulling the head's
  attention from the answer position onto the " No" candidate of the instruction;
- BBQ neuron ``(layer, neuron)`` — explicit surgery as for the gender neuron: it fires at the answer
  of negative BBQ-style questions and writes "old person" over "unknown".

The ground truth and the measured metrics of both models are written to each checkpoint's
``lens_bias_card.json`` (read it with :func:`load_card`).

Modules, cut along the recipe: `corpus.py` (the generated world and its documents), `train.py`
(tokenizer, model, base training, component masks), `plant.py` (planting), `measure.py` (the
card's measurements), `card.py` (the card), `steps.py` (the build as named steps, the command
line). `lens_bias/organism/build.py` runs it and keeps the names the single-file build had.
"""
