"""lm-evaluation-harness against `jaxembed serve`, as evaluation users run it: its
`local-completions` model over the completions route, on a task defined here from local JSON
files (no hub), with both request kinds a harness sends.

- `loglikelihood` (a multiple-choice task): lm-eval sends each context plus choice as token ids
  with `echo`, `logprobs: 1` and `max_tokens: 1`, and sums the prompt tokens' log-probabilities
  past the context. Each sum must match transformers' on the same weights within 1e-3, and its
  greedy flag must be transformers'.
- `generate_until`: greedy generations, cut at the task's stop string, must equal transformers'
  greedy ones cut the same way.

The model is a tiny random Llama (safetensors and its tokenizer, which lm-eval loads itself).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import families as F
import numpy as np
import pytest
import torch

from jaxembed import EngineBuilder
from jaxembed.server.app import create_app

from live import serve_in_thread

LL_ATOL = 1e-3  # per request, absolute, float32
TIE_GAP = 1e-3  # the reference's top-2 logit gap below which greedy may pick either
NEW_TOKENS = 8
STOP = "."

QUESTIONS = [
    {"question": "The cat sat on the", "choices": [" mat", " moon", " table top"], "answer": 0},
    {"question": "Water boils at one hundred", "choices": [" degrees", " cats"], "answer": 0},
    {"question": "She opened the door and", "choices": [" left", " sang a song", " slept"],
     "answer": 1},
]
PROMPTS = [{"prompt": "Once upon a time", "target": "x"},
           {"prompt": "The quick brown fox jumps", "target": "x"},
           {"prompt": "In the beginning there was", "target": "x"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Any, str]]:
    from transformers import AutoModelForCausalLM

    folder = F.build_family("llama", tmp_path_factory.mktemp("lm_eval") / "llama", seed=11)
    # lm-eval loads the tokenizer itself, through transformers: it needs the config too.
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512}))
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    engine = EngineBuilder(model=folder, dtype="float32", warmup=False, progress=False,
                           compilation_cache=False, max_num_seqs=4, max_model_len=512).build()
    try:
        with serve_in_thread(create_app(engine)) as url:
            yield folder, reference, url
    finally:
        engine.shutdown()


def _tasks(root: Path) -> Path:
    """Two tasks over local JSON lines: one of each request kind."""
    (root / "choice.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (root / "gen.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "choice.yaml").write_text(
        f"task: local_choice\n{common}dataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'choice.jsonl'}\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    (root / "gen.yaml").write_text(
        f"task: local_gen\n{common}dataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'gen.jsonl'}\noutput_type: generate_until\n"
        "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\ntarget_delimiter: ''\n"
        f"generation_kwargs:\n  until: ['{STOP}']\n  max_gen_toks: {NEW_TOKENS}\n"
        "  do_sample: false\n  temperature: 0\nmetric_list:\n  - metric: exact_match\n")
    return root


def _reference_loglikelihood(reference: Any, context: list[int], continuation: list[int]
                             ) -> tuple[float, bool]:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        lp = torch.log_softmax(reference(ids).logits[0].double(), -1)
    n = len(context)
    rows = lp[n - 1 : n - 1 + len(continuation)]
    picked = rows[torch.arange(len(continuation)), torch.tensor(continuation)]
    return float(picked.sum()), bool((rows.argmax(-1) == torch.tensor(continuation)).all())


def _reference_greedy(reference: Any, tok: Any, prompt: str) -> str:
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
    logits = torch.stack(out.logits)[:, 0].float()
    top2 = logits.topk(2, -1).values
    assert bool(((top2[:, 0] - top2[:, 1]) > TIE_GAP).all()), "a near tie: pick other prompts"
    # Special tokens are left out of the text, as the server (and vLLM) does by default.
    text = tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    return text.split(STOP)[0]


def test_lm_eval_matches_transformers(model, tmp_path: Path, monkeypatch) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    folder, reference, url = model
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    tasks = _tasks(tmp_path)
    out = simple_evaluate(
        model="local-completions",
        model_args=f"model=default,base_url={url}/completions,tokenizer={folder},"
                   "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,"
                   "max_retries=1,max_length=512",
        tasks=["local_choice", "local_gen"], task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True, batch_size=1, random_seed=0, numpy_random_seed=0,
        torch_random_seed=0, fewshot_random_seed=0)
    tok = AutoTokenizer.from_pretrained(folder)

    # loglikelihood: every (context, choice) request.
    samples = out["samples"]["local_choice"]
    diffs, requests = [], 0
    for s in samples:
        for args, resp in zip(s["arguments"], s["resps"], strict=True):
            context, choice = args[0], args[1]
            ours_ll, ours_greedy = resp[0]
            ctx = tok(context)["input_ids"]
            cont = tok(context + choice)["input_ids"][len(ctx):]
            ref_ll, ref_greedy = _reference_loglikelihood(reference, ctx, cont)
            diffs.append(abs(float(ours_ll) - ref_ll))
            assert bool(ours_greedy) == ref_greedy
            requests += 1
    assert requests == sum(len(q["choices"]) for q in QUESTIONS)
    assert max(diffs) <= LL_ATOL, f"log-likelihoods differ by up to {max(diffs):.3g}"

    # generate_until: greedy, cut at the stop string.
    samples = out["samples"]["local_gen"]
    assert len(samples) == len(PROMPTS)
    for s in samples:
        prompt = s["arguments"][0][0]
        assert s["resps"][0][0] == _reference_greedy(reference, tok, prompt)
    print(f"lm-eval: {requests} loglikelihood requests, largest difference "
          f"{max(diffs):.2e}; {len(samples)} generations equal")
    assert np.isfinite(diffs).all()
