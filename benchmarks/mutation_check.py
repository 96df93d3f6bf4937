"""Mutation check: plant plausible bugs in the methods, one at a time, and show the test suite catches each.

    python benchmarks/mutation_check.py [--only NAME ...] [--list] [--keep]

Each mutation replaces one snippet of one source file (a sign, a position, a skipped step) in a
temporary copy of the repository and runs the tests that guard it; it is *caught* when they fail.
A mutation whose snippet is no longer in the source is reported as STALE (the check must be updated
with the code), and counts as a failure of this script. Exit code 0 only when every mutation is caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


MUTATIONS = [
    Mutation("attribution: gradient × activation (no corrupted baseline)", "lens_bias/locate/attribution.py",
             'delta = (a_g - a_o) if at == "clean" else (a_o - a_g)',
             'delta = a_g', ("tests/locate/test_attribution.py",
                             "tests/bench/test_real.py::test_attribution_without_the_corrupted_baseline_scores_below_attribution"),
             "the estimate must be ∂m/∂a · (a_clean − a_corr), not ∂m/∂a · a"),
    Mutation("attribution: corrupted − clean (sign)", "lens_bias/locate/attribution.py",
             'delta = (a_g - a_o) if at == "clean" else (a_o - a_g)',
             'delta = (a_o - a_g) if at == "clean" else (a_g - a_o)',
             ("tests/locate/test_attribution.py",), "a flipped sign ranks the protective components first"),
    Mutation("NAS: raw attention to ' No'", "lens_bias/locate/nas.py",
             "per_prompt.append(torch.stack([nas_terms(*got[l], mask) for l in range(L)], 1).cpu())",
             "per_prompt.append(torch.stack([(got[l][0] * mask).sum(-1) for l in range(L)], 1).cpu())",
             ("tests/locate/test_nas.py::test_nas_equals_hand_computation", "tests/locate/test_nas.py::test_query_range_is_after_the_instruction", "tests/locate/test_nas.py::test_planted_negative_head_ranks_first",
              "tests/bench/test_real.py::test_nas_as_raw_attention_scores_below_nas"), "NAS weighs the candidates' attention by its log ratio"),
    Mutation("NAS: query positions one token early", "lens_bias/locate/nas.py",
             "return (pos >= first) & (pos <= last)", "return (pos >= first - 1) & (pos <= last - 1)",
             ("tests/locate/test_nas.py::test_nas_equals_hand_computation", "tests/locate/test_nas.py::test_query_range_is_after_the_instruction", "tests/locate/test_nas.py::test_planted_negative_head_ranks_first"), "the sum runs from L_I to L_P"),
    Mutation("NAS: answer position read at q − 1", "lens_bias/locate/nas.py",
             "return pos == last", "return pos == last - 1", ("tests/locate/test_nas.py::test_nas_equals_hand_computation", "tests/locate/test_nas.py::test_query_range_is_after_the_instruction", "tests/locate/test_nas.py::test_planted_negative_head_ranks_first"),
             "queries='answer' reads the position that predicts the answer"),
    Mutation("NAS: log(Yes/No) instead of log(No/Yes)", "lens_bias/locate/nas.py",
             "(torch.log(att_neg + EPS) - torch.log(att_pos + EPS))", "(torch.log(att_pos + EPS) - torch.log(att_neg + EPS))",
             ("tests/locate/test_nas.py::test_nas_equals_hand_computation", "tests/locate/test_nas.py::test_query_range_is_after_the_instruction", "tests/locate/test_nas.py::test_planted_negative_head_ranks_first"), "a positive NAS means more attention to ' No'"),
    Mutation("CRISPR: ŷ may be the gold answer", "lens_bias/locate/crispr.py",
             "wrong[torch.arange(len(chunk)), gold] = -1", "pass", ("tests/locate/test_crispr.py::test_crispr_scores_equal_an_independent_computation", "tests/locate/test_crispr.py::test_the_order_of_aggregation_matters", "tests/locate/test_crispr.py::test_generic_multiple_choice_items"),
             "ŷ = argmax over o ≠ y"),
    Mutation("CRISPR: no skill disentanglement", "lens_bias/locate/crispr.py",
             "b = (a_hat - lam * a_gold.clamp(min=0)).amax(0)", "b = a_hat.amax(0)", ("tests/locate/test_crispr.py::test_crispr_scores_equal_an_independent_computation", "tests/locate/test_crispr.py::test_the_order_of_aggregation_matters", "tests/locate/test_crispr.py::test_generic_multiple_choice_items"),
             "B = A(ŷ) − λ·relu(A(y))"),
    Mutation("CRISPR: disentangle after the max over tokens by default", "lens_bias/locate/crispr.py",
             'if order == "token":', 'if order != "token":', ("tests/locate/test_crispr.py::test_crispr_scores_equal_an_independent_computation", "tests/locate/test_crispr.py::test_the_order_of_aggregation_matters", "tests/locate/test_crispr.py::test_generic_multiple_choice_items"),
             "the paper disentangles token by token, then takes the max"),
    Mutation("CRISPR: no confusion weighting", "lens_bias/locate/crispr.py",
             "total += (conf[:, None, None] * b).sum(0)", "total += b.sum(0)", ("tests/locate/test_crispr.py::test_crispr_scores_equal_an_independent_computation", "tests/locate/test_crispr.py::test_the_order_of_aggregation_matters", "tests/locate/test_crispr.py::test_generic_multiple_choice_items"),
             "instances are weighted by their confusion score c = P(ŷ)"),
    Mutation("tracing: noise one token off the subject", "lens_bias/locate/tracing.py",
             "out[i, a:b] = torch.randn(b - a, d, generator=gen) * scale",
             "out[i, a + 1:b + 1] = torch.randn(b - a, d, generator=gen) * scale", ("tests/locate/test_tracing.py",),
             "the noise goes on the subject's tokens"),
    Mutation("tracing: zero noise", "lens_bias/locate/tracing.py",
             "scale = noise * embedding_std(model, ps, std)", "scale = 0.0 * embedding_std(model, ps, std)",
             ("tests/locate/test_tracing.py",), "a corruption that corrupts nothing has no total effect"),
    Mutation("metric: logit(a₁) − logit(a₀)", "lens_bias/core/metrics.py",
             "d = a[:, 0] - a[:, 1]", "d = a[:, 1] - a[:, 0]", ("tests/locate/test_patching.py",),
             "LD = logit(answer₀) − logit(answer₁)"),
    Mutation("LSDM: preservation term dropped", "lens_bias/mitigate/lsdm/solve.py",
             "A = H.T @ H / H.shape[0] + lam * (H0.T @ H0) / H0.shape[0]", "A = H.T @ H / H.shape[0]",
             ("tests/mitigate/test_lsdm.py",), "the edit must leave other outputs unchanged"),
    Mutation("LSDM: no change asked for", "lens_bias/mitigate/lsdm/main.py",
             "goal = ld + (goal_final - ld) / (len(layers) - j)", "goal = ld", ("tests/mitigate/test_lsdm.py",),
             "the targets move the logit difference to zero"),
    Mutation("pruning: the next neuron's row", "lens_bias/mitigate/prune.py",
             'out_projection(target, l, "mlp")[i].zero_()', 'out_projection(target, l, "mlp")[(i + 1) % target.cfg.d_mlp].zero_()',
             ("tests/locate/test_crispr.py", "tests/mitigate/test_export.py"), "pruning = zero-ablating that neuron"),
    Mutation("pruning: a head's slice off by one head", "lens_bias/mitigate/prune.py",
             'out_projection(target, l, "attn")[h * d_head:(h + 1) * d_head].zero_()',
             'out_projection(target, l, "attn")[(h + 1) % target.cfg.n_heads * d_head:((h + 1) % target.cfg.n_heads + 1) * d_head].zero_()',
             ("tests/mitigate/test_ablation.py",), "pruning a head = zero-ablating its hook_z"),
    Mutation("export: the saved weights are not the model's", "lens_bias/mitigate/export.py",
             "        fresh.save_pretrained(tmp)\n",
             "        [p.data.add_(0.01) for p in fresh.parameters()]\n        fresh.save_pretrained(tmp)\n",
             ("tests/mitigate/test_export.py",), "transformers must reload the same logits"),
    Mutation("ablation: mean over padding too", "lens_bias/mitigate/ablation.py",
             "mean = (act * m).sum((0, 1)) / m.sum((0, 1))", "mean = act.mean((0, 1))",
             ("tests/mitigate/test_ablation.py",), "the mean is over real tokens"),
    Mutation("patching: shortcut starts one position after the first change", "lens_bias/locate/patching.py",
             "start = diff.int().argmax(1)[:, head_c].T  # the first position the patch changes",
             "start = diff.int().argmax(1)[:, head_c].T + 1", ("tests/locate/test_patching.py",),
             "positions from the first change on must be recomputed (the shortcut equals TransformerLens)"),
    Mutation("patching: effect = corrupted − patched", "lens_bias/core/scores.py",
             "return self.values - self.corrupted", "return self.corrupted - self.values",
             ("tests/locate/test_patching.py", "tests/locate/test_tracing.py"),
             "a restored component that brings the bias back has a positive effect"),
    Mutation("BBQ: the stereotyped option is the biased one for non-negative questions too",
             "lens_bias/tasks/multiple_choice.py", "    return BBQTarget(u, target, others[0], \"ok\")",
             "    return BBQTarget(u, target, target, \"ok\")", ("tests/tasks/test_multiple_choice.py",),
             "BBQ: the bias target in negative contexts, the non-target in non-negative ones"),
    Mutation("BBQ: s_AMB not scaled by (1 − accuracy)", "lens_bias/tasks/multiple_choice.py",
             'out["bias_ambig"] = (1 - acc_ambig) * s("ambig", "bias_ambig")',
             'out["bias_ambig"] = s("ambig", "bias_ambig")', ("tests/tasks/test_multiple_choice.py",),
             "s_AMB = (1 − acc)·s_DIS-style score (Parrish et al. 2022)"),
    # the real-model tier (tests/real: SmolLM2-135M-Instruct, `lens-bias fetch smollm2-135m-instruct`)
    Mutation("real model: chat prompts' answer read one position early", "lens_bias/tasks/yesno.py",
             "    ps = PromptSet.build(model_or_tokenizer, prompts, answers, metadata=meta)\n",
             "    ps = PromptSet.build(model_or_tokenizer, prompts, answers, metadata=meta)\n"
             "    ps.answer_pos = ps.answer_pos - int(chat)\n",
             ("tests/real/test_real_locate.py::test_nas_equals_attention_patterns",),
             "through the chat template the decision is the token after 'assistant\\n'"),
    Mutation("real model: a chat-turn marker prepended as BOS again", "lens_bias/core/prompts.py",
             "return bool(ids and ids[0] == bos) or bos == tok.eos_token_id", "return True",
             ("tests/real/test_real_loading.py::test_prompts_are_tokenised_as_the_model_tokenises_them",
              "tests/real/test_real_locate.py::test_nas_equals_attention_patterns"),
             "SmolLM2's tokenizer never adds its bos_token <|im_start|>"),
    Mutation("real model: a chat reply's option scored with a leading space", "lens_bias/tasks/multiple_choice.py",
             'o_ids = tok(continuation(p, o), add_special_tokens=False)["input_ids"]',
             'o_ids = tok(" " + o.strip(), add_special_tokens=False)["input_ids"]',
             ("tests/real/test_real_locate.py::test_bbq_option_scores_equal_transformers",),
             "after the chat template's 'assistant\\n' the reply starts without a space"),
    Mutation("real model: NASA's k/v slice of a GQA head taken from the wrong KV group", "lens_bias/mitigate/nasa/lora.py",
             "g = h // (n_heads // n_kv)", "g = h % n_kv",
             ("tests/real/test_real_mitigate.py::test_nasa_adapter_reloads_in_peft_and_the_merge_exports",),
             "query heads h share the KV head h // (n_heads / n_kv_heads) (contiguous groups)"),
    Mutation("real tier: attribution sign flipped", "lens_bias/locate/attribution.py",
             'delta = (a_g - a_o) if at == "clean" else (a_o - a_g)',
             'delta = (a_o - a_g) if at == "clean" else (a_g - a_o)',
             ("tests/real/test_real_patching.py::test_attribution_equals_autograd",),
             "attribution = ∂m/∂a · (a_clean − a_corr), checked against plain transformers' autograd"),
    Mutation("real tier: all-position patching starts one position late", "lens_bias/locate/patching.py",
             "start = diff.int().argmax(1)[:, head_c].T  # the first position the patch changes",
             "start = diff.int().argmax(1)[:, head_c].T + 1",
             ("tests/real/test_real_patching.py::test_heads_equal_transformer_lens",),
             "all-position head patching recomputes from the first change on: equal to transformer_lens.patching"),
    Mutation("real tier: tracing noise one token off the subject", "lens_bias/locate/tracing.py",
             "out[i, a:b] = torch.randn(b - a, d, generator=gen) * scale",
             "out[i, a + 1:b + 1] = torch.randn(b - a, d, generator=gen) * scale",
             ("tests/real/test_real_locate.py::test_causal_trace_equals_restoring_hooks",),
             "ROME's noise goes on the subject's embedding"),
    Mutation("real tier: NAS log ratio flipped", "lens_bias/locate/nas.py",
             "(torch.log(att_neg + EPS) - torch.log(att_pos + EPS))", "(torch.log(att_pos + EPS) - torch.log(att_neg + EPS))",
             ("tests/real/test_real_locate.py::test_nas_equals_attention_patterns",),
             "NAS = Σ (A_Yes + A_No)·log(A_No / A_Yes), from the eager attention patterns"),
    Mutation("real tier: CRISPR without skill disentanglement", "lens_bias/locate/crispr.py",
             "b = (a_hat - lam * a_gold.clamp(min=0)).amax(0)", "b = a_hat.amax(0)",
             ("tests/real/test_real_locate.py::test_crispr_equals_autograd_through_the_chat_template",),
             "B = max_t [A_t(ŷ) − λ·relu(A_t(y))], against autograd over each option's sequence"),
    Mutation("real tier: neurons named by the pre-activation", "lens_bias/core/hooks.py",
             '"neuron": ("blocks.{}.mlp.hook_post", "neuron"),', '"neuron": ("blocks.{}.mlp.hook_pre", "neuron"),',
             ("tests/real/test_real_patching.py::test_attribution_equals_autograd",),
             "a neuron is the input of down_proj, act(gate)·up (zero ablation cannot tell: silu(0)·up = 0; attribution can)"),
    Mutation("real tier: mean ablation over padding too", "lens_bias/mitigate/ablation.py",
             "mean = (act * m).sum((0, 1)) / m.sum((0, 1))", "mean = act.mean((0, 1))",
             ("tests/real/test_real_mitigate.py::test_ablation_hooks_equal_transformers_hooks",),
             "the mean is over the reference prompts' real tokens (chat prompts of several lengths)"),
    Mutation("real tier: pruning a head's slice off by one head", "lens_bias/mitigate/prune.py",
             'out_projection(target, l, "attn")[h * d_head:(h + 1) * d_head].zero_()',
             'out_projection(target, l, "attn")[(h + 1) % target.cfg.n_heads * d_head:((h + 1) % target.cfg.n_heads + 1) * d_head].zero_()',
             ("tests/real/test_real_mitigate.py::test_pruning_exports_and_reloads",
              "tests/real/test_real_precision.py::test_half_precision_prune_exports_and_reloads"),
             "pruning a head zeroes the o_proj columns that read its z"),
    Mutation("real tier: the export saves other weights", "lens_bias/mitigate/export.py",
             "        fresh.save_pretrained(tmp)\n",
             "        [p.data.add_(0.01) for p in fresh.parameters()]\n        fresh.save_pretrained(tmp)\n",
             ("tests/real/test_real_mitigate.py::test_pruning_exports_and_reloads",),
             "plain transformers reloads the edited model's logits"),
    Mutation("real tier: LSDM asks for no change", "lens_bias/mitigate/lsdm/main.py",
             "goal = ld + (goal_final - ld) / (len(layers) - j)", "goal = ld",
             ("tests/real/test_real_mitigate.py::test_lsdm_edit_exports_and_reloads",),
             "the edit moves the bias toward zero, measured on the reloaded model"),
    Mutation("real tier: text_loss counts padded positions", "lens_bias/tasks/capability.py",
             "real = mask[:, 1:].bool()  # next tokens that are not padding", "real = torch.ones_like(mask[:, 1:]).bool()",
             ("tests/real/test_real_demo.py::test_text_loss_equals_transformers",),
             "the capability loss is over real next tokens only"),
    Mutation("real tier: the demo's proof measured against zero, not the twins", "lens_bias/apps/demo.py",
             "share = lambda ld: (base - ld) / (base - ref)", "share = lambda ld: (base - ld) / base",
             ("tests/real/test_real_demo.py::test_what_it_names_is_true",),
             "the share of the excess bias (over the neutral twins) that ablation removes, as the report says"),
    Mutation("hooks: 'neuron' names the pre-activation", "lens_bias/core/hooks.py",
             '"neuron": ("blocks.{}.mlp.hook_post", "neuron"),', '"neuron": ("blocks.{}.mlp.hook_pre", "neuron"),',
             ("tests/core/test_hooks.py",), "a neuron is the input of the MLP's output projection (CRISPR, pruning)"),
    Mutation("hooks: trace's saver runs before the patches", "lens_bias/core/hooks.py",
             "fwd_hooks=list(fwd_hooks) + [(n, saver(n)) for n in sorted(names)]",
             "fwd_hooks=[(n, saver(n)) for n in sorted(names)] + list(fwd_hooks)", ("tests/core/test_hooks.py",),
             "trace records the patched activation"),
    Mutation("hooks: stop_at does not stop", "lens_bias/core/hooks.py",
             "            if name == stop_at:\n                raise Stop", "            if name == stop_at:\n                pass",
             ("tests/core/test_hooks.py",), "nothing after stop_at is computed"),
    Mutation("hf: clone by deepcopy", "lens_bias/core/hf.py",
             '    if not hasattr(model, "original_model"):  # a plain Hugging Face model: no views to keep',
             "    if True:", ("tests/core/test_hf.py",), "a deepcopy cuts GPT-2's q/k/v views from c_attn"),
    Mutation("hf: out_projection in the module's own orientation", "lens_bias/core/hf.py",
             'return hf.weight if type(hf).__name__ == "Conv1D" else hf.weight.T', "return hf.weight",
             ("tests/core/test_hf.py",), "nn.Linear stores [out, in]: its rows are not the units"),
    Mutation("scores: top by signed effect", "lens_bias/core/scores.py",
             'df.reindex(df["effect"].abs().sort_values(ascending=False).index)',
             'df.reindex(df["effect"].sort_values(ascending=False).index)', ("tests/core/test_scores.py",),
             "top(k) is the k largest |effect|"),
    Mutation("scores: units ignore the swept layers", "lens_bias/core/scores.py",
             "                idx[0] = int(layers[idx[0]])", "                pass", ("tests/core/test_scores.py",),
             "units are (model layer, index), not rows of the swept layers"),
    Mutation("bench build: mean ablation of a head set to zero", "lens_bias/bench/recipe/ablation.py",
             'x[i * n:(i + 1) * n, :, h * d:(h + 1) * d] = 0.0 if meth == "zero" else means["z"][l, h]',
             "x[i * n:(i + 1) * n, :, h * d:(h + 1) * d] = 0.0", ("tests/bench/test_build.py",),
             "the shipped ground truth's mean ablation sets z to its mean"),
    Mutation("bench build: the truth imports the toolkit", "lens_bias/bench/recipe/forward.py",
             "import torch\n\n\nclass Hooks:", "import torch\n\nfrom ...core.files import atomic_write  # noqa: F401\n\n\nclass Hooks:",
             ("tests/bench/test_build.py",), "the truth must stay independent of what it checks"),
    Mutation("bench: carriers taken from the smallest effects", "lens_bias/bench/truth.py",
             "order = flat.argsort(descending=True)", "order = flat.argsort()", ("tests/bench",),
             "the carriers are the units with the largest positive effects"),
]


def _copy_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "lens-bias-out", ".pytest_cache")
    for name in ("lens_bias", "tests", "notebooks", "benchmarks", "pyproject.toml"):
        src = ROOT / name
        (shutil.copytree(src, dst / name, ignore=ignore) if src.is_dir() else shutil.copy2(src, dst / name))
    os.symlink(ROOT / "data", dst / "data")


def run(mutations, keep: bool = False) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="lens-bias-mutants-"))
    results = []
    try:
        _copy_tree(tmp)
        env = {**os.environ, "PYTHONPATH": str(tmp), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        for m in mutations:
            path = tmp / m.file
            original = path.read_text()
            if m.old not in original:
                results.append((m, "STALE", 0.0))
                print(f"STALE   {m.name}: snippet not found in {m.file}", flush=True)
                continue
            path.write_text(original.replace(m.old, m.new, 1))
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                                  cwd=tmp, env=env, capture_output=True, text=True)
            path.write_text(original)
            status = "caught" if proc.returncode != 0 else "MISSED"
            results.append((m, status, time.time() - t0))
            print(f"{status:<7} {m.name} ({time.time() - t0:.0f} s; {', '.join(m.tests)})", flush=True)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    caught = sum(s == "caught" for _, s, _ in results)
    print(f"\n{caught} of {len(results)} mutations caught")
    for m, s, _ in results:
        if s != "caught":
            print(f"  {s}: {m.name} — {m.why}")
    return 0 if caught == len(results) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="run the mutations whose name contains one of these strings")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(s in m.name for s in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name}  [{m.file}]  — {m.why}")
        return 0
    return run(chosen, args.keep)


if __name__ == "__main__":
    sys.exit(main())
