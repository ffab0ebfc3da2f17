"""A run leaves Python: merged into a standalone transformers model (merged.py), converted to GGUF by
llama.cpp's own converter (converter.py), quantized by llama.cpp's quantizer and described by its
metadata (gguf.py), checked against the merged model in llama.cpp itself (check.py), and handed to
Ollama and llama-server (modelfile.py). recipes/merge.py and recipes/export.py are the commands."""
