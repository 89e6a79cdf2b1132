"""Complete outputs: every output folder (LoRA on the tiny random model, LoRA on a local --model folder given by a
relative path, full, merged) holds the tokenizer and chat template and loads with transformers + peft from that
folder alone, in a fresh process started elsewhere; ``train chat`` replies; ``train run`` wrote its report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from padless.train.cli import main
from tests.user_errors import assert_one_line_error

from .runs import CLI_FAST

DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / "prep" / "assets" / "demo_tokenizer"
TOKENIZER = ("tokenizer.json", "tokenizer_config.json")

# Runs in a fresh interpreter: nothing of the training process (padless's patches, imported modules) is there.
_LOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = {}
    for folder in sys.argv[1:]:
        peft = __import__("os").path.isfile(folder + "/adapter_config.json")
        model = (AutoPeftModelForCausalLM if peft else AutoModelForCausalLM).from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        text = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                 min_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
        report[folder] = {"peft": peft, "new_tokens": out.shape[1] - ids.shape[1], "vocab": len(tok),
                          "prompt_tokens": ids.shape[1]}
    print(json.dumps(report))
    """
)


def _run(*args: str) -> None:
    fast = CLI_FAST if "--model" not in args else CLI_FAST[:-2]  # the model folder has the fast shape already
    res = CliRunner().invoke(main, ["run", *args, *fast, "--max-steps", "2"])
    assert res.exit_code == 0, (res.output, res.exception)


def _model_folder(folder: Path, vocab: int) -> Path:
    from padless.train.modeling import load_model

    load_model(None, vocab_size=vocab, config_overrides=json.loads(CLI_FAST[-1])).save_pretrained(folder)
    for name in TOKENIZER:
        shutil.copy(DEMO_TOKENIZER / name, folder / name)
    return folder


def _adapter_base(folder: Path) -> str:
    return json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]


@pytest.mark.slow
def test_every_output_folder_loads_alone_and_chats(
    demo_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from padless.shards.reader import open_shards

    shards = str(demo_shards)
    lora, full, merged = tmp_path / "lora", tmp_path / "full", tmp_path / "merged"
    _run(shards, "--output", str(lora))
    _run(shards, "--output", str(full), "--full")
    res = CliRunner().invoke(main, ["merge", str(lora), "--out", str(merged)])
    assert res.exit_code == 0, res.output
    # A local --model folder named by a relative path: the adapter names it by absolute path.
    monkeypatch.chdir(tmp_path)
    _model_folder(tmp_path / "model", open_shards(demo_shards).vocab_size)
    _run(shards, "--model", "model", "--output", "with_model")
    with_model = tmp_path / "with_model"

    assert _adapter_base(lora) == str((lora / "base_model").resolve())
    assert _adapter_base(with_model) == str((tmp_path / "model").resolve())
    for folder in (lora, full, merged, with_model):
        for name in TOKENIZER:  # the shards' tokenizer, byte for byte, chat template included
            assert (folder / name).read_bytes() == (DEMO_TOKENIZER / name).read_bytes(), (folder, name)
        assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    for folder in (lora, full, with_model):
        assert set(TOKENIZER) <= set(json.loads((folder / "padless-run.json").read_text())["outputs"])
    # The report train run writes at its end: a decodable PNG and the summary.
    from matplotlib.image import imread

    assert imread(str(lora / "report.png")).shape[:2] == (750, 1100)
    assert "steps: 2" in (lora / "report.txt").read_text()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADLESS_")}
    folders = [str(p) for p in (lora, full, merged, with_model)]
    proc = subprocess.run([sys.executable, "-c", _LOAD, *folders], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    vocab = open_shards(demo_shards).vocab_size
    for folder, peft in zip(folders, [True, False, False, True]):
        assert report[folder]["peft"] is peft, folder
        assert report[folder]["new_tokens"] == 4 and report[folder]["vocab"] == vocab, report[folder]
        assert report[folder]["prompt_tokens"] > 4  # the chat template wrapped the message

    for folder in (lora, full):
        res = CliRunner().invoke(main, ["chat", str(folder), "--prompt", "Name a colour.", "--max-new-tokens", "8"])
        assert res.exit_code == 0, (res.output, res.exception)
        # A 2-step model's greedy reply is mostly newlines, the demo data's most frequent token: any text will do.
        assert len(res.stdout) > len("\n"), res.stdout


def test_chat_needs_a_model_folder_with_a_tokenizer(synthetic_shards: Path, tmp_path: Path) -> None:
    line = assert_one_line_error(CliRunner().invoke(main, ["chat", str(tmp_path), "--prompt", "hi"]),
                                 r"holds neither adapter_config.json nor config.json")  # fmt: skip
    assert "train run" in line
    (tmp_path / "config.json").write_text("{}")
    assert_one_line_error(CliRunner().invoke(main, ["chat", str(tmp_path), "--prompt", "hi"]), r"holds no tokenizer")


@pytest.mark.parametrize("temperature", ["-1", "nan", "inf"])
def test_chat_temperature_must_be_a_finite_non_negative_number(temperature: str, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["chat", str(tmp_path), "--prompt", "hi", "--temperature", temperature])
    assert_one_line_error(res, rf"^error: --temperature must be >= 0 \(0 = greedy\) and finite, got {temperature}")


def test_chat_says_why_a_reply_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty reply (the model ended at once, typically a run trained on another prompt format) gets a note."""
    import padless.train.chat

    monkeypatch.setattr(padless.train.chat, "chat", lambda *args, **kwargs: "")
    result = CliRunner().invoke(main, ["chat", "any-run", "--prompt", "hi"])
    assert result.exit_code == 0
    assert "note: the model ended its reply at once" in result.stderr


def test_merge_of_a_qlora_adapter_saves_a_plain_model(tmp_path: Path) -> None:
    """A QLoRA run's random base is saved in NF4: the merge dequantizes it, adds the adapter and saves a plain model
    that computes what the adapter on its 4-bit base computes (transformers cannot save a merged 4-bit model)."""
    import torch
    from transformers import AutoModelForCausalLM

    from padless.train.adapters import apply_adapters
    from padless.train.modeling import load_model
    from padless.train.output import save_base_model, save_output

    from .tiny_models import randomize_lora

    shape = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}
    model = load_model(None, vocab_size=97, quantize_4bit=True, config_overrides=shape)
    save_base_model(model, tmp_path / "run" / "base_model")
    model = apply_adapters(model, mode="qlora", r=4)
    randomize_lora(model, std=0.05)
    save_output(model, tmp_path / "run", model_source=None)
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()

    res = CliRunner().invoke(main, ["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits.float()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


def test_merge_into_a_path_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    base = json.dumps({"base_model_name_or_path": str(tmp_path / "base")})
    (tmp_path / "adapter" / "adapter_config.json").write_text(base)
    (tmp_path / "file").write_text("mine")
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "file" / "merged")])
    assert_one_line_error(res, r"^error: --out '.*merged' lies under '.*file', which is a file; expected a folder")
    assert (tmp_path / "file").read_text() == "mine"
