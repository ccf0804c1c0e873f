"""A random-weight Qwen2 decoder for benchmarks and memory figures, with MiniLM's WordPiece
tokenizer (a decoder does not care which tokenizer feeds it; a small vocabulary keeps the
embedding table from dominating the 50M model).

    python make_decoder.py 50m|0.5b MINILM_DIR OUT_DIR
50m: hidden 512, 12 layers, 8 heads (2 key/value), MLP 1536, vocabulary 30,522: 51.8M parameters.
0.5b: Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads (2 key/value), MLP 4864, vocabulary
151,936, tied embeddings): 494M parameters. Weights in F32, seeded.
"""
import shutil
import sys

import torch
from transformers import AutoModel, Qwen2Config

size, minilm, out = sys.argv[1:4]
shape = {
    "50m": dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1536, vocab_size=30522),
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936),
}[size]
torch.manual_seed(0)
config = Qwen2Config(**shape, max_position_embeddings=4096, rope_theta=1000000.0, tie_word_embeddings=True,
                     use_sliding_window=False, pad_token_id=0, eos_token_id=102, bos_token_id=101)
model = AutoModel.from_config(config)
model.save_pretrained(out, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    try:
        shutil.copy(f"{minilm}/{f}", out)
    except FileNotFoundError:
        pass
print(sum(p.numel() for p in model.parameters()))
