"""LoRA adapters served over one base (serve/adapters.py, models/multilora.py).

A tiny random Llama with a word-level tokenizer ("t0".."t95", one token per word) so a completion's
logprob tokens map back to token ids one to one; four peft adapters on different projections and
ranks, their B matrices random (peft starts B at zero, which would make every adapter the base).
The reference for each adapter is peft itself: `PeftModel.from_pretrained(base, folder)`, greedy,
one sequence alone, full forward per token.
"""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import openai
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from genforge.common.errors import ConfigError, GenforgeError, RunError
from genforge.models.lm import load_lm
from genforge.models.sampling import SamplingParams
from genforge.serve.adapters import AdapterRegistry, parse_adapter_flags
from genforge.serve.engine import Engine

from .conftest import serve_in_thread
from .processes import error_lines, genforge

VOCAB = 96
NEW = 10
PROMPTS = [[5, 17, 33, 2, 71], [9, 9, 40], [60, 12, 3, 88, 41, 7, 19], [23, 55]]
# name -> (rank, target modules)
ADAPTERS = {"qv": (4, ["q_proj", "v_proj"]), "attn": (2, ["q_proj", "k_proj", "v_proj", "o_proj"]),
            "mlp": (8, ["gate_proj", "up_proj", "down_proj"]),
            "all": (4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])}


def _tiny(folder: Path, hidden: int = 64, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=0,
                      initializer_range=0.1)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    t = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="t0", unk_token="t1").save_pretrained(folder)
    return folder


def _adapter(base: Path, out: Path, r: int, targets: list[str], seed: int) -> Path:
    model = LlamaForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets,
                                                  task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.peft_config["default"].base_model_name_or_path = str(base.resolve())
    peft_model.save_pretrained(out)
    return out


def _greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(NEW):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("adapters")
    base = _tiny(root / "base")
    folders = {name: _adapter(base, root / "adapters" / name, r, targets, seed)
               for seed, (name, (r, targets)) in enumerate(ADAPTERS.items(), 1)}
    ref = {"base": [_greedy(LlamaForCausalLM.from_pretrained(base).eval(), p) for p in PROMPTS]}
    for name, folder in folders.items():
        peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), str(folder)).eval()
        ref[name] = [_greedy(peft_model, p) for p in PROMPTS]
    for name in ADAPTERS:  # the adapters must change the answers, or the test proves nothing
        assert ref[name] != ref["base"], name
    return {"root": root, "base": base, "folders": folders, "ref": ref}


def _params() -> SamplingParams:
    return SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("decode", [{}, {"prepack": True}], ids=["eager", "prepacked"])
def test_mixed_batch_equals_peft_alone(setup: dict, decode: dict) -> None:
    """Base + 4 adapters x 4 prompts queued before the engine starts: all 20 rows are admitted in one
    iteration, so every prefill and decode step mixes all five; each row's tokens equal peft's."""
    model, tok = load_lm(setup["base"], dtype=torch.float32)
    registry = AdapterRegistry(setup["folders"], model, "base", served_path=setup["base"], max_loaded=4)
    engine = Engine(model, tok, max_batch_size=24, adapters=registry, **decode)
    names = ["base", *ADAPTERS]
    streams = {(n, i): s for n in names for i, s in
               enumerate(engine.submit_many([(p, _params()) for p in PROMPTS], adapter=None if n == "base" else n))}
    with engine:
        got = {k: [ev.token_id for ev in s] for k, s in streams.items()}
    for (name, i), tokens in got.items():
        assert tokens == setup["ref"][name][i], (name, i)
    assert engine.steps == NEW - 1  # one prefill round then NEW - 1 decode steps: all rows together
    assert sorted(registry.loads.values()) == [1, 1, 1, 1]


def test_busy_slot_is_not_evicted(setup: dict) -> None:
    """One slot, two adapters at once: the second waits for the first's sequence to end (its slot is
    pinned) instead of evicting it mid-sequence; both answers are right."""
    model, tok = load_lm(setup["base"], dtype=torch.float32)
    folders = {k: setup["folders"][k] for k in ("qv", "mlp")}
    registry = AdapterRegistry(folders, model, "base", served_path=setup["base"], max_loaded=1)
    engine = Engine(model, tok, max_batch_size=4, adapters=registry)
    a = engine.submit(PROMPTS[0], _params())
    first, second = (engine.submit_many([(PROMPTS[0], _params())], adapter=n)[0] for n in ("qv", "mlp"))
    with engine:
        out = [[ev.token_id for ev in s] for s in (a, first, second)]
    assert out == [setup["ref"]["base"][0], setup["ref"]["qv"][0], setup["ref"]["mlp"][0]]
    assert registry.loads == {"qv": 1, "mlp": 1} and registry.evictions == {"qv": 1}


@pytest.fixture(scope="module")
def server(setup: dict):
    from genforge.serve.server import create_app

    app = create_app(setup["base"], served_model_name="base", dtype="float32", max_batch_size=24,
                     adapters=dict(setup["folders"]), max_loaded_adapters=4)
    with serve_in_thread(app) as live:
        yield live


def _complete(client: openai.OpenAI, model: str, prompt: list[int]) -> list[int]:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=NEW, temperature=0, logprobs=1,
                                  extra_body={"ignore_eos": True})
    assert r.model == model
    return [int(t.removeprefix("t")) for t in r.choices[0].logprobs.tokens]


def test_http_mixed_adapters_and_metrics(setup: dict, server) -> None:
    client = openai.OpenAI(base_url=server.v1, api_key="x")
    jobs = [(n, i) for n in ["base", *ADAPTERS] for i in range(len(PROMPTS))]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = dict(zip(jobs, pool.map(lambda j: _complete(client, j[0], PROMPTS[j[1]]), jobs)))
    for (name, i), tokens in got.items():
        assert tokens == setup["ref"][name][i], (name, i)
    for name in ["base", *ADAPTERS]:
        assert server.metric("genforge:adapter_requests_total", adapter=name) == len(PROMPTS)
        assert server.metric("genforge:adapter_generation_tokens_total", adapter=name) == len(PROMPTS) * NEW
    assert server.metric("genforge:adapter_loads_total") == 4
    assert server.metric("genforge:adapters_loaded") == 4

    # the chat route and a stream answer as the adapter too, under its name
    chat = client.chat.completions.create(model="mlp", messages=[{"role": "user", "content": "t5 t6"}],
                                          max_tokens=4, temperature=0)
    assert chat.model == "mlp" and chat.choices[0].message.content
    text = client.completions.create(model="attn", prompt=PROMPTS[1], max_tokens=NEW, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    chunks = list(client.completions.create(model="attn", prompt=PROMPTS[1], max_tokens=NEW, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert {c.model for c in chunks} == {"attn"} and "".join(c.choices[0].text for c in chunks) == text

    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"base", *ADAPTERS}
    assert all(cards[n].model_extra["parent"] == "base" and cards[n].model_extra["root"] == "base" for n in ADAPTERS)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt=[1, 2], max_tokens=2)
    assert e.value.code == "model_not_found" and "'qv'" in e.value.message


def test_lru_eviction_reloads_from_disk(setup: dict) -> None:
    """max 2 in memory, 3 adapters used in turn: every request misses, evicts the oldest idle one,
    reloads from disk, and still answers exactly."""
    from genforge.serve.server import create_app

    folders = {k: setup["folders"][k] for k in ("qv", "attn", "mlp")}
    app = create_app(setup["base"], served_model_name="base", dtype="float32", adapters=folders,
                     max_loaded_adapters=2)
    with serve_in_thread(app) as live:
        client = openai.OpenAI(base_url=live.v1, api_key="x")
        for name in ["qv", "attn", "mlp"] * 2:
            assert _complete(client, name, PROMPTS[2]) == setup["ref"][name][2], name
        assert live.metric("genforge:adapter_loads_total") == 6
        assert live.metric("genforge:adapter_evictions_total") == 4
        assert live.metric("genforge:adapters_loaded") == 2


def test_bad_adapters_refused_at_start(setup: dict, tmp_path: Path) -> None:
    root = setup["root"]
    other = _tiny(tmp_path / "other", hidden=32, seed=1)
    wrong = _adapter(other, tmp_path / "wrong", 4, ["q_proj", "v_proj"], 9)
    r = genforge("serve", str(setup["base"]), "--adapter", f"wrong={wrong}", "--port", "1")
    assert r.returncode == 2, r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "wrong" in lines[0] and str(other) in lines[0] and str(setup["base"]) in lines[0]

    model, _ = load_lm(setup["base"], dtype=torch.float32)
    # the recorded base says "this one" but the shapes say otherwise: the shape check names the matrix
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(setup["base"].resolve())
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunError, match=r"does not fit the base .*/base: .*lora_A is \[4, 32\], the base needs \[4, 64\]"):
        AdapterRegistry({"wrong": wrong}, model, "base", served_path=setup["base"])
    with pytest.raises(RunError, match="adapter gone: .* does not exist"):
        AdapterRegistry({"gone": root / "missing"}, model, "base", served_path=setup["base"])
    with pytest.raises(RunError, match="not a peft adapter folder"):
        AdapterRegistry({"plain": setup["base"]}, model, "base", served_path=setup["base"])
    with pytest.raises(GenforgeError, match="expected NAME=PATH"):
        parse_adapter_flags(["nameonly"], None)
    assert parse_adapter_flags([], str(root / "adapters")) == {n: root / "adapters" / n for n in sorted(ADAPTERS)}


def test_adapters_over_a_moe_base_are_refused_with_the_fix():
    from genforge.models.fastdecode import LlamaRunner
    from tests.models.test_fastdecode_moe import mixtral

    model = mixtral()
    registry = AdapterRegistry({}, model, "base", served_path=None)
    with pytest.raises(ConfigError, match="mixture-of-experts base.*genforge merge"):
        registry.attach(LlamaRunner(model, max_len=64), model)
