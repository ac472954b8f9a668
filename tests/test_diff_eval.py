"""diff-eval: its KL and perplexities against a direct full-logits computation on a tiny Llama."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from tensorstore_llm.diff.evaluate import diff_eval, eval_text, load_tokenizer
from tensorstore_llm.io.hf_dir import HFCheckpointSource
from tensorstore_llm.testing.synth import write_model_family

pytest.importorskip("transformers")


def _tokenizer(folders: list[str]) -> None:
    """A byte-level BPE tokenizer with the tiny preset's 512 tokens, saved in each of ``folders``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tensorstore_llm.testing.finetune import heldout_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([heldout_text()[:200_000]], trainer)
    assert tok.get_vocab_size() == 512
    for folder in folders:
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffeval")
    base, ft1 = write_model_family(str(root), "tiny", finetunes=1, delta_scale=0.02)
    _tokenizer([base, ft1])
    return base, ft1


def _direct(candidate_dir, reference_dir, batches):
    """KL(p_ref || p_cand) per token and perplexities from full logits (transformers, fp32)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    cand = AutoModelForCausalLM.from_pretrained(candidate_dir, dtype=torch.float32).eval()
    kl, nll_p, nll_q, n = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for ids in batches:
            lp = torch.log_softmax(ref(input_ids=ids).logits[:, :-1].double(), -1)
            lq = torch.log_softmax(cand(input_ids=ids).logits[:, :-1].double(), -1)
            kl += float(torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="sum"))
            tgt = ids[:, 1:].unsqueeze(-1)
            nll_p -= float(lp.gather(-1, tgt).sum())
            nll_q -= float(lq.gather(-1, tgt).sum())
            n += tgt.numel()
    return kl / n, math.exp(nll_p / n), math.exp(nll_q / n)


def test_kl_matches_direct_computation(tiny):
    base, ft1 = tiny
    ref_src, cand_src = HFCheckpointSource(ft1), HFCheckpointSource(base)
    result = diff_eval(cand_src, ref_src, ref_src.files(), seq_len=48, batches=2, batch_size=3, chunk=7)
    tokenizer = load_tokenizer(ref_src.files(), "reference")
    text = eval_text(tokenizer, None, seq_len=48, batches=2, batch_size=3)
    kl, ppl_ref, ppl_cand = _direct(base, ft1, text.batches)
    assert result["tokens"] == 2 * 3 * 47
    assert kl > 1e-4                                          # the two models do differ
    assert result["kl"] == pytest.approx(kl, rel=1e-4)
    assert result["ppl_reference"] == pytest.approx(ppl_ref, rel=1e-5)
    assert result["ppl_candidate"] == pytest.approx(ppl_cand, rel=1e-5)
    # the chunking of positions does not change the result beyond rounding
    whole = diff_eval(cand_src, ref_src, ref_src.files(), seq_len=48, batches=2, batch_size=3, chunk=1000)
    assert whole["kl"] == pytest.approx(result["kl"], rel=1e-6)


def test_identical_models_have_zero_kl(tiny):
    _, ft1 = tiny
    src = HFCheckpointSource(ft1)
    result = diff_eval(src, src, src.files(), seq_len=32, batches=1, batch_size=2)
    assert result["kl"] == 0.0 and result["ppl_change"] == 0.0 and result["top1_agreement"] == 1.0


def test_cli_with_corpus_file(tiny, tmp_path):
    from tensorstore_llm_cli import cli

    base, ft1 = tiny
    corpus = tmp_path / "heldout.txt"
    corpus.write_text(" ".join(f"line {i} of held-out text about streams and tensors." for i in range(400)))
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(cli, ["--store", str(tmp_path / "store"), "diff-eval", base, "--reference", ft1,
                                      "--corpus", str(corpus), "--seq-len", "32", "--batches", "2",
                                      "--batch-size", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "KL(reference || recon)" in result.output
    body = json.loads(out.read_text())
    assert body["tokens"] == 2 * 2 * 31 and body["kl"] > 0 and body["text"] == str(corpus)


def test_cli_errors(tiny, tmp_path):
    from tensorstore_llm_cli import cli

    base, ft1 = tiny
    corpus = tmp_path / "short.txt"
    corpus.write_text("too short")
    runner = CliRunner()
    result = runner.invoke(cli, ["--store", str(tmp_path / "s"), "diff-eval", base, "--reference", ft1,
                                 "--corpus", str(corpus)])
    assert result.exit_code != 0 and "windows" in str(result.exception or result.output)
    result = runner.invoke(cli, ["--store", str(tmp_path / "s"), "diff-eval", str(tmp_path / "nope"), "--reference", ft1])
    assert result.exit_code != 0
