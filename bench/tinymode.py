"""--tiny: the config overrides that swap SmolLM2 for the random tiny model (tests, smoke runs).

The tiny-debug model (configs/tiny-debug.yaml) with the byte tokenizer, one small training
file, and byte-sized buckets; a bench's own --set overrides come after these and win.
"""

TINY_OVERRIDES = [
    "model.path=random", "model.tokenizer=bytes", "model.quant=nf4", "model.dtype=float32",
    "model.tiny.vocab=259", "model.tiny.hidden=64", "model.tiny.layers=2", "model.tiny.heads=4",
    "model.tiny.kv_heads=2", "model.tiny.intermediate=128",
    "data.train=[{path: data/commonsense_train/boolq/train.json, limit: 48}]",
    "data.cutoff_len=512", "data.buckets=[512]", "data.val_size=8",
    "train.batch_size=4", "train.warmup_steps=1", "train.eval_batches=1",
]
