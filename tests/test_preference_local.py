"""A local model as the demo's policy: the trainable set (the input embedding whatever its name, or a pattern) is
checked as soon as the policy loads, and a directory whose tokenizer is missing or does not fit the model is refused
by name."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import save_local_model
from helpers import tiny_gpt2

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("vaderSentiment")

from zokern import cli  # noqa: E402
from zokern.preference import pipeline  # noqa: E402
from zokern.preference.data import WordTokenizer  # noqa: E402
from zokern.preference.local import load_local  # noqa: E402
from zokern.preference.loop import LoopConfig  # noqa: E402


def test_the_default_trainable_set_is_the_input_embedding_whatever_its_name():
    from zokern.preference.data import WordTokenizer
    from zokern.preference.models import new_policy
    from zokern.preference.trainable import select_trainable
    from zokern.preference.trainable import trainable_names

    gpt2 = tiny_gpt2(20)
    assert trainable_names(gpt2, None) == ["transformer.wte.weight"]
    opt = new_policy(WordTokenizer.build(["a b c"]), hidden=16, layers=1, heads=2)
    assert trainable_names(opt, None) == ["model.decoder.embed_tokens.weight"]  # lm_head is tied to it
    assert trainable_names(gpt2, "") == [n for n, _ in gpt2.named_parameters()]
    params = select_trainable(gpt2, r"h\.0\.attn\.c_proj")
    chosen = [n for n, p in gpt2.named_parameters() if p.requires_grad]
    assert chosen == ["transformer.h.0.attn.c_proj.weight", "transformer.h.0.attn.c_proj.bias"] and len(params) == 2
    with pytest.raises(ValueError, match=r"trainable='\[' is not a regular expression"):
        trainable_names(gpt2, "[")
    with pytest.raises(ValueError, match=r"no parameter of the policy matches trainable='embed_tokens'; .*wte"):
        trainable_names(gpt2, "embed_tokens")


def _stub_training(monkeypatch, seen):
    """The pipeline without its slow stages (first-order reward-model training, the loop, the plots): what reaches
    them is recorded."""
    from zokern.preference.trainable import trainable_names

    def train_reward_model(reward_model, *args, **kwargs):
        seen["reward model trained"] = True
        return [0.0] * 10

    def loop(method, policy, reward_model, tokenizer, train, heldout, judge, config, log, recorder):
        seen["trained"] = trainable_names(policy, config.trainable)
        record = dict(method=method, step=0, forwards=0, seconds=0.0, reward=0.0)
        log(record)
        return [record]

    monkeypatch.setattr(pipeline, "train_reward_model", train_reward_model)
    monkeypatch.setattr(pipeline, "run", loop)
    monkeypatch.setattr(pipeline, "plot_rewards", lambda records, path: None)
    monkeypatch.setattr(pipeline, "make_plots", lambda out: out / "viz" / "index.html")


def test_demo_trains_a_gpt2_policys_input_embedding_by_default(tmp_path, monkeypatch, capsys):
    save_local_model(tmp_path / "gpt2", kind="gpt2")
    seen = {}
    _stub_training(monkeypatch, seen)
    argv = ["demo", "--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "run"), "--methods", "mezo"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert seen["trained"] == ["transformer.wte.weight"]
    assert "trainable: transformer.wte.weight" in capsys.readouterr().out


def test_demo_checks_the_trainable_set_before_any_training(tmp_path, monkeypatch, capsys):
    save_local_model(tmp_path / "gpt2", kind="gpt2")
    seen = {}
    _stub_training(monkeypatch, seen)
    argv = ["demo", "--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "run"), "--trainable", "decoder"]
    assert cli.main(argv) == 2
    assert "no parameter of the policy matches trainable='decoder'" in capsys.readouterr().err
    assert "reward model trained" not in seen
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_demo_checks_the_models_positions_before_training_the_reward_model(tmp_path, monkeypatch, capsys):
    # A position table too short for the responses failed only when the loop started, after the reward model's
    # training.
    save_local_model(tmp_path / "short", kind="gpt2", positions=8)
    seen = {}
    _stub_training(monkeypatch, seen)
    argv = ["demo", "--model", str(tmp_path / "short"), "--out", str(tmp_path / "run"), "--methods", "mezo"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "short: a response of 12 tokens leaves no room for a prompt in the model's 8 positions" in err, err
    assert "reward model trained" not in seen


def test_demo_of_a_local_model_keeps_a_hugging_face_tokenizer_in_out_and_refuses_the_model_directory(
    tmp_path, monkeypatch, capsys
):
    """A run of a local model writes no tokenizer.json: it removes the demo's own from an earlier run, not the user's
    (it deleted the model's, with --out the model directory, which then no longer loaded)."""
    save_local_model(tmp_path / "gpt2", kind="gpt2")
    _stub_training(monkeypatch, {})
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    argv = ["demo", "--model", str(tmp_path / "gpt2"), "--out", str(run), "--methods", "mezo"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert json.loads((run / "tokenizer.json").read_text())["version"] == "1.0"
    WordTokenizer.build(["a b c"]).save(run / "tokenizer.json")  # as an earlier demo run of its own policy left it
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert not (run / "tokenizer.json").exists()
    before = sorted(p.name for p in (tmp_path / "gpt2").iterdir())
    argv = ["demo", "--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "gpt2"), "--methods", "mezo"]
    assert cli.main(argv) == 2
    assert "is the --model directory" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "gpt2").iterdir()) == before


def test_loop_config_defaults_to_the_input_embedding():
    assert LoopConfig().trainable is None


def test_a_model_directory_without_a_tokenizer_is_refused_by_name(tmp_path):
    save_local_model(tmp_path / "weights_only", tokenizer=False)
    with pytest.raises(ValueError, match=r"--model .*weights_only: no usable tokenizer"):
        load_local(tmp_path / "weights_only")


def test_a_tokenizer_larger_than_the_embedding_is_refused_by_name(tmp_path):
    tokenizer = save_local_model(tmp_path / "small", embedding_rows=6)
    assert len(tokenizer) > 6
    with pytest.raises(ValueError, match=r"--model .*small: the tokenizer's ids reach \d+ but the model's input "
                                         r"embedding has 6 rows"):  # fmt: skip
        load_local(tmp_path / "small")


def test_a_damaged_weights_file_or_a_file_for_a_directory_is_refused_by_name(tmp_path):
    # A damaged safetensors file raised safetensors' own error type: a traceback where one line was promised.
    save_local_model(tmp_path / "damaged", kind="gpt2")
    (tmp_path / "damaged" / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"--model .*damaged: cannot load a causal LM and its tokenizer from it"):
        load_local(tmp_path / "damaged")
    (tmp_path / "a_file").write_text("weights?")
    with pytest.raises(FileNotFoundError, match=r"--model .*a_file: a file, not a directory"):
        load_local(tmp_path / "a_file")


def test_an_encoder_is_refused_as_not_causal(tmp_path):
    # A saved BertModel loaded as a causal LM (BertLMHeadModel, attending both ways), trained the reward model, then
    # failed in sampling with a shape error.
    save_local_model(tmp_path / "bert", kind="bert")
    with pytest.raises(ValueError, match=r"--model .*bert: not a causal language model .*BertLMHeadModel"):
        load_local(tmp_path / "bert")


def test_a_matching_local_model_loads(tmp_path):
    save_local_model(tmp_path / "ok", kind="gpt2")
    policy, reward_model, tokenizer = load_local(tmp_path / "ok")
    assert tokenizer.encode("the weather was fine") and max(tokenizer.tokenizer.get_vocab().values()) < 128
    assert isinstance(policy.get_input_embeddings(), torch.nn.Embedding)


def test_the_reward_models_fresh_head_comes_from_the_seed(tmp_path):
    """The score head is initialised from torch's global generator: from the seed, not from the process's state."""
    save_local_model(tmp_path / "ok", kind="gpt2")
    heads = []
    for global_seed, seed in ((1, 0), (2, 0), (1, 3)):
        torch.manual_seed(global_seed)
        _, reward_model, _ = load_local(tmp_path / "ok", seed=seed)
        heads.append(reward_model.score.weight.detach().clone())
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
