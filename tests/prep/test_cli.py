"""The ``prep`` command line: light start-up (no torch), stats numbers against an independent recount, show."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from click.testing import CliRunner

from padless.prep.cli import main
from padless.prep.report import GPUS
from tests.user_errors import assert_one_line_error

from .rows import alpaca_rows, chat_rows, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def test_import_and_pack_do_not_import_torch(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(30))
    code = (
        "import sys\n"
        "import padless.prep.cli as cli\n"
        "assert 'torch' not in sys.modules, 'import padless.prep.cli pulled torch'\n"
        f"try:\n    cli.main(['pack', {str(src)!r}, '--max-len', '64', '--out', {str(tmp_path / 'o')!r},"
        " '--no-progress', '--eval-examples', '3'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'kernels')\n"
        "             or m.startswith(('padless.train', 'padless.kernels')))\n"
        "print('BAD', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "BAD []" in out.stdout
    assert (tmp_path / "o" / "manifest.json").is_file() and (tmp_path / "o" / "eval" / "manifest.json").is_file()


def test_python_dash_m_prep_help():
    out = subprocess.run([sys.executable, "-m", "padless.prep", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "pack" in out.stdout and "verify" in out.stdout


def _recount(path: Path):
    """Independent of shards.reader: read the Arrow files with pyarrow directly."""
    lens, tokens, trainable, packs = [], 0, 0, 0
    for f in sorted(path.glob("shard-*.arrow")):
        t = pa.ipc.open_file(pa.memory_map(str(f))).read_all().to_pydict()
        for ids, cu, m in zip(t["input_ids"], t["cu_seqlens"], t["loss_mask"]):
            packs += 1
            tokens += len(ids)
            trainable += sum(m)
            lens += [b - a for a, b in itertools.pairwise(cu)]
    return np.array(lens), tokens, trainable, packs


def test_stats_against_independent_recount(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(200, 3, hi=60))
    r = CliRunner().invoke(main, ["pack", str(src), "--max-len", "128", "--out", str(tmp_path / "o"), "--no-progress"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["stats", str(tmp_path / "o"), "--json", "--model-params", "1.5B", "--gpu", "h100",
                                  "--mfu", "0.5", "--epochs", "3", "--price-per-hour", "2"])  # fmt: skip
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)
    lens, tokens, trainable, packs = _recount(tmp_path / "o")
    assert (st["packs"], st["tokens"], st["trainable"], st["examples"]) == (packs, tokens, trainable, len(lens))
    assert st["fill"] == tokens / (packs * 128) and st["lower_bound_packs"] == -(-tokens // 128)
    assert st["length_percentiles"]["50"] == float(np.percentile(lens, 50))
    edges, counts = st["histogram"]["edges"], st["histogram"]["counts"]
    assert edges[0] == lens.min() and edges[-2] <= lens.max() < edges[-1] and len(counts) <= 20
    assert counts == [int(((lens >= a) & (lens < b)).sum()) for a, b in itertools.pairwise(edges)]
    # Padded batching: the same random order, brute force.
    order = np.random.default_rng(0).permutation(len(lens))
    for b in (1, 3, 8, 32):
        chunks = [lens[order[i : i + b]] for i in range(0, len(lens), b)]
        assert st["padded_tokens"][str(b)] == sum(int(c.max()) * len(c) for c in chunks)
    assert st["padded_tokens"]["1"] == tokens
    c = st["cost"]
    assert c["gpu"] == "H100"
    hours = 6 * 1.5e9 * tokens * 3 / (GPUS["H100"][0] * 1e12 * 0.5) / 3600
    assert abs(c["full_packed_gpu_hours"] - hours) < 1e-12 and abs(c["full_packed_cost"] - 2 * hours) < 1e-12
    assert abs(c["lora_packed_gpu_hours"] - hours * 4 / 6) < 1e-12
    r = CliRunner().invoke(main, ["stats", str(tmp_path / "o"), "--model-params", "1.5B"])
    assert r.exit_code == 0 and "padded batching" in r.output and "lora" in r.output


def test_show_marks_trained_tokens_and_boundaries(tmp_path):
    rows = chat_rows(10, 2)
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    r = CliRunner().invoke(main, ["pack", str(src), "--max-len", "2048", "--out", str(tmp_path / "o"), "--no-progress"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["show", str(tmp_path / "o"), "--pack", "0", "--no-color"])
    assert r.exit_code == 0, r.output
    from padless.shards.reader import open_shards

    p = open_shards(tmp_path / "o")[0]
    assert r.output.count("--- example ") == p.num_examples
    k = int(p.example_index[0])
    for m in rows[k]["messages"]:
        if m["role"] == "assistant":
            assert f"[[{m['content']}<|im_end|>\n]]" in r.output
        else:
            assert f"[[{m['content']}" not in r.output
    r = CliRunner().invoke(main, ["show", str(tmp_path / "o"), "--pack", "999"])
    assert r.exit_code == 2 and "out of range" in r.output


def test_verify_cli_exit_codes(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(50))
    CliRunner().invoke(main, ["pack", str(src), "--max-len", "64", "--out", str(tmp_path / "o"), "--no-progress"])
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "o")])
    assert r.exit_code == 0 and r.output.startswith("ok:")
    f = tmp_path / "o" / "shard-00000.arrow"
    f.write_bytes(f.read_bytes()[:-10])
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "o")])
    assert r.exit_code == 1 and "shard-00000.arrow" in r.output and "truncated" in r.output


def test_stats_help_lists_every_gpu_of_the_rate_table():
    help_text = CliRunner().invoke(main, ["stats", "--help"], terminal_width=200).output
    assert "--gpu [" + "|".join(GPUS).lower() + "]" in help_text  # any letter case: h200 or H200


def test_model_params_from_config_llama2_7b(tmp_path):
    from padless.prep.report import model_params_from_config

    cfg = {"hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 32000, "intermediate_size": 11008,
           "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert round(model_params_from_config(str(tmp_path)) / 1e6) == 6738  # Llama-2-7B: 6,738M parameters


def test_show_warns_about_another_tokenizer_by_content_not_by_file_bytes(tmp_path):
    """A copy of the tokenizer re-saved with other formatting decodes the same ids: no warning. One whose vocabulary
    differs gets the warning, saying how it differs."""
    import json

    from padless.prep.tokenizer import DEFAULT_TOKENIZER

    src = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    r = CliRunner().invoke(main, ["pack", str(src), "--max-len", "256", "--out", str(tmp_path / "o"), "--no-progress"])
    assert r.exit_code == 0, r.output
    doc = json.loads((DEFAULT_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
    for name in ("resaved", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer_config.json").write_bytes(
            (DEFAULT_TOKENIZER / "tokenizer_config.json").read_bytes()
        )
    (tmp_path / "resaved" / "tokenizer.json").write_text(json.dumps(doc, indent=4), encoding="utf-8")
    vocab = doc["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap ids
    (tmp_path / "other" / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    r = CliRunner().invoke(main, ["show", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "resaved")])
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    r = CliRunner().invoke(main, ["show", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "other")])
    assert r.exit_code == 0, r.output
    assert (
        "warning: this is not the tokenizer the shards were made with (the tokenizers differ in content (model): "
        in r.output
    )


def test_show_names_the_manifest_s_tokenizer_folder_when_it_no_longer_loads(tmp_path):
    """The folder the shards were made with still exists but lost its tokenizer.json: the error says the path came
    from the manifest and to pass --tokenizer."""
    import shutil

    from padless.prep.tokenizer import DEFAULT_TOKENIZER

    tok = tmp_path / "tok"
    shutil.copytree(DEFAULT_TOKENIZER, tok)
    src = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    r = CliRunner().invoke(main, ["pack", str(src), "--tokenizer", str(tok), "--max-len", "256",
                                  "--out", str(tmp_path / "o"), "--no-progress"])  # fmt: skip
    assert r.exit_code == 0, r.output
    (tok / "tokenizer.json").unlink()
    r = CliRunner().invoke(main, ["show", str(tmp_path / "o")])
    line = assert_one_line_error(r, rf"the shards' manifest names the tokenizer folder '{tok}', which cannot be ")
    assert line.endswith("pass --tokenizer with the tokenizer the shards were made with")
