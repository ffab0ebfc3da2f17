"""The one generation engine: where a model (an adapter, merged or switchable, or the base model)
becomes a reply. Above model/ (loading, LoRA), below evaluate/, trainer/, serve/ and recipes/.

- sampling.py   `Sampling`, the one options type, and the samplers that read it
- text.py       `TextStream`, the one incremental detokenizer (token ids in, text deltas out)
- kv_cache.py   the static KV cache and what it needs to know of a model (`cache_keyword` too)
- decode.py     `StaticDecoder`: the one fast decode path (static cache, CUDA graphs, torch.compile)
- replies.py    batched (`generate_replies`) and streamed (`stream_reply`) replies: chat, eval, the
                training-time monitor and the compare report
- events.py     what the engine hands back (`Event`, `Usage`) and how it refuses (`RequestError`)
- rows.py       one request being generated (`Row`); the batch mode without a static cache
- continuous.py continuous batching over a `StaticDecoder`
- engine.py     `Engine`: the worker thread and queue behind serve and web, in either batch mode
"""
