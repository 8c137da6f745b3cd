"""The data-check command, and a real GPT-2 tokenizer through SFT and DPO on real files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import shared
# A ChatML-style template without {% generation %}: the loss mask must come from prefix diffs.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _validate(*args, cwd):
    return subprocess.run([sys.executable, "-m", "alignment.validate", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_validate_reports_and_passes_clean_data(tmp_path):
    rows = [{"instruction": f"Say {w}", "input": "", "output": w} for w in ["cat", "dog", "sun", "sky"] * 10]
    (tmp_path / "sft.json").write_text(json.dumps(rows))
    out = _validate("+recipe=sft", f"data={tmp_path / 'sft.json'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(alpaca=40)" in out.stdout and "rows read 40, kept 40" in out.stdout and "data ok" in out.stdout


def test_validate_fails_on_degenerate_pairs_and_names_reasons(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "same", "rejected": "same" if i % 2 else "other"} for i in range(20)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _validate("+recipe=dpo", "dpo.init_from=/nowhere", f"dpo.data_path={tmp_path / 'pairs.jsonl'}", cwd=tmp_path)
    assert out.returncode == 1
    assert "chosen_equals_rejected=10" in out.stdout and "data.max_drop_share" in out.stdout


@pytest.mark.integration
def test_gpt2_tokenizer_through_sft_and_dpo_on_real_files(tmp_path, run_recipe):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    gpt2 = shared("tokenizers", "gpt2")
    core = ByteLevelBPETokenizer(str(gpt2 / "vocab.json"), str(gpt2 / "merges.txt"))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    assert tok("Hello")["input_ids"] == [15496]
    tok.chat_template = CHATML
    model_dir = tmp_path / "gpt2-vocab-llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, intermediate_size=64)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    _, (sft, dpo) = run_recipe(
        "sft_then_dpo", "model=hf", f"model.name_or_path={model_dir}", f"data={shared('alpaca_en_demo.json')}",
        f"dpo.data_path={shared('dpo_en_demo.json')}", "sft.max_seq_tokens=512", "dpo.max_seq_tokens=1024",
        "data.max_drop_share=0.5", "data.over_length=drop", "data.max_eval_rows=4", "eval.max_new_tokens=4",
        "sft.global_batch_size=2", "dpo.global_batch_size=2", "sft.max_steps=2", "dpo.max_steps=2", "eval.batch_size=8",
    )
    assert sft.data["format:alpaca"] == 999 and sft.data["checks"]["rows_kept"] > 800
    assert dpo.data["format:sharegpt_preference"] == 300 and dpo.data["checks"]["rows_read"] == 300
    assert "reward_accuracy" in dpo.metrics
    AutoModelForCausalLM.from_pretrained(dpo.checkpoint)
