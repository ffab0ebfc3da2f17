"""The memory and speed plan: its arithmetic against hand-computed values, the batching replay,
data.batch_tokens=auto choosing within a memory budget, and the `chatlora plan` command."""

from __future__ import annotations

import pytest

from chatlora.config.schema import LoraSettings, parse_gib
from chatlora.errors import ConfigError
from chatlora.plan.arch import from_config
from chatlora.plan.batches import Batching, Samples, simulate
from chatlora.plan.memory import GiB, NF4_BYTES, Setup, estimate, layer_bytes_per_token
from chatlora.plan.plan import choose, make_plan
from chatlora.plan.speed import find_gpu
from conftest import tiny_config

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_arch(r: int = 4):
    """conftest's tiny Llama: hidden 32, 2 layers, 4 heads of 8, 2 kv heads, intermediate 64, vocab 259."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return from_config(config, LoraSettings(r=r, target_modules="all-linear"))


def qwen7b_arch():
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                         intermediate_size=11008, vocab_size=151936, tie_word_embeddings=False)
    return from_config(config, LoraSettings(r=8, target_modules=ALL))


def test_tiny_architecture_counts():
    a = tiny_arch()
    # per layer: q 32x32, k 16x32, v 16x32, o 32x32, gate/up/down 3 x 32x64 = 9216; 2 layers
    assert a.layer_linear == 2 * 9216
    # + embeddings and head 2 x 259 x 32, norms 2 x 2 x 32 + 32
    assert a.params == 2 * 9216 + 2 * 259 * 32 + 5 * 32
    assert a.lora == 2 * 2048  # conftest's TINY_TRAINABLE
    assert a.lora_inputs == 6 * 32 + 64  # q, k, v, o, gate, up read 32 wide; down 64
    assert (a.heads, a.kv_heads, a.head_dim) == (4, 2, 8)


def test_qwen7b_architecture_counts():
    a = qwen7b_arch()
    assert a.params == 7_721_324_544
    assert a.lora == 19_988_480
    # bf16 weights: 14.38 GiB; a layer keeps 20h + 8I bytes per token without dropout (166 KiB)
    assert a.params * 2 / GiB == pytest.approx(14.382, abs=1e-3)
    assert layer_bytes_per_token(a, Setup(dropout=False)) == 20 * 4096 + 8 * 11008
    assert layer_bytes_per_token(a, Setup(dropout=True)) == 20 * 4096 + 8 * 11008 + 3 * (6 * 4096 + 11008)


def test_memory_arithmetic_without_checkpointing():
    a = tiny_arch()
    m = estimate(a, Setup(dropout=True, checkpointing=False), tokens=100, trained=40)
    per_layer = 2 * 4 * 32 + 2 * (32 + 4 * 4 * 8) + 2 * (32 + 4 * 64) + 3 * 256  # = 1920
    assert layer_bytes_per_token(a, Setup()) == per_layer == 1920
    assert m.weights == a.params * 2
    assert m.adapter == 4096 * (4 + 4 + 8 + 2)  # fp32 weight, grad, 2 Adam states, autocast's bf16 copy
    assert m.kept == 2 * 1920 * 100 + (2 + 4) * 32 * 100 + 8 * 32 * 40
    assert (m.transient, m.transient_is) == (12 * 259 * 40, "output layer chunk")
    assert m.peak == m.weights + m.adapter + m.kept + m.transient


def test_memory_arithmetic_with_checkpointing_and_4bit():
    a = tiny_arch()
    m = estimate(a, Setup(dropout=True, checkpointing=True, quant="nf4"), tokens=100, trained=40)
    assert m.weights == pytest.approx(a.layer_linear * NF4_BYTES + (a.params - a.layer_linear) * 2)
    assert m.kept == 2 * 2 * 32 * 100 + (2 + 4) * 32 * 100 + 8 * 32 * 40  # each layer keeps its input only
    # one layer recomputed + its backward + one de-quantized weight
    assert (m.transient, m.transient_is) == (1920 * 100 + 2 * (3 * 64 + 2 * 32) * 100 + 2 * 32 * 64, "layer backward")


def test_qwen7b_matches_the_h200_measurements():
    """bench/results/train_speed-h200-2026-11-27.json's peaks at the passes the bench ran (16 samples,
    ~1,100-1,400 tokens; 128 samples in <= 8,192-token passes), within 15%."""
    a = qwen7b_arch()
    seed = estimate(a, Setup(dropout=True), 1300, 450).peak / GiB
    preset = estimate(a, Setup(dropout=True, checkpointing=True), 1300, 450).peak / GiB
    throughput = estimate(a, Setup(dropout=False), 8188, 2641).peak / GiB
    assert seed == pytest.approx(24.9, rel=0.15)
    assert preset == pytest.approx(15.9, rel=0.15)
    assert throughput == pytest.approx(59.4, rel=0.15)
    four_bit = estimate(a, Setup(dropout=True, checkpointing=True, quant="nf4"), 1300, 450).peak / GiB
    assert four_bit < 10


def test_batches_replay_the_collators():
    same = Samples([10] * 8, [4] * 8)
    packed = simulate(same, Batching(samples_per_step=4, per_pass=4, packing=True, budget=25, steps=6))
    assert (packed.largest.tokens, packed.largest.trained, packed.passes_per_step) == (20, 8, 2.0)
    assert packed.real_tokens_per_step == 40 and packed.trained_tokens_per_step == 16
    whole = simulate(same, Batching(4, 4, True, None, 6))
    assert (whole.largest.tokens, whole.passes_per_step) == (40, 1.0)
    mixed = Samples([5, 50], [1, 20])
    padded = simulate(mixed, Batching(2, 2, packing=False, budget=None, steps=3))
    assert padded.largest.tokens == 100  # both padded to the longest
    assert padded.positions_per_step == 100 and padded.real_tokens_per_step == 55


def test_the_plan_batches_the_global_batch_as_training_splits_it(tiny_model_dir, tmp_path, monkeypatch):
    """distributed.samples_per_step is the step, on one process or split over several (WORLD_SIZE)."""
    from chatlora.plan.plan import batching_of

    cfg = tiny_config(tiny_model_dir, tmp_path, "distributed.samples_per_step=12", "training.max_steps=-1",
                      "training.num_train_epochs=1", "training.per_device_train_batch_size=4")
    samples = Samples([10] * 24, [4] * 24)
    one = batching_of(cfg, samples)
    assert (one.samples_per_step, one.per_pass, one.steps, one.processes) == (12, 4, 2, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    two = batching_of(cfg, samples)
    assert (two.samples_per_step, two.per_pass, two.steps, two.processes) == (6, 3, 2, 2)  # 3 x 2 per process


def test_parse_gib():
    assert parse_gib("24GiB") == 24
    assert parse_gib("24GB") == pytest.approx(24e9 / 2**30)
    assert parse_gib(80) == 80
    assert parse_gib("512MiB") == 0.5
    with pytest.raises(ConfigError, match="not a memory size"):
        parse_gib("lots")


def test_find_gpu():
    assert find_gpu("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert find_gpu("NVIDIA H200").bf16_tflops == 989
    assert find_gpu("h100 pcie").name == "H100 PCIe"
    assert find_gpu("NVIDIA GeForce RTX 4090").memory_gib == 24
    assert find_gpu("Voodoo 2") is None


def _cfg(tiny_model_dir, tmp_path, *overrides):
    return tiny_config(tiny_model_dir, tmp_path, "training.per_device_train_batch_size=4",
                       "training.gradient_accumulation_steps=2", "training.max_steps=20", *overrides)


def test_auto_picks_within_the_memory_budget(tiny_model_dir, tmp_path):
    a = tiny_arch()
    samples = Samples([30, 60, 90, 120, 45, 75, 100, 20] * 4, [10, 20, 30, 40, 15, 25, 33, 7] * 4)
    cfg = _cfg(tiny_model_dir, tmp_path, "data.batch_tokens=auto", "training.gradient_checkpointing=auto")
    free, why = choose(cfg, a, samples, None, None)
    assert not free.setup.checkpointing and "no memory limit" in why
    # no limit: one pass per step (the smallest budget that gives it)
    assert free.stats.passes_per_step == 1 and free.batching.budget >= free.stats.largest.tokens
    tried = [make_plan(cfg, a, samples, None, None, budget=b, checkpointing=c)
             for b in (128, 256, 512, 1024) for c in (False, True)]
    needs = sorted(p.memory.card_need for p in tried)
    for limit in needs:
        plan, why = choose(cfg, a, samples, None, limit / GiB + 1e-9)
        assert plan.memory.card_need <= limit + 1
        assert f"data.batch_tokens={plan.batching.budget}" in why
    with pytest.raises(ConfigError, match="nothing fits"):
        choose(cfg, a, samples, None, needs[0] / GiB * 0.99)


def test_auto_checkpointing_alone_keeps_the_budget(tiny_model_dir, tmp_path):
    a = tiny_arch()
    samples = Samples([64] * 40, [20] * 40)
    cfg = _cfg(tiny_model_dir, tmp_path, "data.batch_tokens=256", "training.gradient_checkpointing=auto")
    off = make_plan(cfg, a, samples, None, None, checkpointing=False)
    on = make_plan(cfg, a, samples, None, None, checkpointing=True)
    assert on.memory.peak < off.memory.peak
    plan, _ = choose(cfg, a, samples, None, (on.memory.card_need + off.memory.card_need) / 2 / GiB)
    assert plan.setup.checkpointing and plan.batching.budget == 256
    plan, _ = choose(cfg, a, samples, None, off.memory.card_need / GiB + 0.01)
    assert not plan.setup.checkpointing


def test_speed_estimate_counts_the_recompute():
    from chatlora.plan.speed import estimate_speed, step_flops

    a = qwen7b_arch()
    stats = simulate(Samples([1000] * 4, [300] * 4), Batching(1, 1, True, None, 4))
    plain, model = step_flops(a, stats, Setup())
    ckpt, model2 = step_flops(a, stats, Setup(checkpointing=True))
    assert model == model2 == plain
    assert ckpt - plain == pytest.approx(2 * a.layer_linear * 1000 + 2 * 1000**2 * 4096 * 32)
    h200 = find_gpu("h200")
    assert estimate_speed(a, stats, Setup(), h200).real_tokens_per_s > estimate_speed(a, stats, Setup(checkpointing=True), h200).real_tokens_per_s


def test_config_rejects_bad_auto_values(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="batch_tokens"):
        _cfg(tiny_model_dir, tmp_path, "data.batch_tokens=lots")
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        _cfg(tiny_model_dir, tmp_path, "training.gradient_checkpointing=maybe")
    with pytest.raises(ConfigError, match="packing"):
        _cfg(tiny_model_dir, tmp_path, "data.batch_tokens=auto", "data.packing=false")
    with pytest.raises(ConfigError, match="quantize"):
        _cfg(tiny_model_dir, tmp_path, "model.quantize=int3")


def test_train_resolves_auto_and_records_the_choice(tiny_model_dir, tmp_path):
    from chatlora.recipes.train import train

    lines: list[str] = []
    cfg = _cfg(tiny_model_dir, tmp_path, "data.batch_tokens=auto", "training.gradient_checkpointing=auto",
               "training.max_steps=2", "plan.gpu_mem=8GiB")
    run = train(cfg, lines.append)
    chose = [line for line in lines if line.startswith("auto chose")]
    assert chose and "training.gradient_checkpointing=false" in chose[0]
    assert any("peak GPU memory" in line for line in lines)
    saved = run.load_config()
    assert isinstance(saved.data.batch_tokens, int) and saved.training["gradient_checkpointing"] is False


def test_unset_checkpointing_is_auto_on_a_gpu_and_off_on_a_cpu(tiny_model_dir, tmp_path):
    """No training.gradient_checkpointing: planning for a GPU, the plan decides it (on only when the
    step would not fit); on a CPU it stays unset, as TrainingArguments has it (off)."""
    from chatlora.model.source import resolve
    from chatlora.plan.batches import Samples
    from chatlora.plan.entry import plan_for

    samples = Samples([64] * 40, [20] * 40)
    cfg = _cfg(tiny_model_dir, tmp_path, "data.batch_tokens=256")
    source = resolve(cfg.model)
    on_cpu, _ = plan_for(cfg, source, samples, lambda _line: None, on_gpu=False)
    assert "gradient_checkpointing" not in on_cpu.training
    off = make_plan(cfg, tiny_arch(), samples, None, None, checkpointing=False).memory.card_need
    on = make_plan(cfg, tiny_arch(), samples, None, None, checkpointing=True).memory.card_need
    for mem, want in (((on + off) / 2, True), (off * 1.5, False)):
        lines: list[str] = []
        chosen, _ = plan_for(_cfg(tiny_model_dir, tmp_path, "data.batch_tokens=256", f"plan.gpu_mem={mem / GiB}"),
                             source, samples, lines.append)
        assert chosen.training["gradient_checkpointing"] is want
        assert any(line.startswith(f"auto chose training.gradient_checkpointing={str(want).lower()}") for line in lines), lines
