"""Generation primitives: the fast decode path against HF, batching, samplers, detokenization, stops."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from genforge.common.errors import GenforgeError
from genforge.models.fastdecode import HFRunner, LlamaRunner
from genforge.models.generation import BatchGenerator, Detokenizer, Sequence, generate, generate_many
from genforge.models.llamacore import fast_path_unsupported
from genforge.models.sampling import RowSampler, SamplingParams, sample

CORPUS = ["the quick brown fox jumps over the lazy dog", "héllo wörld, 日本語 テキスト 😀 emoji",
          "def f(x):\n    return x + 1", "stop here. END of text"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def llama_config(vocab: int = 320, **kw) -> LlamaConfig:
    args = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=0)
    return LlamaConfig(**{**args, **kw})


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(len(tok))).eval()


def byte_ids(tok, text: str) -> list[int]:
    """One token per UTF-8 byte (the byte-level alphabet), so strings span many tokens."""
    table = pre_tokenizers.ByteLevel.alphabet()
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    ids = [tok.convert_tokens_to_ids(b2u[b]) for b in text.encode("utf-8")]
    assert all(b2u[b] in table for b in text.encode("utf-8"))
    return ids


def hf_reference(model, prompts: list[list[int]], steps: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Logits of the HF forward, one sequence at a time with its DynamicCache, greedy."""
    per_step: list[list[torch.Tensor]] = [[] for _ in range(steps + 1)]
    tokens: list[list[int]] = []
    with torch.no_grad():
        for p in prompts:
            cache = DynamicCache(config=model.config)
            out = model(torch.tensor([p]), past_key_values=cache, use_cache=True).logits[0, -1]
            toks = []
            for s in range(steps + 1):
                per_step[s].append(out)
                toks.append(int(out.argmax()))
                if s < steps:
                    pos = torch.tensor([[len(p) + s]])
                    out = model(torch.tensor([[toks[-1]]]), past_key_values=cache, use_cache=True,
                                position_ids=pos).logits[0, -1]
            tokens.append(toks)
    return [torch.stack(x) for x in per_step], tokens


MODELS = {
    "llama": lambda: LlamaForCausalLM(llama_config()),
    "llama-mha-untied": lambda: LlamaForCausalLM(llama_config(num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen2-bias": lambda: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=128)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=None)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_fast_path_matches_hf_logits(name):
    torch.manual_seed(1)
    m = MODELS[name]().eval()
    assert fast_path_unsupported(m) is None
    prompts = [list(range(5, 17)), list(range(30, 33)), list(range(100, 125))]  # different lengths
    ref, ref_tokens = hf_reference(m, prompts, steps=4)
    runner = LlamaRunner(m, max_len=128, slots=2)  # slots grow on demand
    logits = runner.prefill(0, prompts)
    assert (logits - ref[0]).abs().max() < 1e-4
    toks, pos = [t[0] for t in ref_tokens], [len(p) for p in prompts]
    for s in range(1, 5):
        logits = runner.decode(toks, pos)
        assert (logits - ref[s]).abs().max() < 1e-4, f"decode step {s}"
        toks, pos = [t[s] for t in ref_tokens], [p + 1 for p in pos]


def test_cache_grows_and_compacts_outside_inference_mode(model, tok):
    runner = LlamaRunner(model, max_len=128, slots=1)
    prompts = [tok.encode(t) for t in CORPUS[:3]]
    ref = runner.prefill(0, prompts)  # grows to 4 slots inside inference mode
    assert runner.cache.slots >= 3
    runner.move(2, 0, len(prompts[2]))  # the scheduler compacts outside inference mode
    toks = [1, 1]
    pos = [len(prompts[2]), len(prompts[1])]
    again = LlamaRunner(model, max_len=128)
    again.prefill(0, [prompts[2], prompts[1]])
    assert (runner.decode(toks, pos) - again.decode(toks, pos)).abs().max() < 1e-5
    assert ref.shape[0] == 3


def test_hf_fallback_matches_fast_path(model, tok):
    prompts = [tok.encode(t) for t in CORPUS]
    fast, slow = LlamaRunner(model, max_len=128), HFRunner(model, max_len=128)
    assert (fast.prefill(0, prompts) - slow.prefill(0, prompts)).abs().max() < 1e-4
    toks, pos = [1, 2, 3, 4], [len(p) for p in prompts]
    assert (fast.decode(toks, pos) - slow.decode(toks, pos)).abs().max() < 1e-4


def test_batched_greedy_equals_one_at_a_time(model, tok):
    prompts = [tok.encode(t) for t in CORPUS]
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    alone = [[e.token_id for e in generate(model, tok, p, params)] for p in prompts]
    gen = BatchGenerator(model, tok, max_batch_size=4)
    # rows join at different steps and leave at different steps
    out: dict[int, list[int]] = {}
    seqs = [gen.new_sequence(p, SamplingParams(max_new_tokens=12 - 2 * i, temperature=0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    events = gen.add(seqs[:2])
    for step in range(20):
        if step == 2:
            events += gen.add(seqs[2:])
        for s, ev in events:
            out.setdefault(seqs.index(s), []).append(ev.token_id)
        events = gen.step()
    assert not gen.rows
    for i in range(4):
        assert out[i] == alone[i][: 12 - 2 * i]


def test_generate_many_queues_prompts_beyond_the_batch_and_keeps_their_order(model, tok):
    prompts = [tok.encode(t) for t in CORPUS]
    params = [SamplingParams(max_new_tokens=3 + 2 * i, temperature=0, ignore_eos=True) for i in range(len(prompts))]
    alone = ["".join(e.text for e in generate(model, tok, p, q)) for p, q in zip(prompts, params)]
    finished: list[int] = []
    texts = generate_many(model, tok, prompts, params, max_batch_size=2, on_finish=finished.append)
    assert texts == alone  # 4 prompts through 2 rows: the last two join as the first two finish
    assert sorted(finished) == [0, 1, 2, 3] and finished[:2] == [0, 1]  # shorter answers finish first
    assert generate_many(model, tok, [], []) == []


def test_seed_determinism_and_sampler_effects(model, tok):
    p = tok.encode(CORPUS[0])
    greedy = [e.token_id for e in generate(model, tok, p, SamplingParams(max_new_tokens=10, temperature=0,
                                                                         ignore_eos=True))]

    def run(**kw):
        params = SamplingParams(max_new_tokens=10, ignore_eos=True, **kw)
        return [e.token_id for e in generate(model, tok, p, params)]

    assert run(seed=7, temperature=1.5) == run(seed=7, temperature=1.5)
    assert run(seed=7, temperature=1.5) != run(seed=8, temperature=1.5)
    assert run(seed=3, temperature=1.0, top_k=1) == greedy
    assert run(seed=3, temperature=1.0, top_p=1e-6) == greedy
    # a random tiny model's logits are small: a penalty of 2 outweighs them, so nothing repeats
    assert len(set(run(temperature=0, presence_penalty=2.0))) == 10
    assert len(set(run(temperature=0, frequency_penalty=2.0))) == 10
    rep = run(temperature=0, repetition_penalty=1e4)
    assert len(set(rep)) == 10


def test_min_tokens_masks_eos_and_logprobs():
    vocab = 8
    logits = torch.zeros(1, vocab)
    logits[0, 0] = 10.0  # EOS is by far the likeliest
    params = SamplingParams(temperature=0, min_tokens=3, logprobs=2)
    row = RowSampler(params, [1, 2], vocab, eos_ids={0})
    picked = []
    for _ in range(4):
        toks, lps, tops = sample(logits.clone(), [row])
        row.observe(toks[0])
        picked.append(toks[0])
    assert picked[:3] != [0, 0, 0] and 0 not in picked[:3] and picked[3] == 0
    ref = torch.log_softmax(logits[0], -1)
    assert lps[0] == pytest.approx(float(ref[0]))
    assert [t for t, _ in tops[0]][0] == 0 and len(tops[0]) == 2


def test_top_k_top_p_restrict_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    # temperature 5 flattens p to ~[.27 .22 .18 .15 .12]: top_p 0.4 keeps two tokens
    for kw, allowed in (({"top_k": 2}, {0, 1}), ({"top_p": 0.4}, {0, 1})):
        seen = set()
        row = RowSampler(SamplingParams(temperature=5.0, seed=0, **kw), [], 5, set())
        for _ in range(200):
            seen.add(sample(logits, [row])[0][0])
        assert seen == allowed, kw


def _feed(seq: Sequence, ids: list[int]) -> list:
    events = []
    for t in ids:
        events.append(seq.accept(t, None, None))
        if seq.finished:
            break
    return events


def _seq(tok, **kw) -> Sequence:
    return Sequence(tok.encode("x"), SamplingParams(**kw), tok, eos_ids={tok.eos_token_id}, vocab_size=len(tok),
                    max_model_len=128)


def test_stop_string_across_token_boundaries(tok):
    events = _feed(_seq(tok, max_new_tokens=50, stop=["END"]), byte_ids(tok, "say EN, then END more"))
    texts = [e.text for e in events]
    assert "".join(texts) == "say EN, then "
    assert events[-1].finish_reason == "stop"
    assert texts[4:6] == ["", ""]  # "E", "N" held back: they could begin "END"
    # a held-back partial match is released when the request ends by length
    events = _feed(_seq(tok, max_new_tokens=4, stop=["END"]), byte_ids(tok, "abEN"))
    assert "".join(e.text for e in events) == "abEN" and events[-1].finish_reason == "length"


def test_multibyte_detokenization(tok):
    ids = byte_ids(tok, "a😀é日")
    events = _feed(_seq(tok, max_new_tokens=50), ids)
    texts = [e.text for e in events]
    assert "".join(texts) == "a😀é日"
    assert texts[1:4] == ["", "", ""] and texts[4] == "😀"
    assert not any("\ufffd" in t for t in texts)

    class SlowTokenizer:  # no Rust backend: exercises the re-decoding fallback
        def decode(self, ids, skip_special_tokens=True):
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    det = Detokenizer(SlowTokenizer(), tok.encode("hello"))
    assert det.backend is None
    assert "".join(det.step(i) for i in ids) == "a😀é日"


def test_eos_and_stop_token_ids_finish(tok):
    eos = tok.eos_token_id
    events = _feed(_seq(tok, max_new_tokens=50), byte_ids(tok, "hi") + [eos] + byte_ids(tok, "x"))
    assert [e.finish_reason for e in events] == [None, None, "stop"] and events[-1].text == ""
    events = _feed(_seq(tok, max_new_tokens=50, ignore_eos=True), byte_ids(tok, "hi") + [eos])
    assert events[-1].finish_reason is None
    stop_id = byte_ids(tok, "!")[0]
    events = _feed(_seq(tok, max_new_tokens=50, stop_token_ids=[stop_id]), byte_ids(tok, "ok!no"))
    assert "".join(e.text for e in events) == "ok" and events[-1].finish_reason == "stop"


def test_context_limit_finishes_with_length(model, tok):
    prompt = list(range(1, 120))  # context 128
    events = list(generate(model, tok, prompt, SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True)))
    assert len(events) == 9 and events[-1].finish_reason == "length"


@pytest.mark.parametrize("kw, param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"max_new_tokens": 0}, "max_tokens"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"stop": [""]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"min_tokens": 99}, "min_tokens"),
    ({"logprobs": 21}, "logprobs"), ({"seed": "x"}, "seed"), ({"temperature": float("nan")}, "temperature"),
])
def test_params_validation_names_the_field(kw, param):
    with pytest.raises(GenforgeError) as e:
        SamplingParams(**kw).validate()
    assert e.value.param == param and param in e.value.message


def test_prompt_too_long_or_bad_ids(model, tok):
    gen = BatchGenerator(model, tok, max_batch_size=1)
    with pytest.raises(GenforgeError, match="context") as e:
        gen.new_sequence(list(range(1, 200)), SamplingParams())
    assert e.value.param == "prompt"
    with pytest.raises(GenforgeError, match="vocabulary"):
        gen.new_sequence([1, 99999], SamplingParams())
    SamplingParams(top_k=-1).validate(128, 10)  # -1 and 0 = no limit
    SamplingParams(top_k=0).validate(128, 10)


@pytest.mark.slow
def test_compiled_decode_matches_hf():
    """torch.compile'd step: same logits, batch of one, rows leaving, cache growth."""
    torch.manual_seed(2)
    m = LlamaForCausalLM(llama_config()).eval()
    prompts = [list(range(5, 17)), list(range(30, 33)), list(range(100, 125))]
    ref, ref_tokens = hf_reference(m, prompts, steps=3)
    runner = LlamaRunner(m, max_len=128, slots=2, compile=True)
    assert runner.compiled
    assert (runner.prefill(0, prompts) - ref[0]).abs().max() < 1e-4
    toks, pos = [t[0] for t in ref_tokens], [len(p) for p in prompts]
    for s in range(1, 4):
        assert (runner.decode(toks, pos) - ref[s]).abs().max() < 1e-4
        toks, pos = [t[s] for t in ref_tokens], [p + 1 for p in pos]
    runner.move(2, 0, len(prompts[2]) + 3)  # only the third row is left, now in slot 0
    logits = runner.decode([ref_tokens[2][3]], [len(prompts[2]) + 3])
    full_ref, _ = hf_reference(m, prompts[2:], steps=4)
    assert logits.shape[0] == 1 and (logits - full_ref[4]).abs().max() < 1e-4


def test_moe_on_the_hf_fallback_matches_generate(tok):
    """fast=False: the HF forward, one row at a time, still serves a MoE model (the fast path's
    own MoE tests are in test_fastdecode_moe.py)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(3)
    m = MixtralForCausalLM(MixtralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        eos_token_id=0)).eval()
    assert fast_path_unsupported(m) is None
    gen = BatchGenerator(m, tok, max_batch_size=2, fast=False)
    assert isinstance(gen.runner, HFRunner)
    prompt = tok.encode(CORPUS[0])
    ours = [e.token_id for e in gen.generate(prompt, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))]
    with torch.no_grad():
        ref = m.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert ours == ref[0, len(prompt):].tolist()
