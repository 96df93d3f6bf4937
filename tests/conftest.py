"""Shared fixtures: random-weight models of real families (with the shipped GPT-2 tokenizer), the shipped
organism, the shipped data sets. Nothing here reads outside the repository: a clone tests itself."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
GPT2_TOKENIZER = DATA / "tokenizers" / "gpt2"
DATASETS = DATA / "datasets"

# OMP_NUM_THREADS, when set, wins: on a loaded machine two threads per process oversubscribe the cores and a
# report run takes 15× longer (5 s → 76 s measured); otherwise two threads at most
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit()
                      else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    """The real GPT-2 tokenizer, shipped in data/tokenizers/gpt2."""
    return GPT2_TOKENIZER


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """The shipped data sets (data/datasets: professions, WinoBias, Winogender, BBQ, StrategyQA, GSM8K)."""
    return DATASETS


def _random_dir(tmp_path_factory, family, tok_dir, **kw):
    from lens_bias.core import save_random_model

    return save_random_model(family, tmp_path_factory.mktemp(family), tok_dir, **kw)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, gpt2_tokenizer_dir):
    """Random GPT-2: 2 layers, d_model 64, 4 heads, real GPT-2 tokenizer."""
    return _random_dir(tmp_path_factory, "gpt2", gpt2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, gpt2_tokenizer_dir):
    """Random Llama with GQA: 2 layers, d_model 64, 4 query heads, 2 KV heads."""
    return _random_dir(tmp_path_factory, "llama", gpt2_tokenizer_dir, n_kv_heads=2)


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir):
    from lens_bias.core import load_model

    return load_model(tiny_gpt2_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from lens_bias.core import load_model

    return load_model(tiny_llama_dir, device="cpu")


@pytest.fixture(scope="session")
def organism():
    """The shipped model organism (planted biases; ground truth in its card)."""
    from lens_bias.core import load_model

    return load_model("organism", device="cpu")


@pytest.fixture(scope="session")
def organism_control():
    """The organism's control: the same base model without the planted components."""
    from lens_bias.core import load_model

    return load_model("organism-control", device="cpu")


@pytest.fixture(scope="session")
def organism_card():
    from lens_bias.organism import load_card

    return load_card("organism")


@pytest.fixture(scope="session")
def browser():
    """check(path, widths=(1400,)): open an HTML page in headless Chromium, offline (lens_bias.core.browser),
    assert that it runs without a console error and that every plotly figure div holds a rendered plot, and
    save a screenshot per width next to the page (PAGE-1400px.png); returns the PageCheck. For any test that
    writes figures (the locate report, the demo): call it after the test's own assertions. Where no Chromium is
    installed it skips the test there, saying why (.ci/run installs Debian's chromium)."""
    from lens_bias.core.browser import check_page, find_chromium, screenshot

    def check(path, widths=(1400,), height=900):
        if find_chromium() is None:
            pytest.skip("no chromium on PATH, so pages cannot be opened in a browser (install it: apt-get install -y "
                        "chromium; .ci/run does)")
        path = Path(path)
        res = check_page(path)
        assert res.figures, f"{path.name}: no plotly figure div in the page"
        assert not res.errors, f"{path.name}: the browser reported {res.errors}"
        assert not res.blank, f"{path.name}: {len(res.blank)} of {len(res.figures)} figures did not render: {res.blank}"
        for w in widths:
            screenshot(path, path.with_name(f"{path.stem}-{w}px.png"), w, height)
        return res

    return check


#: SmolLM2-135M-Instruct's chat template (ChatML with a default system turn)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="session")
def chatml_tokenizer_dir(tmp_path_factory, gpt2_tokenizer_dir):
    """The GPT-2 tokenizer made into a chat tokenizer as SmolLM2's: bos_token = the chat-turn marker
    <|im_start|> (never added by the tokenizer), eos = pad = <|im_end|>, its ChatML chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir))
    tok.add_special_tokens({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"})
    tok.chat_template = CHATML_TEMPLATE
    path = tmp_path_factory.mktemp("chatml_tok")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory, chatml_tokenizer_dir):
    """Random Llama (GQA) with the ChatML tokenizer: an instruct model's conventions on a tiny model."""
    from lens_bias.core import load_model

    return load_model(_random_dir(tmp_path_factory, "llama", chatml_tokenizer_dir, n_kv_heads=2), device="cpu")
