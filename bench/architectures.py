"""The model shapes the benches build with random weights (no model hub is reachable; speed and
memory equal the real model's)."""

# Qwen1.5-7B-Chat's architecture (its config.json).
QWEN15_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu")
# The same shrunk to 2 layers, with grouped-query attention: a CPU smoke check of a decoding bench.
QWEN2_TINY = dict(QWEN15_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
